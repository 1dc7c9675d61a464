"""Training schedules as data: row order, per-batch padding, BIO value dropout, the stacked batches of a phase and
the people levers (curriculum, power law)."""
import dataclasses
import math
import re

import datasets
import numpy as np
import pytest

from factrecall_jax import data, train
from factrecall_jax.data import schedules

TASK_IDS = {task: i for i, task in enumerate(schedules.TASK_SPLITS)}  # the row streams of the tasks
OPT = train.OptimizerConfig(warmup_steps=2)


@pytest.fixture(scope="module")
def tokenized():
    datasets.disable_progress_bars()
    dataset_dict = data.build_dataset(data.DatasetConfig(num_people=40, seed=0, bio_templates=1))
    tokenizer = data.train_word_tokenizer(dataset_dict)
    return data.tokenize(dataset_dict, tokenizer), tokenizer


@pytest.fixture(scope="module")
def tables(tokenized):
    dataset_dict, tokenizer = tokenized
    return {name: schedules.TokenTable.from_split(split, tokenizer.pad_token_id)
            for name, split in dataset_dict.items()}


@pytest.fixture(scope="module")
def pad(tokenized):
    return tokenized[1].pad_token_id


def blocks_are_permutations(rows, num_rows):
    chunks = np.asarray(rows)[:len(rows) // num_rows * num_rows].reshape(-1, num_rows)
    return all(sorted(c.tolist()) == list(range(num_rows)) for c in chunks)


# ---------------------------------------------------------------- row order


def test_row_indices_is_a_pure_function():
    args = dict(num_rows=17, batch_size=5, seed=3, phase=1, task=0)
    for step in (0, 3, 11):
        np.testing.assert_array_equal(schedules.row_indices(**args, step=step),
                                      schedules.row_indices(**args, step=step))
    a = schedules.row_indices(**args, step=0)
    assert not np.array_equal(a, schedules.row_indices(**args, step=1))
    for key, value in (("seed", 4), ("phase", 0), ("task", 1)):  # each is a stream of its own
        assert not np.array_equal(a, schedules.row_indices(**{**args, key: value}, step=0)), key


@pytest.mark.parametrize("num_rows, batch_size, steps", [(10, 4, 5), (12, 4, 9), (3, 8, 5), (7, 7, 3), (1, 3, 2)])
def test_row_indices_walk_epochs_of_permutations(num_rows, batch_size, steps):
    rows = np.concatenate([schedules.row_indices(num_rows, batch_size, 0, 0, 0, step) for step in range(steps)])
    assert rows.dtype.kind == "i" and len(rows) == batch_size * steps
    assert blocks_are_permutations(rows, num_rows)  # every epoch reads each row exactly once
    if num_rows > 2 and len(rows) >= 2 * num_rows:
        assert not np.array_equal(rows[:num_rows], rows[num_rows:2 * num_rows])  # each epoch a fresh order


def test_row_indices_first_epoch_is_a_permutation():
    rows = np.concatenate([schedules.row_indices(10, 4, 0, 0, 0, step) for step in range(5)])
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:20]) == list(range(10))
    assert rows[:10].tolist() != list(range(10))  # shuffled


def test_row_indices_of_an_empty_split_raise():
    with pytest.raises(ValueError, match="empty"):
        schedules.row_indices(0, 4, 0, 0, 0, 0)


# ---------------------------------------------------------------- token tables and batches


def test_token_table_holds_the_split(tokenized, tables, pad):
    dataset_dict, _ = tokenized
    for name, split in dataset_dict.items():
        table, rows = tables[name], split.to_dict()
        assert len(table) == len(split) and table.pad_id == pad
        assert table.input_ids.shape[1] == max(map(len, rows["input_ids"]))
        for i in range(len(table)):
            n = len(rows["input_ids"][i])
            assert table.lengths[i] == n
            assert table.input_ids[i, :n].tolist() == rows["input_ids"][i] and np.all(table.input_ids[i, n:] == pad)
            assert table.loss_mask[i, :n].tolist() == rows["loss_mask"][i] and not table.loss_mask[i, n:].any()
            assert table.value_ids[i, :n].tolist() == rows["value_attribute_ids"][i]
            assert np.all(table.value_ids[i, n:] == -1)


