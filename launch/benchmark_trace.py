"""Time and peak memory of the gradient trace against one training step and against PyTorch's per-example gradient
tools, per model size.

    python -m launch.benchmark_trace [--config=configs/default.py] [--sizes=default,30m,100m] [--pairs=64]
        [--seq_len=64] [--chunk_size=16] [--torch_chunk_size=N] [--dtype=float32] [--repeats=5] [--skip_reference]
        [--skip_torch]
        [--memory_limit_gb=G] [--sweep_chunks=8,16,32,64] [--profile_dir=DIR] [--json_out=bench.json]

Per size, one random model and one set of `pairs` BIO and `pairs` QA rows of `seq_len` random tokens (every target
weighted), shared by every variant:
  train step: train.make_train_step (AdamW) on the same 2 x pairs rows as one batch;
  lean: trace.cross_task_trace (chunks of `chunk_size` pairs; per-example gradients from the modules' taps);
  pair stats: trace.pair_statistics (the per-pair dot products and norms alone, from Gram products of the taps);
  reference: trace.cross_task_trace(method="reference"): jax.vmap(jax.grad) over all pairs, then the contraction;
  torch.func and opacus (with torch, transformers and opacus installed): the transformers model with the same
    weights (models.save_pretrained -> AutoModelForCausalLM), per-example gradients of chunks of `chunk_size` pairs
    from torch.func.vmap(torch.func.grad(loss)) (eager attention: sdpa has no vmap rule) or from Opacus'
    GradSampleModule (hooks on the activations and output gradients; sdpa attention), with the loss of
    trace.example_loss, then the same contraction. Their pair dots, and those of pair stats, are checked against
    the lean trace's, relative to |g_bio| |g_qa| (1e-4 in float32, 1e-2 in bfloat16, whose torch models hold bfloat16
    weights).
Sizes: "default" is the config's model (its vocabulary, or 2,048 where the config leaves it to the tokenizer, as
configs/default.py does: the word tokenizer's is about 2k); "30m" is 6 Llama layers of width 512 and a 12,288-token
vocabulary, "100m" 12 of width 768 and 16,384, "1b" 16 of width 2048 and 32,000. `--config=configs/llama32_1b.py
--sizes=default` benchmarks that checkpoint's architecture with random weights (nothing is downloaded). "user10m" is
a researcher's own NNX transformer (`UserTransformer`: nnx.Embed, nnx.LayerNorm, nnx.Linear attention and MLP in an
nnx.List, 10.5M parameters), which the trace knows only through Flax's module types; its train step is its own jitted
AdamW step on the same rows, and it has no torch peers.

Time is the median of `repeats` runs after one compile/warm-up run. JAX peak memory is XLA's account of the compiled
program (arguments + outputs + temporaries - aliased buffers): exact, and known before running. The reference path
is compiled but not run when that peak exceeds --memory_limit_gb (default 80% of physical memory, or of the
accelerator's). torch's peak is torch.cuda's on a GPU; on a CPU torch has no allocator statistics, and it is the
growth of the process's resident memory over the run (sampled every 5 ms). torch_grads_mb is the analytic size of one
chunk's per-example gradients (2 x chunk x params x 4 bytes). --sweep_chunks times the lean trace at other chunk
sizes on the 30m model (one run each after the compile). --profile_dir runs the train step and the lean trace once
more each under jax.profiler and prints where the time goes.
"""
import collections
import ctypes
import gc
import glob
import json
import os
import re
import statistics
import tempfile
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from factrecall_jax import cli, errors, experiment, models, trace, train
from factrecall_jax.trace import engine

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config whose model is the size 'default'.")
_SIZES = flags.DEFINE_list("sizes", ["default", "30m", "100m"], "Model sizes: default, 30m, 100m, 1b, user10m.")
_PAIRS = flags.DEFINE_integer("pairs", 64, "BIO/QA pairs (the train step sees 2 x pairs rows).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_CHUNK = flags.DEFINE_integer("chunk_size", 16, "Pairs per chunk in the lean, pair-statistics and torch paths.")
_TORCH_CHUNK = flags.DEFINE_integer("torch_chunk_size", None, "Pairs per chunk in the torch peers (default: "
                                    "--chunk_size): they hold a chunk's whole-model per-example gradients.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(experiment.DTYPES), "Compute dtype (parameters stay float32; "
                           "the torch models hold their weights in it).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per variant (after the compile/warm-up run).")
_SKIP_REFERENCE = flags.DEFINE_bool("skip_reference", False, "Compile the reference path but never run it.")
_MEMORY_LIMIT = flags.DEFINE_float("memory_limit_gb", None, "Run the reference only if its compiled peak is below "
                                   "this (default: 80% of the device's memory).")
_SWEEP = flags.DEFINE_list("sweep_chunks", [], "Chunk sizes at which to also time the lean trace on the 30m model.")
_NO_TORCH = flags.DEFINE_bool("skip_torch", False, "Leave out the torch.func and Opacus variants.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Also run the train step and the lean trace once each under "
                                   "jax.profiler, write the traces here and print where their time goes.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON, keyed by size.")

# name -> Llama shape (besides the config's own for "default").
SIZES = {"30m": dict(num_hidden_layers=6, hidden_size=512, vocab_size=12288),
         "100m": dict(num_hidden_layers=12, hidden_size=768, vocab_size=16384),
         "1b": dict(num_hidden_layers=16, hidden_size=2048, vocab_size=32000)}
USER_SIZE = "user10m"
MB = 2**20


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


def _model_config(size: str) -> dict:
    base = _CONFIG.value.model.to_dict()
    base.setdefault("vocab_size", 2048)
    if size != "default":
        if size not in SIZES:
            raise errors.InvalidValue(f"--sizes: unknown size {size!r}; expected default, {', '.join(SIZES)}, "
                                      f"{USER_SIZE}")
        width = SIZES[size]["hidden_size"]
        base = {**_CONFIG.value.model.to_dict(), "model_type": "llama", **SIZES[size],
                "intermediate_size": int(width * 8 / 3) // 8 * 8, "num_attention_heads": width // 64,
                "num_key_value_heads": width // 64, "head_dim": 64, "initializer_range": 0.02}
    base["max_position_embeddings"] = max(base["max_position_embeddings"], _SEQ_LEN.value)
    return base


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def _time(fn, repeats):
    """(median seconds of `repeats` calls after one warm-up call, the last output)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _measure_jax(fn, args, run=True, repeats=None):
    """{"peak_bytes", "compile_s", "seconds", "output", "compiled", "args"} of jax.jit(fn) on args (seconds None when
    not run)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    r = {"peak_bytes": _peak_bytes(compiled), "compile_s": time.perf_counter() - start, "seconds": None,
         "output": None, "compiled": compiled, "args": args}
    if run:
        r["seconds"], r["output"] = _time(lambda: jax.block_until_ready(compiled(*args)), repeats or _REPEATS.value)
    return r


class _RssPeak:
    """Peak growth of this process's resident memory while inside the block (sampled every 5 ms)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.growth = self.peak - self.base


# The lean trace's parts, by the name scopes of its ops (the first that matches); everything else is what lies
# between them (batch gathers, the sums' updates), and in the train step the whole step.
PARTS = ((engine.CONTRACT_SCOPE, "per-example gradients, their sums and dots"), (engine.DOTS_SCOPE, "Gram dots"),
         (engine.TAPS_SCOPE, "forward and backward"))
REST = "everything else"


def _profile(folder: str, compiled, args, top: int = 8) -> dict:
    """One run of a compiled program under jax.profiler (the trace lands in `folder`, for TensorBoard or Perfetto),
    and where its time went: XLA op time summed over threads, by PARTS, and the costliest ops."""
    ops = {}  # HLO instruction name -> its op_name metadata
    for line in compiled.as_text().splitlines():
        if match := re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line):
            ops.setdefault(match.group(1), match.group(2))
    with jax.profiler.trace(folder):
        jax.block_until_ready(compiled(*args))
    xspace = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(xspace).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in ops:
                    seconds[event.name] += event.duration_ns / 1e9
                    calls[event.name] += 1
    parts = collections.Counter()
    for name, s in seconds.items():  # a scope appears as "/scope/" or, in the backward pass, as "(scope)"
        parts[next((part for scope, part in PARTS if re.search(rf"[/(]{scope}[/)]", ops[name])), REST)] += s
    return {"op_seconds": sum(seconds.values()), "parts": dict(parts),
            "top_ops": [{"op": name, "seconds": s, "calls": calls[name], "op_name": ops[name]}
                        for name, s in seconds.most_common(top)]}


def _print_profile(name, p):
    total = p["op_seconds"]
    if not total:
        print(f"  {name}: the profile has no events named like the program's XLA ops")
        return
    print(f"  {name}: {total:.2f} s of XLA op time (summed over threads): "
          + ", ".join(f"{part} {s:.2f} s ({s / total:.0%})" for part, s in p["parts"].items()) + "; costliest ops:")
    for op in p["top_ops"]:
        print(f"    {op['seconds']:6.2f} s {op['calls']:4d} calls  {op['op']}: {op['op_name'][-90:]}")


def _torch_peers(model, bio, qa) -> dict:
    """{"torch.func": r, "opacus": r} with r = {"seconds", "peak_bytes", "grads_bytes", "pair_dot"}; a peer that
    cannot run here is left out, with a printed reason."""
    try:
        import torch
        import transformers
    except ImportError:
        print("  torch peers: not run (torch or transformers is not installed)")
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
        print(f"  torch peers: not run (JAX runs on {jax.default_backend()}, torch has no GPU here)")
        return {}
    torch.set_num_threads(os.cpu_count())
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[_DTYPE.value]
    as_torch = lambda rows: [torch.from_numpy(np.asarray(rows[k])).to(device)  # noqa: E731
                             for k in ("inputs", "targets", "weights")]
    bio_t, qa_t = ([x.long() if i < 2 else x for i, x in enumerate(as_torch(rows))] for rows in (bio, qa))
    n, chunk = len(bio_t[0]), _TORCH_CHUNK.value or _CHUNK.value

    def example_losses(logits, targets, weights):  # trace.example_loss of each row
        ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
        return (ce.view(targets.shape) * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)

    def func_grads(hf):
        params = {k: v.detach() for k, v in hf.named_parameters()}

        def loss(p, inputs, targets, weights):
            logits = torch.func.functional_call(hf, p, (), {"input_ids": inputs[None], "use_cache": False}).logits
            return example_losses(logits, targets[None], weights[None])[0]

        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))
        return lambda rows: grads(params, *rows)

    def opacus_grads(hf):
        from opacus import GradSampleModule  # hooks; modules without a grad sampler (LlamaRMSNorm) go through functorch
        module = GradSampleModule(hf.train(), loss_reduction="sum", strict=False)  # its hooks skip eval mode; the
        # models have no dropout
        named = list(hf.named_parameters())

        def grads(rows):
            inputs, targets, weights = rows
            with warnings.catch_warnings():  # its hook on the embedding fires on output gradients: as intended
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                example_losses(module(input_ids=inputs, use_cache=False).logits, targets, weights).sum().backward()
            out = {k: p.grad_sample for k, p in named}
            for _, p in named:
                p.grad_sample = p.grad = None
            return out
        return grads

    def run(hf, grads_fn):
        names = [k for k, _ in hf.named_parameters()]
        layer_of = [int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", k)) else -1 for k in names]
        num_layers = hf.config.num_hidden_layers

        @torch.no_grad()
        def contract(gb, gq, sums, pair_dot, bio_sq, qa_sq, layer):
            for i, k in enumerate(names):
                b, q = gb[k].float(), gq[k].float()
                sums[0][k] += b.abs().sum(0)
                sums[1][k] += q.abs().sum(0)
                sums[2][k] += (b * q).sum(0)
                dots = [(x * y).flatten(1).sum(1) for x, y in ((b, q), (b, b), (q, q))]
                for total, d in zip((pair_dot, bio_sq, qa_sq), dots):
                    total += d
                if layer_of[i] >= 0:
                    for total, d in zip(layer, dots):
                        total[:, layer_of[i]] += d

        def trace_once():
            sums = [{k: torch.zeros_like(v, dtype=torch.float32) for k, v in hf.named_parameters()} for _ in range(3)]
            pair_dot, bio_sq, qa_sq = (torch.zeros(n, device=device) for _ in range(3))
            layer = [torch.zeros(n, num_layers, device=device) for _ in range(3)]
            for s in range(0, n, chunk):
                gb = grads_fn([x[s:s + chunk] for x in bio_t])
                gq = grads_fn([x[s:s + chunk] for x in qa_t])
                contract(gb, gq, sums, pair_dot[s:s + chunk], bio_sq[s:s + chunk], qa_sq[s:s + chunk],
                         [x[s:s + chunk] for x in layer])
                del gb, gq
            if device == "cuda":
                torch.cuda.synchronize()
            return pair_dot

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            seconds, pair_dot = _time(trace_once, _REPEATS.value)
            peak = torch.cuda.max_memory_allocated() - base
        else:
            with _RssPeak() as rss:
                seconds, pair_dot = _time(trace_once, _REPEATS.value)
            peak = rss.growth
        num_params = sum(v.numel() for v in hf.parameters())
        return {"seconds": seconds, "peak_bytes": peak, "grads_bytes": 2 * min(chunk, n) * num_params * 4,
                "pair_dot": pair_dot.cpu().numpy()}

    peers = {"torch.func": ("eager", func_grads), "opacus": ("sdpa", opacus_grads)}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        models.save_pretrained(model, folder)
        for name, (attention, grads_fn) in peers.items():
            if name == "opacus" and not _has_opacus():
                print("  opacus: not run (opacus is not installed)")
                continue
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                folder, dtype=torch_dtype, attn_implementation=attention).to(device).eval()
            results[name] = run(hf, grads_fn(hf))
            del hf
            _release_freed_memory()  # so that the next peer's resident-memory growth starts from what is in use
    return results


def _release_freed_memory():
    """Hands freed heap memory back to the OS (glibc keeps it otherwise), where the C library can."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _has_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def _rows(rng, vocab):
    ids = rng.integers(0, vocab, (_PAIRS.value, _SEQ_LEN.value + 1)).astype(np.int32)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((_PAIRS.value, _SEQ_LEN.value),
                                                                               np.float32)}


def _parity(name, pair_dot, lean) -> float:
    """Max difference of a variant's pair dots from the lean trace's, relative to |g_bio| |g_qa| (a difference of
    cosines: a pair dot itself can be near 0 by cancellation), printed against the tolerance of the dtype."""
    scale = np.sqrt(np.asarray(lean.bio_sq_norm) * np.asarray(lean.qa_sq_norm))
    rel = float(np.max(np.abs(pair_dot - np.asarray(lean.pair_dot)) / np.maximum(scale, 1e-30)))
    tolerance = 1e-4 if _DTYPE.value == "float32" else 1e-2
    print(f"  {name}: pair_dot vs lean: max difference {rel:.2e} relative to |g_bio| |g_qa| "
          f"({'ok' if rel <= tolerance else 'MISMATCH'} at {tolerance:g})", flush=True)
    return rel


def _bench(size: str, memory_limit: float) -> dict:
    rng = np.random.default_rng(0)
    if size == USER_SIZE:
        model, loss = UserTransformer(rngs=nnx.Rngs(0)), user_loss
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        vocab, description = model.head.out_features, (f"{len(model.blocks)} blocks of nnx.Linear in an nnx.List, "
                                                      f"width {model.head.in_features}, vocab {model.head.out_features}")
    else:
        model, loss = models.from_config(_model_config(size), dtype=experiment.DTYPES[_DTYPE.value]), trace.lm_loss
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        config = model.config
        vocab, description = config.vocab_size, (
            f"{config.model_type}, {config.num_hidden_layers} layers, width {config.hidden_size}, MLP "
            f"{config.intermediate_size}, {config.num_attention_heads} heads, vocab {config.vocab_size}")
    num_params = sum(x.size for x in jax.tree.leaves(params))
    bio, qa = _rows(rng, vocab), _rows(rng, vocab)
    print(f"\n== {size}: {num_params / 1e6:.2f}M parameters ({num_params:,}; {description}, {_DTYPE.value}); "
          f"{_PAIRS.value} pairs of {_SEQ_LEN.value} tokens", flush=True)
    if size == USER_SIZE:
        tx, step = _user_train_step(graphdef, rest)
        rows = jax.tree.map(lambda a, b: np.concatenate([a, b]), bio, qa)
        results = {"train step": _measure_jax(step, (params, tx.init(params), rows))}
    else:
        tx = train.make_optimizer(train.OptimizerConfig(), steps=1000)
        step = train.make_train_step(graphdef, tx, lambda s: 0.0)
        results = {"train step": _measure_jax(step, (train.init_state(params, tx), {"bio": bio, "qa": qa}))}
    print(f"  train step {results['train step']['seconds']:.3f} s", flush=True)
    lean_fn = trace.jit_trace(loss, graphdef, chunk_size=_CHUNK.value)
    results["lean"] = _measure_jax(lambda p, b, q: lean_fn(p, rest, b, q), (params, bio, qa))
    print(f"  lean {results['lean']['seconds']:.3f} s", flush=True)
    lean = results["lean"]["output"]
    stats_fn = trace.jit_pair_statistics(loss, graphdef, chunk_size=_CHUNK.value)
    results["pair stats"] = _measure_jax(lambda p, b, q: stats_fn(p, rest, b, q), (params, bio, qa))
    print(f"  pair stats {results['pair stats']['seconds']:.3f} s", flush=True)
    parity = {"pair stats": _parity("pair stats", np.asarray(results["pair stats"]["output"].pair_dot), lean)}
    ref = trace.jit_trace(loss, graphdef, method="reference", chunk_size=_PAIRS.value)
    ref_fn = lambda p, b, q: ref(p, rest, b, q)  # noqa: E731
    ref_peak = _peak_bytes(jax.jit(ref_fn).lower(params, bio, qa).compile())
    run_ref = not _SKIP_REFERENCE.value and ref_peak <= memory_limit
    results["reference"] = _measure_jax(ref_fn, (params, bio, qa), run=run_ref)
    ref_s = results["reference"]["seconds"]
    print(f"  reference {'not run' if ref_s is None else f'{ref_s:.3f} s'} (peak {ref_peak / 2**30:.2f} GiB)",
          flush=True)
    if ref_s is not None:
        parity["reference"] = _parity("reference", np.asarray(results["reference"]["output"].pair_dot), lean)
    peers = {} if _NO_TORCH.value or size == USER_SIZE else _torch_peers(model, bio, qa)
    for name, r in peers.items():
        print(f"  {name} {r['seconds']:.3f} s", flush=True)
        parity[name] = _parity(name, r["pair_dot"], lean)
        results[name] = r
    sweep = {}
    if size == "30m":
        for c in sorted({int(c) for c in _SWEEP.value}):
            fn = trace.jit_trace(loss, graphdef, chunk_size=c)
            r = _measure_jax(lambda p, b, q, fn=fn: fn(p, rest, b, q), (params, bio, qa), repeats=1)
            sweep[c] = {"seconds": r["seconds"], "peak_mb": r["peak_bytes"] / MB}
            print(f"  lean, chunks of {c}: {r['seconds']:.3f} s, peak {r['peak_bytes'] / MB:.0f} MB", flush=True)

    profiles = {}
    if _PROFILE_DIR.value:
        for name in ("train step", "lean"):
            r = results[name]
            folder = os.path.join(_PROFILE_DIR.value, size, name.replace(" ", "_"))
            profiles[name] = _profile(folder, r["compiled"], r["args"])
        print(f"\n{size}: profiles in {os.path.join(_PROFILE_DIR.value, size)}")
        for name, p in profiles.items():
            _print_profile(name, p)

    _table(size, results, num_params)
    sec = lambda name: results[name]["seconds"] if name in results else None  # noqa: E731
    peak = lambda name: results[name]["peak_bytes"] / MB if name in results else None  # noqa: E731
    return {"params": num_params, "dtype": _DTYPE.value, "device": str(jax.devices()[0].device_kind),
            "train_step_s": sec("train step"), "lean_trace_s": sec("lean"), "pair_stats_s": sec("pair stats"),
            "reference_trace_s": sec("reference"), "torch_func_s": sec("torch.func"), "opacus_s": sec("opacus"),
            "train_step_peak_mb": peak("train step"), "lean_peak_mb": peak("lean"),
            "pair_stats_peak_mb": peak("pair stats"), "reference_peak_mb": peak("reference"),
            "torch_peak_mb": peak("torch.func"), "opacus_peak_mb": peak("opacus"),
            "torch_grads_mb": peers["torch.func"]["grads_bytes"] / MB if "torch.func" in peers else None,
            "torch_parity_max_rel": parity.get("torch.func"), "opacus_parity_max_rel": parity.get("opacus"),
            "pair_stats_parity_max_rel": parity["pair stats"], "lean_chunk_sweep": sweep or None,
            "profiles": profiles or None}


def _table(size, results, num_params):
    pairs = _PAIRS.value
    print(f"\n{size} ({num_params / 1e6:.1f}M parameters, {pairs} pairs x {_SEQ_LEN.value} tokens, {_DTYPE.value})")
    print(f"  {'variant':<11} {'time':>10} {'peak memory':>12} {'pairs/s':>9}")
    for name, r in results.items():
        t = "not run" if r["seconds"] is None else f"{r['seconds']:.3f} s"
        rate = "" if r["seconds"] is None else f"{pairs / r['seconds']:.1f}"
        note = " (RSS growth)" if name in ("torch.func", "opacus") and jax.default_backend() == "cpu" else ""
        print(f"  {name:<11} {t:>10} {r['peak_bytes'] / MB:>9.0f} MB {rate:>9}{note}")

    def ratio(a, b, key):
        x, y = results.get(a, {}).get(key), results.get(b, {}).get(key)
        return f"{x / y:.2f}x" if x and y else "n/a"

    for a, b in (("lean", "train step"), ("pair stats", "train step"), ("reference", "lean"), ("torch.func", "lean"),
                 ("opacus", "lean")):
        print(f"  {a} / {b}: time {ratio(a, b, 'seconds')}, peak {ratio(a, b, 'peak_bytes')}")


def _device_memory() -> float:
    """Bytes of the default device: an accelerator's own, or physical memory on a CPU."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main(_):
    for flag in (_PAIRS, _SEQ_LEN, _CHUNK, _REPEATS, _TORCH_CHUNK):
        if flag.value is not None and flag.value < 1:
            raise errors.InvalidValue(f"--{flag.name}={flag.value} is invalid: expected a positive integer")
    for size in _SIZES.value:
        if size != USER_SIZE:
            _model_config(size)  # an unknown size fails before anything runs
    memory_limit = _MEMORY_LIMIT.value * 2**30 if _MEMORY_LIMIT.value is not None else 0.8 * _device_memory()
    print(f"devices: {jax.devices()}; {os.cpu_count()} CPU cores; reference runs if its peak <= "
          f"{memory_limit / 2**30:.1f} GiB")
    figures = {}
    for size in _SIZES.value:
        figures[size] = _bench(size, memory_limit)
        if _JSON_OUT.value:  # after every size, so a long run keeps what it measured
            with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
                json.dump(figures, f, indent=2)


if __name__ == "__main__":
    cli.launch(main)
