"""The gradient trace against a float64 Python loop of jax.grad, one pair at a time: a user's NNX models (blocks in an
nnx.List named `layers` with mixed widths, blocks stacked by nnx.vmap and run by nnx.scan), a linen model, a plain-JAX
function, and the library's Llama (GQA, tied) and GPT-NeoX; both engines and pair_statistics; bad inputs."""
import dataclasses
import warnings

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from factrecall_jax import errors, models, stacking, trace
from factrecall_jax.trace import xla

RTOL = 1e-5
VOCAB = 40


def _batch(rng, n, length, vocab, left_pad=False):
    """Rows of random tokens; each padded to a random length (right, or left with an attention mask), sparse weights."""
    ids = rng.integers(1, vocab, (n, length + 1)).astype(np.int32)
    lengths = rng.integers(3, length + 1, n)
    real = np.arange(length)[None, :] < lengths[:, None]
    if left_pad:
        real = real[:, ::-1]
    weights = (real & (rng.random((n, length)) < 0.5)).astype(np.float32)
    weights[np.arange(n), np.argmax(real, axis=1)] = 1.0  # every example has a loss token
    batch = {"inputs": np.where(real, ids[:, :-1], 0), "targets": np.where(real, ids[:, 1:], 0), "weights": weights}
    if left_pad:
        batch["attention_mask"] = real.astype(np.int32)
    return batch


def _loop(loss_of_params, params, bio, qa):
    """The trace's fields from per-example gradients computed one by one in float64 and summed in numpy."""
    stacked = stacking.stacked_leaves(params)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
        grad = jax.jit(jax.grad(loss_of_params))
        n = len(jax.tree.leaves(bio)[0])
        sums = [[np.zeros(x.shape) for x in jax.tree.leaves(params)] for _ in range(3)]
        pairs = {k: [] for k in trace.PairStatistics.__dataclass_fields__}
        for i in range(n):
            b, q = ([np.asarray(g, np.float64) for g in jax.tree.leaves(grad(params64, jax.tree.map(
                lambda x: x[i], t)))] for t in (bio, qa))
            for k, (gb, gq) in enumerate(zip(b, q)):
                sums[0][k] += np.abs(gb)
                sums[1][k] += np.abs(gq)
                sums[2][k] += gb * gq
            for name, (x, y) in {"pair_dot": (b, q), "bio_sq_norm": (b, b), "qa_sq_norm": (q, q)}.items():
                pairs[name].append(sum(np.vdot(u, v) for u, v in zip(x, y)))
                pairs["layer_" + name].append(sum((u * v).reshape(len(u), -1).sum(axis=1)
                                                  for u, v, s in zip(x, y, stacked) if s))
    layers = stacking.num_layers(params)
    pairs = {k: np.array(v) if not k.startswith("layer_") or layers else np.zeros((n, 0)) for k, v in pairs.items()}
    return sums, pairs


def _assert_matches(result, expected):
    """The trace's sums and per-pair fields (a PairStatistics has the per-pair fields only) against the loop's."""
    sums, pairs = expected
    for name, tree_sums in zip(("bio_abs", "qa_abs", "cross"), sums):
        if not hasattr(result, name):
            continue
        scale = max(np.abs(want).max() for want in tree_sums)  # normwise: a leaf whose gradient is 0 (a key bias,
        for path_x, want in zip(jax.tree_util.tree_flatten_with_path(getattr(result, name))[0], tree_sums):  # under
            path, got = path_x  # softmax) is rounding noise in both
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale,
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")
    for name, want in pairs.items():
        got = np.asarray(getattr(result, name))
        assert got.shape == want.shape, (name, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(np.abs(want).max(initial=0), 1e-30),
                                   err_msg=name)


# ---------------------------------------------------------------------------------------------------------------------
# A researcher's own models
# ---------------------------------------------------------------------------------------------------------------------

def _annotated(init, *names):
    return nnx.with_partitioning(init, names, eager_sharding=False)


