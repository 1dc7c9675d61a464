"""From a checked config to trained, evaluated and checkpointed runs: the loop around the pure train step.

`train(config, workdir)` runs one schedule in a work directory (config.json, checkpoints/, metrics.jsonl) and resumes
from its last checkpoint when run again with the same config. The order of the data is a pure function of (seed,
step) and every step boundary is the same in a resumed run, so resuming gives bitwise the uninterrupted result.
"""
import dataclasses
import functools
import json
import math
import os
import time

import datasets
import jax
import numpy as np
from absl import logging
from flax import nnx

from factrecall_jax import checkpoint, cli, configuration, data, errors, evaluate, models, sharding, train as train_lib
from factrecall_jax.checkpoint import Checkpoints
from factrecall_jax.configuration import RunConfig
from factrecall_jax.data import schedules
from factrecall_jax.metrics import MetricsLog


def load_data(config: RunConfig):
    """(tokenized DatasetDict, tokenizer) of a config: built in memory in seconds, the same for the same config."""
    datasets.disable_progress_bars()
    dataset_dict = data.build_dataset(config.data)
    tokenizer = data.get_tokenizer(config.tokenizer, dataset_dict)
    return data.tokenize(dataset_dict, tokenizer, qa_loss=config.qa_loss), tokenizer


def schedule(config: RunConfig) -> tuple[schedules.Phase, ...]:
    """The phases of `config.schedule`, with the optimizer settings of `config.optimizer` (and stage 2's own) and
    the people levers of `config.people` in every phase."""
    if config.schedule == "mixed":
        c = config.mixed
        return schedules.mixed(c.steps, c.bio_batch, c.qa_batch, config.optimizer, config.people)
    c = config.two_stage
    stage2 = dataclasses.replace(config.optimizer, learning_rate=c.stage2_learning_rate,
                                 weight_decay=c.stage2_weight_decay)
    return schedules.two_stage(c.stage1_steps, c.bio_batch, c.stage2_steps, c.qa_batch, config.optimizer, stage2,
                               c.fresh_optimizer, config.people)


def resolve_batches(config: RunConfig, tables) -> RunConfig:
    """`config` with mixed.qa_batch derived from mixed.qa_token_share when that is set (> 0), a multiple of the
    devices a batch is split over and of train.grad_accum_steps, so that config.json holds the rows a step reads."""
    if not config.mixed.qa_token_share:
        return config
    mesh = make_mesh(config)
    rows = math.lcm(math.prod(mesh.shape[a] for a in sharding.BATCH_AXES), config.train.grad_accum_steps)
    qa_rows = schedules.qa_rows_for_token_share(tables, config.mixed.bio_batch, config.mixed.qa_token_share,
                                                multiple_of=rows)
    return config.replace(**{"mixed.qa_batch": qa_rows})


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


def write_config(config: RunConfig, workdir: str) -> None:
    """Writes the resolved config.json (process 0), or checks that a resumed run has the same one."""
    path = os.path.join(workdir, "config.json")
    text = config.to_json()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() != text:
                raise errors.InvalidValue(f"{workdir} holds a run with another config.json; resume with the same "
                                          "config, or use a new --workdir")
    elif sharding.is_writer():
        os.makedirs(workdir, exist_ok=True)
        cli.atomic_write(path, text)


