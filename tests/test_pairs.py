"""data.pairs.fact_pairs: the paired BIO and QA examples, their weights and positions, sampling and errors."""
import numpy as np
import pytest
from test_data import save_bpe

from factrecall_jax import data
from factrecall_jax.data.pairs import fact_pairs

CONFIG = data.DatasetConfig(num_people=10, seed=0, bio_variants=2, permute=True)
PEOPLE = data.sample_people(CONFIG.num_people, CONFIG.seed)


@pytest.fixture(scope="module")
def dataset():
    return data.build_dataset(CONFIG)


@pytest.fixture(scope="module", params=["word", "llama3", "neox"])
def tokenized(request, dataset, tmp_path_factory):
    """(style, tokenizer, tokenized dataset) for the word tokenizer and two BPE styles (offsets with and without
    spaces)."""
    if request.param == "word":
        tokenizer = data.get_tokenizer("word", dataset)
    else:
        texts = [t for split in dataset.values() for t in split["text"]]
        tokenizer = data.get_tokenizer(str(save_bpe(tmp_path_factory.mktemp(request.param), texts, request.param)),
                                       dataset)
    return request.param, tokenizer, data.tokenize(dataset, tokenizer)


def test_pairs_hold_each_fact_in_both_formats(tokenized):
    style, tokenizer, tds = tokenized
    pad = tokenizer.pad_token_id
    pairs = fact_pairs(tds, pad)
    qa_people = sorted(set(tds["qa_train"]["person_id"]))
    n = len(qa_people) * len(data.ATTRIBUTES)
    np.testing.assert_array_equal(pairs["person_id"], np.repeat(qa_people, len(data.ATTRIBUTES)))
    assert pairs["attribute"].tolist() == list(data.ATTRIBUTES) * len(qa_people)
    first_bio = {}
    for row in tds["bio"]:
        first_bio.setdefault(row["person_id"], row)
    qa_row = {(r["person_id"], r["attribute"]): r for r in tds["qa_train"]}
    for fmt in ("bio", "qa"):
        batch, positions = pairs[fmt], pairs[f"{fmt}_positions"]
        assert {k: v.shape for k, v in batch.items()} == {k: (n, batch["inputs"].shape[1]) for k in batch}
        assert positions["subject"].shape == positions["answer"].shape == (n,)
        for i, (person_id, attribute) in enumerate(zip(pairs["person_id"], pairs["attribute"])):
            person = PEOPLE[person_id]
            row = first_bio[person_id] if fmt == "bio" else qa_row[person_id, attribute]
            ids = row["input_ids"]
            inputs, targets, weights = batch["inputs"][i], batch["targets"][i], batch["weights"][i]
            padded = ids + [pad] * (len(inputs) + 1 - len(ids))  # the first BIO variant, shifted as in training
            np.testing.assert_array_equal(inputs, padded[:-1])
            np.testing.assert_array_equal(targets, padded[1:])
            value = getattr(person, attribute)
            answer, subject = positions["answer"][i], positions["subject"][i]
            weighted = np.flatnonzero(weights)
            assert targets[answer] == ids[row["value_attribute_ids"].index(data.ATTRIBUTES.index(attribute))]
            assert set(weights.tolist()) == {0.0, 1.0} and tokenizer.eos_token_id not in targets[weighted]
            # the targets from the answer position on are the value, and nothing before it is
            np.testing.assert_array_equal(weighted, np.arange(answer, answer + len(weighted)))
            assert tokenizer.decode(targets[weighted]).strip() == value
            assert value not in tokenizer.decode(inputs[:answer + 1])
            prefix = tokenizer.decode(inputs[:subject + 1], skip_special_tokens=True)
            assert prefix.endswith(person.name) and prefix.count(person.name) == 1  # the first mention's last token
            assert subject < answer
            if style == "word":  # names are words
                assert tokenizer.decode(inputs[subject:subject + 1]) == person.last


def test_seeded_sampling(tokenized):
    _, tokenizer, tds = tokenized
    pad = tokenizer.pad_token_id
    everyone = fact_pairs(tds, pad, split="qa_test")
    drawn = {seed: fact_pairs(tds, pad, split="qa_test", num_people=3, seed=seed) for seed in range(6)}
    again = fact_pairs(tds, pad, split="qa_test", num_people=3, seed=2)
    for name in ("person_id", "attribute"):
        np.testing.assert_array_equal(drawn[2][name], again[name])
    for fmt in ("bio", "qa"):
        np.testing.assert_array_equal(drawn[2][fmt]["inputs"], again[fmt]["inputs"])
    for pairs in drawn.values():
        people = pairs["person_id"][::len(data.ATTRIBUTES)]
        assert len(pairs["person_id"]) == 3 * len(data.ATTRIBUTES)
        assert list(people) == sorted(set(people)) and set(people) <= set(everyone["person_id"])
        # a drawn pair equals the same pair among all (up to padding)
        i = np.flatnonzero(everyone["person_id"] == people[1])[0]
        width = pairs["qa"]["inputs"].shape[1]
        np.testing.assert_array_equal(pairs["qa"]["inputs"][len(data.ATTRIBUTES)], everyone["qa"]["inputs"][i, :width])
        assert pairs["qa_positions"]["answer"][len(data.ATTRIBUTES)] == everyone["qa_positions"]["answer"][i]
    assert len({tuple(p["person_id"]) for p in drawn.values()}) > 1


def test_errors_name_the_bad_value(tokenized, dataset):
    _, tokenizer, tds = tokenized
    pad = tokenizer.pad_token_id
    people = len(set(tds["qa_train"]["person_id"]))
    with pytest.raises(ValueError, match=r"split='bio' is invalid: .*\['qa_test', 'qa_train'\]"):
        fact_pairs(tds, pad, split="bio")
    for bad in (people + 1, 0, 2.0, True):
        with pytest.raises(ValueError, match=rf"num_people={bad!r} is invalid: .*\[1, {people}\]"):
            fact_pairs(tds, pad, num_people=bad)
    with pytest.raises(ValueError, match=r"split 'bio' lacks the columns \['input_ids', "):
        fact_pairs(dataset, pad)
    no_subject = tds["bio"].map(lambda row: {"subject_mask": [0] * len(row["subject_mask"])})
    with pytest.raises(ValueError, match=r"row \d+ of split 'bio' has no subject tokens or no birth_date value"):
        fact_pairs({**tds, "bio": no_subject}, pad)
    empty = data.tokenize(data.build_dataset(data.DatasetConfig(num_people=4, qa_train_fraction=0.0)), tokenizer)
    with pytest.raises(ValueError, match=r"split='qa_train' has no rows"):
        fact_pairs(empty, pad)
