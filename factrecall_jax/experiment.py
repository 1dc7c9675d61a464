"""From a config file to trained, evaluated and checkpointed runs: the loop around the pure train step.

`train(config, workdir)` runs one schedule in a work directory (config.json, checkpoints/, metrics.jsonl) and resumes
from its last checkpoint when run again with the same config. The order of the data is a pure function of (seed,
step) and every step boundary is the same in a resumed run, so resuming gives bitwise the uninterrupted result.
"""
import dataclasses
import json
import math
import os
import time

import datasets
import ml_collections
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from factrecall_jax import data, evaluate, models, sharding, train as train_lib
from factrecall_jax.checkpoint import Checkpoints
from factrecall_jax.data import schedules

SCHEDULES = ("mixed", "two_stage")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_data(config):
    """(tokenized DatasetDict, tokenizer) of a config: built in memory in seconds, the same for the same config."""
    fields = {f.name for f in dataclasses.fields(data.DatasetConfig)} - {"seed"}  # config.seed is the one seed
    if unknown := set(config.data) - fields:
        raise ValueError(f"config.data has fields DatasetConfig does not take: {', '.join(sorted(unknown))}")
    datasets.disable_progress_bars()
    dataset_dict = data.build_dataset(data.DatasetConfig(seed=config.seed, **config.data))
    tokenizer = data.get_tokenizer(config.tokenizer, dataset_dict)
    return data.tokenize(dataset_dict, tokenizer, qa_loss=config.qa_loss), tokenizer


def _dtype(config):
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
    return DTYPES[config.dtype]


def init_model(config, vocab_size: int) -> nnx.Module:
    """The model both regimes start from: `config.init_from` (an HF folder or hub id), else a seeded random init."""
    if config.init_from:
        return models.from_pretrained(config.init_from, dtype=_dtype(config))
    return models.from_config({**config.model.to_dict(), "vocab_size": vocab_size}, seed=config.seed,
                              dtype=_dtype(config))


def abstract_model(config, vocab_size: int) -> nnx.Module:
    """The model's structure with shapes and dtypes only (no weights read or drawn): a template for restoring."""
    if config.init_from:
        model_config = models.hf.read_config(models.hf.resolve(config.init_from))
    else:
        model_config = {**config.model.to_dict(), "vocab_size": vocab_size}
    return nnx.eval_shape(lambda: models.from_config(model_config, dtype=_dtype(config)))


def schedule(config) -> tuple[schedules.Phase, ...]:
    """The phases of `config.schedule`, with the optimizer settings of `config.optimizer` (and stage 2's own)."""
    optimizer = train_lib.OptimizerConfig(**config.optimizer)
    if config.schedule == "mixed":
        return schedules.mixed(config.mixed.steps, config.mixed.bio_batch, config.mixed.qa_batch, optimizer)
    if config.schedule == "two_stage":
        c = config.two_stage
        stage2 = dataclasses.replace(optimizer, learning_rate=c.stage2_learning_rate,
                                     weight_decay=c.stage2_weight_decay)
        return schedules.two_stage(c.stage1_steps, c.bio_batch, c.stage2_steps, c.qa_batch, optimizer, stage2,
                                   c.fresh_optimizer)
    raise ValueError(f"schedule={config.schedule!r} is invalid: expected one of {', '.join(SCHEDULES)}")


def resolve_batches(config, tables):
    """`config` with mixed.qa_batch derived from mixed.qa_token_share when that is set (> 0), a multiple of the
    devices a batch is split over, so that config.json holds the rows a step reads."""
    if not config.mixed.qa_token_share:
        return config
    mesh = make_mesh(config)
    qa_rows = schedules.qa_rows_for_token_share(tables, config.mixed.bio_batch, config.mixed.qa_token_share,
                                                multiple_of=math.prod(mesh.shape[a] for a in sharding.BATCH_AXES))
    return override(config, **{"mixed.qa_batch": qa_rows})


def phase_optimizer(phases, index):
    """(optax transformation, learning rate as a function of the global step) of phase `index`."""
    starts = schedules.phase_starts(phases)
    phase = phases[index]
    fresh = max(i for i in range(index + 1) if i == 0 or phases[i].fresh_optimizer)  # where the moments began
    tx = train_lib.make_optimizer(phase.optimizer, phase.steps, count_offset=starts[index] - starts[fresh])
    lr = train_lib.learning_rate_schedule(phase.optimizer, phase.steps)
    return tx, lambda step: lr(step - starts[index])


