"""Fact recall: QA exact match per split and attribute, BIO recall, and batched greedy generation.

A value counts as recalled when every one of its tokens is the argmax given the true prefix (teacher forcing). By
induction that is the same as greedy decoding reproducing the value token for token, which `generate` does the slow
way (the tests check the two agree). For a QA row the value is the answer; for a biography each of its six values is
scored on its own, given the biography up to it.

Held-out QA is also reported in its two parts (data.population.ONE_HOP, COMPOSED): the mean over the one-hop facts
and the employer's city, whose question needs name -> employer -> city; `composition` asks whether the model knows
both hops of that chain for a held-out person and still fails to answer it.
"""
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from factrecall_jax import sharding as sharding_lib
from factrecall_jax.data import ATTRIBUTES
from factrecall_jax.data.population import COMPOSED, COMPOSED_VIA, ONE_HOP
from factrecall_jax.data.schedules import TokenTable

HELD_OUT = "qa_test"  # the questions about people whose QA was never trained
ONE_HOP_KEY, COMPOSED_KEY = f"{HELD_OUT}_one_hop_accuracy", f"{HELD_OUT}_{COMPOSED}_accuracy"  # evaluation keys


def value_hits(graphdef: nnx.GraphDef, params: nnx.State, batch: Mapping[str, jax.Array]):
    """(present, recalled) [B, A]: whether row b holds a value of attribute a, and whether all its tokens are argmax.

    batch: {"inputs", "targets"} [B, T] and "values" [B, T], the attribute index of each target token (-1 elsewhere).
    """
    logits_BTV = nnx.merge(graphdef, params)(batch["inputs"])
    hit_BT = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
    in_value_BTA = batch["values"][..., None] == jnp.arange(len(ATTRIBUTES))[None, None, :]
    present_BA = jnp.any(in_value_BTA, axis=1)
    return present_BA, present_BA & jnp.all(hit_BT[..., None] | ~in_value_BTA, axis=1)


@functools.lru_cache(maxsize=8)
def jit_value_hits(graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None):
    """The one jit of the evaluation step, `(params, batch) -> value_hits(...)`; on a `mesh` the batch's rows stay
    split (activations too) and the results are replicated, so every host of a multi-host mesh reads all rows."""
    def eval_step(params, batch):
        return sharding_lib.constrain_replicated(value_hits(graphdef, params, batch))

    return jax.jit(sharding_lib.on_mesh(eval_step, mesh))


