"""Time and peak memory of the gradient trace against one training step and against PyTorch's per-example gradient
tools, per model size or on a checkpoint (benchmarks.trace.benchmark says how each variant is run and measured).

    python -m launch.benchmark_trace [--config=configs/default.py] [--sizes=default,30m,100m] [--model=DIR]
        [--pairs=64] [--seq_len=64] [--chunk_size=16] [--torch_chunk_size=N] [--dtype=float32] [--repeats=5]
        [--skip_reference] [--skip_torch] [--memory_limit_gb=G] [--sweep_chunks=8,16,32,64] [--profile_dir=DIR]
        [--json_out=bench.json]

Sizes (random weights): "default" is the config's model (its vocabulary, or 2,048 where the config leaves it to the
tokenizer); "30m" is 6 Llama layers of width 512 and a 12,288-token vocabulary, "100m" 12 of width 768 and 16,384,
"1b" 16 of width 2048 and 32,000. `--config=configs/llama32_1b.py --sizes=default` benchmarks that checkpoint's
architecture with random weights (nothing is downloaded). "user10m" is a researcher's own NNX transformer
(benchmarks.trace.UserTransformer, 10.5M parameters), which the trace knows only through Flax's module types; its
train step is its own jitted AdamW step, and it has no torch peers.

--model=DIR benchmarks a Hugging Face checkpoint folder instead of the sizes (with its weights, random token rows of
its vocabulary; the torch peers load the same folder), keyed by the folder's name in the JSON; --sizes cannot be given
with it. E.g. SmolLM2-135M-Instruct, converted by `python -m launch.convert_gguf`.

Time is the median of `repeats` runs after one compile/warm-up run. JAX peak memory is XLA's account of the compiled
program. The reference path is compiled but not run when that peak exceeds --memory_limit_gb (default 80% of
physical memory, or of the accelerator's). torch's peak is torch.cuda's on a GPU and the growth of the process's
resident memory on a CPU. --sweep_chunks times the lean trace at other chunk sizes on the 30m model. --profile_dir runs
the train step and the lean trace once more each under jax.profiler and prints where the time goes. The JSON is
rewritten after every model, so a long run keeps what it measured.
"""
import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from factrecall_jax import cli, configuration, errors, models
from factrecall_jax.benchmarks import measure
from factrecall_jax.benchmarks import trace as trace_bench

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config whose model is the size 'default'.")
_SIZES = flags.DEFINE_list("sizes", ["default", "30m", "100m"], "Model sizes: default, 30m, 100m, 1b, user10m.")
_MODEL = flags.DEFINE_string("model", None, "A Hugging Face checkpoint folder to benchmark instead of --sizes.")
_PAIRS = flags.DEFINE_integer("pairs", 64, "BIO/QA pairs (the train step sees 2 x pairs rows).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Tokens per row.")
_CHUNK = flags.DEFINE_integer("chunk_size", 16, "Pairs per chunk in the lean, pair-statistics and torch paths.")
_TORCH_CHUNK = flags.DEFINE_integer("torch_chunk_size", None, "Pairs per chunk in the torch peers (default: "
                                    "--chunk_size): they hold a chunk's whole-model per-example gradients.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", list(configuration.DTYPES), "Compute dtype (parameters stay "
                           "float32; the torch models hold their weights in it).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per variant (after the compile/warm-up run).")
_SKIP_REFERENCE = flags.DEFINE_bool("skip_reference", False, "Compile the reference path but never run it.")
_MEMORY_LIMIT = flags.DEFINE_float("memory_limit_gb", None, "Run the reference only if its compiled peak is below "
                                   "this (default: 80% of the device's memory).")
_SWEEP = flags.DEFINE_list("sweep_chunks", [], "Chunk sizes at which to also time the lean trace on the 30m model.")
_NO_TORCH = flags.DEFINE_bool("skip_torch", False, "Leave out the torch.func and Opacus variants.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", None, "Also run the train step and the lean trace once each under "
                                   "jax.profiler, write the traces here and print where their time goes.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the figures here as JSON, keyed by size (or folder).")


def _models():
    """(name, folder or None, a function that builds the model) for each model to run; checked before any runs."""
    dtype, config_model = _DTYPE.value, _CONFIG.value.model.to_dict()
    if _MODEL.value is not None:
        if _SIZES.present:
            raise errors.InvalidValue("--model and --sizes are exclusive: --model benchmarks that checkpoint alone")
        folder = os.path.abspath(os.path.expanduser(_MODEL.value))
        if not os.path.isdir(folder):
            raise errors.MissingPath(f"--model={_MODEL.value} is not a folder (a Hugging Face checkpoint folder)")
        return [(os.path.basename(folder), folder,
                 lambda: models.from_pretrained(folder, dtype=configuration.DTYPES[dtype]))]
    for size in _SIZES.value:
        if size != trace_bench.USER_SIZE:
            trace_bench.model_config(size, config_model, _SEQ_LEN.value)  # an unknown size fails before anything runs
    return [(size, None, lambda size=size: trace_bench.build_model(size, config_model, dtype, _SEQ_LEN.value))
            for size in _SIZES.value]


def main(_):
    for flag in (_PAIRS, _SEQ_LEN, _CHUNK, _REPEATS, _TORCH_CHUNK):
        if flag.value is not None and flag.value < 1:
            raise errors.InvalidValue(f"--{flag.name}={flag.value} is invalid: expected a positive integer")
    todo = _models()
    memory_limit = _MEMORY_LIMIT.value * 2**30 if _MEMORY_LIMIT.value is not None else 0.8 * measure.device_memory()
    print(f"devices: {jax.devices()}; {os.cpu_count()} CPU cores; reference runs if its peak <= "
          f"{memory_limit / 2**30:.1f} GiB")
    figures = {}
    for name, folder, build in todo:
        figures[name] = trace_bench.benchmark(
            name, build(), folder=folder, pairs=_PAIRS.value, seq_len=_SEQ_LEN.value, chunk_size=_CHUNK.value,
            torch_chunk_size=_TORCH_CHUNK.value, dtype=_DTYPE.value, repeats=_REPEATS.value, memory_limit=memory_limit,
            run_reference=not _SKIP_REFERENCE.value, with_torch=not _NO_TORCH.value,
            sweep_chunks=[int(c) for c in _SWEEP.value] if name == "30m" else (),
            profile_dir=_PROFILE_DIR.value and os.path.join(_PROFILE_DIR.value, name))
        if _JSON_OUT.value:  # after every model, so a long run keeps what it measured
            cli.atomic_write(_JSON_OUT.value, json.dumps(figures, indent=2))


if __name__ == "__main__":
    cli.launch(main)
