"""Ablation and grafting change exactly the masked entries (an all-True mask gives a zero model or the donor itself),
and the random control mask keeps every tensor's count."""
import functools

import jax
import numpy as np
import pytest
from flax import nnx
from test_analysis import tiny_model

from factrecall_jax import analysis, interventions, models

CONFIGS = {"llama": models.LlamaConfig.tiny(), "neox": models.GPTNeoXConfig.tiny()}
TOKENS = np.array([[1, 5, 9, 33, 127], [0, 2, 4, 8, 16]], np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, input_ids):
    return nnx.merge(graphdef, params)(input_ids)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def two_models(request):
    """(graphdef, params, other params) of one tiny architecture; the two differ in every entry."""
    graphdef, params = tiny_model(CONFIGS[request.param])
    return graphdef, params, jax.tree.map(lambda x: x + np.float32(1), params)


def _bernoulli_mask(params, p=0.3, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda x: rng.rand(*x.shape) < p, params)


def _all_true(params):
    return jax.tree.map(lambda x: np.ones(x.shape, bool), params)


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(g, w)


def test_ablate_everything_zeroes_the_logits(two_models):
    graphdef, params, _ = two_models
    ablated = interventions.ablate(params, _all_true(params))
    _assert_trees_equal(ablated, jax.tree.map(np.zeros_like, params))
    assert np.any(_logits(graphdef, params, TOKENS))
    assert not np.any(_logits(graphdef, ablated, TOKENS))


@pytest.mark.parametrize("to_init", [False, True])
def test_ablate_changes_only_masked_entries(two_models, to_init):
    _, trained, init = two_models
    mask = _bernoulli_mask(trained)
    ablated = interventions.ablate(trained, mask, to=init if to_init else None)
    replacement = init if to_init else jax.tree.map(np.zeros_like, trained)
    _assert_trees_equal(ablated, jax.tree.map(np.where, mask, replacement, trained))


def test_graft_everything_reproduces_the_donor(two_models):
    graphdef, recipient, donor = two_models
    grafted = interventions.graft(recipient, donor, _all_true(recipient))
    donor_logits = _logits(graphdef, donor, TOKENS)
    np.testing.assert_array_equal(_logits(graphdef, grafted, TOKENS), donor_logits)
    assert np.any(_logits(graphdef, recipient, TOKENS) != donor_logits)


def test_graft_changes_exactly_the_masked_entries(two_models):
    _, recipient, donor = two_models
    mask = _bernoulli_mask(recipient, p=0.1, seed=1)
    grafted = interventions.graft(recipient, donor, mask)
    for r, d, m, g in zip(*map(jax.tree.leaves, (recipient, donor, mask, grafted)), strict=True):
        assert np.all(r != d)
        np.testing.assert_array_equal(np.asarray(g) != r, m)
        np.testing.assert_array_equal(np.asarray(g)[m], d[m])
    # Donor and mask may also be plain nested dicts (nnx.to_pure_dict); the result keeps the recipient's structure.
    _assert_trees_equal(interventions.graft(recipient, nnx.to_pure_dict(donor), nnx.to_pure_dict(mask)), grafted)


def test_graft_and_ablate_validate_their_inputs(two_models):
    _, recipient, donor = two_models
    mask = _all_true(recipient)
    other = tiny_model(CONFIGS["llama"] if "embed_in" in recipient else CONFIGS["neox"])[1]
    with pytest.raises(ValueError, match="donor does not have the structure of the parameters"):
        interventions.graft(recipient, other, mask)
    with pytest.raises(ValueError, match="mask does not have the structure"):
        interventions.ablate(recipient, {"layers": mask["layers"]})
    wrong = jax.tree.map(lambda x: x[..., :1] if x.ndim == 1 else x, donor)  # truncate the 1-d leaves
    with pytest.raises(ValueError, match=r"to\[.*has shape \(1,\); the parameter has shape \(64,\)"):
        interventions.ablate(recipient, mask, to=wrong)
    with pytest.raises(ValueError, match="mask must be boolean"):
        interventions.ablate(recipient, jax.tree.map(lambda x: x.astype(np.float32), mask))


def test_random_mask_keeps_counts_per_tensor():
    params = tiny_model(CONFIGS["llama"])[1]
    mask = analysis.top_fraction_mask(jax.tree.map(np.abs, params), 0.05)  # a different count in every tensor
    control = interventions.random_mask(mask, seed=0)
    counts = [int(np.sum(m)) for m in jax.tree.leaves(mask)]
    assert [int(np.sum(c)) for c in jax.tree.leaves(control)] == counts
    assert len(set(counts)) > 2
    assert sum(int(np.sum(np.asarray(m) & np.asarray(c))) for m, c in
               zip(jax.tree.leaves(mask), jax.tree.leaves(control))) < 0.5 * sum(counts)
    _assert_trees_equal(interventions.random_mask(mask, seed=0), control)
    assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(control),
                                              jax.tree.leaves(interventions.random_mask(mask, seed=1))))
    # The control keeps the nnx metadata: the same aggregations run on it.
    assert analysis.head_counts(control)["heads"].sum() > 0
