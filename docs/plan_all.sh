#!/usr/bin/env bash
# The README's memory-plan table: launch.plan for every real config on 8 fake CPU devices, mesh (1, 8, 1).
set -e
mkdir -p runs/plan
for name in pythia_160m llama32_1b pythia_1b llama32_3b pythia_2p8b; do
  .venv/bin/python -m launch.plan --config=configs/$name.py --devices=8 --config.mesh.data=1 --config.mesh.fsdp=8 \
      --json_out=runs/plan/$name.json > runs/plan/$name.txt 2>&1
done
for name in llama32_3b pythia_2p8b; do
  .venv/bin/python -m launch.plan --config=configs/$name.py --devices=8 --config.mesh.data=1 --config.mesh.fsdp=8 \
      --config.train.remat=none --json_out=runs/plan/${name}_noremat.json > runs/plan/${name}_noremat.txt 2>&1
done
.venv/bin/python -m launch.plan --config=configs/llama32_3b.py --devices=8 --config.mesh.data=1 --config.mesh.fsdp=8 \
    --top=8 > runs/plan/llama32_3b_top.txt 2>&1
echo done
