"""Compiled memory plans: the programs a job runs, lowered against abstract inputs (no weights read, no tokenizer
fetched for a pretrained model) and compiled, with XLA's account of their memory per device; and the check that
`launch.train` and `launch.reproduce` make with them before a run reads anything.

The programs are the ones a run executes: `train.jit_steps` of every phase of the job's schedules,
`evaluate.jit_value_hits` and (for the main job) `trace.jit_trace`, lowered with the config's dtype, remat policy,
batch sizes and mesh, rows of `seq_len` tokens. The figures are arguments, outputs, temporaries, and the total live
at once (outputs that reuse donated arguments counted once).
"""
import dataclasses
import functools
import glob
import os
import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from factrecall_jax import configuration, errors, evaluate, experiment, sharding, trace, train
from factrecall_jax.configuration import RunConfig

GIB = 2**30
PROGRAMS = ("train_step", "eval", "lean_trace")
# What each job runs: launch.train one schedule's phases and the evaluator; the main job both schedules and the trace.
JOB_PROGRAMS = {"train": ("train_step", "eval"), "reproduce": PROGRAMS}


@dataclasses.dataclass(frozen=True)
class Memory:
    """Per-device GiB of a compiled program."""
    arguments_gib: float
    outputs_gib: float
    temporaries_gib: float
    total_gib: float

    @classmethod
    def of(cls, compiled) -> "Memory":
        m = compiled.memory_analysis()
        total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        return cls(m.argument_size_in_bytes / GIB, m.output_size_in_bytes / GIB, m.temp_size_in_bytes / GIB,
                   total / GIB)


def _rows(shape, mesh, split=True) -> dict:
    """Abstract {"inputs", "targets", "weights"} int32 / float32 rows of `shape`, split by rows (or replicated)."""
    layout = sharding.batch_sharding(mesh, stacked=len(shape) == 3) if split else sharding.replicated(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=layout)
            for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32), ("weights", jnp.float32))}


def lowered(run: experiment.Run, seq_len: int, programs=PROGRAMS, schedules=configuration.SCHEDULES) -> Iterator[
        tuple[str, str, jax.stages.Lowered]]:
    """(program, what it is, lowered) of each of `programs` for the run's config: the train step once per phase of
    each of `schedules`, the evaluation step, the lean trace of config.trace's pairs."""
    config, mesh, graphdef, params = run.config, run.mesh, run.graphdef, run.abstract_params
    if "train_step" in programs:
        for name in schedules:
            phases = experiment.schedule(config.replace(schedule=name))
            for index, phase in enumerate(phases):
                tx, lr = experiment.phase_optimizer(phases, index)
                state = jax.eval_shape(lambda p, tx=tx: train.init_state(p, tx), params)
                state = sharding.abstract_on(state, sharding.state_shardings(state, mesh))
                k = config.train.steps_per_call
                batches = {task: _rows((k, rows, seq_len), mesh) for task, rows in phase.batch_sizes.items()}
                step = train.make_train_step(graphdef, tx, lr, task_weights=dict(config.train.task_weights),
                                             grad_accum_steps=config.train.grad_accum_steps)
                label = (name if phase.name == name else f"{name} {phase.name}") + ": " + " + ".join(
                    f"{n} {t.upper()}" for t, n in phase.batch_sizes.items())
                yield "train_step", label, train.jit_steps(step, mesh).lower(state, batches)
    if "eval" in programs:
        batch = _rows((config.train.eval_batch_size, seq_len), mesh)
        batch = {"inputs": batch["inputs"], "targets": batch["targets"], "values": batch["targets"]}
        yield "eval", f"{config.train.eval_batch_size} rows", evaluate.jit_value_hits(graphdef, mesh).lower(params,
                                                                                                             batch)
    if "lean_trace" in programs:
        pairs = _rows((6 * config.trace.num_people, seq_len), mesh, split=False)  # six facts per person
        fn = trace.jit_trace(trace.lm_loss, graphdef, chunk_size=config.trace.chunk_size, mesh=mesh)
        yield ("lean_trace", f"{6 * config.trace.num_people} pairs in chunks of {config.trace.chunk_size}",
               fn.lower(params, nnx.State({}), pairs, pairs))


def compiled_memory(run: experiment.Run, seq_len: int, programs=PROGRAMS, schedules=configuration.SCHEDULES) -> list[
        tuple[str, str, Memory]]:
    """(program, what it is, Memory) of each lowered program, compiled."""
    return [(program, label, Memory.of(low.compile())) for program, label, low in
            lowered(run, seq_len, programs, schedules)]


