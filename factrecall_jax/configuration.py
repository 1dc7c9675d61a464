"""What a run config holds: the checks on it, run before anything is written, and its typed sections.

A configs/ file is one ConfigDict whose sections are read in different places, some only hours into a run (the trace
of launch.reproduce, a fork's stage-1 checkpoint). `read` checks all the sections a job reads, at once and cheaply
(no dataset built, no weights read, nothing downloaded), so a mistyped value fails before a work directory exists
(otherwise its config.json stays behind, and the corrected rerun is refused as a run with another config), and turns
the ConfigDict into a `RunConfig`: one frozen dataclass per section, which every module reads from then on (as
nanodo builds `DoConfig(**c.model)`); no ConfigDict reaches the library below the launch scripts.
"""
import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from factrecall_jax import analysis, checkpoint, data, errors, models, sharding, train as train_lib
from factrecall_jax.data import dataset, schedules, tokenizer

SCHEDULES = ("mixed", "two_stage")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# A Hugging Face hub id, "owner/name" or "name"; a string that is neither this nor a folder names nothing.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")
# What a learning rate (positive) and a weight decay (not positive: >= 0) must be.
_EXPECTED = {True: "a positive number", False: "a number >= 0"}
# The batch sizes of both schedules (mixed.qa_batch only where mixed.qa_token_share does not derive it).
_BATCHES = ("mixed.bio_batch", "mixed.qa_batch", "two_stage.bio_batch", "two_stage.qa_batch")


def validate(config, job: str = "train") -> None:
    """Raises a UserError naming each bad field of `config` (dotted, e.g. "mixed.steps=-5") and what would be valid.

    job: what will read the config. "data" (launch.generate_data): the data and the tokenizer; "train" (a run of
    experiment.train): also both schedules, the optimizer, the mesh on this job's devices, the model and the train
    section; "reproduce" (launch.reproduce): also the stage-2 sweep and the trace of the study.
    Every section is checked and its first problem reported: one problem raises its own error (InvalidValue,
    MissingPath), several raise one InvalidValue that lists them all, so one rerun can fix them together.
    """
    problems = []
    for check in _JOBS[job]:
        try:
            check(config)
        except errors.UserError as e:
            problems.append(e)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise errors.InvalidValue(f"{len(problems)} problems in the config: " + "; ".join(map(str, problems)))


def _known_fields(name: str, section, cls, label: str, exclude=frozenset()) -> None:
    """Refuses a config section's field that the dataclass `cls` (called `label` in the message) does not have."""
    fields = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    if unknown := sorted(set(section) - fields):
        raise errors.InvalidValue(f"{name}.{unknown[0]} is not a field of {label}: expected some of "
                                  f"{', '.join(sorted(fields))}")


def dataset_config(config) -> data.DatasetConfig:
    """The data.DatasetConfig of `config.data` and `config.seed` (the one seed); its errors name the config field."""
    _known_fields("data", config.data, data.DatasetConfig, "data.DatasetConfig", exclude={"seed"})
    _check(_is_int(config.seed) and config.seed >= 0, "seed", config.seed, "an integer >= 0")
    try:
        return data.DatasetConfig(seed=config.seed, **config.data)
    except errors.InvalidValue as e:
        raise errors.InvalidValue(f"data.{e}") from None


def _check(ok, name, value, expected):
    if not ok:
        raise errors.InvalidValue(f"{name}={value!r} is invalid: expected {expected}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_nonnegative(value, positive=False):
    return _is_number(value) and (value > 0 if positive else value >= 0)


def _get(config, name):
    node = config
    for key in name.split("."):
        if key not in node:
            raise errors.InvalidValue(f"config.{name} is missing: every configs/ file sets it (configs/default.py)")
        node = node[key]
    return node


def _count(config, name):
    value = _get(config, name)
    _check(_is_int(value) and value > 0, name, value, "a positive integer")
    return value


def _batches(config):
    """{dotted name: value} of the batch sizes a step reads, as given in the config."""
    return {name: _get(config, name) for name in _BATCHES
            if name != "mixed.qa_batch" or not config.mixed.qa_token_share}


def _folder_or_hub_id(name, value, files, expected):
    """`value` is a folder holding one of `files`, or is shaped like a hub id (which is not looked up here)."""
    path = os.path.expanduser(value)
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, f)) for f in files):
            raise errors.MissingPath(f"{name}={value!r} holds none of {', '.join(files)}: expected {expected}")
    elif os.path.exists(path) or not _HUB_ID.fullmatch(value):
        raise errors.MissingPath(f"{name}={value!r} is not a folder: expected {expected}, or a hub id (owner/name)")


def _qa_people(config):
    """(people in qa_train, people held out) of the dataset, as data.build_dataset splits them."""
    c = dataset_config(config)
    num_train = round(c.qa_train_fraction * c.num_people)
    return num_train, c.num_people - num_train


