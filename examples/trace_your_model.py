"""The cross-task gradient trace of your own model: a small Flax NNX transformer and a linen MLP.

    python examples/trace_your_model.py

An NNX model gets the lean engine: every nnx.Linear, nnx.LinearGeneral, nnx.Einsum and nnx.Embed call is captured with
Flax's own `sow` / `perturb` under `nnx.capture`, and per-example gradients are built from each call's input and output
gradient. Norm scales are formed whole (they are small); a module type the trace does not know is formed whole too,
with a warning, until you `trace.register` a rule for it (the last part below). A linen model or any function of a
params pytree gets the reference engine (`jax.vmap(jax.grad)` per chunk). Each result is checked here against a loop
of `jax.grad`, one example at a time.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

from factrecall_jax import analysis, stacking, trace

VOCAB, WIDTH, DEPTH = 50, 32, 2


class Block(nnx.Module):
    """Pre-norm causal self-attention and an MLP. Logical axis names on the weights are optional; with them, and
    blocks stacked by nnx.vmap under the axis name "layers", the trace reports per-layer dot products and `analysis`
    counts per layer, head and neuron."""

    def __init__(self, rngs: nnx.Rngs):
        named = lambda init, *names: nnx.with_partitioning(init, names, eager_sharding=False)  # noqa: E731
        self.norm = nnx.LayerNorm(WIDTH, scale_init=named(nnx.initializers.ones, "embed"),
                                  bias_init=named(nnx.initializers.zeros, "embed"), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=4, in_features=WIDTH, decode=False, use_bias=False, rngs=rngs,
            kernel_init=named(nnx.initializers.lecun_normal(), "embed", "heads", None),  # q, k, v: [D, N, H]
            out_kernel_init=named(nnx.initializers.lecun_normal(), "heads", None, "embed"))  # out: [N, H, D]
        self.up = nnx.Linear(WIDTH, 4 * WIDTH, kernel_init=named(nnx.initializers.lecun_normal(), "embed", "mlp"),
                             bias_init=named(nnx.initializers.zeros, "mlp"), rngs=rngs)
        self.down = nnx.Linear(4 * WIDTH, WIDTH, kernel_init=named(nnx.initializers.lecun_normal(), "mlp", "embed"),
                               bias_init=named(nnx.initializers.zeros, "embed"), rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.attn(h, mask=nnx.make_causal_mask(x[..., 0]))
        return x + self.down(jax.nn.gelu(self.up(h)))


class Transformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, WIDTH, rngs=rngs)

        @nnx.split_rngs(splits=DEPTH)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: stacking.LAYER_AXIS})
        def blocks(rngs):
            return Block(rngs)

        self.blocks = blocks(rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)

    def __call__(self, ids):
        run = nnx.scan(lambda x, block: (block(x), None), in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        return self.head(run(self.embed(ids), self.blocks)[0])


def next_token_loss(model, example):
    """One example's loss, written for one example: {"inputs", "targets", "weights"} of one row [T]."""
    logits = model(example["inputs"][None])[0]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, example["targets"])
    return jnp.sum(losses * example["weights"]) / jnp.sum(example["weights"])


def rows(rng, n, length):
    ids = rng.integers(0, VOCAB, (n, length + 1)).astype(np.int32)
    weights = np.zeros((n, length), np.float32)
    weights[:, -2:] = 1.0  # the loss on the last two tokens: "the fact"
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": weights}


def loop_pair_dots(loss, params, bio, qa):
    """g_bio_i . g_qa_i from jax.grad, one pair at a time: what the trace must equal."""
    grad = jax.jit(jax.grad(loss))
    dots = []
    for i in range(len(bio["inputs"])):
        g_b, g_q = (grad(params, jax.tree.map(lambda x: x[i], batch)) for batch in (bio, qa))
        dots.append(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_q))))
    return np.array(dots)


def check(name, result, expected):
    error = np.max(np.abs(np.asarray(result.pair_dot) - expected)) / np.max(np.abs(expected))
    print(f"{name}: pair_dot of {len(expected)} pairs equals a loop of jax.grad to {error:.1e} (relative)")
    assert error < 1e-4, error


def main():
    rng = np.random.default_rng(0)
    bio, qa = rows(rng, 8, 12), rows(rng, 8, 6)  # pair i: bio[i] <-> qa[i]; any pytree with a leading pair axis

    # An NNX model: pass the module and a loss written over it.
    model = Transformer(nnx.Rngs(0))
    result = trace.cross_task_trace(next_token_loss, model, bio, qa, chunk_size=4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    check("nnx transformer", result,
          loop_pair_dots(lambda p, ex: next_token_loss(nnx.merge(graphdef, p, rest), ex), params, bio, qa))
    print(f"  per-layer pair dots {result.layer_pair_dot.shape}, mean BIO-QA cosine "
          f"{analysis.gradient_consistency(result)['mean']:.3f}")
    mask = analysis.shared_parameters(result, top_fraction=0.05)  # a boolean tree like the parameters
    print(f"  shared parameters (top 5% by both tasks): {analysis.module_counts(mask)['total']['count']}; "
          f"per head of each layer: {analysis.head_counts(mask)['heads'].tolist()}")
    stats = trace.pair_statistics(next_token_loss, model, bio, qa, chunk_size=4)  # the dots alone, cheaper
    print(f"  pair_statistics agrees: {np.allclose(stats.pair_dot, result.pair_dot, rtol=1e-4, atol=1e-8)}")

    # A linen model (or any function of a params pytree): the reference engine.
    class MLP(linen.Module):
        @linen.compact
        def __call__(self, ids):
            x = linen.Embed(VOCAB, WIDTH)(ids)
            return linen.Dense(VOCAB)(jax.nn.relu(linen.Dense(2 * WIDTH)(x)))

    linen_params = MLP().init(jax.random.key(0), bio["inputs"][:1])["params"]

    def linen_loss(params, example):
        return next_token_loss(lambda ids: MLP().apply({"params": params}, ids), example)

    check("linen MLP", trace.cross_task_trace(linen_loss, linen_params, bio, qa, chunk_size=4),
          loop_pair_dots(linen_loss, linen_params, bio, qa))

    # A module type of your own: formed whole (with a warning) until you register how its gradient factors.
    class Gate(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(WIDTH))

        def __call__(self, x):
            return x * self.w[...]

    class Gated(nnx.Module):
        def __init__(self, rngs):
            self.embed, self.gate, self.head = nnx.Embed(VOCAB, WIDTH, rngs=rngs), Gate(), nnx.Linear(
                WIDTH, VOCAB, rngs=rngs)

        def __call__(self, ids):
            return self.head(self.gate(self.embed(ids)))

    # g_w = sum over positions of x * dy: two operands that share the parameter's axis and sum the positions
    trace.register(Gate, trace.Rule(params=("w",), terms=lambda module, method, x, dy: {
        "w": [trace.Term("...d,...d->d", (x, dy))]}))
    gated = Gated(nnx.Rngs(1))
    graphdef, params, rest = nnx.split(gated, nnx.Param, ...)
    check("your own module type", trace.cross_task_trace(next_token_loss, gated, bio, qa, chunk_size=4),
          loop_pair_dots(lambda p, ex: next_token_loss(nnx.merge(graphdef, p, rest), ex), params, bio, qa))


if __name__ == "__main__":
    main()
