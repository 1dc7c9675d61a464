"""A compiled memory plan: the train step, the evaluation step and the lean trace of a config, compiled for its
architecture on N fake CPU devices with abstract inputs (no weights read, nothing downloaded), per device.

    python -m launch.plan --config=configs/llama32_3b.py --devices=8 --config.mesh.data=1 --config.mesh.fsdp=8
    python -m launch.plan --config=configs/llama32_3b.py --devices=8 --config.mesh.fsdp=8 --top=10 --json_out=p.json

The programs are the ones a run executes (`train.jit_steps` of every phase of both schedules, the evaluator's
`evaluate.jit_value_hits`, `trace.jit_trace`), lowered with the config's dtype, remat policy, batch sizes and
mesh, rows of --seq_len tokens. Figures are XLA's `memory_analysis()` of the compiled CPU programs: arguments,
outputs, temporaries, and the total live at once (outputs that reuse donated arguments counted once). The CPU
compiler's plan is a model of an accelerator's, not a measurement of one. --top=N names the N largest temporaries
(the values of XLA's buffer assignment, with the JAX operation that produced each).
"""
import glob
import json
import os
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from factrecall_jax import cli, configuration, evaluate, experiment, models, sharding, trace, train
from factrecall_jax.data import schedules

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/llama32_3b.py.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 8, "Fake CPU devices to compile for (the mesh must fit).", lower_bound=1)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row of every batch.", lower_bound=2)
_TOP = flags.DEFINE_integer("top", 0, "Name the N largest temporaries of each program.", lower_bound=0)
_JSON_OUT = flags.DEFINE_string("json_out", None, "Write {program: {arguments_gib, ...}} to this file.")
flags.mark_flag_as_required("config")

GIB = 2 ** 30
PROGRAMS = ("train_step", "eval", "lean_trace")


def _rows(shape, mesh, split=True):
    """Abstract {"inputs", "targets", "weights"} int32 / float32 rows of `shape`, split by rows (or replicated)."""
    layout = sharding.batch_sharding(mesh, stacked=len(shape) == 3) if split else sharding.replicated(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=layout)
            for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}


def _train_steps(config, graphdef, params, mesh, tables):
    """(phase name, lowered fused steps) for every phase of both schedules."""
    for name in experiment.SCHEDULES:
        run_config = experiment.resolve_batches(experiment.override(config, schedule=name), tables)
        phases = experiment.schedule(run_config)
        for index, phase in enumerate(phases):
            tx, lr = experiment.phase_optimizer(phases, index)
            state = jax.eval_shape(lambda p, tx=tx: train.init_state(p, tx), params)
            state = sharding.abstract_on(state, sharding.state_shardings(state, mesh))
            k = config.train.steps_per_call
            batches = {task: _rows((k, rows, _SEQ_LEN.value), mesh) for task, rows in phase.batch_sizes.items()}
            step = train.make_train_step(graphdef, tx, lr, task_weights=dict(config.train.task_weights),
                                         grad_accum_steps=config.train.grad_accum_steps)
            label = f"{name} {phase.name}: " + " + ".join(f"{n} {t.upper()}" for t, n in phase.batch_sizes.items())
            yield label, train.jit_steps(step, mesh).lower(state, batches)


def _eval(config, graphdef, params, mesh):
    batch = _rows((config.train.eval_batch_size, _SEQ_LEN.value), mesh)
    batch = {"inputs": batch["inputs"], "targets": batch["targets"], "values": batch["targets"]}
    return evaluate.jit_value_hits(graphdef, mesh).lower(params, batch)


def _lean_trace(config, graphdef, params, mesh):
    pairs = _rows((6 * config.trace.num_people, _SEQ_LEN.value), mesh, split=False)  # six facts per person
    fn = trace.jit_trace(trace.lm_loss, graphdef, chunk_size=config.trace.chunk_size, mesh=mesh)
    return fn.lower(params, nnx.State({}), pairs, pairs)