def _chunk_ends(start, stop, every):
    """The steps after `start` up to `stop` at which a fused call ends: multiples of each of `every`, and stop."""
    ends = {stop}
    for n in every:
        ends.update(range((start // n + 1) * n, stop, n))
    return sorted(e for e in ends if start < e <= stop)


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step; reopening drops records a restored checkpoint has not seen.
    Only process 0 writes (`sharding.is_writer`)."""

    def __init__(self, path: str, resume_step: int):
        self.path = path if sharding.is_writer() else None
        if self.path is None:
            return
        records = read_metrics(path) if os.path.exists(path) else []
        kept = [r for r in records if r["step"] <= resume_step]
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)

    def write(self, record: dict) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_config(config, workdir):
    """Writes the resolved config.json (process 0), or checks that a resumed run has the same one."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                raise ValueError(f"{workdir} holds a run with another config.json; resume with the same config, "
                                 "or use a new --workdir")
    elif sharding.is_writer():
        os.makedirs(workdir, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def _format_seconds(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def train(config, workdir: str, *, until_step: int | None = None, log=print) -> dict:
    """Trains `config.schedule` in `workdir`, evaluating every `config.train.eval_every` steps; returns the final
    evaluation. Resumes from the work directory's last checkpoint, or starts a fork from the stage boundary of
    `config.two_stage.fork_from`. `until_step` stops early (a stage-1-only run, or a test's interrupted run).
    """
    tokenized, tokenizer = load_data(config)
    tables = schedules.token_tables(tokenized, tokenizer.pad_token_id)
    config = resolve_batches(config, tables)
    phases = schedule(config)
    write_config(config, workdir)
    starts = schedules.phase_starts(phases)
    stop = starts[-1] if until_step is None else min(until_step, starts[-1])
    graphdef, params = nnx.split(init_model(config, len(tokenizer)), nnx.Param)
    mesh = make_mesh(config)
    evaluator = evaluate.Evaluator(tables, graphdef, config.train.eval_batch_size, sharding.batch_sharding(mesh))
    tc = config.train

    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints or None)
    state = train_lib.init_state(params, phase_optimizer(phases, 0)[0])
    state_shardings = sharding.state_shardings(state, mesh)
    state = sharding.shard(state, state_shardings)
    if saved := checkpoints.steps():
        # every phase's optimizer state has one structure, so any phase's serves as the template
        state = checkpoints.restore(saved[-1], state)
        log(f"resumed {workdir} at step {saved[-1]}")
    elif config.schedule == "two_stage" and config.two_stage.fork_from:
        source = Checkpoints(os.path.join(config.two_stage.fork_from, "checkpoints"), read_only=True)
        state = source.restore(starts[1], state)
        log(f"forked stage 2 from {config.two_stage.fork_from} at step {starts[1]}")
    step = int(state.step)
    metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), step)
    if step == 0:
        metrics_log.write({"step": 0, "eval": evaluator(state.params)})

    window_start, window_tokens = time.perf_counter(), 0
    run_start, run_steps_start, last_print = time.perf_counter(), step, 0.0
    for index, phase in enumerate(phases):
        if step >= min(starts[index + 1], stop):
            continue
        tx, lr_fn = phase_optimizer(phases, index)
        shares = schedules.token_shares(phase, tables)
        log(f"{phase.name}: " + " + ".join(f"{n} {task.upper()} rows ({shares[task]:.0%} of the tokens)"
                                           for task, n in sorted(phase.batch_sizes.items())) + " per step")
        if index > 0 and phase.fresh_optimizer and step == starts[index]:
            state = sharding.shard(train_lib.init_state(state.params, tx, step), state_shardings)
        steps_fn = sharding.jit_train_steps(train_lib.make_train_step(
            graphdef, tx, lr_fn, task_weights=dict(tc.task_weights), grad_accum_steps=tc.grad_accum_steps),
            state_shardings, sharding.batch_sharding(mesh, stacked=True))
        phase_stop = min(starts[index + 1], stop)
        for end in _chunk_ends(step, phase_stop, [tc.steps_per_call, tc.eval_every, tc.checkpoint_every]):
            batches = schedules.phase_batches(phases, index, step - starts[index], end - starts[index], tables,
                                              config.seed, tc.bio_value_dropout)
            window_tokens += sum(int(np.count_nonzero(b["targets"] != tokenizer.pad_token_id)) for b in batches.values())
            state, metrics = steps_fn(state, _feed(batches, mesh))
            metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {end}; lower the learning rate")
            step = end
            record = {"step": step, "phase": phase.name, **metrics}
            if step % tc.eval_every == 0 or step in starts:
                record["eval"] = evaluator(state.params)
            if step % tc.checkpoint_every == 0 or step in starts or step == stop:
                checkpoints.save(state)
            metrics_log.write(record)
            now = time.perf_counter()
            if "eval" in record or now - last_print >= 10 or step == stop:
                rate = window_tokens / (now - window_start)
                eta = (now - run_start) / (step - run_steps_start) * (stop - step)
                line = (f"{phase.name} step {step}/{stop}  loss {metrics['loss']:.3f}  "
                        f"{rate / 1000:.1f}k tok/s  ETA {_format_seconds(eta)}")
                if "eval" in record:
                    line += "  | " + "  ".join(f"{k.removesuffix('_accuracy')} {v:.3f}"
                                               for k, v in record["eval"].items() if k.endswith("_accuracy"))
                log(line)
                window_start, window_tokens, last_print = now, 0, now
    checkpoints.close()
    final = record["eval"] if step > run_steps_start and "eval" in record else evaluator(state.params)
    logging.info("final evaluation of %s: %s", workdir, final)
    return final


def make_mesh(config) -> jax.sharding.Mesh:
    """The device mesh of `config.mesh` (sizes of the data, fsdp and tensor axes; -1: the rest of the devices)."""
    return sharding.make_mesh(dict(config.mesh))


def _feed(batches, mesh):
    """Fused batches {task: {name: [K, B, T]}} as global arrays split over the mesh. Every host computes the same
    row indices (a pure function of seed and step) and contributes only its own rows of each batch."""
    def one(x):
        local = x[:, sharding.host_batch_slice(x.shape[1])]
        return sharding.global_batch_from_host(local, sharding.batch_sharding(mesh, stacked=True))

    return jax.tree.map(one, batches)


def load_config(workdir: str):
    """The resolved config.json of a work directory, as a ConfigDict."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory written by launch.train")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, step: int | None = None):
    """(config, tokenized data, tokenizer, graphdef, params, step) of a trained run; the last checkpoint by default."""
    config, tokenized, tokenizer, graphdef, params_like = abstract_run(workdir)
    step = checkpoint_steps(workdir)[-1] if step is None else step
    return config, tokenized, tokenizer, graphdef, restore_params(workdir, step, config, params_like), step


def abstract_run(workdir: str):
    """(config, tokenized data, tokenizer, graphdef, abstract params) of a work directory: no weights read."""
    config = load_config(workdir)
    tokenized, tokenizer = load_data(config)
    graphdef, params_like = nnx.split(abstract_model(config, len(tokenizer)), nnx.Param)
    return config, tokenized, tokenizer, graphdef, params_like


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps saved in a work directory, oldest first; an error if there are none."""
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    saved = checkpoints.steps()
    checkpoints.close()
    if not saved:
        raise FileNotFoundError(f"{workdir} has no checkpoints yet")
    return saved


def restore_params(workdir: str, step: int, config, params_like: nnx.State) -> nnx.State:
    """The parameters saved at `step` in `workdir` (params_like: their structure, e.g. abstract), laid out on the
    mesh of `config`."""
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    if step not in checkpoints.steps():
        raise FileNotFoundError(f"{workdir} has no checkpoint at step {step}; it has {checkpoints.steps()}")
    like = jax.eval_shape(lambda p: train_lib.init_state(p, phase_optimizer(schedule(config), 0)[0]), params_like)
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), like,
                        sharding.state_shardings(like, make_mesh(config)))
    params = checkpoints.restore(step, like).params
    checkpoints.close()
    return params


def override(config, **fields):
    """A copy of `config` with dotted fields replaced ("two_stage.fork_from": ...)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for dotted, value in fields.items():
            *parents, name = dotted.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[name] = value
    return config
