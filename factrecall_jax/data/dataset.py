"""The bioS DatasetDict (BIO and QA splits with value and subject spans) and its tokenization with loss masks.

Splits: `bio` (every person), `qa_train` (QA about the training half of the people), `qa_test` (the held-out half),
and with `qa_paraphrases > 0` also `qa_train_paraphrase` / `qa_test_paraphrase` (the same people, reworded questions).
Every split has one schema: person_id, attribute ("bio" or one of ATTRIBUTES), text, prompt, answer (empty for BIO)
the character spans of the attribute values in `text` (span_attribute, span_start, span_end; in text order), and
the character span of the first mention of the person's full name (subject_start, subject_end), where analyses look
for the subject in both formats.
Rows are ordered by person_id, then attribute. The build is a pure function of the config, so `Dataset.from_dict`
gives the same content fingerprint for the same config.
"""
import dataclasses
import numbers

import datasets
import numpy as np

from factrecall_jax import errors
from factrecall_jax.data import population, templates
from factrecall_jax.data.population import ATTRIBUTES

FEATURES = datasets.Features({
    "person_id": datasets.Value("int32"),
    "attribute": datasets.Value("string"),
    "text": datasets.Value("string"),
    "prompt": datasets.Value("string"),
    "answer": datasets.Value("string"),
    "span_attribute": datasets.List(datasets.Value("string")),
    "span_start": datasets.List(datasets.Value("int32")),
    "span_end": datasets.List(datasets.Value("int32")),
    "subject_start": datasets.Value("int32"),
    "subject_end": datasets.Value("int32"),
})
TOKEN_FEATURES = datasets.Features({
    **FEATURES,
    "input_ids": datasets.List(datasets.Value("int32")),
    "loss_mask": datasets.List(datasets.Value("int8")),  # 1 where the token is a training target (unshifted)
    "value_attribute_ids": datasets.List(datasets.Value("int8")),  # index into ATTRIBUTES, -1 outside values
    "subject_mask": datasets.List(datasets.Value("int8")),  # 1 on the tokens of the subject span
})
QA_LOSSES = ("answer", "all")
NUM_BIO_TEMPLATES = min(len(t) for t in templates.BIO_TEMPLATES.values())
NUM_PARAPHRASES = min(len(t) for t in templates.PARAPHRASES.values())


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(ok, name, value, expected):
    if not ok:
        raise errors.InvalidValue(f"{name}={value!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """What to generate; every field is validated on construction.

    num_people: people in the population (all get a biography).
    seed: draws the people, the BIO templates and sentence orders, and the paraphrases.
    qa_train_fraction: share of people whose QA pairs are in `qa_train`; round(fraction * num_people) people.
    split_seed: draws which people are in `qa_train`; None uses `seed`.
    bio_variants: biographies per person, each with freshly drawn templates (and order, if `permute`).
    bio_templates: each sentence uses one of the first `bio_templates` templates of its attribute.
    permute: shuffle the sentence order of each biography; the first sentence still carries the full name.
    fullname: the full name in every sentence instead of He/She after the first.
    qa_paraphrases: reworded questions per attribute and person in the `*_paraphrase` splits (0: no such splits).
    """
    num_people: int = 1000
    seed: int = 0
    qa_train_fraction: float = 0.5
    split_seed: int | None = None
    bio_variants: int = 1
    bio_templates: int = 5
    permute: bool = False
    fullname: bool = False
    qa_paraphrases: int = 0

    def __post_init__(self):
        _check(_is_int(self.num_people), "num_people", self.num_people, "an integer")
        population.check_num_people(self.num_people)
        _check(_is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _check(isinstance(self.qa_train_fraction, numbers.Real) and not isinstance(self.qa_train_fraction, bool)
               and 0 <= self.qa_train_fraction <= 1, "qa_train_fraction", self.qa_train_fraction, "a number in [0, 1]")
        _check(self.split_seed is None or _is_int(self.split_seed) and self.split_seed >= 0, "split_seed",
               self.split_seed, "None or an integer >= 0")
        _check(_is_int(self.bio_variants) and self.bio_variants >= 1, "bio_variants", self.bio_variants,
               "an integer >= 1")
        _check(_is_int(self.bio_templates) and 1 <= self.bio_templates <= NUM_BIO_TEMPLATES, "bio_templates",
               self.bio_templates, f"an integer in [1, {NUM_BIO_TEMPLATES}]")
        _check(isinstance(self.permute, bool), "permute", self.permute, "True or False")
        _check(isinstance(self.fullname, bool), "fullname", self.fullname, "True or False")
        _check(_is_int(self.qa_paraphrases) and 0 <= self.qa_paraphrases <= NUM_PARAPHRASES, "qa_paraphrases",
               self.qa_paraphrases, f"an integer in [0, {NUM_PARAPHRASES}]")


def _rows():
    return {name: [] for name in FEATURES}


def _add(rows, person_id, attribute, text, spans, subject, prompt="", answer=""):
    rows["person_id"].append(person_id)
    rows["attribute"].append(attribute)
    rows["text"].append(text)
    rows["prompt"].append(prompt)
    rows["answer"].append(answer)
    rows["span_attribute"].append([a for a, _, _ in spans])
    rows["span_start"].append([s for _, s, _ in spans])
    rows["span_end"].append([e for _, _, e in spans])
    rows["subject_start"].append(subject[0])
    rows["subject_end"].append(subject[1])


def _bio_rows(people, config):
    rng = np.random.default_rng([config.seed, 1])
    shape = (len(people), config.bio_variants, len(ATTRIBUTES))
    template_ids = rng.integers(config.bio_templates, size=shape)
    orders = np.argsort(rng.random(shape), axis=-1) if config.permute else np.broadcast_to(np.arange(shape[-1]), shape)
    rows = _rows()
    for person in people:
        for ids, order in zip(template_ids[person.person_id], orders[person.person_id]):
            text, spans, subject = templates.render_bio(person, ids, order, config.fullname)
            _add(rows, person.person_id, "bio", text, spans, subject)
    return rows


def _qa_rows(people, questions):
    """QA rows; `questions(person_id, attribute)` gives the question templates to ask."""
    rows = _rows()
    for person in people:
        for attribute in ATTRIBUTES:
            for question in questions(person.person_id, attribute):
                prompt, text, (start, end), subject = templates.render_qa(person, attribute, question)
                _add(rows, person.person_id, attribute, text, [(attribute, start, end)], subject, prompt,
                     text[start:end])
    return rows


def build_dataset(config: DatasetConfig) -> datasets.DatasetDict:
    """Generates the people and renders every split (see the module docstring).

    Each random choice has its own stream, [seed, k] (people 0, BIO templates and orders 1, paraphrases 2, split 3),
    so changing one option leaves the other draws as they were.
    """
    people = population.sample_people(config.num_people, config.seed)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    permutation = np.random.default_rng([split_seed, 3]).permutation(config.num_people)
    num_train = round(config.qa_train_fraction * config.num_people)
    groups = {"train": sorted(permutation[:num_train]), "test": sorted(permutation[num_train:])}
    rows = {"bio": _bio_rows(people, config)}
    for group, ids in groups.items():
        rows[f"qa_{group}"] = _qa_rows([people[i] for i in ids], lambda i, a: [templates.QUESTIONS[a]])
    if config.qa_paraphrases:
        draws = np.argsort(np.random.default_rng([config.seed, 2]).random(
            (config.num_people, len(ATTRIBUTES), NUM_PARAPHRASES)), axis=-1)[..., :config.qa_paraphrases]
        for group, ids in groups.items():
            rows[f"qa_{group}_paraphrase"] = _qa_rows(
                [people[i] for i in ids],
                lambda i, a: [templates.PARAPHRASES[a][k] for k in draws[i, ATTRIBUTES.index(a)]])
    return datasets.DatasetDict({name: datasets.Dataset.from_dict(r, features=FEATURES) for name, r in rows.items()})


def _token_labels(text, offsets, spans):
    """Per token, the label of the span it belongs to, else -1; `spans` are `(label, start, end)`, labels >= 0.

    A token belongs to a span when its characters, leading whitespace ignored, overlap the span. A token of only
    whitespace (GPT-NeoX trims its offsets to nothing) belongs to a span when the characters on both sides do:
    Llama 3 and Pythia split "April 8" into "April", " ", "8", and the answer's loss mask must not have a hole there.
    Special tokens have offsets (0, 0) and belong to nothing.
    """
    char_values = np.full(len(text) + 1, -1, np.int8)  # one more: the -1 after the text
    for label, start, end in spans:
        char_values[start:end] = label
    values = []
    for start, end in offsets:
        content = start + len(text[start:end]) - len(text[start:end].lstrip())
        if content < end:
            values.append(int(char_values[content:end].max()))
        elif start > 0 and char_values[start - 1] == char_values[end]:
            values.append(int(char_values[end]))
        else:
            values.append(-1)
    return values


def _tokenize_split(split, tokenizer, qa_loss):
    rows = split.to_dict()
    texts = rows["text"]
    # transformers cannot encode an empty batch, and qa_train_fraction 0 or 1 leaves a QA split empty
    encoded = tokenizer(texts, return_offsets_mapping=True) if texts else {"input_ids": [], "offset_mapping": []}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    rows.update(input_ids=[], loss_mask=[], value_attribute_ids=[], subject_mask=[])
    for i, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
        # The tokenizer's post-processor may add BOS (Llama 3) or not (GPT-NeoX): add what is missing, never twice.
        if bos is not None and ids[:1] != [bos]:
            ids, offsets = [bos] + ids, [(0, 0)] + offsets
        if ids[-1:] != [eos]:
            ids, offsets = ids + [eos], offsets + [(0, 0)]
        spans = zip(rows["span_attribute"][i], rows["span_start"][i], rows["span_end"][i])
        values = _token_labels(texts[i], offsets, [(ATTRIBUTES.index(a), s, e) for a, s, e in spans])
        subject = _token_labels(texts[i], offsets, [(1, rows["subject_start"][i], rows["subject_end"][i])])
        if rows["attribute"][i] == "bio" or qa_loss == "all":
            mask = [1] * len(ids)
        else:  # the answer tokens and the EOS that ends the answer
            mask = [int(v >= 0) for v in values[:-1]] + [1]
        if bos is not None:
            mask[0] = 0  # nothing predicts BOS
        rows["input_ids"].append(ids)
        rows["loss_mask"].append(mask)
        rows["value_attribute_ids"].append(values)
        rows["subject_mask"].append([max(v, 0) for v in subject])
    return datasets.Dataset.from_dict(rows, features=TOKEN_FEATURES)


def tokenize(dataset_dict: datasets.DatasetDict, tokenizer, *, qa_loss="answer") -> datasets.DatasetDict:
    """Adds input_ids (BOS ... EOS), loss_mask, value_attribute_ids and subject_mask to every split.

    Args:
      dataset_dict: from `build_dataset`.
      tokenizer: a fast (Rust-backed) Hugging Face tokenizer with an EOS token; the offsets locate the values.
      qa_loss: "answer" puts the QA loss on the answer tokens and the EOS after them; "all" on the whole pair.
        BIO rows are targets everywhere except BOS.
    """
    _check(qa_loss in QA_LOSSES, "qa_loss", qa_loss, f"one of {QA_LOSSES}")
    if not tokenizer.is_fast:
        raise errors.InvalidValue(f"{type(tokenizer).__name__} is not a fast tokenizer: offsets are needed to find "
                                  "the values")
    if tokenizer.eos_token_id is None:
        raise errors.InvalidValue("the tokenizer has no EOS token, which ends every biography and answer")
    return datasets.DatasetDict({name: _tokenize_split(split, tokenizer, qa_loss)
                                 for name, split in dataset_dict.items()})