def _format_seconds(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Run:
    """One run: its checked config, its work directory (None for a run not yet written), and what they derive,
    each computed on first use: the tokenized data and tokenizer, the token tables, the config with its batch sizes
    resolved (as config.json records them), the mesh, the model's graphdef and abstract parameters laid out on the
    mesh, the evaluator; the initial parameters and any checkpoint's parameters on demand.

    `Run(config)` takes a RunConfig (configuration.read checks a ConfigDict into one) and reads nothing yet: the
    abstract parameters of a plan cost the data's tokenizer alone, no weights. `Run.load(workdir)` is a trained
    run's, whose config.json was checked before it was written (and may name a fork's stage-1 folder gone since).
    """

    def __init__(self, config: RunConfig, workdir: str | None = None):
        if not isinstance(config, RunConfig):
            raise TypeError(f"Run takes a configuration.RunConfig (configuration.read(config)); got {type(config)}")
        self.given, self.workdir = config, workdir

    @classmethod
    def load(cls, workdir: str) -> "Run":
        return cls(load_config(workdir), workdir)

    @functools.cached_property
    def _data(self):
        return load_data(self.given)

    @property
    def tokenized(self):
        return self._data[0]

    @property
    def tokenizer(self):
        return self._data[1]

    @functools.cached_property
    def tables(self) -> dict[str, schedules.TokenTable]:
        return schedules.token_tables(self.tokenized, self.tokenizer.pad_token_id)

    @functools.cached_property
    def config(self) -> RunConfig:
        """The given config with its batch sizes resolved, as config.json records them."""
        return resolve_batches(self.given, self.tables) if self.given.mixed.qa_token_share else self.given

    @functools.cached_property
    def mesh(self) -> jax.sharding.Mesh:
        return make_mesh(self.given)

    @property
    def dtype(self):
        return configuration.DTYPES[self.given.dtype]

    @functools.cached_property
    def model_config(self) -> dict:
        """The model's config.json. From scratch: config.model with the tokenizer's vocabulary. Fine-tuning a local
        folder: the folder's, which config.model must not contradict. Fine-tuning a hub id: config.model, which
        stands for the checkpoint until its weights are read (and checked: `init_params`), so that a plan needs
        no download."""
        c = self.given
        if not c.init_from:
            return {**c.model, "vocab_size": len(self.tokenizer)}
        if os.path.isdir(os.path.expanduser(c.init_from)):
            return self._agreeing(models.hf.read_config(os.path.expanduser(c.init_from)))
        return dict(c.model)

    def _agreeing(self, checkpoint_config: dict) -> dict:
        """The checkpoint's config.json, once config.model is found not to contradict it (the checkpoint's
        architecture is what trains, and config.json records config.model) and the tokenizer to fit its vocabulary."""
        c, problems = self.given, []
        if (vocab := len(self.tokenizer)) > checkpoint_config["vocab_size"]:  # an id past the embedding reads NaN
            problems.append(f"tokenizer={c.tokenizer!r} has {vocab} tokens, more than the "
                            f"{checkpoint_config['vocab_size']} of the vocabulary of init_from={c.init_from!r}: use "
                            "the checkpoint's own tokenizer")
        if clashes := [f"model.{k}={v!r} (the checkpoint's: {checkpoint_config[k]!r})" for k, v in c.model.items()
                       if k in checkpoint_config and checkpoint_config[k] != v]:
            problems.append(f"config.model disagrees with init_from={c.init_from!r}: {', '.join(clashes)}; make "
                            "config.model agree with the checkpoint's config.json, or leave it out")
        if problems:
            raise errors.InvalidValue("; ".join(problems))
        return checkpoint_config


    @functools.cached_property
    def _split(self):
        return nnx.split(nnx.eval_shape(lambda: models.from_config(
            self.model_config, dtype=self.dtype, remat=self.given.train.remat)), nnx.Param)

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self._split[0]

    @functools.cached_property
    def abstract_params(self) -> nnx.State:
        params = self._split[1]
        return sharding.abstract_on(params, sharding.param_shardings(params, self.mesh))

    def init_params(self) -> nnx.State:
        """The parameters both regimes start from (`config.init_from`, else a seeded random init), each drawn or read
        where its shard lives."""
        kw = dict(dtype=self.dtype, remat=self.given.train.remat, mesh=self.mesh)
        if self.given.init_from:
            folder = models.hf.resolve(self.given.init_from)
            self._agreeing(models.hf.read_config(folder))
            model = models.from_pretrained(folder, **kw)
        else:
            model = models.from_config(self.model_config, seed=self.given.seed, **kw)
        return nnx.split(model, nnx.Param)[1]

    def init_state(self, params: nnx.State, tx, step: int = 0) -> train_lib.TrainState:
        """A TrainState of `params` (donated) with fresh optimizer moments, created where their shards live."""
        like = jax.eval_shape(lambda p: train_lib.init_state(p, tx, step), params)
        return jax.jit(lambda p: train_lib.init_state(p, tx, step), donate_argnums=0,
                       out_shardings=sharding.state_shardings(like, self.mesh))(params)

    def abstract_state(self, tx) -> train_lib.TrainState:
        like = jax.eval_shape(lambda p: train_lib.init_state(p, tx), self.abstract_params)
        return sharding.abstract_on(like, sharding.state_shardings(like, self.mesh))

    @functools.cached_property
    def evaluator(self) -> evaluate.Evaluator:
        """Scores every split (BIO recall, QA accuracy in and out of distribution), batches split like training's;
        built once, on first use (its batches live on the devices)."""
        return evaluate.Evaluator(self.tables, self.graphdef, self.given.train.eval_batch_size,
                                  sharding.batch_sharding(self.mesh))

    def params(self, step: int | None = None, workdir: str | None = None) -> nnx.State:
        """The parameters saved at `step` (default: the last) in `workdir` (default: this run's; a fork's stage-1 run
        has the same model), read alone and laid out on the mesh."""
        workdir = workdir or self.workdir
        step = checkpoint.saved_steps(workdir)[-1] if step is None else step
        checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
        try:
            return checkpoints.restore_params(step, self.abstract_params)
        finally:
            checkpoints.close()

    def model(self, step: int | None = None, workdir: str | None = None) -> nnx.Module:
        """The model at a saved step (`params`), for the trace and analyses that take a module."""
        return nnx.merge(self.graphdef, self.params(step, workdir))


def train(config, workdir: str, *, until_step: int | None = None, log=print) -> dict:
    """Trains `config.schedule` in `workdir`, evaluating every `config.train.eval_every` steps; returns the final
    evaluation. `config`: a RunConfig, or a ConfigDict, checked first (configuration.read). Resumes from the work
    directory's last checkpoint, or starts a fork from the stage boundary of `config.two_stage.fork_from`.
    `until_step` stops early (a stage-1-only run, or a test's interrupted run).
    """
    run = Run(configuration.read(config), workdir)
    run.model_config  # init_from and the tokenizer checked against each other before anything is written
    write_config(run.config, workdir)
    phases = schedule(run.config)
    starts = schedules.phase_starts(phases)
    stop = starts[-1] if until_step is None else min(until_step, starts[-1])
    tc = run.config.train
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=tc.keep_checkpoints or None)
    try:
        state = _start(run, phases, checkpoints, workdir, log)
        metrics_log = MetricsLog(os.path.join(workdir, "metrics.jsonl"), int(state.step), tensorboard=tc.tensorboard)
        try:
            if int(state.step) == 0:
                metrics_log.write({"step": 0, "eval": run.evaluator(state.params)})
            progress, final = _Progress(int(state.step), stop, log), None
            for index in range(len(phases)):
                if int(state.step) < min(starts[index + 1], stop):
                    state, final = _train_phase(run, phases, index, state, stop, checkpoints, metrics_log, progress)
        finally:
            metrics_log.close()
    finally:
        checkpoints.close()
    final = final or run.evaluator(state.params)
    logging.info("final evaluation of %s: %s", workdir, final)
    return final


