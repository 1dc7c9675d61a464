"""Time and peak memory of the gradient trace against one training step, the reference path and PyTorch's
per-example gradient tools, on one model (random weights of a named size, a checkpoint, or a user's NNX model).

Every variant sees the same `pairs` BIO and `pairs` QA rows of `seq_len` random tokens of the model's vocabulary
(every target weighted):
  train step: train.make_train_step (AdamW) on the 2 x pairs rows as one batch (a user's model: its own AdamW step);
  lean: trace.jit_trace in chunks of `chunk_size` pairs (per-example gradients from the modules' taps);
  pair stats: trace.jit_pair_statistics (the per-pair dot products and norms alone, from Gram products of the taps);
  reference: trace.jit_trace(method="reference"): jax.vmap(jax.grad) over all pairs, compiled always, run where its
    compiled peak fits;
  torch.func and opacus: torch_peers on the same weights in transformers.
The pair dots of every variant are checked against the lean trace's, relative to |g_bio| |g_qa|.
"""
import math
import os
import tempfile
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from factrecall_jax import configuration, errors, models, trace, train
from factrecall_jax.benchmarks import measure, torch_peers
from factrecall_jax.trace import engine

# name -> Llama shape (besides the config's own, "default").
SIZES = {"30m": dict(num_hidden_layers=6, hidden_size=512, vocab_size=12288),
         "100m": dict(num_hidden_layers=12, hidden_size=768, vocab_size=16384),
         "1b": dict(num_hidden_layers=16, hidden_size=2048, vocab_size=32000)}
USER_SIZE = "user10m"  # a UserTransformer
# The lean trace's parts, by the name scopes of its ops (the first that matches); REST is what lies between them
# (batch gathers, the sums' updates), and in the train step the whole step.
PARTS = ((engine.CONTRACT_SCOPE, "per-example gradients, their sums and dots"), (engine.DOTS_SCOPE, "Gram dots"),
         (engine.TAPS_SCOPE, "forward and backward"))
REST = "everything else"
TORCH_PEERS = ("torch.func", "opacus")