class Evaluator:
    """Scores every split of a tokenized dataset; the splits live on the device, padded to fixed batches, so each
    evaluation during training is a few jitted calls that never recompile. `sharding` places the batches (e.g.
    sharding.batch_sharding(mesh), rows split like training's); None puts them on the default device."""

    def __init__(self, tables: Mapping[str, TokenTable], graphdef: nnx.GraphDef, batch_size: int = 512,
                 sharding: jax.sharding.NamedSharding | None = None):
        self._hits = jit_value_hits(graphdef, None if sharding is None else sharding.mesh)
        self._batches, self._rows, self._people = {}, {}, {}
        for split, table in tables.items():
            if not len(table):
                continue
            self._rows[split], self._people[split] = len(table), table.person_ids
            rows = np.arange(-(-len(table) // batch_size) * batch_size) % len(table)
            length = table.input_ids.shape[1] - 1
            values = np.where(np.arange(len(rows))[:, None] < len(table), table.value_ids[rows, 1:], -1)
            batch = table.batch(rows, length)
            self._batches[split] = [
                jax.device_put({"inputs": batch["inputs"][i:i + batch_size],
                                "targets": batch["targets"][i:i + batch_size],
                                "values": values[i:i + batch_size]}, sharding)
                for i in range(0, len(rows), batch_size)]

    def recall(self, params: nnx.State, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(present, recalled) [rows, A] for every row of `split`."""
        out = [self._hits(params, batch) for batch in self._batches[split]]
        return tuple(np.concatenate([np.asarray(o[i]) for o in out])[:self._rows[split]] for i in range(2))

    def __call__(self, params: nnx.State) -> dict:
        """{"<split>_accuracy": x, "per_attribute": {"<split>": {attribute: x}}} for every split.

        The bio split is reported as "bio_accuracy": BIO recall, the share of (person, attribute) values recalled.
        Held-out QA adds ONE_HOP_KEY (the mean of the one-hop attributes' accuracies) and COMPOSED_KEY (the
        employer's city); with the bio split too, "composition" (see `composition`).
        """
        result, per_attribute, recalls = {}, {}, {}
        for split in self._batches:
            present, recalled = recalls[split] = self.recall(params, split)
            result[f"{split}_accuracy"] = float(recalled.sum() / max(present.sum(), 1))
            per_attribute[split] = {a: float(recalled[:, i].sum() / present[:, i].sum())
                                    for i, a in enumerate(ATTRIBUTES) if present[:, i].any()}
            if split == HELD_OUT:
                result |= _held_out_parts(per_attribute[split])
        result["per_attribute"] = per_attribute
        if {"bio", HELD_OUT} <= set(recalls):
            result["composition"] = composition(self._people["bio"], *recalls["bio"], self._people[HELD_OUT],
                                                *recalls[HELD_OUT])
        return result


def _held_out_parts(per_attribute: Mapping[str, float]) -> dict:
    """The two parts of held-out QA that fail for different reasons: the one-hop mean and the composed fact."""
    parts = {}
    if one_hop := [per_attribute[a] for a in ONE_HOP if a in per_attribute]:
        parts[ONE_HOP_KEY] = float(np.mean(one_hop))
    if COMPOSED in per_attribute:
        parts[COMPOSED_KEY] = per_attribute[COMPOSED]
    return parts


def composition(bio_people: np.ndarray, bio_present: np.ndarray, bio_recalled: np.ndarray, qa_people: np.ndarray,
                qa_present: np.ndarray, qa_recalled: np.ndarray) -> dict:
    """Whether held-out questions about the employer's city fail for want of a hop or for want of chaining two
    hops the model has.

    Per person with a row in the QA split: the employer is answered (QA); the city is completed from the biography
    (BIO recall of the city: teacher-forced on the biography up to it, which in the default sentence order is the
    employer sentence and the city sentence's prefix; with several biographies, only when all of them recall it); the
    city is answered (QA). bio_* and qa_*: the rows' person ids [N] and present / recalled [N, A] of each split.

    Returns {"people", "employer_answered", "city_completed", "city_answered": shares of the people, "both_known" and
    "others": {"people", "city_answered"}}: both_known are the people with the employer answered and the city
    completed, others the rest. A share of nobody is None.
    """
    people = np.unique(qa_people)

    def known(row_people, present, recalled, attribute):
        """Per person, whether every one of their rows holding `attribute` recalls it (False without such rows)."""
        a = ATTRIBUTES.index(attribute)
        rows, ok = row_people[present[:, a]], recalled[present[:, a], a]
        return np.isin(people, rows) & ~np.isin(people, rows[~ok])

    employer = known(qa_people, qa_present, qa_recalled, COMPOSED_VIA)
    completed = known(bio_people, bio_present, bio_recalled, COMPOSED)
    answered = known(qa_people, qa_present, qa_recalled, COMPOSED)
    both = employer & completed

    def share(hits, of):
        return float(hits[of].mean()) if of.any() else None

    everyone = np.ones(len(people), bool)
    return {"people": len(people), "employer_answered": share(employer, everyone),
            "city_completed": share(completed, everyone), "city_answered": share(answered, everyone),
            **{group: {"people": int(of.sum()), "city_answered": share(answered, of)}
               for group, of in (("both_known", both), ("others", ~both))}}


def generate(graphdef: nnx.GraphDef, params: nnx.State, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             pad_id: int) -> np.ndarray:
    """Greedy continuations [B, max_new_tokens] of a batch of prompts of different lengths (left-padded).

    Each new token reruns the model on the whole buffer: simple and exact, and fine for demos and tests; tokens after
    the one being predicted are masked out by causality, so the buffer's attention mask can be set once.
    """
    width = max(map(len, prompts))
    ids = np.full((len(prompts), width + max_new_tokens), pad_id, np.int32)
    mask = np.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):width] = prompt
        mask[i, width - len(prompt):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return np.asarray(_greedy(graphdef, params, ids, mask, positions, width, max_new_tokens))


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _greedy(graphdef, params, ids_BT, mask_BT, positions_BT, width, max_new_tokens):
    model = nnx.merge(graphdef, params)

    def next_token(i, ids_BT):
        logits_BTV = model(ids_BT, attention_mask_BT=mask_BT, position_ids_BT=positions_BT)
        token_B = jnp.argmax(logits_BTV[:, width + i - 1], axis=-1).astype(ids_BT.dtype)
        return ids_BT.at[:, width + i].set(token_B)

    return jax.lax.fori_loop(0, max_new_tokens, next_token, ids_BT)[:, width:]
