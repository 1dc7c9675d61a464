#!/usr/bin/env bash
# The README's memory-plan table: launch.plan for every real config on its default mesh (FSDP over all devices), on 8
# fake CPU devices and on 1, one after another (each compiles on the CPU; the 3B models take minutes). Writes
# runs/plan/<config>_d<devices>.{txt,json} and prints the per-device totals in GiB.
set -e
mkdir -p runs/plan
CONFIGS="pythia_160m llama32_1b pythia_1b llama32_3b pythia_2p8b"
for devices in 8 1; do
  for name in $CONFIGS; do
    echo "launch.plan --config=configs/$name.py --devices=$devices" >&2
    .venv/bin/python -m launch.plan --config=configs/$name.py --devices=$devices \
        --json_out=runs/plan/${name}_d$devices.json > runs/plan/${name}_d$devices.txt 2>&1
  done
done
.venv/bin/python - $CONFIGS <<'EOF'
import json, sys
print("| config | 8 devices: train step / eval / lean trace | 1 device: train step / eval / lean trace |")
print("|---|---|---|")
for name in sys.argv[1:]:
    cells = []
    for devices in (8, 1):
        with open(f"runs/plan/{name}_d{devices}.json", encoding="utf-8") as f:
            plan = json.load(f)
        cells.append(" / ".join(f"{plan[p]['total_gib']:.2f}" for p in ("train_step", "eval", "lean_trace")))
    print(f"| {name} | {cells[0]} | {cells[1]} |")
print("(GiB per device, everything live at once)")
EOF
