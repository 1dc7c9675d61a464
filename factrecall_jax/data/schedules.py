"""Training schedules as data: two-stage and mixed differ only in which rows each step reads.

A schedule is a tuple of `Phase`s run in order. Which rows a step reads, and which BIO value tokens it drops, is a
pure function of (seed, phase, step), so a resumed run needs no iterator state and a forked stage 2 reads exactly
what the unforked one would. Within a phase each task walks through its split in epochs, each a fresh permutation;
a batch that runs past the end of an epoch continues into the next, so every batch is full, even when a split has
fewer rows than the batch.

With a people lever on (`PeopleSampling`, Zucchet et al. 2025's data-order levers: a curriculum that widens from a
subset of the people to all, and people drawn by a power law), a step instead draws its rows i.i.d. with replacement
from the rows of the people it admits, by their people's weights: still a pure function of (seed, phase, step).

A batch maps each task ("bio", "qa") to {"inputs", "targets", "weights"} [B, T]: targets are the inputs shifted by
one, weights the loss mask of the targets, T the longest row of the batch minus one (right padding, which causal
attention never sees from real tokens).
"""
import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from factrecall_jax import errors

# The split each task trains on.
TASK_SPLITS = {"bio": "bio", "qa": "qa_train"}
_DROPOUT_STREAM = len(TASK_SPLITS)  # the rng stream after the tasks' permutation streams
# The people levers' rng stream: the 3rd key of the people orders (seed, 0, stream, order), the 5th of a step's draws
# (seed, phase, task, step, stream); numpy pads shorter keys with zeros, so no other stream's key can equal them.
_PEOPLE_STREAM = _DROPOUT_STREAM + 1
# The two seeded orders of the people, one per lever, independent so that each lever keeps its own meaning.
PEOPLE_ORDERS = ("admission", "popularity")