def _start(run: Run, phases, checkpoints: Checkpoints, workdir: str, log) -> train_lib.TrainState:
    """The state a run continues from: its last checkpoint, a fork's stage boundary, or the initial parameters."""
    tx = phase_optimizer(phases, 0)[0]  # every phase's optimizer state has one structure: any serves as template
    if saved := checkpoints.steps():
        log(f"resumed {workdir} at step {saved[-1]}")
        return checkpoints.restore(saved[-1], run.abstract_state(tx))
    if run.config.schedule == "two_stage" and run.config.two_stage.fork_from:
        boundary = schedules.phase_starts(phases)[1]
        source = Checkpoints(os.path.join(run.config.two_stage.fork_from, "checkpoints"), read_only=True)
        try:
            state = source.restore(boundary, run.abstract_state(tx))
        finally:
            source.close()
        log(f"forked stage 2 from {run.config.two_stage.fork_from} at step {boundary}")
        return state
    return run.init_state(run.init_params(), tx)


class _Progress:
    """The progress line: throughput over the last window, ETA over the whole session, evaluations when made."""

    def __init__(self, step: int, stop: int, log):
        self.stop, self.log, self.session_start_step = stop, log, step
        self.session_start = self.window_start = time.perf_counter()
        self.window_tokens, self.last_print = 0, 0.0

    def update(self, record: dict, tokens: int) -> None:
        self.window_tokens += tokens
        now, step = time.perf_counter(), record["step"]
        if "eval" not in record and now - self.last_print < 10 and step != self.stop:
            return
        rate = self.window_tokens / (now - self.window_start)
        eta = (now - self.session_start) / (step - self.session_start_step) * (self.stop - step)
        speed = f"{rate / 1000:.1f}k" if rate >= 1000 else f"{rate:.0f}"
        line = (f"{record['phase']} step {step}/{self.stop}  loss {record['loss']:.3f}  {speed} tok/s  "
                f"ETA {_format_seconds(eta)}")
        if "eval" in record:
            line += "  | " + "  ".join(f"{k.removesuffix('_accuracy')} {v:.3f}"
                                       for k, v in record["eval"].items() if k.endswith("_accuracy"))
        self.log(line)
        self.window_start, self.window_tokens, self.last_print = now, 0, now


