"""bioS data: pools, people, splits, templates, spans, determinism, and tokenization with three tokenizer styles."""
import collections
import dataclasses
import itertools
import re

import datasets
import numpy as np
import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from factrecall_jax import data
from factrecall_jax.data import population, templates
from factrecall_jax.data.dataset import NUM_BIO_TEMPLATES, NUM_PARAPHRASES

ATTRIBUTES = data.ATTRIBUTES


@pytest.fixture(scope="module")
def small():
    """A small dataset with two permuted biographies per person and paraphrase splits."""
    config = data.DatasetConfig(num_people=40, seed=3, bio_variants=2, permute=True, qa_paraphrases=2)
    return config, data.build_dataset(config)


@pytest.fixture(scope="module")
def tiny_default():
    """The setting of configs/default.py (1000 people, one template) with the word tokenizer."""
    dataset_dict = data.build_dataset(data.DatasetConfig(num_people=1000, bio_templates=1))
    tokenizer = data.get_tokenizer("word", dataset_dict)
    return dataset_dict, tokenizer, data.tokenize(dataset_dict, tokenizer)


def rows(split):
    """A split as a list of row dicts (one Arrow read, unlike per-row indexing)."""
    columns = split.to_dict()
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def spans(row):
    return list(zip(row["span_attribute"], row["span_start"], row["span_end"]))


def sentences(text):
    """Biography sentences; no pool value contains a period."""
    return re.findall(r"[^.]+\.", text)


# ---------------------------------------------------------------- pools and people


def test_pools_are_sized_unique_and_clean():
    p = population.pools()
    sizes = {"female_first": 100, "male_first": 100, "middle": 200, "last": 400, "birth_city": 200,
             "university": 300, "major": 100, "employer": 300}
    for name, size in sizes.items():
        pool = getattr(p, name)
        assert len(pool) == size, name
        assert len(set(pool)) == size, [v for v, n in collections.Counter(pool).items() if n > 1]
        assert all(v.isascii() and v == v.strip() and "." not in v and "\t" not in v for v in pool), name
    for name in ("female_first", "male_first", "middle", "last"):
        assert all(v.isalpha() for v in getattr(p, name)), name
    assert not set(p.female_first) & set(p.male_first)  # the first name decides the gender
    employer_cities = set(p.employer_city.values())
    assert len(employer_cities) == 200 and not employer_cities & set(p.birth_city)
    assert all(re.fullmatch(r"[A-Za-z ]+, [A-Z]{2}", c) for c in employer_cities | set(p.birth_city))
    assert set(p.employer_city) == set(p.employer)


def test_people_have_unique_names_and_consistent_facts():
    people = data.sample_people(5000, seed=0)
    assert len({person.name for person in people}) == 5000
    assert [person.person_id for person in people] == list(range(5000))
    assert 0.45 < np.mean([person.female for person in people]) < 0.55
    p = population.pools()
    for person in people:
        assert (person.first in p.female_first) == person.female
        assert person.employer_city == p.employer_city[person.employer]
        month, day, year = re.fullmatch(r"(\w+) (\d+), (\d{4})", person.birth_date).groups()
        assert month in population.MONTHS and 1 <= int(day) <= 28 and 1900 <= int(year) < 2000
    assert len({person.birth_city for person in people}) == 200  # all of each pool is reachable
    assert len({person.employer for person in people}) == 300


def test_employer_city_is_a_function_of_the_employer():
    cities = collections.defaultdict(set)
    for person in data.sample_people(2000, seed=7):
        cities[person.employer].add(person.employer_city)
    assert all(len(c) == 1 for c in cities.values())
    assert len({c for cs in cities.values() for c in cs}) > 150  # and employers do not share one city


def test_too_many_people_names_both_numbers():
    limit = population.pools().num_unique_names
    assert limit == 200 * 200 * 400
    for make in (lambda: data.DatasetConfig(num_people=limit + 1), lambda: data.sample_people(limit + 1, 0)):
        with pytest.raises(ValueError, match=rf"num_people={limit + 1}\b.*\b{limit}\b"):
            make()


