"""Fact recall against a brute-force per-row loop, held-out QA's parts and the composition diagnostic against direct
computations, and teacher-forced exact match against greedy generation."""
import functools

import datasets
import jax
import numpy as np
import pytest
from flax import nnx

from factrecall_jax import data, models, train
from factrecall_jax.data import schedules
from factrecall_jax.data.population import COMPOSED, ONE_HOP
from factrecall_jax.evaluate import COMPOSED_KEY, ONE_HOP_KEY, Evaluator, composition, generate

ATTRIBUTES = data.ATTRIBUTES
EVAL_BATCH = 7  # no split of the dataset (40 bios, 120 + 120 QA pairs) is a multiple of it


@pytest.fixture(scope="module")
def tokenized():
    datasets.disable_progress_bars()
    dataset_dict = data.build_dataset(data.DatasetConfig(num_people=40, seed=0, bio_templates=1))
    tokenizer = data.train_word_tokenizer(dataset_dict)
    tables = {name: schedules.TokenTable.from_split(split, tokenizer.pad_token_id)
              for name, split in data.tokenize(dataset_dict, tokenizer).items()}
    assert all(len(t) % EVAL_BATCH for t in tables.values())
    return tables, tokenizer


@pytest.fixture(scope="module")
def model_parts(tokenized):
    _, tokenizer = tokenized
    model = models.from_config(dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=64), seed=0)
    return nnx.split(model, nnx.Param)


@pytest.fixture(scope="module")
def trained_params(tokenized, model_parts):
    """100 mixed steps: enough that some, not all, facts are recalled (about 60% of bio and qa_train values)."""
    tables, _ = tokenized
    graphdef, params = model_parts
    steps = 100
    optimizer = train.OptimizerConfig(learning_rate=2e-2, warmup_steps=5, weight_decay=0.1)
    phases = schedules.mixed(steps, 8, 16, optimizer)
    tx = train.make_optimizer(optimizer, steps)
    run = train.jit_steps(train.make_train_step(graphdef, tx, train.learning_rate_schedule(optimizer, steps)))
    state, _ = run(train.init_state(jax.tree.map(np.array, params), tx),
                   schedules.phase_batches(phases, 0, 0, steps, tables, seed=0, bio_value_dropout=0.3))
    return state.params


@pytest.fixture(scope="module", params=["random", "trained"])
def params(request, model_parts):
    return model_parts[1] if request.param == "random" else request.getfixturevalue("trained_params")


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, input_ids):
    return nnx.merge(graphdef, params)(input_ids)


def brute_force_recall(graphdef, params, table):
    """(present, recalled, argmax) per row: each row alone, unpadded; a value is recalled when the argmax is its
    target token at every position whose target belongs to it."""
    present = np.zeros((len(table), len(ATTRIBUTES)), bool)
    recalled = np.zeros_like(present)
    argmax = []
    for i in range(len(table)):
        n = table.lengths[i]
        ids = table.input_ids[i, :n]
        predicted = np.asarray(_logits(graphdef, params, ids[None, :-1]))[0].argmax(-1)
        argmax.append(predicted)
        targets, values = ids[1:], table.value_ids[i, 1:n]
        for a in range(len(ATTRIBUTES)):
            at = values == a
            present[i, a] = at.any()
            recalled[i, a] = at.any() and bool(np.all(predicted[at] == targets[at]))
    return present, recalled, argmax


@pytest.fixture(scope="module")
def brute_force(tokenized, model_parts):
    """`brute_force(name, params)`: {split: brute_force_recall(...)}, computed once per name of a parameter set."""
    tables, _ = tokenized
    cache = {}

    def get(name, params):
        if name not in cache:
            cache[name] = {split: brute_force_recall(model_parts[0], params, table) for split, table in tables.items()}
        return cache[name]

    return get


def reference_of(brute_force, request, params):
    return brute_force(request.node.callspec.params["params"], params)


@pytest.fixture(scope="module")
def evaluator(tokenized, model_parts):
    return Evaluator(tokenized[0], model_parts[0], batch_size=EVAL_BATCH)


def test_recall_matches_brute_force(request, tokenized, brute_force, evaluator, params):
    tables, _ = tokenized
    reference = reference_of(brute_force, request, params)
    for split, table in tables.items():
        present, recalled = evaluator.recall(params, split)
        n = len(table)
        np.testing.assert_array_equal(present[:n], reference[split][0], err_msg=split)
        np.testing.assert_array_equal(recalled[:n], reference[split][1], err_msg=split)
        # one result per row of the split: the rows that pad the last batch are not the split's
        assert present.shape == recalled.shape == (n, len(ATTRIBUTES)), split
    # every bio holds each attribute once, every QA row one (its answer)
    assert reference["bio"][0].all() and np.all(reference["qa_train"][0].sum(1) == 1)