def memory(compiled) -> dict:
    """Per-device GiB of a compiled program: arguments, outputs, temporaries, and all of them live at once."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)
    return {"arguments_gib": m.argument_size_in_bytes / GIB, "outputs_gib": m.output_size_in_bytes / GIB,
            "temporaries_gib": m.temp_size_in_bytes / GIB, "total_gib": total / GIB}


def largest_temporaries(dump_dir: str, module: str, count: int) -> list[tuple[float, str, str]]:
    """(GiB, shape, JAX operation) of the `count` largest values in the temporary buffer of the last compiled module
    whose name contains `module`, read from XLA's buffer assignment and optimized HLO dumps."""
    prefix = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*.cpu_after_optimizations.txt")))[-1][:-len(".txt")]
    with open(prefix + ".txt", encoding="utf-8") as f:
        op_names = dict(re.findall(r"%(\S+) = .*?op_name=\"([^\"]+)\"", f.read()))
    with open(prefix + "-buffer-assignment.txt", encoding="utf-8") as f:
        text = f.read()
    temp = re.search(r"allocation \d+: size \d+, preallocated-temp:\n((?: value:.*\n)+)", text)
    values = re.findall(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)", temp.group(1) if temp else "")
    values = sorted({(int(size), name, shape) for name, size, shape in values}, reverse=True)[:count]
    return [(size / GIB, shape, op_names.get(name, name)) for size, name, shape in values]


def main(_):
    config = _CONFIG.value
    dump_dir = tempfile.mkdtemp(prefix="plan-") if _TOP.value else None
    if dump_dir:  # read when the CPU backend starts, below
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}"
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _DEVICES.value)
    configuration.validate(config)
    mesh = experiment.make_mesh(config)
    model_config = config.model.to_dict()
    tables = None
    if "vocab_size" not in model_config or config.mixed.qa_token_share:  # a word tokenizer: built from the data
        tokenized, tokenizer = experiment.load_data(config)
        tables = schedules.token_tables(tokenized, tokenizer.pad_token_id)
        model_config.setdefault("vocab_size", len(tokenizer))
    abstract = nnx.eval_shape(lambda: models.from_config(model_config, dtype=experiment.DTYPES[config.dtype],
                                                         remat=config.train.remat))
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    params = sharding.abstract_on(params, sharding.param_shardings(params, mesh))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"{model_config['model_type']}, {count / 1e9:.2f}B parameters, compute {config.dtype}, parameters and "
          f"AdamW float32, remat {config.train.remat!r}; mesh {dict(mesh.shape)} on {_DEVICES.value} CPU devices; "
          f"rows of {_SEQ_LEN.value} tokens")

    results, modules = {}, {}
    train_steps = [(label, memory(lowered.compile())) for label, lowered in
                   _train_steps(config, graphdef, params, mesh, tables)]
    for label, figures in train_steps:
        print(f"  train step, {label}: total {figures['total_gib']:.2f} GiB")
    label, results["train_step"] = max(train_steps, key=lambda x: x[1]["total_gib"])
    modules["train_step"] = "jit_steps"
    print(f"train_step is the largest phase: {label}")
    results["eval"] = memory(_eval(config, graphdef, params, mesh).compile())
    modules["eval"] = "jit_eval_step"
    results["lean_trace"] = memory(_lean_trace(config, graphdef, params, mesh).compile())
    modules["lean_trace"] = "jit_fn"
    print(f"  (eval: {config.train.eval_batch_size} rows; lean_trace: {6 * config.trace.num_people} pairs in chunks "
          f"of {config.trace.chunk_size})")

    print(f"\n| program | arguments | outputs | temporaries | total |\n|---|---|---|---|---|")
    for program in PROGRAMS:
        r = results[program]
        print(f"| {program} | {r['arguments_gib']:.2f} | {r['outputs_gib']:.2f} | {r['temporaries_gib']:.2f} | "
              f"{r['total_gib']:.2f} |")
    print("(GiB per device)")
    if dump_dir:
        for program in PROGRAMS:
            print(f"\nlargest temporaries of {program}:")
            for gib, shape, op in largest_temporaries(dump_dir, modules[program], _TOP.value):
                print(f"  {gib:7.3f} GiB  {shape:32s} {op}")
    if _JSON_OUT.value:
        cli.atomic_write(_JSON_OUT.value, json.dumps(results, indent=2))


if __name__ == "__main__":
    cli.launch(main)