def test_batch_is_shifted_and_padded_to_its_longest_row(tables, pad):
    table = tables["qa_train"]
    by_length = {n: np.flatnonzero(table.lengths == n) for n in np.unique(table.lengths)}
    assert len(by_length) >= 2
    short, long = min(by_length), max(by_length)
    mixed_lengths = np.r_[by_length[short][:2], by_length[long][:1]]
    for rows, width in ((by_length[short][:3], short - 1), (mixed_lengths, long - 1)):
        batch = table.batch(rows)
        assert {k: v.shape for k, v in batch.items()} == {k: (len(rows), width)
                                                          for k in ("inputs", "targets", "weights")}
        for b, row in enumerate(rows):
            n = table.lengths[row]
            ids = table.input_ids[row, :n]
            np.testing.assert_array_equal(batch["inputs"][b, :n - 1], ids[:-1])
            np.testing.assert_array_equal(batch["targets"][b, :n - 1], ids[1:])
            np.testing.assert_array_equal(batch["weights"][b, :n - 1], table.loss_mask[row, 1:n])
            # a shorter row: its EOS is an input (predicting padding, at weight 0), then padding
            np.testing.assert_array_equal(batch["inputs"][b, n - 1:n], ids[n - 1:width])
            assert np.all(batch["inputs"][b, n:] == pad) and np.all(batch["targets"][b, n - 1:] == pad)
            assert not batch["weights"][b, n - 1:].any()
    assert table.batch(by_length[short][:2], length=long - 1)["inputs"].shape == (2, long - 1)


def test_batch_drop_replaces_inputs_only(tables, pad):
    table = tables["bio"]
    rows = np.array([3, 0, 7])
    plain = table.batch(rows)
    drop = np.zeros(plain["inputs"].shape, bool)
    drop[0, 5], drop[2, [1, 9]] = True, True
    dropped = table.batch(rows, drop=drop)
    np.testing.assert_array_equal(dropped["inputs"], np.where(drop, pad, plain["inputs"]))
    assert plain["inputs"][0, 5] != pad
    np.testing.assert_array_equal(dropped["targets"], plain["targets"])
    np.testing.assert_array_equal(dropped["weights"], plain["weights"])


# ---------------------------------------------------------------- value dropout


def test_value_dropout_drops_only_values_at_the_rate(tables):
    value_ids = tables["bio"].value_ids
    is_value = value_ids >= 0
    assert 0.1 < is_value.mean() < 0.5
    drops = np.stack([schedules.value_dropout(value_ids, 0.3, 0, 0, step) for step in range(40)])
    assert not (drops & ~is_value).any()
    assert abs(drops[:, is_value].mean() - 0.3) < 0.03
    for step in range(3):  # every step drops some but not all values
        assert 0 < drops[step][is_value].mean() < 1
    assert not schedules.value_dropout(value_ids, 0.0, 0, 0, 0).any()
    np.testing.assert_array_equal(schedules.value_dropout(value_ids, 1.0, 0, 0, 0), is_value)


def test_value_dropout_is_deterministic_in_seed_phase_step(tables):
    value_ids = tables["bio"].value_ids
    base = schedules.value_dropout(value_ids, 0.3, 5, 1, 7)
    np.testing.assert_array_equal(base, schedules.value_dropout(value_ids, 0.3, 5, 1, 7))
    for other in ((6, 1, 7), (5, 0, 7), (5, 1, 8)):
        assert not np.array_equal(base, schedules.value_dropout(value_ids, 0.3, *other)), other


# ---------------------------------------------------------------- phase batches


def expected_batch(table, task, size, seed, phase, step, length=None):
    return table.batch(schedules.row_indices(len(table), size, seed, phase, TASK_IDS[task], step), length)


def test_mixed_phase_batches(tables):
    phases = schedules.mixed(20, 8, 6, OPT)
    out = schedules.phase_batches(phases, 0, 2, 5, tables, seed=4)
    assert sorted(out) == ["bio", "qa"]
    for task, size in (("bio", 8), ("qa", 6)):
        table = tables[schedules.TASK_SPLITS[task]]
        stream = out[task]
        assert sorted(stream) == ["inputs", "targets", "weights"]
        k, b, t = stream["inputs"].shape
        assert (k, b) == (3, size) and stream["targets"].shape == stream["weights"].shape == (3, size, t)
        rows = [schedules.row_indices(len(table), size, 4, 0, TASK_IDS[task], s) for s in range(2, 5)]
        assert t == max(int(table.lengths[r].max()) for r in rows) - 1  # the K batches share the longest length
        for i, s in enumerate(range(2, 5)):
            expected = expected_batch(table, task, size, 4, 0, s, t)
            for name in stream:
                np.testing.assert_array_equal(stream[name][i], expected[name], err_msg=f"{task} {name} step {s}")