class Block(nnx.Module):
    """Pre-norm causal self-attention (nnx.MultiHeadAttention: LinearGeneral q, k, v, out) and an MLP (nnx.Linear);
    a projection when the width changes. `annotate` gives every parameter logical axis names."""

    def __init__(self, d_in: int, d_out: int, rngs: nnx.Rngs, annotate: bool = False):
        names = (lambda init, *n: _annotated(init, *n)) if annotate else (lambda init, *n: init)
        self.norm = nnx.LayerNorm(d_in, scale_init=names(nnx.initializers.ones, "embed"),
                                  bias_init=names(nnx.initializers.zeros, "embed"), rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d_in, qkv_features=d_in, decode=False,
                                           kernel_init=names(nnx.initializers.lecun_normal(), "embed", "heads", None)
                                           if annotate else nnx.initializers.lecun_normal(), rngs=rngs)
        self.up = nnx.Linear(d_in, 2 * d_out, kernel_init=names(nnx.initializers.lecun_normal(), "embed", "mlp"),
                             bias_init=names(nnx.initializers.normal(0.1), "mlp"), rngs=rngs)
        self.down = nnx.Linear(2 * d_out, d_out, kernel_init=names(nnx.initializers.lecun_normal(), "mlp", "embed"),
                               rngs=rngs)
        self.skip = nnx.Linear(d_in, d_out, use_bias=False, rngs=rngs) if d_in != d_out else nnx.data(None)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.attn(h, mask=nnx.make_causal_mask(x[..., 0]))
        return (x if self.skip is None else self.skip(x)) + self.down(jax.nn.gelu(self.up(h if self.skip is None
                                                                                           else x)))


class ListModel(nnx.Module):
    """Blocks of different widths in an nnx.List named `layers` (no stacking: no per-layer fields)."""

    def __init__(self, rngs: nnx.Rngs, widths=(16, 16, 24)):
        self.embed = nnx.Embed(VOCAB, widths[0], rngs=rngs)
        self.layers = nnx.List([Block(a, b, rngs) for a, b in zip(widths, widths[1:])])
        self.head = nnx.Linear(widths[-1], VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)


class StackedModel(nnx.Module):
    """Blocks stacked by nnx.vmap (their axis named "layers") and run by nnx.scan; an RMSNorm and a tied head."""

    def __init__(self, rngs: nnx.Rngs, depth: int = 3, width: int = 16):
        self.embed = nnx.Embed(VOCAB, width, embedding_init=_annotated(nnx.initializers.normal(0.5), "vocab", "embed"),
                               rngs=rngs)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: stacking.LAYER_AXIS})
        def make(rngs):
            return Block(width, width, rngs, annotate=True)

        self.blocks = make(rngs)
        self.norm = nnx.RMSNorm(width, rngs=rngs)

    def __call__(self, ids):
        body = nnx.scan(lambda x, block: (block(x).astype(x.dtype), None), in_axes=(nnx.Carry, 0),
                        out_axes=(nnx.Carry, 0))
        return self.embed.attend(self.norm(body(self.embed(ids), self.blocks)[0]))


def token_loss(model, example):
    """A user's per-example loss: weighted next-token cross-entropy of one row."""
    logits = model(example["inputs"][None])[0]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, example["targets"])
    return jnp.sum(losses * example["weights"]) / jnp.sum(example["weights"])


def _module_loop(model, loss, bio, qa):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return _loop(lambda p, ex: loss(nnx.merge(graphdef, p, rest), ex), params, bio, qa)