def _data(config):
    num_train, held_out = _qa_people(config)
    if not (num_train and held_out):
        raise errors.InvalidValue(
            f"data.qa_train_fraction={config.data.qa_train_fraction!r} is invalid: it puts {num_train} of the "
            f"{num_train + held_out} people in qa_train; expected a fraction that leaves people both to train on "
            "and held out")
    _check(config.qa_loss in dataset.QA_LOSSES, "qa_loss", config.qa_loss, f"one of {', '.join(dataset.QA_LOSSES)}")


def _schedules(config):
    _check(config.schedule in SCHEDULES, "schedule", config.schedule, f"one of {', '.join(SCHEDULES)}")
    share = config.mixed.qa_token_share
    _check(_is_number(share) and (share == 0 or 0 < share < 1), "mixed.qa_token_share", share,
           "0 (use mixed.qa_batch) or a share of the tokens between 0 and 1")
    for name in ("mixed.steps", "two_stage.stage1_steps", "two_stage.stage2_steps", *_batches(config)):
        _count(config, name)
    c = config.two_stage
    _check(isinstance(c.fresh_optimizer, bool), "two_stage.fresh_optimizer", c.fresh_optimizer, "True or False")
    if config.schedule == "two_stage" and c.fork_from:
        try:
            saved = checkpoint.saved_steps(c.fork_from)
        except errors.MissingPath as e:
            raise errors.MissingPath(f"two_stage.fork_from={c.fork_from!r}: {e}; expected a two-stage work directory "
                                     "whose stage 1 is done, or \"\"") from None
        _check(c.stage1_steps in saved, "two_stage.fork_from", c.fork_from,
               f"a run with a checkpoint at the stage boundary, step {c.stage1_steps} (it has {saved})")


def _people(config):
    _known_fields("people", _get(config, "people"), schedules.PeopleSampling, "schedules.PeopleSampling")
    start = _get(config, "people.start_fraction")
    _check(_is_number(start) and 0 < start <= 1, "people.start_fraction", start,
           "a fraction in (0, 1] (1.0: all people from the start)")
    widen = _get(config, "people.widen_fraction")
    _check(_is_number(widen) and 0 <= widen <= 1, "people.widen_fraction", widen,
           "a fraction of each phase's steps in [0, 1]")
    power = _get(config, "people.power")
    _check(_is_nonnegative(power), "people.power", power, "a number >= 0 (0: uniform)")


def _optimizers(config):
    _known_fields("optimizer", config.optimizer, train_lib.OptimizerConfig, "train.OptimizerConfig")
    train_lib.OptimizerConfig(**config.optimizer)  # its errors name the field: "optimizer.learning_rate=0 ..."
    for name, positive in (("stage2_learning_rate", True), ("stage2_weight_decay", False)):  # stage 2's own
        value = config.two_stage[name]
        _check(_is_nonnegative(value, positive), f"two_stage.{name}", value, _EXPECTED[positive])


def _mesh(config):
    try:
        mesh = sharding.make_mesh(dict(config.mesh))
    except errors.InvalidValue as e:
        raise errors.InvalidValue(f"mesh={dict(config.mesh)}: {e}") from None
    rows = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    for name, value in {**_batches(config), "train.eval_batch_size": config.train.eval_batch_size}.items():
        if _is_int(value) and value > 0:  # other values are reported by their own section
            _check(value % rows == 0, name, value,
                   f"a multiple of {rows}, the devices a batch is split over (mesh data x fsdp)")


def _model(config):
    _check(config.dtype in DTYPES, "dtype", config.dtype, f"one of {', '.join(DTYPES)}")
    if config.init_from:
        _folder_or_hub_id("init_from", config.init_from, ["config.json"],
                          '"" (train config.model from scratch), a Hugging Face checkpoint folder')
    hf_config = config.model.to_dict()
    if config.init_from and not hf_config:  # the checkpoint's config.json is the architecture
        return
    model_type = hf_config.get("model_type")
    _check(model_type in models.MODELS, "model.model_type", model_type, f"one of {', '.join(models.MODELS)}")
    try:  # the vocabulary size comes from the tokenizer when the config has none
        models.MODELS[model_type][0].from_hf_config({"vocab_size": 1, **hf_config})
    except errors.InvalidValue as e:
        message = str(e)
        raise errors.InvalidValue(f"model.{message}" if re.match(r"\w+=", message) else f"model: {message}") from None


def _tokenizer(config):
    if config.tokenizer != "word":
        _folder_or_hub_id("tokenizer", config.tokenizer, tokenizer.TOKENIZER_FILES,
                          '"word" (trained on the dataset), a Hugging Face tokenizer folder')