def test_phase_batches_equal_single_step_calls(tables, pad):
    phases = schedules.mixed(30, 8, 16, OPT)
    fused = schedules.phase_batches(phases, 0, 3, 9, tables, seed=1, bio_value_dropout=0.3)
    for i, step in enumerate(range(3, 9)):
        single = schedules.phase_batches(phases, 0, step, step + 1, tables, seed=1, bio_value_dropout=0.3)
        for task in ("bio", "qa"):
            for name, values in single[task].items():
                assert values.shape[0] == 1
                t = values.shape[2]
                np.testing.assert_array_equal(fused[task][name][i, :, :t], values[0], err_msg=f"{task} {name} {step}")
                # the rest is padding that carries no loss
                fill = 0 if name == "weights" else pad
                assert np.all(fused[task][name][i, :, t:] == fill)


def test_length_buckets_leave_few_lengths_alone_and_bound_the_compiles(tables):
    """Splits with no more distinct lengths than buckets (the word tokenizer's) are padded as without buckets; rows of
    many lengths (a subword tokenizer's) give at most `buckets` step shapes, each at least the batch's own longest."""
    phases = schedules.mixed(40, 8, 6, OPT)
    few = {name: len(np.unique(table.lengths)) for name, table in tables.items()}
    plain = schedules.phase_batches(phases, 0, 0, 40, tables, seed=3)
    same = schedules.phase_batches(phases, 0, 0, 40, tables, seed=3, length_buckets=max(few.values()))
    for task in plain:
        for name in plain[task]:
            np.testing.assert_array_equal(same[task][name], plain[task][name])
    rng = np.random.default_rng(0)
    varied = {name: dataclasses.replace(table, lengths=rng.integers(5, table.input_ids.shape[1] + 1, len(table)))
              for name, table in tables.items()}  # many lengths: each row's last tokens count as padding
    single = schedules.mixed(40, 1, 1, OPT)  # one row per task: its length varies the most
    shapes = set()
    for step in range(40):
        one = schedules.phase_batches(single, 0, step, step + 1, varied, seed=3, length_buckets=3)
        plain_step = schedules.phase_batches(single, 0, step, step + 1, varied, seed=3)
        for task in one:
            assert one[task]["inputs"].shape[2] >= plain_step[task]["inputs"].shape[2]
            edges = varied[schedules.TASK_SPLITS[task]].bucket_lengths(3)
            assert one[task]["inputs"].shape[2] + 1 in edges
        shapes.add(tuple(one[task]["inputs"].shape[2] for task in sorted(one)))
    assert 1 < len(shapes) <= 3, shapes


def test_bio_value_dropout_in_phase_batches(tables, pad):
    phases = schedules.mixed(20, 8, 6, OPT)
    plain = schedules.phase_batches(phases, 0, 0, 4, tables, seed=2)
    dropped = schedules.phase_batches(phases, 0, 0, 4, tables, seed=2, bio_value_dropout=0.3)
    bio = tables["bio"]
    changed = dropped["bio"]["inputs"] != plain["bio"]["inputs"]
    t = plain["bio"]["inputs"].shape[2]
    value_ids = np.stack([bio.value_ids[schedules.row_indices(len(bio), 8, 2, 0, 0, s), :t] for s in range(4)])
    assert changed.any() and not (changed & (value_ids < 0)).any()  # only value tokens are dropped
    assert np.all(dropped["bio"]["inputs"][changed] == pad)
    assert abs(changed[value_ids >= 0].mean() - 0.3) < 0.1
    for name in ("targets", "weights"):
        np.testing.assert_array_equal(dropped["bio"][name], plain["bio"][name])
    for name in plain["qa"]:  # the qa task never gets dropout
        np.testing.assert_array_equal(dropped["qa"][name], plain["qa"][name])
    # the drop pattern is the documented one: value_dropout of the step
    for s in range(4):
        np.testing.assert_array_equal(changed[s], schedules.value_dropout(value_ids[s], 0.3, 2, 0, s))