@pytest.mark.parametrize("name", ["list", "stacked"])
def test_a_users_nnx_model_equals_a_float64_loop(name):
    model = ListModel(nnx.Rngs(0)) if name == "list" else StackedModel(nnx.Rngs(0))
    rng = np.random.default_rng(1)
    bio, qa = _batch(rng, 5, 9, VOCAB), _batch(rng, 5, 4, VOCAB)
    expected = _module_loop(model, token_loss, bio, qa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module type of these models has a rule: no warning
        lean = trace.cross_task_trace(token_loss, model, bio, qa, chunk_size=2)
    _assert_matches(lean, expected)
    _assert_matches(trace.pair_statistics(token_loss, model, bio, qa, chunk_size=3), expected)
    _assert_matches(trace.cross_task_trace(token_loss, model, bio, qa, method="reference", chunk_size=5), expected)
    layers = 3 if name == "stacked" else 0  # an nnx.List has no stacked axis: no per-layer fields, never wrong ones
    assert lean.layer_pair_dot.shape == (5, layers)


def test_linen_and_plain_jax_take_the_reference_path():
    class MLP(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(3)(jnp.tanh(linen.Dense(8)(x)))

    rng = np.random.default_rng(2)
    batch = lambda n: {"x": rng.normal(size=(n, 5)).astype(np.float32),  # noqa: E731
                       "y": rng.normal(size=(n, 3)).astype(np.float32)}
    bio, qa = batch(6), batch(6)
    linen_params = MLP().init(jax.random.key(0), bio["x"][:1])["params"]

    def linen_loss(params, example):
        return jnp.sum((MLP().apply({"params": params}, example["x"]) - example["y"]) ** 2)

    plain_params = {"w": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}

    def plain_loss(params, example):
        return jnp.sum(jnp.tanh(example["x"] @ params["w"] + params["b"]) * example["y"])

    for loss, params in ((linen_loss, linen_params), (plain_loss, plain_params)):
        expected = _loop(loss, params, bio, qa)
        _assert_matches(trace.cross_task_trace(loss, params, bio, qa, chunk_size=4), expected)
        _assert_matches(trace.pair_statistics(loss, params, bio, qa, chunk_size=4), expected)


MODELS = {
    "llama_gqa": models.LlamaConfig.tiny(),
    "llama_tied": models.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                     initializer_range=0.1),
    "pythia": models.GPTNeoXConfig.tiny(),
}


@pytest.mark.parametrize("name, left_pad", [("llama_gqa", False), ("llama_tied", False), ("pythia", True)])
def test_the_librarys_models_equal_a_float64_loop(name, left_pad, monkeypatch):
    config = MODELS[name]
    model = models.from_config(config, seed=1)
    rng = np.random.default_rng(0)
    n = 7  # not a multiple of the chunk size
    bio, qa = _batch(rng, n, 12, config.vocab_size, left_pad), _batch(rng, n, 6, config.vocab_size, left_pad)
    expected = _module_loop(model, trace.lm_loss, bio, qa)
    _assert_matches(trace.cross_task_trace(trace.lm_loss, model, bio, qa, chunk_size=3), expected)
    _assert_matches(trace.pair_statistics(trace.lm_loss, model, bio, qa, chunk_size=4), expected)
    if name == "llama_tied":  # every parameter contracted pair by pair, as on a CPU at scale: the tied embedding's
        monkeypatch.setattr(xla, "SMALL", 0)  # lookup rows added into its head gradient
        _assert_matches(trace.cross_task_trace(trace.lm_loss, model, bio, qa, chunk_size=4, group=1), expected)
    if name == "llama_gqa":
        _assert_matches(trace.cross_task_trace(trace.lm_loss, model, bio, qa, method="reference"), expected)


def test_the_trace_sees_the_facts_tokens_only():
    """Weights select the loss tokens: zero weights outside them make gradients independent of other targets."""
    config = MODELS["llama_gqa"]
    model = models.from_config(config, seed=2)
    rng = np.random.default_rng(1)
    bio, qa = _batch(rng, 4, 8, config.vocab_size), _batch(rng, 4, 5, config.vocab_size)
    changed = dict(bio, targets=np.where(bio["weights"] > 0, bio["targets"], (bio["targets"] + 1) % config.vocab_size))
    a, b = (trace.cross_task_trace(trace.lm_loss, model, x, qa, chunk_size=4) for x in (bio, changed))
    np.testing.assert_array_equal(a.pair_dot, b.pair_dot)


# ---------------------------------------------------------------------------------------------------------------------
# The registry: rules of one's own, modules without one, modules that run twice
# ---------------------------------------------------------------------------------------------------------------------

class Gate(nnx.Module):
    """y = x * w elementwise: a module type the registry does not know."""

    def __init__(self, width: int):
        self.w = nnx.Param(jnp.linspace(0.5, 1.5, width))

    def __call__(self, x):
        return x * self.w[...].reshape((1,) * (x.ndim - 1) + (-1,))


class GatedModel(nnx.Module):
    """A Gate, and one nnx.Linear run twice (weight sharing)."""

    def __init__(self, rngs: nnx.Rngs, width: int = 8):
        self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
        self.gate = Gate(width)
        self.shared = nnx.Linear(width, width, rngs=rngs)
        self.head = nnx.Linear(width, VOCAB, rngs=rngs)

    def __call__(self, ids):
        x = self.gate(self.embed(ids))
        return self.head(self.shared(jnp.tanh(self.shared(x))))


def test_unknown_and_repeated_modules_are_formed_whole_with_a_warning_and_registered_rules_factor(monkeypatch):
    model = GatedModel(nnx.Rngs(3))
    rng = np.random.default_rng(4)
    bio, qa = _batch(rng, 4, 6, VOCAB), _batch(rng, 4, 5, VOCAB)
    expected = _module_loop(model, token_loss, bio, qa)
    with pytest.warns(UserWarning) as caught:
        _assert_matches(trace.cross_task_trace(token_loss, model, bio, qa, chunk_size=2), expected)
    messages = {str(w.message) for w in caught}
    assert any(m.startswith("trace: no gradient rule for test_trace.Gate (parameters w)") for m in messages), messages
    assert any(m.startswith("trace: module shared (flax.nnx.nn.linear.Linear) runs 2 times per example")
               for m in messages), messages

    calls = []

    def gate_terms(module, method, x, dy):  # g_w = sum over positions of x * dy: factorable with w as a batch axis
        calls.append(method)
        return {"w": [trace.Term("...d,...d->d", (x, dy))]}

    monkeypatch.setattr(trace.rules, "_REGISTRY", dict(trace.rules._REGISTRY))
    trace.register(Gate, trace.Rule(params=("w",), terms=gate_terms))
    assert trace.rule_for(Gate).terms is gate_terms
    _assert_matches(trace.cross_task_trace(token_loss, model, bio, qa, chunk_size=4), expected)
    _assert_matches(trace.pair_statistics(token_loss, model, bio, qa, chunk_size=4), expected)
    assert calls  # the rule was used
    with pytest.raises(ValueError, match="is not an nnx.Module subclass"):
        trace.register(int, trace.DIRECT)


# ---------------------------------------------------------------------------------------------------------------------
# Bad input, named before anything runs
# ---------------------------------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused_with_a_message_naming_them():
    model = ListModel(nnx.Rngs(0))
    rng = np.random.default_rng(5)
    bio, qa = _batch(rng, 3, 5, VOCAB), _batch(rng, 3, 4, VOCAB)
    cases = [
        (dict(dtype=jnp.int32), "dtype=int32 is invalid: expected a floating dtype"),
        (dict(method="exact"), "method='exact' is invalid: expected one of lean, reference"),
        (dict(chunk_size=0), "chunk_size=0 is invalid: expected a positive integer"),
        (dict(chunk_size=4, group=3), "group=3 is invalid: expected a divisor of chunk_size=4"),
    ]
    for kwargs, message in cases:
        with pytest.raises(errors.InvalidValue, match=message):
            trace.cross_task_trace(token_loss, model, bio, qa, **kwargs)
    with pytest.raises(errors.InvalidValue, match=r"bio_batch\[inputs\] is a list: pass arrays"):
        trace.cross_task_trace(token_loss, model, dict(bio, inputs=bio["inputs"].tolist()), qa)
    with pytest.raises(errors.InvalidValue, match=r"bio_batch\[scale\] is a scalar: every leaf needs a leading pair"):
        trace.cross_task_trace(token_loss, model, dict(bio, scale=np.float32(2)), qa)
    with pytest.raises(errors.InvalidValue, match=r"one non-zero leading pair axis; got .*qa_batch\[inputs\]: 2"):
        trace.cross_task_trace(token_loss, model, bio, jax.tree.map(lambda x: x[:2], qa))
    with pytest.raises(errors.InvalidValue, match=r"per_example_loss returned a tuple of 2: return the scalar loss"):
        trace.cross_task_trace(lambda m, ex: (token_loss(m, ex), 0.0), model, bio, qa)
    with pytest.raises(errors.InvalidValue, match=r"per_example_loss returned float32\[5, 40\]: expected a floating"):
        trace.cross_task_trace(lambda m, ex: m(ex["inputs"][None])[0], model, bio, qa)
    broken = ListModel(nnx.Rngs(0))
    broken.layers[1].up.kernel[...] = broken.layers[1].up.kernel[...].at[0, 0].set(jnp.nan)
    with pytest.raises(errors.InvalidValue, match=r"parameter layers.1.up.kernel has non-finite values"):
        trace.cross_task_trace(token_loss, broken, bio, qa)
    with pytest.raises(errors.InvalidValue, match=r"parameter step has dtype int32: every parameter is differentiated"):
        trace.cross_task_trace(lambda p, ex: jnp.sum(p["w"]), {"w": np.ones(2, np.float32), "step": np.int32(3)},
                               bio, qa)


def test_stacked_leaves_must_agree_on_their_layers():
    params = nnx.State({"a": nnx.Param(jnp.ones((3, 2)), out_sharding=("layers", None), eager_sharding=False),
                        "b": nnx.Param(jnp.ones((4, 2)), out_sharding=("layers", None), eager_sharding=False)})
    with pytest.raises(errors.InvalidValue, match="parameter b stacks 4 layers but a stacks 3"):
        stacking.stacked_leaves(params)
    late = nnx.State({"a": nnx.Param(jnp.ones((3, 2)), out_sharding=(None, "layers"), eager_sharding=False)})
    with pytest.raises(errors.InvalidValue, match="parameter a has its 'layers' axis at position 1"):
        stacking.stacked_leaves(late)


def test_combine_is_the_weighted_sum_and_save_load_round_trips(tmp_path):
    params = nnx.split(models.from_config(MODELS["llama_gqa"]), nnx.Param)[1]
    rng = np.random.default_rng(3)

    def random_result():
        tree = lambda: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)  # noqa: E731
        pairs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(5,)] * 3 + [(5, 2)] * 3]
        return trace.TraceResult(*pairs, bio_abs=tree(), qa_abs=tree(), cross=tree())

    r1, r2 = random_result(), random_result()
    combined = trace.combine([r1, r2], [0.5, 2.0])
    for x, a, b in zip(jax.tree.leaves(combined), jax.tree.leaves(r1), jax.tree.leaves(r2)):
        np.testing.assert_allclose(x, 0.5 * a + 2.0 * b, rtol=1e-6)
    trace.save(combined, str(tmp_path / "trace.safetensors"), {"steps": "[1, 2]"})
    loaded, metadata = trace.load(str(tmp_path / "trace.safetensors"), params)
    assert metadata == {"steps": "[1, 2]"}
    assert jax.tree.structure(loaded.cross) == jax.tree.structure(params)  # axis metadata comes back with the tree
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(combined)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="one weight per result"):
        trace.combine([r1], [1.0, 2.0])
    other = nnx.split(models.from_config(dataclasses.replace(MODELS["llama_gqa"], hidden_size=32)), nnx.Param)[1]
    with pytest.raises(ValueError, match="does not match the model: bio_abs of embed_tokens.embedding has shape"):
        trace.load(str(tmp_path / "trace.safetensors"), other)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a trace")
    with pytest.raises(ValueError, match="is not a trace"):
        trace.load(str(tmp_path / "garbage.safetensors"), params)


def test_importing_the_trace_and_analysis_pulls_no_heavy_dependency():
    import subprocess
    import sys
    code = ("import sys, factrecall_jax.trace, factrecall_jax.analysis; print(sorted(m for m in "
            "('transformers', 'datasets', 'orbax', 'matplotlib', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