@pytest.mark.parametrize("field, value, expected", [
    ("num_people", 0, "between 1 and"),
    ("num_people", 2.5, "an integer"),
    ("seed", -1, r"an integer >= 0"),
    ("qa_train_fraction", 1.5, r"a number in \[0, 1\]"),
    ("qa_train_fraction", "half", r"a number in \[0, 1\]"),
    ("split_seed", -2, "None or an integer >= 0"),
    ("bio_variants", 0, r"an integer >= 1"),
    ("bio_templates", 0, rf"an integer in \[1, {NUM_BIO_TEMPLATES}\]"),
    ("bio_templates", NUM_BIO_TEMPLATES + 1, rf"an integer in \[1, {NUM_BIO_TEMPLATES}\]"),
    ("permute", 1, "True or False"),
    ("fullname", "yes", "True or False"),
    ("qa_paraphrases", NUM_PARAPHRASES + 1, rf"an integer in \[0, {NUM_PARAPHRASES}\]"),
    ("qa_paraphrases", True, rf"an integer in \[0, {NUM_PARAPHRASES}\]"),
])
def test_bad_config_values_raise(field, value, expected):
    with pytest.raises(ValueError, match=rf"{field}={re.escape(repr(value))} .*{expected}"):
        data.DatasetConfig(**{field: value})


# ---------------------------------------------------------------- templates


def test_templates_are_well_formed():
    assert set(templates.BIO_TEMPLATES) == set(templates.QUESTIONS) == set(templates.PARAPHRASES) == set(ATTRIBUTES)
    for attribute in ATTRIBUTES:
        assert len(templates.BIO_TEMPLATES[attribute]) >= 5
        assert len(set(templates.BIO_TEMPLATES[attribute])) == len(templates.BIO_TEMPLATES[attribute])
        for template in templates.BIO_TEMPLATES[attribute]:
            assert template.startswith("{name} ") and template.count("{value}") == 1 and template.endswith(".")
        paraphrases = templates.PARAPHRASES[attribute]
        assert len(paraphrases) >= 3 and len(set(paraphrases)) == len(paraphrases)
        assert templates.QUESTIONS[attribute] not in paraphrases
        for question in (templates.QUESTIONS[attribute], *paraphrases):
            assert question.count("{name}") == 1 and question.endswith("?")
    every_question = [q for a in ATTRIBUTES for q in (templates.QUESTIONS[a], *templates.PARAPHRASES[a])]
    assert len(set(every_question)) == len(every_question)  # no wording is shared by two attributes


# ---------------------------------------------------------------- the dataset


def test_schema_and_row_order(small):
    config, ds = small
    assert set(ds) == {"bio", "qa_train", "qa_test", "qa_train_paraphrase", "qa_test_paraphrase"}
    for name, split in ds.items():
        assert split.features == data.dataset.FEATURES, name
        keys = [(r["person_id"], -1 if r["attribute"] == "bio" else ATTRIBUTES.index(r["attribute"]))
                for r in rows(split)]
        assert keys == sorted(keys), name
    for row in rows(ds["bio"]):
        assert row["attribute"] == "bio" and row["prompt"] == row["answer"] == ""
        assert sorted(row["span_attribute"]) == sorted(ATTRIBUTES) and row["span_start"] == sorted(row["span_start"])


def test_qa_answers_are_the_facts_of_the_biography(small):
    config, ds = small
    people = data.sample_people(config.num_people, config.seed)
    bio_value = {}
    for row in rows(ds["bio"]):
        for attribute, start, end in spans(row):
            bio_value.setdefault((row["person_id"], attribute), set()).add(row["text"][start:end])
    for name in ("qa_train", "qa_test", "qa_train_paraphrase", "qa_test_paraphrase"):
        for row in rows(ds[name]):
            person, attribute = people[row["person_id"]], row["attribute"]
            [(span_attribute, start, end)] = spans(row)
            assert span_attribute == attribute and row["text"][start:end] == row["answer"]
            assert row["text"] == f"{row['prompt']} {row['answer']}" and person.name in row["prompt"]
            assert bio_value[row["person_id"], attribute] == {row["answer"]} == {getattr(person, attribute)}