def test_two_stage_phases(tables):
    opt2 = train.OptimizerConfig(learning_rate=1e-4, warmup_steps=2)
    phases = schedules.two_stage(5, 4, 7, 6, OPT, opt2, fresh_optimizer=False)
    assert [p.name for p in phases] == ["bio", "qa"]
    assert phases[0].optimizer is OPT and phases[1].optimizer is opt2
    assert phases[0].fresh_optimizer and not phases[1].fresh_optimizer
    assert schedules.phase_starts(phases) == [0, 5, 12]
    stage1 = schedules.phase_batches(phases, 0, 0, 5, tables, seed=0, bio_value_dropout=0.3)
    stage2 = schedules.phase_batches(phases, 1, 0, 7, tables, seed=0, bio_value_dropout=0.3)
    assert list(stage1) == ["bio"] and stage1["bio"]["inputs"].shape[:2] == (5, 4)
    assert list(stage2) == ["qa"] and stage2["qa"]["inputs"].shape[:2] == (7, 6)
    t = stage2["qa"]["inputs"].shape[2]
    for s in range(7):  # stage 2 reads qa_train in its own phase's stream
        expected = expected_batch(tables["qa_train"], "qa", 6, 0, 1, s, t)
        np.testing.assert_array_equal(stage2["qa"]["inputs"][s], expected["inputs"])


def test_a_phase_reads_every_qa_row_once_per_epoch(tables):
    table = tables["qa_train"]
    steps = len(table) // 8
    out = schedules.phase_batches(schedules.mixed(steps, 4, 8, OPT), 0, 0, steps, tables, seed=9)
    seen = [tuple(r) for r in out["qa"]["targets"].reshape(-1, out["qa"]["targets"].shape[-1])]
    width = out["qa"]["targets"].shape[-1]
    expected = [tuple(table.input_ids[i, 1:width + 1]) for i in range(len(table))]
    assert sorted(seen) == sorted(expected)


def test_phase_starts():
    assert schedules.phase_starts(schedules.mixed(7, 1, 1, OPT)) == [0, 7]
    assert schedules.phase_starts(schedules.two_stage(3, 1, 4, 1, OPT, OPT)) == [0, 3, 7]


# ---------------------------------------------------------------- people levers

CURRICULUM = schedules.PeopleSampling(start_fraction=0.25, widen_fraction=0.5)
BOTH_LEVERS = schedules.PeopleSampling(start_fraction=0.25, widen_fraction=0.5, power=0.7)


def every_person(tables):
    return np.unique(tables["bio"].person_ids)  # each person has exactly one biography


def in_order(tables, seed, order):
    """The people, first of the seeded `order` first."""
    people = every_person(tables)
    return people[np.argsort(schedules.people_ranks(people, seed, order))]


def test_people_levers_off_read_the_epochs(tables):
    """A widening without a smaller start turns nothing on: the rows are row_indices' epochs, as without levers."""
    for people in (schedules.PeopleSampling(), schedules.PeopleSampling(widen_fraction=0.8)):
        assert not people.is_on
        out = schedules.phase_batches(schedules.mixed(20, 8, 6, OPT, people), 0, 2, 6, tables, seed=4)
        for task, size in (("bio", 8), ("qa", 6)):
            t = out[task]["inputs"].shape[2]
            for i, step in enumerate(range(2, 6)):
                expected = expected_batch(tables[schedules.TASK_SPLITS[task]], task, size, 4, 0, step, t)
                for name, values in expected.items():
                    np.testing.assert_array_equal(out[task][name][i], values, err_msg=f"{people} {task} {name}")


def test_people_ranks_are_seeded_orders(tables):
    people = every_person(tables)
    ranks = schedules.people_ranks(people, 3, "admission")
    assert sorted(ranks.tolist()) == list(range(len(people))) and ranks.tolist() != list(range(len(people)))
    np.testing.assert_array_equal(ranks, schedules.people_ranks(people, 3, "admission"))
    assert not np.array_equal(ranks, schedules.people_ranks(people, 4, "admission"))
    assert not np.array_equal(ranks, schedules.people_ranks(people, 3, "popularity"))  # each lever its own order


