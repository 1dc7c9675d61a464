"""A compiled memory plan: the train step, the evaluation step and the lean trace of a config, compiled for its
architecture on N fake CPU devices with abstract inputs (no weights read, nothing downloaded), per device.

    python -m launch.plan --config=configs/llama32_3b.py --devices=8
    python -m launch.plan --config=configs/llama32_3b.py --devices=8 --config.mesh.fsdp=8 --top=10 --json_out=p.json

The programs are the ones a run executes (plan.lowered: `train.jit_steps` of every phase of both schedules, the
evaluator's `evaluate.jit_value_hits`, `trace.jit_trace`), lowered with the config's dtype, remat policy, batch sizes
and mesh, rows of --seq_len tokens. Figures are XLA's `memory_analysis()` of the compiled CPU programs: arguments,
outputs, temporaries, and the total live at once (outputs that reuse donated arguments counted once). The CPU
compiler's plan is a model of an accelerator's, not a measurement of one. --top=N names the N largest temporaries
(the values of XLA's buffer assignment, with the JAX operation that produced each).
"""
import dataclasses
import json
import os
import tempfile

import jax
from absl import flags
from ml_collections import config_flags

from factrecall_jax import cli, configuration, experiment, plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/llama32_3b.py.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for (the mesh must fit).", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row of every batch.", lower_bound=2)
_TOP = flags.DEFINE_integer("top", 0, "Name the N largest temporaries of each program.", lower_bound=0)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write {program: {arguments_gib, ...}} to this file.")
flags.mark_flag_as_required("config")

# The jitted function each program's compiled module is named after (for --top's dump files).
MODULES = {"train_step": "jit_steps", "eval": "jit_eval_step", "lean_trace": "jit_fn"}


def main(_):
    dump_dir = tempfile.mkdtemp(prefix="plan-") if _TOP.value else None
    if dump_dir:  # read when the CPU backend starts, below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}"
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    run = experiment.Run(configuration.read(_CONFIG.value))
    config, mesh = run.given, run.mesh
    count = sum(x.size for x in jax.tree.leaves(run.abstract_params))
    print(f"{run.model_config['model_type']}, {count / 1e9:.2f}B parameters, compute {config.dtype}, parameters and "
          f"AdamW float32, remat {config.train.remat!r}; mesh {dict(mesh.shape)} on {_DEVICES.value} CPU devices; "
          f"rows of {_SEQ_LEN.value} tokens")

    compiled = plan.compiled_memory(run, _SEQ_LEN.value)
    train_steps = [(label, m) for program, label, m in compiled if program == "train_step"]
    for label, m in train_steps:
        print(f"  train step, {label}: total {m.total_gib:.2f} GiB")
    label, largest = max(train_steps, key=lambda x: x[1].total_gib)
    print(f"train_step is the largest phase: {label}")
    results = {"train_step": largest, **{program: m for program, _, m in compiled if program != "train_step"}}
    print(f"  (eval: {config.train.eval_batch_size} rows; lean_trace: {6 * config.trace.num_people} pairs in chunks "
          f"of {config.trace.chunk_size})")

    print("\n| program | arguments | outputs | temporaries | total |\n|---|---|---|---|---|")
    for program in plan.PROGRAMS:
        r = results[program]
        print(f"| {program} | {r.arguments_gib:.2f} | {r.outputs_gib:.2f} | {r.temporaries_gib:.2f} | "
              f"{r.total_gib:.2f} |")
    print("(GiB per device)")
    if dump_dir:
        for program in plan.PROGRAMS:
            print(f"\nlargest temporaries of {program}:")
            for gib, shape, op in plan.largest_temporaries(dump_dir, MODULES[program], _TOP.value):
                print(f"  {gib:7.3f} GiB  {shape:32s} {op}")
    if _JSON_OUT.value:
        cli.atomic_write(_JSON_OUT.value, json.dumps({k: dataclasses.asdict(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    cli.launch(main)