def test_splits_are_disjoint_cover_everyone_and_follow_the_fraction():
    people = {}
    for fraction, split_seed in ((0.5, None), (0.3, None), (0.3, 11)):
        config = data.DatasetConfig(num_people=50, seed=2, qa_train_fraction=fraction, split_seed=split_seed)
        ds = data.build_dataset(config)
        train, test = (collections.Counter(ds[s]["person_id"]) for s in ("qa_train", "qa_test"))
        assert not train.keys() & test.keys() and train.keys() | test.keys() == set(range(50))
        assert len(train) == round(fraction * 50) and set(train.values()) | set(test.values()) == {len(ATTRIBUTES)}
        assert list(ds["bio"]["person_id"]) == list(range(50))
        people[split_seed] = (set(train), ds["bio"]["text"])
    assert people[None][0] != people[11][0]  # split_seed moves the split ...
    assert people[None][1] == people[11][1]  # ... and nothing else


def test_same_config_same_dataset_other_seed_other_dataset():
    config = data.DatasetConfig(num_people=30, seed=5, qa_paraphrases=1)
    a, b = data.build_dataset(config), data.build_dataset(config)
    c = data.build_dataset(dataclasses.replace(config, seed=6))
    for name in a:
        assert a[name]._fingerprint == b[name]._fingerprint and a[name].to_dict() == b[name].to_dict()
        assert a[name]._fingerprint != c[name]._fingerprint and a[name]["text"] != c[name]["text"]


def test_bio_templates_and_variants():
    people = data.sample_people(30, seed=4)
    one = data.build_dataset(data.DatasetConfig(num_people=30, seed=4, bio_templates=1))
    for row in rows(one["bio"]):
        person = people[row["person_id"]]
        expected = [t.format(name=person.name if i == 0 else person.pronoun, value=getattr(person, a))
                    for i, (a, t) in enumerate((a, templates.BIO_TEMPLATES[a][0]) for a in ATTRIBUTES)]
        assert row["text"] == " ".join(expected)
    k = 3
    ds = data.build_dataset(data.DatasetConfig(num_people=30, seed=4, bio_templates=k, bio_variants=4))
    assert list(ds["bio"]["person_id"]) == [i for i in range(30) for _ in range(4)]
    used = collections.defaultdict(set)
    for row in rows(ds["bio"]):
        person = people[row["person_id"]]
        for i, (sentence, (attribute, _, _)) in enumerate(zip(sentences(row["text"]), spans(row))):
            subject = person.name if i == 0 else person.pronoun
            template = sentence.strip().replace(getattr(person, attribute), "{value}").replace(subject, "{name}", 1)
            assert template in templates.BIO_TEMPLATES[attribute][:k]
            used[attribute].add(template)
    assert all(len(u) == k for u in used.values())
    texts = collections.defaultdict(set)
    for row in rows(ds["bio"]):
        texts[row["person_id"]].add(row["text"])
    assert np.mean([len(t) for t in texts.values()]) > 3  # variants draw templates afresh


def test_permute_and_fullname_keep_spans_right():
    for permute, fullname in ((True, False), (False, True), (True, True)):
        config = data.DatasetConfig(num_people=30, seed=8, permute=permute, fullname=fullname)
        people = data.sample_people(30, seed=8)
        orders = set()
        for row in rows(data.build_dataset(config)["bio"]):
            person = people[row["person_id"]]
            assert all(row["text"][s:e] == getattr(person, a) for a, s, e in spans(row))
            orders.add(tuple(row["span_attribute"]))
            subjects = [s.strip().split(" ", 3)[:3] for s in sentences(row["text"])]
            assert len(subjects) == len(ATTRIBUTES)
            for i, words in enumerate(subjects):
                full = words == person.name.split()
                assert full if (i == 0 or fullname) else (words[0] == person.pronoun and not full)
        assert (len(orders) > 10) if permute else (orders == {ATTRIBUTES})