def largest_temporaries(dump_dir: str, module: str, count: int) -> list[tuple[float, str, str]]:
    """(GiB, shape, JAX operation) of the `count` largest values in the temporary buffer of the last compiled module
    whose name contains `module`, read from XLA's buffer assignment and optimized HLO dumps (--xla_dump_to)."""
    prefix = sorted(glob.glob(os.path.join(dump_dir, f"*{module}*.cpu_after_optimizations.txt")))[-1][:-len(".txt")]
    with open(prefix + ".txt", encoding="utf-8") as f:
        op_names = dict(re.findall(r"%(\S+) = .*?op_name=\"([^\"]+)\"", f.read()))
    with open(prefix + "-buffer-assignment.txt", encoding="utf-8") as f:
        text = f.read()
    temp = re.search(r"allocation \d+: size \d+, preallocated-temp:\n((?: value:.*\n)+)", text)
    values = re.findall(r"value: <\d+ (\S+) @\d+> \(size=(\d+),offset=\d+\): (\S+)", temp.group(1) if temp else "")
    values = sorted({(int(size), name, shape) for name, size, shape in values}, reverse=True)[:count]
    return [(size / GIB, shape, op_names.get(name, name)) for size, name, shape in values]


def device_limit(config: RunConfig) -> tuple[float | None, str]:
    """(the memory of one device in GiB, where that figure comes from): config.memory.limit_gib when set, else what
    the backend reports (`memory_stats()["bytes_limit"]`); None where neither says (a CPU)."""
    if config.memory.limit_gib:
        return config.memory.limit_gib, "config.memory.limit_gib"
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"] / GIB, f"{jax.devices()[0].device_kind}'s bytes_limit"
    return None, f"the {jax.default_backend()} backend reports no memory limit"


def _alternatives(config: RunConfig) -> list[dict]:
    """Changes that cut a plan's memory, each adding to the one before: FSDP over all devices, then remat of every
    layer, then 2, 4 and 8 micro-batches."""
    cuts = []
    if dict(config.mesh) != {"data": 1, "fsdp": -1, "tensor": 1}:
        cuts.append({"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1})
    if config.train.remat != "nothing_saveable":
        cuts.append({"train.remat": "nothing_saveable"})
    cuts += [{"train.grad_accum_steps": config.train.grad_accum_steps * accum} for accum in (2, 4, 8)]
    return [functools.reduce(lambda a, b: {**a, **b}, cuts[:i + 1]) for i in range(len(cuts))]


def _fits(config: RunConfig, job: str, seq_len: int, limit: float) -> bool:
    return all(m.total_gib <= limit for _, _, m in compiled_memory(
        experiment.Run(config), seq_len, JOB_PROGRAMS[job], _schedules(config, job)))


def _schedules(config: RunConfig, job: str) -> tuple[str, ...]:
    return configuration.SCHEDULES if job == "reproduce" else (config.schedule,)


def check(config: RunConfig, job: str, log=print) -> None:
    """Compiles the job's programs for the config (no weights read) and refuses, with one line naming the program,
    its size, the limit and the settings that would fit, a plan that does not fit one device (`device_limit`).
    Nothing is compiled where no limit is known."""
    limit, source = device_limit(config)
    if limit is None:
        log(f"memory check: skipped ({source}; config.memory.limit_gib sets one)")
        return
    seq_len = config.memory.seq_len
    run = experiment.Run(config)
    plans = compiled_memory(run, seq_len, JOB_PROGRAMS[job], _schedules(config, job))
    program, label, worst = max(plans, key=lambda p: p[2].total_gib)
    if worst.total_gib <= limit:
        log(f"memory check: fits; the largest program, {program} ({label}), needs {worst.total_gib:.3g} GiB per "
            f"device of {limit:.3g} ({source}; rows of {seq_len} tokens)")
        return
    changes = _alternatives(config)  # the last cuts the most: where it does not fit, none does (one compile)
    fitting = None
    if _fits(config.replace(**changes[-1]), job, seq_len, limit):
        fitting = next(change for change in changes if _fits(config.replace(**change), job, seq_len, limit))
    advice = ("it fits with " + " ".join(f"--config.{k}={v}" for k, v in fitting.items()) if fitting is not None
              else "no mesh, remat or micro-batch setting tried fits: more devices, or smaller batches")
    raise errors.InvalidValue(
        f"memory check: {program} ({label}) needs {worst.total_gib:.3g} GiB per device, more than the "
        f"{limit:.3g} GiB of one device ({source}; rows of {seq_len} tokens, config.memory.seq_len); {advice}; "
        "--skip_memory_check runs anyway")
