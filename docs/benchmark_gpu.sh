#!/usr/bin/env bash
# The trace benchmark on a GPU, for BENCHMARKS.md's GPU table: launch.benchmark_trace at 30m, 100m and 1b and at the
# Llama-3.2-1B and Pythia-1B architectures (random weights: nothing is downloaded), in bfloat16 and float32.
#
#     bash docs/benchmark_gpu.sh [OUT_DIR]          (default runs/benchmark_gpu; PYTHON=... picks the interpreter)
#
# Writes OUT_DIR/<dtype>_<set>.json (launch.benchmark_trace --json_out) and the printed tables beside them (.txt).
# The torch peers run where torch sees the GPU; the reference path runs where its compiled peak fits. It stops at
# once where JAX sees no GPU: the CPU figures come from the README's command instead.
set -euo pipefail
python=${PYTHON:-python3}
out=${1:-runs/benchmark_gpu}
"$python" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'no GPU: ' + str(jax.devices()))"
mkdir -p "$out"
for dtype in bfloat16 float32; do
  # name:config:sizes:torch chunk (the torch peers hold a chunk's whole-model per-example gradients: 2 x chunk x
  # 1.2B floats at 1B)
  for set in "small:configs/default.py:30m,100m:16" "1b:configs/default.py:1b:2" \
             "llama32_1b:configs/llama32_1b.py:default:2" "pythia_1b:configs/pythia_1b.py:default:2"; do
    IFS=: read -r name config sizes torch_chunk <<< "$set"
    "$python" -m launch.benchmark_trace --config="$config" --sizes="$sizes" --dtype="$dtype" --pairs=64 --seq_len=64 \
        --chunk_size=16 --torch_chunk_size="$torch_chunk" --repeats=5 --json_out="$out/${dtype}_$name.json" 2>&1 \
        | tee "$out/${dtype}_$name.txt"
  done
done
echo "done: $out"
