"""Which parameters hold one tensor per layer: decided here, from axis metadata, for `trace` and `analysis` alike.

A leaf is stacked when it is an nnx.Variable whose logical axis names (the `out_sharding` metadata that
`nnx.with_partitioning` sets, and that `nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: "layers"})` extends
when it stacks blocks) start with LAYER_AXIS; slice l of its first axis is layer l. Nothing is inferred from a key
name or a shape: a block list (`nnx.List`) or a stacked module without that metadata has no layers here, so per-layer
results are absent for it rather than wrong.
"""
from collections.abc import Sequence

import jax
from flax import nnx

from factrecall_jax import errors

__all__ = ["LAYER_AXIS", "axis_names", "is_stacked", "num_layers", "stacked_leaves"]

LAYER_AXIS = "layers"


def axis_names(leaf) -> tuple:
    """The logical axis names of a leaf (an nnx.Variable's metadata), () where it has none."""
    if not isinstance(leaf, nnx.Variable):
        return ()
    return tuple(leaf.get_metadata().get("out_sharding") or ())


def is_stacked(leaf) -> bool:
    return axis_names(leaf)[:1] == (LAYER_AXIS,)


def _named_leaves(tree) -> list[tuple[str, object]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return [(jax.tree_util.keystr(path, simple=True, separator="."), leaf) for path, leaf in leaves]


def stacked_leaves(tree) -> list[bool]:
    """Per leaf of `tree` (in `jax.tree.leaves` order), whether it is stacked. A "layers" axis anywhere but first, or
    stacked leaves that disagree on the number of layers, raise an error naming the leaf."""
    flags, first = [], None
    for name, leaf in _named_leaves(tree):
        names = axis_names(leaf)
        if LAYER_AXIS in names[1:]:
            raise errors.InvalidValue(f"parameter {name} has its {LAYER_AXIS!r} axis at position "
                                      f"{names.index(LAYER_AXIS)}: stacked parameters need it first (axes {names})")
        stacked = names[:1] == (LAYER_AXIS,)
        if stacked:
            size = leaf.shape[0]
            if first is None:
                first = (name, size)
            elif size != first[1]:
                raise errors.InvalidValue(f"parameter {name} stacks {size} layers but {first[0]} stacks {first[1]}: "
                                          f"every leaf whose first axis is {LAYER_AXIS!r} must have one size")
        flags.append(stacked)
    return flags


def num_layers(tree, stacked: Sequence[bool] | None = None) -> int:
    """The number of layers of the stacked leaves of `tree` (0 when none is stacked)."""
    stacked = stacked_leaves(tree) if stacked is None else stacked
    return next((x.shape[0] for x, s in zip(jax.tree.leaves(tree), stacked) if s), 0)
