"""Causal tests of the shared parameters: overwrite a masked subset of a model's parameters and measure recall again.

If the parameters that BIO and QA training share carry fact recall, ablating them (to zero, or back to their initial
or pretrained values) should break recall, and grafting them from a trained model into an untrained one should
transfer some of it. `random_mask` is the control: the same number of parameters in every tensor, at random
positions, which should do much less. Every function is a pure map over trees like the parameters (nnx.State), so
the result goes straight back into `nnx.merge(graphdef, params)` or an evaluator.
"""
import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["KINDS", "Outcome", "ablate", "graft", "random_mask"]

# What an intervention does: nothing (the trained model), ablate to zero, reset to the init, graft from a donor.
KINDS = {"none": "none", "ablate": "ablate to zero", "reset": "reset to init", "graft": "graft from {donor}"}


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One intervention and the accuracies measured after it: a row of the main job's intervention table.

    model: the regime intervened on; kind: a key of KINDS; scope ("global", "tensor"), mask ("shared", or "random",
    the control) and count: the mask's ("-" and 0 for kind "none"); donor: the regime grafted from; accuracies: the
    evaluation's "*_accuracy" values.
    """
    model: str
    kind: str
    scope: str = "-"
    mask: str = "-"
    count: int = 0
    donor: str = ""
    accuracies: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        return KINDS[self.kind].format(donor=self.donor)


def _by_path(tree) -> dict:
    """{path: array} of a tree like the parameters; an nnx.State and its nnx.to_pure_dict give the same paths."""
    return {jax.tree_util.keystr(path): leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))}


def _aligned(params: dict, other, name: str) -> list:
    """The leaves of `other` in the order of `params`; ValueError naming the paths or shapes that do not match."""
    other = _by_path(other)
    if params.keys() != other.keys():
        missing, extra = sorted(params.keys() - other.keys()), sorted(other.keys() - params.keys())
        raise ValueError(f"{name} does not have the structure of the parameters: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for path, x in params.items():
        if other[path].shape != x.shape:
            raise ValueError(f"{name}{path} has shape {other[path].shape}; the parameter has shape {x.shape}")
    return [other[path] for path in params]


@jax.jit
def _select(mask_leaves, source_leaves, params):
    """params with the source's values (zeros when source_leaves is None) where the mask is True, in params' dtypes;
    the leaf lists are in the order of jax.tree.leaves(params)."""
    leaves, treedef = jax.tree.flatten(params)
    sources = [jnp.zeros_like(x) for x in leaves] if source_leaves is None else source_leaves
    return treedef.unflatten([jnp.where(m, s.astype(x.dtype), x) for m, s, x in zip(mask_leaves, sources, leaves)])


def _overwrite(params, mask, source, source_name: str):
    by_path = _by_path(params)
    mask_leaves = _aligned(by_path, mask, "mask")
    if any(m.dtype != jnp.bool_ for m in mask_leaves):
        raise ValueError("mask must be boolean in every leaf")
    return _select(mask_leaves, None if source is None else _aligned(by_path, source, source_name), params)


def ablate(params, mask, to=None):
    """`params` with the masked entries set to zero, or to the values of `to` (e.g. the initial or pretrained
    parameters, which undoes what training wrote there rather than removing the weights).

    Raises ValueError when `mask` is not boolean or `mask` or `to` does not match the parameters' structure and shapes.
    """
    return _overwrite(params, mask, to, "to")


def graft(recipient, donor, mask):
    """`recipient` with the donor's values where `mask` is True: moving the shared parameters of a trained model into
    another tests whether they alone carry the facts. Validation as for `ablate`."""
    return _overwrite(recipient, mask, donor, "donor")


@jax.jit
def _random_like(mask, key):
    leaves, treedef = jax.tree.flatten(mask)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([jax.random.permutation(k, m.size).reshape(m.shape) < jnp.sum(m, dtype=jnp.int32)
                              for m, k in zip(leaves, keys)])


def random_mask(mask, seed: int):
    """A control mask: in every tensor exactly as many True entries as `mask` has, at uniformly random positions
    (the entries ranked below that count by a random permutation of each tensor; deterministic in `seed`)."""
    return _random_like(mask, jax.random.key(seed))