def test_curriculum_starts_on_the_first_people_of_the_order(tables):
    phases = schedules.mixed(20, 400, 400, OPT, CURRICULUM)  # large batches: every admitted row shows up
    first = set(in_order(tables, 3, "admission")[:math.ceil(0.25 * len(every_person(tables)))])
    for task in ("bio", "qa"):
        person_ids = tables[schedules.TASK_SPLITS[task]].person_ids
        drawn = set(person_ids[schedules.people_rows(phases, 0, task, 0, tables, seed=3)])
        assert drawn == first & set(person_ids.tolist()) and drawn, task


def test_curriculum_widens_to_every_person(tables):
    n = len(every_person(tables))
    admitted = [CURRICULUM.admitted(n, 20, step) for step in range(20)]
    assert admitted[0] == math.ceil(0.25 * n) and admitted == sorted(admitted)
    assert admitted[9] < n and admitted[10:] == [n] * 10  # all people from step 0.5 * 20 on
    phases = schedules.mixed(20, 400, 400, OPT, CURRICULUM)
    order = in_order(tables, 3, "admission")
    for task in ("bio", "qa"):
        person_ids = tables[schedules.TASK_SPLITS[task]].person_ids
        midway = set(person_ids[schedules.people_rows(phases, 0, task, 5, tables, seed=3)])
        assert midway <= set(order[:admitted[5]]) and not midway <= set(order[:admitted[0]]), task
        widened = set(person_ids[schedules.people_rows(phases, 0, task, 10, tables, seed=3)])
        assert widened == set(person_ids.tolist()), task


def test_curriculum_without_widening_admits_everyone_after_the_first_step():
    jump = schedules.PeopleSampling(start_fraction=0.25, widen_fraction=0.0)
    assert [jump.admitted(40, 20, step) for step in range(3)] == [10, 40, 40]


def test_a_split_without_admitted_people_reads_its_first_person(tables):
    """One admitted person, who may have no training QA: qa reads the first person of the order that has some."""
    phases = schedules.mixed(20, 50, 50, OPT, schedules.PeopleSampling(start_fraction=0.01, widen_fraction=0.5))
    order = in_order(tables, 0, "admission")
    assert order[0] not in tables["qa_train"].person_ids  # seed 0 admits a held-out person first
    for task in ("bio", "qa"):
        person_ids = tables[schedules.TASK_SPLITS[task]].person_ids
        first = next(p for p in order if p in person_ids)
        assert set(person_ids[schedules.people_rows(phases, 0, task, 0, tables, seed=0)]) == {first}, task


def test_people_levers_apply_to_every_phase():
    phases = schedules.mixed(5, 4, 4, OPT, BOTH_LEVERS) + schedules.two_stage(5, 4, 5, 4, OPT, OPT, people=BOTH_LEVERS)
    assert [p.people for p in phases] == [BOTH_LEVERS] * 3


def test_people_rows_are_a_function_of_seed_phase_step(tables):
    """What a resumed or forked run relies on: the same steps read the same rows whatever range a call covers."""
    phases = schedules.two_stage(12, 8, 12, 8, OPT, OPT, people=BOTH_LEVERS)
    for index, task in ((0, "bio"), (1, "qa")):
        table = tables[schedules.TASK_SPLITS[task]]
        rows = [schedules.people_rows(phases, index, task, step, tables, seed=5) for step in range(12)]
        assert not np.array_equal(rows[0], rows[1])
        full = schedules.phase_batches(phases, index, 0, 12, tables, seed=5)[task]
        twice = schedules.phase_batches(phases, index, 0, 12, tables, seed=5)[task]
        for name, values in full.items():
            np.testing.assert_array_equal(values, twice[name], err_msg=f"{task} {name} called twice")
        resumed = schedules.phase_batches(phases, index, 5, 9, tables, seed=5)[task]
        t = resumed["inputs"].shape[2]
        for i, step in enumerate(range(5, 9)):
            expected = table.batch(rows[step], t)
            for name, values in expected.items():
                np.testing.assert_array_equal(resumed[name][i], values, err_msg=f"{task} {name} step {step}")
                np.testing.assert_array_equal(full[name][step, :, :t], values, err_msg=f"{task} {name} step {step}")
    other_seed = schedules.people_rows(phases, 0, "bio", 0, tables, seed=6)
    assert not np.array_equal(other_seed, schedules.people_rows(phases, 0, "bio", 0, tables, seed=5))