def _is_count(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


@dataclasses.dataclass(frozen=True)
class PeopleSampling:
    """Which people a phase's steps read (Zucchet et al. 2025's data-order levers); the defaults turn both off.

    start_fraction: the share of the people a phase's first step reads (1.0: all, no curriculum); people are
      admitted in a seeded order ("admission"), the same for every phase and both schedules.
    widen_fraction: the share of the phase's steps over which the admitted share grows linearly from start_fraction
      to all people (0: all from the phase's second step on).
    power: each row is drawn with its person's weight (rank + 1) ** -power, rank in a second seeded order
      ("popularity"); 0 is uniform.
    """
    start_fraction: float = 1.0
    widen_fraction: float = 0.5
    power: float = 0.0

    @property
    def is_on(self) -> bool:
        """Whether steps draw their rows by people; otherwise they walk the epochs of `row_indices`."""
        return self.start_fraction < 1 or self.power > 0

    def admitted(self, num_people: int, phase_steps: int, step: int) -> int:
        """How many people, the first of the admission order, step `step` of a phase of `phase_steps` steps reads."""
        progress = min(1.0, step / max(1.0, self.widen_fraction * phase_steps))
        share = self.start_fraction + (1 - self.start_fraction) * progress
        return min(num_people, math.ceil(share * num_people))


@dataclasses.dataclass(frozen=True)
class Phase:
    """`steps` optimizer steps on batches of `batch_sizes` rows per task, with `optimizer` (a train.OptimizerConfig).

    fresh_optimizer: start this phase with a new optimizer state (moments and schedule count reset); otherwise the
      previous phase's moments carry over and only the learning rate and weight decay change.
    people: which people the steps read (`PeopleSampling`; default: every row once per epoch).
    """
    name: str
    steps: int
    batch_sizes: Mapping[str, int]
    optimizer: Any
    fresh_optimizer: bool = True
    people: PeopleSampling = PeopleSampling()

    def __post_init__(self):
        if not _is_count(self.steps):
            raise errors.InvalidValue(f"phase {self.name!r}: steps={self.steps!r} is invalid: "
                                      "expected a positive integer")
        for task, size in self.batch_sizes.items():
            if task not in TASK_SPLITS:
                raise errors.InvalidValue(f"phase {self.name!r}: unknown task {task!r}; "
                                          f"tasks: {', '.join(TASK_SPLITS)}")
            if not _is_count(size):
                raise errors.InvalidValue(f"phase {self.name!r}: batch size {size!r} for {task!r} is invalid: "
                                          "expected a positive integer")


def mixed(steps: int, bio_batch: int, qa_batch: int, optimizer,
          people: PeopleSampling = PeopleSampling()) -> tuple[Phase, ...]:
    """Every batch holds `bio_batch` biographies and `qa_batch` training QA pairs, of `people`."""
    return (Phase("mixed", steps, {"bio": bio_batch, "qa": qa_batch}, optimizer, people=people),)


def qa_rows_for_token_share(tables: Mapping[str, "TokenTable"], bio_rows: int, qa_token_share: float,
                            multiple_of: int = 1) -> int:
    """QA rows per mixed step that make QA `qa_token_share` of its tokens next to `bio_rows` biographies (by the mean
    row lengths), rounded to a multiple of `multiple_of` (the devices a batch is split over): Physics 3.1 mixes by
    tokens (QA 80% of them), and a biography is about three QA pairs long."""
    if not 0 < qa_token_share < 1:
        raise errors.InvalidValue(f"qa_token_share={qa_token_share!r} is invalid: expected 0 < share < 1 "
                                  "(0 in a config: use qa_batch as given)")
    bio_tokens = bio_rows * tables[TASK_SPLITS["bio"]].lengths.mean()
    rows = bio_tokens * qa_token_share / (1 - qa_token_share) / tables[TASK_SPLITS["qa"]].lengths.mean()
    return max(1, round(rows / multiple_of)) * multiple_of


def token_shares(phase: Phase, tables: Mapping[str, "TokenTable"]) -> dict[str, float]:
    """{task: its share of a step's tokens} of a phase, by the mean row lengths."""
    tokens = {task: size * tables[TASK_SPLITS[task]].lengths.mean() for task, size in phase.batch_sizes.items()}
    return {task: float(n / sum(tokens.values())) for task, n in tokens.items()}


def two_stage(stage1_steps: int, bio_batch: int, stage2_steps: int, qa_batch: int, optimizer, stage2_optimizer,
              fresh_optimizer: bool = True, people: PeopleSampling = PeopleSampling()) -> tuple[Phase, ...]:
    """Biographies only, then training QA pairs only, with stage 2's own optimizer settings.

    `people` applies to both stages, as `mixed` applies it to its one phase, so that both regimes read the same
    distribution of people (each stage widens its curriculum over its own steps).
    """
    return (Phase("bio", stage1_steps, {"bio": bio_batch}, optimizer, people=people),
            Phase("qa", stage2_steps, {"qa": qa_batch}, stage2_optimizer, fresh_optimizer, people))


def phase_starts(phases) -> list[int]:
    """The global step at which each phase starts, and the total number of steps last."""
    return np.cumsum([0] + [p.steps for p in phases]).tolist()


@dataclasses.dataclass(frozen=True)
class TokenTable:
    """One tokenized split as padded numpy arrays [N, L] (L: its longest row), for fast row gathering."""
    input_ids: np.ndarray
    loss_mask: np.ndarray
    value_ids: np.ndarray  # index into ATTRIBUTES of the value a token belongs to, -1 elsewhere
    lengths: np.ndarray
    pad_id: int
    person_ids: np.ndarray  # [N] the person each row is about

    @classmethod
    def from_split(cls, split, pad_id: int) -> "TokenTable":
        rows = split.select_columns(["input_ids", "loss_mask", "value_attribute_ids", "person_id"]).to_dict()
        lengths = np.array([len(ids) for ids in rows["input_ids"]], np.int32)
        width = int(lengths.max(initial=0))

        def padded(column, fill, dtype):
            out = np.full((len(lengths), width), fill, dtype)
            for i, values in enumerate(rows[column]):
                out[i, :len(values)] = values
            return out

        return cls(padded("input_ids", pad_id, np.int32), padded("loss_mask", 0, np.float32),
                   padded("value_attribute_ids", -1, np.int8), lengths, pad_id, np.array(rows["person_id"], np.int64))

    def __len__(self):
        return len(self.lengths)

    def bucket_lengths(self, buckets: int) -> np.ndarray | None:
        """The `buckets` lengths, ascending, that batches of this split are padded up to: the longest row and lengths
        from the upper half of the split's (a batch's longest row is a high quantile of it). None, and no padding,
        where buckets is 0 or the split has no more distinct lengths than that (the word tokenizer's): every length is
        then its own bucket."""
        distinct = np.unique(self.lengths)
        if not buckets or len(distinct) <= buckets:
            return None
        levels = [1 - 0.5 ** k for k in range(1, buckets)]
        return np.append(np.quantile(self.lengths, levels, method="higher"), distinct[-1])

    def batch(self, rows: np.ndarray, length: int | None = None, drop: np.ndarray | None = None) -> dict:
        """{"inputs", "targets", "weights"} of `rows`, `length` <= L - 1 tokens each (default: their longest minus one).

        drop [len(rows), length]: input positions replaced by the pad token (targets keep the true token).
        """
        length = int(self.lengths[rows].max()) - 1 if length is None else length
        ids = self.input_ids[rows, :length + 1]
        inputs = ids[:, :-1] if drop is None else np.where(drop, self.pad_id, ids[:, :-1])
        return {"inputs": inputs, "targets": ids[:, 1:], "weights": self.loss_mask[rows, 1:length + 1]}


def token_tables(dataset_dict, pad_id: int) -> dict[str, TokenTable]:
    """A TokenTable per split of a tokenized DatasetDict."""
    return {name: TokenTable.from_split(split, pad_id) for name, split in dataset_dict.items()}


def row_indices(num_rows: int, batch_size: int, seed: int, phase: int, task: int, step: int) -> np.ndarray:
    """The rows a phase's `step` reads for one task: positions step*B .. step*B+B-1 of its chain of epochs."""
    if num_rows == 0:
        raise ValueError("cannot draw a batch from an empty split")
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_rows)
    rows = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        order = np.random.default_rng((seed, phase, task, int(epoch))).permutation(num_rows)
        rows[epochs == epoch] = order[offsets[epochs == epoch]]
    return rows