def _train(config):
    tc = config.train
    for name in ("steps_per_call", "eval_every", "checkpoint_every", "eval_batch_size", "grad_accum_steps"):
        _count(config, f"train.{name}")
    buckets = _get(config, "train.length_buckets")
    _check(_is_int(buckets) and buckets >= 0, "train.length_buckets", buckets, "0 (off) or a positive integer")
    _check(_is_int(tc.keep_checkpoints) and tc.keep_checkpoints >= 0, "train.keep_checkpoints", tc.keep_checkpoints,
           "0 (keep all) or a positive integer")
    _check(_is_number(tc.bio_value_dropout) and 0 <= tc.bio_value_dropout < 1, "train.bio_value_dropout",
           tc.bio_value_dropout, "a probability in [0, 1)")
    policies = models.layers.REMAT_POLICIES
    _check(_get(config, "train.remat") in policies, "train.remat", tc.remat, f"one of {', '.join(policies)}")
    weights = dict(tc.task_weights)
    _check(set(weights) <= set(schedules.TASK_SPLITS) and all(map(_is_nonnegative, weights.values())),
           "train.task_weights", weights, f"numbers >= 0 for the tasks {', '.join(schedules.TASK_SPLITS)}")
    for name, value in _batches(config).items():
        if _is_int(value) and value > 0:
            _check(value % tc.grad_accum_steps == 0, name, value,
                   f"a multiple of train.grad_accum_steps={tc.grad_accum_steps} (the micro-batches of a step)")


def _memory(config):
    section = config.get("memory", {})
    _known_fields("memory", section, Memory, "configuration.Memory")
    limit = section.get("limit_gib", 0.0)
    _check(_is_nonnegative(limit), "memory.limit_gib", limit, "0 (the device's own) or a number of GiB")
    seq_len = section.get("seq_len", Memory.seq_len)
    _check(_is_int(seq_len) and seq_len >= 2, "memory.seq_len", seq_len, "an integer >= 2")


def _base(config):
    section = config.get("base", {})
    _known_fields("base", section, Base, "configuration.Base")
    people, seed = section.get("num_people", 0), section.get("seed", Base.seed)
    _check(_is_int(people) and people >= 0, "base.num_people", people, "0 (no base) or a number of people")
    _check(_is_int(seed) and seed >= 0 and seed != config.seed, "base.seed", seed,
           f"an integer >= 0 other than config.seed={config.seed} (the base's people are another population)")
    if people:
        _check(not config.init_from, "init_from", config.init_from,
               '"" with a base: the base is the checkpoint both regimes start from')
        data.DatasetConfig(**{**config.data, "num_people": people, "seed": seed})


def _study(config):
    for name, positive in (("stage2_learning_rates", True), ("stage2_weight_decays", False)):
        sweep = tuple(_get(config, f"reproduce.{name}"))
        _check(sweep and all(_is_nonnegative(v, positive) for v in sweep), f"reproduce.{name}", sweep,
               f"one or more, each {_EXPECTED[positive]}")
    for name in ("num_checkpoints", "num_people", "chunk_size"):
        _count(config, f"trace.{name}")
    try:
        rows = sharding.batch_devices(sharding.make_mesh(dict(config.mesh)))
    except errors.UserError:  # the mesh section reports it
        rows = 1
    chunk = config.trace.chunk_size
    if _is_int(chunk) and chunk > 0:
        _check(chunk % rows == 0, "trace.chunk_size", chunk,
               f"a multiple of {rows}, the devices every chunk's pairs are split over (mesh data x fsdp)")
    analysis.check_fraction(_get(config, "trace.top_fraction"), "trace.top_fraction")
    save_sums = config.trace.get("save_sums", False)
    _check(isinstance(save_sums, bool), "trace.save_sums", save_sums, "True or False")
    try:
        most = min(_qa_people(config))
    except errors.UserError:  # the data section reports it
        return
    _check(config.trace.num_people <= most, "trace.num_people", config.trace.num_people,
           f"at most {most}, the people of the smaller QA split (data.num_people, data.qa_train_fraction)")


_JOBS = {"data": (_data, _tokenizer)}
_JOBS["train"] = (*_JOBS["data"], _schedules, _people, _optimizers, _mesh, _model, _train, _memory)
_JOBS["reproduce"] = (*_JOBS["train"], _study, _base)


# ---------------------------------------------------------------------------------------------------------------------
# Typed sections: what every module reads once a config has been checked.
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mixed:
    """Every mixed step: bio_batch biographies and qa_batch training QA pairs (derived from qa_token_share > 0)."""
    steps: int
    bio_batch: int
    qa_batch: int
    qa_token_share: float