def test_accuracies_match_brute_force(request, tokenized, brute_force, evaluator, params):
    tables, _ = tokenized
    reference = reference_of(brute_force, request, params)
    result = evaluator(params)
    assert set(result) == {f"{s}_accuracy" for s in tables} | {ONE_HOP_KEY, COMPOSED_KEY, "per_attribute",
                                                                "composition"}
    for split in tables:
        present, recalled, _ = reference[split]
        assert result[f"{split}_accuracy"] == pytest.approx(recalled.sum() / present.sum(), abs=1e-12), split
        per_attribute = {a: recalled[:, i].sum() / present[:, i].sum() for i, a in enumerate(ATTRIBUTES)}
        assert result["per_attribute"][split] == pytest.approx(per_attribute, abs=1e-12), split
    held_out = result["per_attribute"]["qa_test"]
    assert result[ONE_HOP_KEY] == pytest.approx(np.mean([held_out[a] for a in ATTRIBUTES[:5]]), abs=1e-12)
    assert result[COMPOSED_KEY] == held_out["employer_city"]
    (_, bio, _), (present, recalled, _) = reference["bio"], reference["qa_test"]
    expected = direct_composition(tables["bio"].person_ids, bio, tables["qa_test"].person_ids, present, recalled)
    assert flat(result["composition"]) == pytest.approx(flat(expected), abs=1e-12)
    if request.node.callspec.params["params"] == "trained":  # a trained model makes the comparison meaningful
        assert 0.2 < result["qa_train_accuracy"] < 0.9 and 0.2 < result["bio_accuracy"] < 0.9


def test_evaluator_skips_empty_splits(tokenized, model_parts, trained_params):
    tables, tokenizer = tokenized
    empty = schedules.TokenTable(np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int8),
                                 np.zeros(0, np.int32), tokenizer.pad_token_id, np.zeros(0, np.int64))
    result = Evaluator({"qa_test": tables["qa_test"], "nobody": empty}, model_parts[0], batch_size=EVAL_BATCH)(
        trained_params)
    # no composition without the biographies
    assert set(result) == {"qa_test_accuracy", ONE_HOP_KEY, COMPOSED_KEY, "per_attribute"}
    assert set(result["per_attribute"]) == {"qa_test"}


# ---------------------------------------------------------------- held-out QA in two parts: one hop and composed


def test_attribute_groups_split_the_attributes():
    assert (*ONE_HOP, COMPOSED) == ATTRIBUTES and (ONE_HOP_KEY, COMPOSED_KEY) == (
        "qa_test_one_hop_accuracy", "qa_test_employer_city_accuracy")


def direct_composition(bio_people, bio_recalled, qa_people, qa_present, qa_recalled):
    """evaluate.composition person by person: a value is known when every row of the person that holds it recalls it
    (every biography holds every value)."""
    employer, city = ATTRIBUTES.index("employer"), ATTRIBUTES.index("employer_city")
    answered, both = [], []
    employer_answered = city_completed = 0
    for person in sorted(set(qa_people.tolist())):
        rows = qa_people == person
        knows_employer = bool(np.all(qa_recalled[rows & qa_present[:, employer], employer]))
        completes_city = bool(np.all(bio_recalled[bio_people == person, city]))
        answered.append(bool(np.all(qa_recalled[rows & qa_present[:, city], city])))
        both.append(knows_employer and completes_city)
        employer_answered += knows_employer
        city_completed += completes_city
    answered, both, n = np.array(answered), np.array(both), len(answered)
    return {"people": n, "employer_answered": employer_answered / n, "city_completed": city_completed / n,
            "city_answered": answered.mean(),
            "both_known": {"people": both.sum(), "city_answered": answered[both].mean() if both.any() else None},
            "others": {"people": (~both).sum(), "city_answered": answered[~both].mean() if (~both).any() else None}}


def flat(composition_result):
    """{"both_known.people": ..., ...}: pytest.approx compares no nested dicts."""
    return {f"{k}.{i}" if isinstance(v, dict) else k: w for k, v in composition_result.items()
            for i, w in (v.items() if isinstance(v, dict) else [(None, v)])}