def test_subject_span_is_the_first_full_name(small):
    fullname = data.DatasetConfig(num_people=10, seed=1, permute=True, fullname=True)
    for config, dataset_dict in (small, (fullname, data.build_dataset(fullname))):
        people = data.sample_people(config.num_people, config.seed)
        for name, split in dataset_dict.items():
            for row in rows(split):
                name_of = people[row["person_id"]].name
                assert row["text"][row["subject_start"]:row["subject_end"]] == name_of, name
                assert row["text"].index(name_of) == row["subject_start"], name
                assert row["subject_end"] <= min(row["span_start"])  # the subject comes before every value


def test_paraphrase_splits_reword_the_questions(small):
    config, ds = small
    people = data.sample_people(config.num_people, config.seed)
    for group in ("train", "test"):
        plain, reworded = rows(ds[f"qa_{group}"]), rows(ds[f"qa_{group}_paraphrase"])
        assert {r["person_id"] for r in plain} == {r["person_id"] for r in reworded}
        assert len(reworded) == config.qa_paraphrases * len(plain)
        by_question = collections.defaultdict(list)
        for row in reworded:
            template = row["prompt"].replace(people[row["person_id"]].name, "{name}")
            assert template in templates.PARAPHRASES[row["attribute"]]
            by_question[row["person_id"], row["attribute"]].append(template)
        assert all(len(set(t)) == config.qa_paraphrases for t in by_question.values())
    assert "qa_train_paraphrase" not in data.build_dataset(data.DatasetConfig(num_people=5))


def test_save_to_disk_round_trip(small, tmp_path):
    _, ds = small
    ds.save_to_disk(tmp_path / "ds")
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert set(loaded) == set(ds)
    for name in ds:
        assert loaded[name].features == ds[name].features and loaded[name].to_dict() == ds[name].to_dict()


# ---------------------------------------------------------------- tokenizers


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def save_bpe(folder, texts, style):
    """A byte-level BPE tokenizer built here and saved as an HF folder, in the style of Llama 3 or of GPT-NeoX."""
    llama3 = style == "llama3"
    bos, eos = ("<|begin_of_text|>", "<|end_of_text|>") if llama3 else ("<|endoftext|>", "<|endoftext|>")
    tokenizer = Tokenizer(models.BPE())
    if llama3:  # Llama 3's split keeps digits apart from the space before them: "April 8" has a " " token
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=sorted({bos, eos}), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if llama3:  # as Llama 3's tokenizer.json: adds BOS, offsets keep the leading space
        tokenizer.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))])])
    else:  # as Pythia's: adds nothing, trims offsets
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    unk = None if llama3 else eos
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, unk_token=unk
                                         ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["word", "llama3", "neox"])
def tokenized(request, small, tmp_path_factory):
    """(dataset, tokenizer, tokenized dataset) for each tokenizer style."""
    _, ds = small
    if request.param == "word":
        tokenizer = data.get_tokenizer("word", ds)
    else:
        texts = [t for split in ds.values() for t in split["text"]]
        folder = save_bpe(tmp_path_factory.mktemp(request.param), texts, request.param)
        tokenizer = data.get_tokenizer(str(folder), ds)
        assert tokenizer.pad_token_id == tokenizer.eos_token_id  # neither defines a pad token
    return ds, tokenizer, data.tokenize(ds, tokenizer)


def test_one_bos_and_eos_at_the_ends(tokenized):
    ds, tokenizer, tds = tokenized
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for name in tds:
        assert tds[name].features == data.dataset.TOKEN_FEATURES and len(tds[name]) == len(ds[name])
        for row in rows(tds[name]):
            ids = row["input_ids"]
            assert ids[0] == bos and ids[1] != bos and ids[-1] == eos
            assert ids[1:-1].count(bos) == ids[1:-1].count(eos) == 0
            assert len(ids) == len(row["loss_mask"]) == len(row["value_attribute_ids"]) == len(row["subject_mask"])


