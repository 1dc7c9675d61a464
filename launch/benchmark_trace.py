"""Memory and time of the gradient trace's lean path, its reference path and one training step, side by side.

    python -m launch.benchmark_trace [--hidden_size=512 --num_layers=6 --vocab_size=12288] [--pairs=64 --seq_len=64]
        [--chunk_size=16] [--repeats=3] [--skip_reference] [--json_out=bench.json]

One random Llama-architecture model (about 30M parameters by default), `pairs` BIO and `pairs` QA rows of `seq_len`
random tokens, every target weighted. Each variant is compiled once; peak memory is XLA's own account of the compiled
program (arguments + outputs + temporaries - donated/aliased buffers), and time is the median of `repeats` runs:
  lean: trace.cross_task_trace (per layer, chunks of `chunk_size` pairs);
  reference: jax.vmap(jax.grad) over all pairs, then the contraction (holds 2 x pairs x parameters floats);
  train step: train.make_train_step (AdamW) on the same 2 x pairs rows as one batch.
"""
import json
import statistics
import time

import jax
import numpy as np
from absl import flags
from flax import nnx

from factrecall_jax import cli, models, trace, train

_HIDDEN = flags.DEFINE_integer("hidden_size", 512, "Model width.")
_LAYERS = flags.DEFINE_integer("num_layers", 6, "Decoder layers.")
_VOCAB = flags.DEFINE_integer("vocab_size", 12288, "Vocabulary size.")
_PAIRS = flags.DEFINE_integer("pairs", 64, "BIO/QA pairs (the train step sees 2 x pairs rows).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_CHUNK = flags.DEFINE_integer("chunk_size", 16, "Pairs per chunk in the lean path.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per variant (after the compile run).")
_SKIP_REFERENCE = flags.DEFINE_bool("skip_reference", False, "Compile the reference path but do not run it (its "
                                    "per-example gradients may not fit in memory).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON.")


def _peak_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def _measure(fn, args, run: bool = True) -> dict:
    """{"peak_bytes", "compile_s", "seconds"} of jax.jit(fn) on args (seconds None when not run)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    figures = {"peak_bytes": _peak_bytes(compiled), "compile_s": time.perf_counter() - start, "seconds": None}
    if run:
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(_REPEATS.value):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        figures["seconds"] = statistics.median(times)
    return figures


def main(_):
    for flag in (_HIDDEN, _LAYERS, _VOCAB, _PAIRS, _SEQ_LEN, _CHUNK, _REPEATS):
        if flag.value < 1:
            raise ValueError(f"--{flag.name}={flag.value} is invalid: expected a positive integer")
    config = models.LlamaConfig(vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value,
                                intermediate_size=int(_HIDDEN.value * 8 / 3) // 8 * 8,
                                num_hidden_layers=_LAYERS.value, num_attention_heads=max(1, _HIDDEN.value // 64),
                                max_position_embeddings=max(256, _SEQ_LEN.value))
    graphdef, params = nnx.split(models.from_config(config), nnx.Param)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rng = np.random.default_rng(0)

    def rows():
        ids = rng.integers(0, config.vocab_size, (_PAIRS.value, _SEQ_LEN.value + 1)).astype(np.int32)
        return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "weights": np.ones((_PAIRS.value, _SEQ_LEN.value),
                                                                                  np.float32)}

    bio, qa = rows(), rows()
    print(f"model: {num_params / 1e6:.1f}M parameters ({config.num_hidden_layers} layers, width {config.hidden_size},"
          f" vocab {config.vocab_size}); {_PAIRS.value} pairs of {_SEQ_LEN.value} tokens; devices: {jax.devices()}")
    loss = trace.lm_loss(graphdef, params)
    tx = train.make_optimizer(train.OptimizerConfig(), steps=1000)
    step = train.make_train_step(graphdef, tx, lambda s: 0.0)
    results = {
        "lean": _measure(lambda p, b, q: trace.cross_task_trace(loss, p, b, q, chunk_size=_CHUNK.value),
                         (params, bio, qa)),
        "reference": _measure(lambda p, b, q: trace.cross_task_trace(loss, p, b, q, method="reference"),
                              (params, bio, qa), run=not _SKIP_REFERENCE.value),
        "train_step": _measure(step, (train.init_state(params, tx), {"bio": bio, "qa": qa})),
    }
    print(f"{'variant':<12} {'peak memory':>12} {'x params':>9} {'time':>9} {'compile':>8}")
    for name, r in results.items():
        seconds = "not run" if r["seconds"] is None else f"{r['seconds']:.2f} s"
        print(f"{name:<12} {r['peak_bytes'] / 2**30:>9.2f} GiB {r['peak_bytes'] / (4 * num_params):>9.1f} "
              f"{seconds:>9} {r['compile_s']:>6.1f} s")
    lean, ref, step_r = results["lean"], results["reference"], results["train_step"]
    print(f"lean / reference: memory {lean['peak_bytes'] / ref['peak_bytes']:.3f}x"
          + (f", time {lean['seconds'] / ref['seconds']:.2f}x" if ref["seconds"] else ""))
    print(f"lean / train step: memory {lean['peak_bytes'] / step_r['peak_bytes']:.2f}x, "
          f"time {lean['seconds'] / step_r['seconds']:.2f}x")
    if _JSON_OUT.value:
        with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
            json.dump({"num_params": num_params, **results}, f, indent=2)


if __name__ == "__main__":
    cli.launch(main)