def people_ranks(people: np.ndarray, seed: int, order: str) -> np.ndarray:
    """Each of `people` (sorted ids) its place, 0 first, in the seeded `order` (one of PEOPLE_ORDERS): a function of
    the seed alone, so every phase of both schedules ranks the people alike."""
    stream = np.random.default_rng((seed, 0, _PEOPLE_STREAM, PEOPLE_ORDERS.index(order)))
    ranks = np.empty(len(people), np.int64)
    ranks[stream.permutation(len(people))] = np.arange(len(people))
    return ranks


def people_rows(phases, index: int, task: str, step: int, tables: Mapping[str, TokenTable], seed: int) -> np.ndarray:
    """The rows phase `index`'s `step` reads for `task` when its people lever is on: drawn i.i.d. with replacement
    from the rows of the people admitted at that step, each with its person's weight (normalized within the split).

    The people are those of every task's split, so that a phase of either schedule ranks the same people.
    """
    phase = phases[index]
    person_ids = tables[TASK_SPLITS[task]].person_ids
    if len(person_ids) == 0:
        raise ValueError("cannot draw a batch from an empty split")
    people = np.unique(np.concatenate([tables[split].person_ids for split in TASK_SPLITS.values()]))
    positions = np.searchsorted(people, person_ids)
    admission = people_ranks(people, seed, "admission")[positions]
    weights = (people_ranks(people, seed, "popularity")[positions] + 1.0) ** -phase.people.power
    # a split that holds none of the admitted people yet (qa_train holds half the people) reads its first in order
    cutoff = max(phase.people.admitted(len(people), phase.steps, step), admission.min() + 1)
    weights = np.where(admission < cutoff, weights, 0.0)
    draws = np.random.default_rng((seed, index, list(TASK_SPLITS).index(task), step, _PEOPLE_STREAM))
    return draws.choice(len(person_ids), phase.batch_sizes[task], p=weights / weights.sum())


def value_dropout(value_ids: np.ndarray, rate: float, seed: int, phase: int, step: int) -> np.ndarray:
    """Which input positions of a BIO batch to replace by the pad token: each value token with probability `rate`."""
    draws = np.random.default_rng((seed, phase, _DROPOUT_STREAM, step)).random(value_ids.shape)
    return (value_ids >= 0) & (draws < rate)


def phase_batches(phases, index: int, start: int, stop: int, tables: Mapping[str, TokenTable], seed: int,
                  bio_value_dropout: float = 0.0, length_buckets: int = 0) -> dict:
    """Steps start..stop-1 (counted within phase `index`) stacked on a leading axis: {task: {name: [K, B, T]}}.

    All K batches of a task share one length (the longest of them), so they stack; K is what one jitted call fuses.
    With `length_buckets`, that length is padded up to one of its split's `TokenTable.bucket_lengths`, and the tasks
    of a step take the same bucket (the highest any of them needs), so a step compiles at most `length_buckets` times
    however many lengths a subword tokenizer's rows have.
    """
    phase = phases[index]
    rows, longest = {}, {}
    for task, size in sorted(phase.batch_sizes.items()):
        table = tables[TASK_SPLITS[task]]
        task_id = list(TASK_SPLITS).index(task)
        if phase.people.is_on:
            rows[task] = [people_rows(phases, index, task, step, tables, seed) for step in range(start, stop)]
        else:
            rows[task] = [row_indices(len(table), size, seed, index, task_id, step) for step in range(start, stop)]
        longest[task] = int(max(table.lengths[r].max() for r in rows[task]))
    buckets = {task: tables[TASK_SPLITS[task]].bucket_lengths(length_buckets) for task in rows}
    bucket = max((np.searchsorted(edges, longest[task]) for task, edges in buckets.items() if edges is not None),
                 default=None)
    out = {}
    for task, task_rows in rows.items():
        table = tables[TASK_SPLITS[task]]
        length = (longest[task] if buckets[task] is None else int(buckets[task][bucket])) - 1
        batches = []
        for step, r in zip(range(start, stop), task_rows):
            drop = None
            if task == "bio" and bio_value_dropout > 0:
                drop = value_dropout(table.value_ids[r, :length], bio_value_dropout, seed, index, step)
            batches.append(table.batch(r, length, drop))
        out[task] = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
    return out