def test_loss_mask_selects_the_answer_and_eos(tokenized):
    ds, tokenizer, tds = tokenized
    for name in tds:
        for row in rows(tds[name]):
            ids, mask = row["input_ids"], row["loss_mask"]
            if row["attribute"] == "bio":
                assert mask == [0] + [1] * (len(ids) - 1)
                continue
            targets = [i for i, m in zip(ids, mask) if m]
            assert targets[-1] == tokenizer.eos_token_id and mask[-1] == 1 and mask[0] == 0
            assert tokenizer.decode(targets[:-1]).strip() == row["answer"]
            target_values = [v for v, m in zip(row["value_attribute_ids"], mask) if m]
            assert target_values == [ATTRIBUTES.index(row["attribute"])] * (len(targets) - 1) + [-1]
    whole = data.tokenize(ds, tokenizer, qa_loss="all")
    for row in rows(whole["qa_test"]):
        assert row["loss_mask"] == [0] + [1] * (len(row["input_ids"]) - 1)


def test_value_tokens_decode_to_the_values(tokenized):
    ds, tokenizer, tds = tokenized
    for row in rows(tds["bio"]):
        values = {a: row["text"][s:e] for a, s, e in spans(row)}
        runs = [(v, [i for i, _ in group]) for v, group in
                itertools.groupby(zip(row["input_ids"], row["value_attribute_ids"]), key=lambda p: p[1]) if v >= 0]
        assert [ATTRIBUTES[v] for v, _ in runs] == row["span_attribute"]  # one run per value, in text order
        for v, ids in runs:
            assert tokenizer.decode(ids).strip() == values[ATTRIBUTES[v]]


def test_subject_tokens_decode_to_the_name(tokenized):
    ds, tokenizer, tds = tokenized
    for name in tds:
        for row in rows(tds[name]):
            marked = np.flatnonzero(row["subject_mask"])
            assert len(marked) and np.all(np.diff(marked) == 1), name  # one run of tokens
            subject = tokenizer.decode([row["input_ids"][i] for i in marked]).strip()
            assert subject == row["text"][row["subject_start"]:row["subject_end"]], name
            assert set(row["subject_mask"]) <= {0, 1}


def test_invalid_qa_loss_raises(small):
    _, ds = small
    with pytest.raises(ValueError, match=r"qa_loss='bio' .*one of \('answer', 'all'\)"):
        data.tokenize(ds, data.get_tokenizer("word", ds), qa_loss="bio")


def test_word_tokenizer_matches_the_notes(tiny_default, tmp_path):
    ds, tokenizer, tds = tiny_default
    assert 1800 <= len(tokenizer) <= 2300 and tokenizer.vocab_size == len(tokenizer)
    assert all(len(i) == 37 for i in tds["bio"]["input_ids"])
    for name in ("qa_train", "qa_test"):
        assert all(10 <= len(i) <= 14 for i in tds[name]["input_ids"])
    unk = tokenizer.unk_token_id
    for name in tds:
        for row in rows(tds[name]):
            assert unk not in row["input_ids"]
            assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == row["text"]
            counts = collections.Counter(v for v in row["value_attribute_ids"] if v >= 0)
            assert all(n == (3 if ATTRIBUTES[v] == "birth_date" else 1) for v, n in counts.items())
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = data.load_tokenizer(str(tmp_path / "tok"))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert data.tokenize(ds, loaded)["qa_test"]["input_ids"] == tds["qa_test"]["input_ids"]


def test_word_tokenizer_length_with_five_templates():
    ds = data.build_dataset(data.DatasetConfig(num_people=100))
    lengths = [len(i) for i in data.tokenize(ds, data.get_tokenizer("word", ds))["bio"]["input_ids"]]
    assert 37 <= np.mean(lengths) <= 45  # the default (first) templates are the shortest: 37


def test_load_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} is not a folder"):
        data.load_tokenizer(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} has none of tokenizer.json"):
        data.load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"cannot load the tokenizer '{tmp_path / 'broken'}'"):
        data.load_tokenizer(str(tmp_path / "broken"))