def test_composition_by_hand():
    """Person 3 has two biographies and only one completes the city: not known. Person 5 has no held-out QA."""
    employer, city = np.eye(len(ATTRIBUTES), dtype=bool)[[ATTRIBUTES.index("employer"), ATTRIBUTES.index(COMPOSED)]]
    bio_people = np.array([3, 3, 5, 7, 9])
    bio_recalled = np.ones((5, len(ATTRIBUTES)), bool)
    bio_recalled[1, ATTRIBUTES.index(COMPOSED)] = False
    qa_people = np.array([3, 3, 7, 7, 9, 9])  # an employer question, then a city question per person
    qa_present = np.array([employer, city] * 3)
    qa_recalled = qa_present & np.array([1, 0, 1, 0, 0, 1], bool)[:, None]  # employer of 9 wrong, city of 9 right
    result = composition(bio_people, np.ones_like(bio_recalled), bio_recalled, qa_people, qa_present, qa_recalled)
    assert flat(result) == pytest.approx(flat({
        "people": 3, "employer_answered": 2 / 3, "city_completed": 2 / 3, "city_answered": 1 / 3,
        "both_known": {"people": 1, "city_answered": 0.0}, "others": {"people": 2, "city_answered": 0.5}}))
    assert flat(result) == pytest.approx(flat(direct_composition(bio_people, bio_recalled, qa_people, qa_present,
                                                                 qa_recalled)))
    only_7 = composition(bio_people, np.ones_like(bio_recalled), bio_recalled, qa_people[2:4], qa_present[2:4],
                         qa_recalled[2:4])
    assert only_7["others"] == {"people": 0, "city_answered": None}  # a share of nobody


def test_evaluator_joins_recall_by_person(tokenized, evaluator, trained_params, monkeypatch):
    """The Evaluator's one-hop mean and composition from its own recall outputs, with random hits (a tiny model
    knows too few held-out employers to exercise the counts), against direct computations."""
    tables, _ = tokenized
    rng = np.random.default_rng(0)
    recall = {}
    for split in tables:
        present, _ = evaluator.recall(trained_params, split)
        recall[split] = present, present & (rng.random(present.shape) < 0.7)
    monkeypatch.setattr(evaluator, "recall", lambda _, split: recall[split])
    result = evaluator(trained_params)
    present, recalled = recall["qa_test"]
    one_hop = [recalled[:, ATTRIBUTES.index(a)].sum() / present[:, ATTRIBUTES.index(a)].sum() for a in ONE_HOP]
    assert result[ONE_HOP_KEY] == pytest.approx(np.mean(one_hop), abs=1e-12)
    expected = direct_composition(tables["bio"].person_ids, recall["bio"][1], tables["qa_test"].person_ids, present,
                                  recalled)
    assert flat(result["composition"]) == pytest.approx(flat(expected), abs=1e-12)
    assert expected["people"] == 20 and 0 < expected["both_known"]["people"] < 20  # both groups are exercised


# ---------------------------------------------------------------- greedy generation


def prompts_and_answers(table):
    """Each QA row's tokens before its answer, and its answer tokens."""
    prompts, answers = [], []
    for i in range(len(table)):
        ids, values = table.input_ids[i, :table.lengths[i]], table.value_ids[i, :table.lengths[i]]
        (positions,) = np.nonzero(values >= 0)
        assert np.array_equal(positions, np.arange(positions[0], positions[-1] + 1))  # one contiguous answer
        prompts.append(ids[:positions[0]].tolist())
        answers.append(ids[positions].tolist())
    return prompts, answers


@pytest.fixture(scope="module")
def greedy(tokenized, model_parts, trained_params):
    """(answers, continuations) of every qa_train prompt, greedily decoded by the trained model."""
    tables, tokenizer = tokenized
    prompts, answers = prompts_and_answers(tables["qa_train"])
    assert len({len(p) for p in prompts}) > 1 and len({len(a) for a in answers}) > 1  # left padding is exercised
    width = max(map(len, answers))
    out = generate(model_parts[0], trained_params, prompts, width, tokenizer.pad_token_id)
    assert out.shape == (len(prompts), width)
    return answers, out


def test_greedy_generation_equals_teacher_forced_recall(tokenized, greedy, brute_force, trained_params):
    tables, _ = tokenized
    answers, out = greedy
    present, recalled, argmax = brute_force("trained", trained_params)["qa_train"]
    table = tables["qa_train"]
    matches = np.array([out[i, :len(a)].tolist() == a for i, a in enumerate(answers)])
    assert 0 < matches.mean() < 1
    np.testing.assert_array_equal(matches, recalled.any(1))
    for i, answer in enumerate(answers):
        # the first generated token is the teacher-forced argmax after the true prompt, right or wrong
        first = int(np.flatnonzero(table.value_ids[i, 1:] >= 0)[0])
        assert out[i, 0] == argmax[i][first], i


def test_greedy_generation_equals_evaluator_recall(greedy, evaluator, trained_params):
    answers, out = greedy
    present, recalled = evaluator.recall(trained_params, "qa_train")
    matches = np.array([out[i, :len(a)].tolist() == a for i, a in enumerate(answers)])
    assert 0 < matches.mean() < 1
    n = len(answers)
    np.testing.assert_array_equal(present[:n].sum(1), 1)
    np.testing.assert_array_equal(matches, recalled[:n].any(1))
    assert recalled.shape == (n, len(ATTRIBUTES))  # one result per row of the split