class UserTransformer(nnx.Module):
    """A transformer as a researcher writes it with Flax NNX (no stacking, no scan, no axis names): pre-LayerNorm
    blocks of causal attention and a GELU MLP, all nnx.Linear, in an nnx.List; an nnx.Embed and an nnx.Linear head."""

    def __init__(self, vocab: int = 8192, width: int = 256, depth: int = 8, heads: int = 4, *, rngs: nnx.Rngs):
        self.heads = heads
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.blocks = nnx.List([nnx.Dict(
            norm1=nnx.LayerNorm(width, rngs=rngs), q=nnx.Linear(width, width, rngs=rngs),
            k=nnx.Linear(width, width, rngs=rngs), v=nnx.Linear(width, width, rngs=rngs),
            o=nnx.Linear(width, width, rngs=rngs), norm2=nnx.LayerNorm(width, rngs=rngs),
            up=nnx.Linear(width, 4 * width, rngs=rngs), down=nnx.Linear(4 * width, width, rngs=rngs))
            for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs)

    def __call__(self, ids_BT):
        x = self.embed(ids_BT)
        b, t, d = x.shape
        causal = jnp.tril(jnp.ones((t, t), bool))
        for blk in self.blocks:
            h = blk["norm1"](x)
            q, k, v = (blk[n](h).reshape(b, t, self.heads, d // self.heads) for n in "qkv")
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
            attn = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            x = x + blk["o"](jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, t, d))
            x = x + blk["down"](jax.nn.gelu(blk["up"](blk["norm2"](x))))
        return self.head(self.norm(x))


def user_loss(model, example):
    """The per-example loss a user writes for one row: trace.example_loss of its logits."""
    return trace.example_loss(model(example["inputs"][None])[0], example)


def _user_train_step(graphdef, rest):
    """The user's own jitted AdamW step on a batch of rows: (params, opt_state, rows) -> (params, opt_state, loss)."""
    tx = optax.adamw(1e-3)

    def step(params, opt_state, rows):
        def loss(p):
            return jnp.mean(jax.vmap(user_loss, in_axes=(None, 0))(nnx.merge(graphdef, p, rest), rows))
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return tx, step


def model_config(size: str, config_model: Mapping, seq_len: int) -> dict:
    """The config.json-style dict of a named size: "default" is `config_model` (a config's `model`; vocabulary 2,048
    where it leaves it to the tokenizer, as the word tokenizer's is about 2k), the others SIZES' Llama shapes."""
    base = {"vocab_size": 2048, **config_model}
    if size != "default":
        if size not in SIZES:
            raise errors.InvalidValue(f"--sizes: unknown size {size!r}; expected default, {', '.join(SIZES)}, "
                                      f"{USER_SIZE}")
        width = SIZES[size]["hidden_size"]
        base = {**config_model, "model_type": "llama", **SIZES[size], "intermediate_size": int(width * 8 / 3) // 8 * 8,
                "num_attention_heads": width // 64, "num_key_value_heads": width // 64, "head_dim": 64,
                "initializer_range": 0.02}
    base["max_position_embeddings"] = max(base["max_position_embeddings"], seq_len)
    return base


def build_model(size: str, config_model: Mapping, dtype: str, seq_len: int) -> nnx.Module:
    """The random model of a named size (USER_SIZE: a UserTransformer, which computes in float32)."""
    if size == USER_SIZE:
        return UserTransformer(rngs=nnx.Rngs(0))
    return models.from_config(model_config(size, config_model, seq_len), dtype=configuration.DTYPES[dtype])


def _rows(rng, vocab: int, pairs: int, seq_len: int) -> dict:
    ids = rng.integers(0, vocab, (pairs, seq_len + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((pairs, seq_len), np.float32)}


def _parity(name: str, pair_dot, lean, dtype: str) -> float:
    """Max difference of a variant's pair dots from the lean trace's, relative to |g_bio| |g_qa| (a difference of
    cosines: a pair dot itself can be near 0 by cancellation), printed against the tolerance of the dtype."""
    scale = np.sqrt(np.asarray(lean.bio_sq_norm) * np.asarray(lean.qa_sq_norm))
    rel = float(np.max(np.abs(np.asarray(pair_dot) - np.asarray(lean.pair_dot)) / np.maximum(scale, 1e-30)))
    tolerance = 1e-4 if dtype == "float32" else 1e-2
    print(f"  {name}: pair_dot vs lean: max difference {rel:.2e} relative to |g_bio| |g_qa| "
          f"({'ok' if rel <= tolerance else 'MISMATCH'} at {tolerance:g})", flush=True)
    return rel


def _describe(model) -> str:
    if isinstance(model, UserTransformer):
        return (f"{len(model.blocks)} blocks of nnx.Linear in an nnx.List, width {model.head.in_features}, "
                f"vocab {model.head.out_features}")
    c = model.config
    return (f"{c.model_type}, {c.num_hidden_layers} layers, width {c.hidden_size}, MLP {c.intermediate_size}, "
            f"{c.num_attention_heads} heads, vocab {c.vocab_size}")


def _torch_peers(model, folder, bio, qa, **kwargs) -> dict:
    """torch_peers.measure_peers on `folder`, or on `model` saved to a temporary folder."""
    if folder is not None:
        return torch_peers.measure_peers(folder, bio, qa, **kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        models.save_pretrained(model, tmp)
        return torch_peers.measure_peers(tmp, bio, qa, **kwargs)


def benchmark(name: str, model: nnx.Module, *, folder: str | None = None, pairs: int = 64, seq_len: int = 64,
              chunk_size: int = 16, torch_chunk_size: int | None = None, dtype: str = "float32", repeats: int = 5,
              memory_limit: float | None = None, run_reference: bool = True, with_torch: bool = True,
              sweep_chunks=(), profile_dir: str | None = None) -> dict:
    """Times every variant on `model`, prints them as a table and returns the figures.

    Args:
      name: the model's name in the printed lines.
      model: a models.Llama or models.GPTNeoX (computing in `dtype`), or a UserTransformer (no torch peers).
      folder: the Hugging Face folder `model` was loaded from, which the torch peers load; None: `model` is saved to
        a temporary folder for them.
      pairs, seq_len: BIO/QA pairs of random rows, tokens per row.
      chunk_size: pairs per chunk of the lean trace and pair statistics; torch_chunk_size: of the torch peers
        (default chunk_size; they hold a chunk's whole-model per-example gradients).
      dtype: "float32" or "bfloat16", of the computation and of the torch models' weights.
      repeats: timed runs per variant after one compile/warm-up run; the median counts.
      memory_limit: bytes; the reference runs only if its compiled peak is below (default 80% of the device's).
      run_reference: False compiles the reference but never runs it.
      with_torch: False leaves out the torch peers.
      sweep_chunks: chunk sizes at which to also time the lean trace (one run each after the compile).
      profile_dir: also run the train step and the lean trace once each under jax.profiler, write the traces here
        and print where their time goes.

    Returns:
      The JSON figures: seconds (`*_s`) and peaks in MB (`*_peak_mb`) of every variant (None where not run), pair-dot
      parities (`*_parity_max_rel`), `lean_chunk_sweep` and `profiles` (None where not asked for).
    """
    if memory_limit is None:
        memory_limit = 0.8 * measure.device_memory()
    user = isinstance(model, UserTransformer)
    loss = user_loss if user else trace.lm_loss
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)
    vocab = model.head.out_features if user else model.config.vocab_size
    bio, qa = _rows(rng, vocab, pairs, seq_len), _rows(rng, vocab, pairs, seq_len)
    print(f"\n== {name}: {num_params / 1e6:.2f}M parameters ({num_params:,}; {_describe(model)}, {dtype}); "
          f"{pairs} pairs of {seq_len} tokens", flush=True)

    results = {}

    def jax_variant(variant, fn, args, max_peak=math.inf):
        results[variant] = r = measure.measure_jax(fn, args, repeats, max_peak)
        t = "not run" if r["seconds"] is None else f"{r['seconds']:.3f} s"
        print(f"  {variant} {t} (peak {r['peak_bytes'] / 2**30:.2f} GiB)", flush=True)
        return r

    if user:
        tx, step = _user_train_step(graphdef, rest)
        jax_variant("train step", step, (params, tx.init(params), jax.tree.map(lambda a, b: np.concatenate([a, b]),
                                                                              bio, qa)))
    else:
        tx = train.make_optimizer(train.OptimizerConfig(), steps=1000)
        step = train.make_train_step(graphdef, tx, lambda s: 0.0)
        jax_variant("train step", step, (train.init_state(params, tx), {"bio": bio, "qa": qa}))
    lean_fn = trace.jit_trace(loss, graphdef, chunk_size=chunk_size)
    lean = jax_variant("lean", lambda p, b, q: lean_fn(p, rest, b, q), (params, bio, qa))["output"]
    stats_fn = trace.jit_pair_statistics(loss, graphdef, chunk_size=chunk_size)
    stats = jax_variant("pair stats", lambda p, b, q: stats_fn(p, rest, b, q), (params, bio, qa))["output"]
    parity = {"pair stats": _parity("pair stats", stats.pair_dot, lean, dtype)}
    ref = trace.jit_trace(loss, graphdef, method="reference", chunk_size=pairs)
    r = jax_variant("reference", lambda p, b, q: ref(p, rest, b, q), (params, bio, qa),
                    max_peak=memory_limit if run_reference else 0)  # 0: compiled, never run
    if r["seconds"] is not None:
        parity["reference"] = _parity("reference", r["output"].pair_dot, lean, dtype)

    peers = {}
    if with_torch and not user:
        peers = _torch_peers(model, folder, bio, qa, dtype=dtype, chunk_size=torch_chunk_size or chunk_size,
                             repeats=repeats)
    for peer, r in peers.items():
        print(f"  {peer} {r['seconds']:.3f} s", flush=True)
        parity[peer] = _parity(peer, r["pair_dot"], lean, dtype)
        results[peer] = r

    sweep = {}
    for c in sorted(set(sweep_chunks)):
        fn = trace.jit_trace(loss, graphdef, chunk_size=c)
        r = measure.measure_jax(lambda p, b, q, fn=fn: fn(p, rest, b, q), (params, bio, qa), 1)
        sweep[c] = {"seconds": r["seconds"], "peak_mb": r["peak_bytes"] / measure.MB}
        print(f"  lean, chunks of {c}: {r['seconds']:.3f} s, peak {r['peak_bytes'] / measure.MB:.0f} MB", flush=True)

    profiles = {}
    if profile_dir:
        for variant in ("train step", "lean"):
            r = results[variant]
            profiles[variant] = measure.profile(os.path.join(profile_dir, variant.replace(" ", "_")), r["compiled"],
                                                r["args"], PARTS, REST)
        print(f"\n{name}: profiles in {profile_dir}")
        for variant, p in profiles.items():
            measure.print_profile(variant, p)

    _table(name, results, num_params, pairs, seq_len, dtype)
    sec = lambda v: results[v]["seconds"] if v in results else None  # noqa: E731
    peak = lambda v: results[v]["peak_bytes"] / measure.MB if v in results else None  # noqa: E731
    return {"params": num_params, "dtype": dtype, "device": str(jax.devices()[0].device_kind),
            "train_step_s": sec("train step"), "lean_trace_s": sec("lean"), "pair_stats_s": sec("pair stats"),
            "reference_trace_s": sec("reference"), "torch_func_s": sec("torch.func"), "opacus_s": sec("opacus"),
            "train_step_peak_mb": peak("train step"), "lean_peak_mb": peak("lean"),
            "pair_stats_peak_mb": peak("pair stats"), "reference_peak_mb": peak("reference"),
            "torch_peak_mb": peak("torch.func"), "opacus_peak_mb": peak("opacus"),
            "torch_grads_mb": peers["torch.func"]["grads_bytes"] / measure.MB if "torch.func" in peers else None,
            "torch_parity_max_rel": parity.get("torch.func"), "opacus_parity_max_rel": parity.get("opacus"),
            "pair_stats_parity_max_rel": parity["pair stats"], "lean_chunk_sweep": sweep or None,
            "profiles": profiles or None}


def _table(name: str, results: dict, num_params: int, pairs: int, seq_len: int, dtype: str):
    print(f"\n{name} ({num_params / 1e6:.1f}M parameters, {pairs} pairs x {seq_len} tokens, {dtype})")
    print(f"  {'variant':<11} {'time':>10} {'peak memory':>12} {'pairs/s':>9}")
    for variant, r in results.items():
        t = "not run" if r["seconds"] is None else f"{r['seconds']:.3f} s"
        rate = "" if r["seconds"] is None else f"{pairs / r['seconds']:.1f}"
        note = " (RSS growth)" if variant in TORCH_PEERS and jax.default_backend() == "cpu" else ""
        print(f"  {variant:<11} {t:>10} {r['peak_bytes'] / measure.MB:>9.0f} MB {rate:>9}{note}")

    def ratio(a, b, key):
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return f"{x / y:.2f}x" if x and y else "n/a"

    for a, b in (("lean", "train step"), ("pair stats", "train step"), ("reference", "lean"), ("torch.func", "lean"),
                 ("opacus", "lean")):
        print(f"  {a} / {b}: time {ratio(a, b, 'seconds')}, peak {ratio(a, b, 'peak_bytes')}")