@dataclasses.dataclass(frozen=True)
class TwoStage:
    """Stage 1 (biographies), then stage 2 (QA pairs) with its own peak learning rate and weight decay; fork_from: a
    two-stage work directory whose stage-boundary checkpoint stage 2 starts from ("": run stage 1)."""
    stage1_steps: int
    bio_batch: int
    stage2_steps: int
    qa_batch: int
    stage2_learning_rate: float
    stage2_weight_decay: float
    fresh_optimizer: bool
    fork_from: str


@dataclasses.dataclass(frozen=True)
class Train:
    """The training loop's settings (configs/default.py says what each does)."""
    bio_value_dropout: float
    task_weights: Mapping[str, float]
    grad_accum_steps: int
    steps_per_call: int
    eval_every: int
    eval_batch_size: int
    checkpoint_every: int
    keep_checkpoints: int
    tensorboard: bool
    remat: str
    length_buckets: int = 0  # a config.json written before buckets pads each batch to its own longest row


@dataclasses.dataclass(frozen=True)
class Reproduce:
    """The stage-2 sweep of launch.reproduce."""
    stage2_learning_rates: tuple[float, ...]
    stage2_weight_decays: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Trace:
    """The look inside (study.mechanisms): checkpoints, people, the shared fraction, pairs per chunk; save_sums: also
    write the three parameter-sized sums (3x the float32 model per regime), not only the shared masks."""
    num_checkpoints: int
    num_people: int
    top_fraction: float
    chunk_size: int
    save_sums: bool = False


@dataclasses.dataclass(frozen=True)
class Base:
    """The paper's protocol in miniature (study.pretrained_base): first a base model trained (mixed) on its own
    population of num_people people drawn with `seed`, disjoint from the study's; both regimes then fine-tune from it.
    num_people 0: no base, both regimes start from the seeded random init (or init_from)."""
    num_people: int = 0
    seed: int = 1000


@dataclasses.dataclass(frozen=True)
class Memory:
    """The memory check before a run (`plan.check`): the memory of one device in GiB (0: what the backend reports;
    a CPU reports none, so the check is skipped there unless this is set) and the row length the plan assumes."""
    limit_gib: float = 0.0
    seq_len: int = 256


_SECTIONS = {"data": data.DatasetConfig, "optimizer": train_lib.OptimizerConfig, "mixed": Mixed,
             "two_stage": TwoStage, "people": schedules.PeopleSampling, "train": Train, "reproduce": Reproduce,
             "trace": Trace, "memory": Memory, "base": Base}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A checked config in typed sections, the same names as configs/default.py's (whose comments say what each
    does). `model` is a config.json-style dict (no vocab_size where the tokenizer sets it); `mesh` the sizes of the
    data, fsdp and tensor axes."""
    seed: int
    data: data.DatasetConfig
    tokenizer: str
    qa_loss: str
    model: Mapping[str, Any]
    init_from: str
    dtype: str
    schedule: str
    optimizer: train_lib.OptimizerConfig
    mixed: Mixed
    two_stage: TwoStage
    people: schedules.PeopleSampling
    mesh: Mapping[str, int]
    distributed: bool
    train: Train
    reproduce: Reproduce
    trace: Trace
    memory: Memory
    base: Base

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """The sections of a config as a dict (a config.json, or a checked ConfigDict's to_dict()). A section that a
        config.json written before it existed lacks takes its defaults (people: the levers off)."""
        raw = dict(raw)
        fields = {}
        for f in dataclasses.fields(cls):
            value = raw.get(f.name, {}) if f.name in _SECTIONS else raw[f.name]
            if f.name == "data":
                value = {**value, "seed": raw["seed"]}
            if f.name in _SECTIONS:
                value = _SECTIONS[f.name](**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            elif isinstance(value, Mapping):
                value = dict(value)
            fields[f.name] = value
        return cls(**fields)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        del out["data"]["seed"]  # config.seed is the one seed
        return out

    def to_json(self) -> str:
        """config.json: the same text for the same config, so a resumed run can be told from another."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **dotted) -> "RunConfig":
        """A copy with dotted fields replaced: replace(schedule="two_stage", **{"two_stage.fork_from": path})."""
        config = self
        for name, value in dotted.items():
            section, _, field = name.partition(".")
            if field:
                old = getattr(config, section)
                value = ({**old, field: value} if isinstance(old, Mapping)
                         else dataclasses.replace(old, **{field: value}))
            config = dataclasses.replace(config, **{section: value})
        return config


def read(config, job: str = "train") -> RunConfig:
    """`config` (a ConfigDict from a configs/ file, with any overrides) checked for `job` (`validate`) and read into
    typed sections; a RunConfig is returned as it is (it was checked when it was read)."""
    if isinstance(config, RunConfig):
        return config
    validate(config, job)
    return RunConfig.from_dict(config.to_dict())