def _train_phase(run: Run, phases, index, state, stop, checkpoints, metrics_log, progress):
    """Runs phase `index` from `state` up to its end (or `stop`) in fused calls, evaluating, checkpointing and
    logging at their boundaries; returns (state, the evaluation of the last call, or None)."""
    config, phase, tc = run.config, phases[index], run.config.train
    starts = schedules.phase_starts(phases)
    tx, lr_fn = phase_optimizer(phases, index)
    shares = schedules.token_shares(phase, run.tables)
    progress.log(f"{phase.name}: " + " + ".join(f"{n} {task.upper()} rows ({shares[task]:.0%} of the tokens)"
                                                for task, n in sorted(phase.batch_sizes.items())) + " per step")
    step = int(state.step)
    if index > 0 and phase.fresh_optimizer and step == starts[index]:
        state = run.init_state(state.params, tx, step)
    steps_fn = train_lib.jit_steps(train_lib.make_train_step(
        run.graphdef, tx, lr_fn, task_weights=dict(tc.task_weights), grad_accum_steps=tc.grad_accum_steps), run.mesh)
    for end in _chunk_ends(step, min(starts[index + 1], stop), [tc.steps_per_call, tc.eval_every, tc.checkpoint_every]):
        batches = schedules.phase_batches(phases, index, step - starts[index], end - starts[index], run.tables,
                                          config.seed, tc.bio_value_dropout, tc.length_buckets)
        state, metrics = steps_fn(state, _feed(batches, run.mesh))
        metrics = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at step {end}; lower the learning rate")
        step = end
        record = {"step": step, "phase": phase.name, **metrics}
        if step % tc.eval_every == 0 or step in starts:
            record["eval"] = run.evaluator(state.params)
        if step % tc.checkpoint_every == 0 or step in starts or step == stop:
            checkpoints.save(state)
        metrics_log.write(record)
        progress.update(record, sum(_real_tokens(b, run.tokenizer) for b in batches.values()))
    return state, record.get("eval")


def _real_tokens(batch: dict, tokenizer) -> int:
    """The targets of a batch that are not padding. Every row ends with EOS (data.tokenize), which a tokenizer whose
    pad token is EOS would let pass for padding: one per row is counted back."""
    rows = math.prod(batch["targets"].shape[:-1])
    eos_is_pad = tokenizer.eos_token_id == tokenizer.pad_token_id
    return int(np.count_nonzero(batch["targets"] != tokenizer.pad_token_id)) + (rows if eos_is_pad else 0)


def make_mesh(config: RunConfig) -> jax.sharding.Mesh:
    """The device mesh of `config.mesh` (sizes of the data, fsdp and tensor axes; -1: the rest of the devices)."""
    return sharding.make_mesh(dict(config.mesh))


def _feed(batches, mesh):
    """Fused batches {task: {name: [K, B, T]}} as global arrays split over the mesh. Every host computes the same
    row indices (a pure function of seed and step) and contributes only its own rows of each batch."""
    def one(x):
        local = x[:, sharding.host_batch_slice(x.shape[1])]
        return sharding.global_batch_from_host(local, sharding.batch_sharding(mesh, stacked=True))

    return jax.tree.map(one, batches)


def load_config(workdir: str) -> RunConfig:
    """The resolved config.json of a work directory, in typed sections."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise errors.MissingPath(f"{path} does not exist: --workdir must be a directory written by launch.train")
    with open(path, encoding="utf-8") as f:
        return RunConfig.from_dict(json.load(f))