@pytest.mark.parametrize("task", ["bio", "qa"])
def test_power_law_draws_rows_by_their_persons_weight(tables, task):
    power, steps, size = 0.7, 40, 500
    phases = schedules.mixed(steps, size, size, OPT, schedules.PeopleSampling(power=power))
    people = every_person(tables)
    person_weights = (schedules.people_ranks(people, 0, "popularity") + 1.0) ** -power
    person_ids = tables[schedules.TASK_SPLITS[task]].person_ids
    rows = np.concatenate([schedules.people_rows(phases, 0, task, step, tables, seed=0) for step in range(steps)])
    # each row carries its person's weight (the QA rows of one person alike), normalized within the split
    row_weights = person_weights[np.searchsorted(people, person_ids)]
    expected = row_weights / row_weights.sum()
    frequencies = np.bincount(rows, minlength=len(person_ids)) / len(rows)
    tolerance = 5 * np.sqrt(expected * (1 - expected) / len(rows))  # 5 standard errors of a binomial frequency
    np.testing.assert_array_less(np.abs(frequencies - expected), tolerance)
    if task == "bio":  # one row per person: the top-ranked person is drawn 1 / sum_k k^-p of the time
        top = np.flatnonzero(person_ids == in_order(tables, 0, "popularity")[0])
        top_share = 1 / np.sum(np.arange(1, len(people) + 1) ** -power)
        assert expected[top] == pytest.approx(top_share) and abs(frequencies[top] - top_share) < tolerance[top]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "steps=0"),
    (dict(steps=-3), "steps=-3"),
    (dict(steps=2.5), "steps=2.5"),
    (dict(steps=True), "steps=True"),
    (dict(batch_sizes={"bio": 0}), "batch size 0"),
    (dict(batch_sizes={"qa": -1}), "batch size -1"),
    (dict(batch_sizes={"qa": 2.0}), "batch size 2.0"),
    (dict(batch_sizes={"bio": 4, "qa_test": 4}), "unknown task 'qa_test'"),
])
def test_phase_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        schedules.Phase(**{"name": "p", "steps": 10, "batch_sizes": {"bio": 4}, "optimizer": OPT, **kwargs})


def test_schedule_builders_validate():
    with pytest.raises(ValueError, match="steps=0"):
        schedules.mixed(0, 4, 4, OPT)
    with pytest.raises(ValueError, match="batch size 0"):
        schedules.two_stage(4, 4, 4, 0, OPT, OPT)


def test_phase_accepts_numpy_integers():
    phase = schedules.Phase("p", np.int64(10), {"bio": np.int32(4)}, OPT)
    assert phase.steps == 10


# ---------------------------------------------------------------- mixing by token share


@pytest.mark.parametrize("share", [0.25, 0.5, 0.8, 0.9])
def test_qa_rows_for_token_share_gives_that_share(tables, share):
    qa_rows = schedules.qa_rows_for_token_share(tables, 16, share)
    bio, qa = (tables[split].lengths.mean() for split in ("bio", "qa_train"))
    assert abs(qa_rows * qa / (qa_rows * qa + 16 * bio) - share) <= qa / (16 * bio)  # within one QA row
    shares = schedules.token_shares(schedules.mixed(10, 16, qa_rows, OPT)[0], tables)
    assert shares["qa"] == pytest.approx(qa_rows * qa / (qa_rows * qa + 16 * bio)) and sum(shares.values()) == 1


@pytest.mark.parametrize("multiple", [2, 8])
def test_qa_rows_for_token_share_rounds_to_a_multiple_of_the_devices(tables, multiple):
    rows = schedules.qa_rows_for_token_share(tables, 16, 0.8, multiple_of=multiple)
    assert rows % multiple == 0 and abs(rows - schedules.qa_rows_for_token_share(tables, 16, 0.8)) <= multiple / 2


@pytest.mark.parametrize("share", [0.0, 1.0, -0.2])
def test_qa_rows_for_token_share_rejects_bad_shares(tables, share):
    with pytest.raises(ValueError, match=f"qa_token_share={share!r} is invalid"):
        schedules.qa_rows_for_token_share(tables, 16, share)
