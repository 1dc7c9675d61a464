"""Paired BIO and QA examples of the same facts, for the gradient trace and the representation analyses.

Pair i is one fact, (person, attribute): the person's first biography, with the loss on that attribute's value only,
and the QA row that asks for it, with the loss on the answer. The two then differ only in format, so comparing their
gradients or hidden states compares how the model stores and retrieves one fact in each format. Each example also
carries two input positions: the last token of the subject (the first mention of the full name) and the token whose
target is the first token of the value (the position that predicts the answer).
"""
import numbers

import numpy as np

from factrecall_jax import errors
from factrecall_jax.data.population import ATTRIBUTES
from factrecall_jax.data.schedules import TokenTable

_COLUMNS = ("person_id", "attribute", "input_ids", "loss_mask", "value_attribute_ids", "subject_mask")


def _first_rows(split) -> dict:
    """{(person_id, attribute): the index of its first row in `split`}; attribute is "bio" for biographies."""
    columns = split.select_columns(["person_id", "attribute"]).to_dict()
    first = {}
    for i, key in enumerate(zip(columns["person_id"], columns["attribute"])):
        first.setdefault(key, i)
    return first


def _examples(tokenized, name, rows, attribute_ids, pad_id) -> tuple[dict, dict]:
    """({"inputs", "targets", "weights"} [n, T], {"subject", "answer"} [n]) of `rows` of split `name`.

    weights: 1 on the targets inside the value of attribute_ids[i]; T: the longest of these rows minus one.
    """
    selected = tokenized[name].select(rows)
    table = TokenTable.from_split(selected, pad_id)
    batch = table.batch(np.arange(len(rows)))
    length = batch["targets"].shape[1]
    weights_NT = table.value_ids[:, 1:length + 1] == attribute_ids[:, None]
    batch["weights"] = weights_NT.astype(np.float32)
    # the last token of the subject; it precedes EOS, so it is an input position
    subject_N = np.array([len(m) - 1 - m[::-1].index(1) if 1 in m else -1 for m in selected["subject_mask"]])
    missing = np.flatnonzero((subject_N < 0) | ~weights_NT.any(axis=1))
    if missing.size:
        i = missing[0]
        raise ValueError(f"row {rows[i]} of split {name!r} has no subject tokens or no "
                         f"{ATTRIBUTES[attribute_ids[i]]} value tokens")
    return batch, {"subject": subject_N.astype(np.int32), "answer": weights_NT.argmax(axis=1).astype(np.int32)}


def fact_pairs(tokenized, pad_id: int, split: str = "qa_train", num_people: int | None = None, seed: int = 0) -> dict:
    """The (person, attribute) pairs of the people of QA split `split`, people by person_id, attributes in ATTRIBUTES
    order.

    Args:
      tokenized: a DatasetDict from `data.tokenize` (with subject_mask).
      pad_id: the token that pads inputs and targets (weight 0), as in training.
      split: a QA split; for each (person, attribute) its first row is used (paraphrase splits: the first wording).
      num_people: how many of the split's people to draw, without replacement, with np.random.default_rng(seed);
        None: all of them.
      seed: seeds that draw.

    Returns:
      A dict of numpy arrays, n = people * len(ATTRIBUTES):
      "bio", "qa": {"inputs", "targets", "weights"} [n, T] (T per format), shifted as in training; weights are 1 on the
        targets of the pair's value (not the EOS).
      "bio_positions", "qa_positions": {"subject", "answer"} [n], indices into the inputs: the subject's last token
        and the position whose target is the value's first token.
      "person_id" [n] and "attribute" [n] (attribute names).
    """
    qa_splits = sorted(name for name in tokenized if name != "bio")
    if split not in qa_splits:
        raise errors.InvalidValue(f"split={split!r} is invalid: expected one of the QA splits {qa_splits}")
    for name in ("bio", split):
        if missing := sorted(set(_COLUMNS) - set(tokenized[name].column_names)):
            raise ValueError(f"split {name!r} lacks the columns {missing}: pass the dataset through data.tokenize")
    qa_rows = _first_rows(tokenized[split])
    people = np.array(sorted({person for person, _ in qa_rows}), np.int64)
    if not len(people):
        raise errors.InvalidValue(f"split={split!r} has no rows: no pairs to build")
    if num_people is not None:
        if not (isinstance(num_people, numbers.Integral) and not isinstance(num_people, bool)
                and 1 <= num_people <= len(people)):
            raise errors.InvalidValue(f"num_people={num_people!r} is invalid: expected None or an integer in "
                                      f"[1, {len(people)}] (the people of {split!r})")
        people = np.sort(np.random.default_rng(seed).choice(people, num_people, replace=False))
    bio_rows = _first_rows(tokenized["bio"])
    person_N = np.repeat(people, len(ATTRIBUTES))
    attribute_N = np.tile(np.arange(len(ATTRIBUTES)), len(people))
    bio, bio_positions = _examples(tokenized, "bio", [bio_rows[p, "bio"] for p in person_N], attribute_N, pad_id)
    qa, qa_positions = _examples(tokenized, split, [qa_rows[p, ATTRIBUTES[a]] for p, a in zip(person_N, attribute_N)],
                                 attribute_N, pad_id)
    return {"bio": bio, "qa": qa, "bio_positions": bio_positions, "qa_positions": qa_positions,
            "person_id": person_N, "attribute": np.array(ATTRIBUTES)[attribute_N]}
