"""From a gradient trace to the paper's findings: which parameters BIO and QA training share, where they sit (modules,
layers, attention heads, MLP neurons), how concentrated they are, and how aligned the two tasks' gradients are.

Masks are boolean trees like the parameters (nnx.State of nnx.Param, each carrying its logical axis names in the
`out_sharding` metadata), so `interventions` can ablate or graft them directly. The aggregations read those axis names,
not module names, so any model built with them works: `stacking` decides which leaves are stacked (one slice per
layer), as it does for the trace; "heads" / "kv_heads" index attention heads and "mlp" indexes MLP neurons. Everything
else returns plain Python and numpy values, ready for JSON.

Selecting the top fraction of a billion-parameter tree must not copy it into one array: `top_fraction_mask` finds the
exact threshold by bisection over float32 bit patterns, reading the tree once per step (about 31 steps).
"""
import functools
import math
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from factrecall_jax import errors, stacking
from factrecall_jax.models.layers import LOGICAL_AXES
from factrecall_jax.trace import PairStatistics, TraceResult

__all__ = ["RULES", "SCOPES", "check_fraction", "concentration", "gradient_consistency", "head_counts", "module_counts",
           "neuron_counts", "pair_cosines", "shared_parameters", "top_fraction_mask"]

HEAD_AXIS, KV_HEAD_AXIS, NEURON_AXIS = LOGICAL_AXES["N"], LOGICAL_AXES["K"], LOGICAL_AXES["F"]
RULES = ("intersection", "cross")
SCOPES = ("global", "tensor")
_INF_BITS = 0x7F800000  # the int32 bit pattern of float32 +inf, above every finite non-negative float32


# ---------------------------------------------------------------------------------------------------------------------
# Shared parameters: the top fraction of a score tree.
# ---------------------------------------------------------------------------------------------------------------------

def _positive_bits(x: jax.Array) -> jax.Array:
    """int32 bit patterns of max(x, 0) in float32 (NaN -> 0); for non-negative float32 they order like the values.

    Selected on the bits rather than by `x > 0`, which XLA evaluates with subnormals flushed to zero.
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where((bits > 0) & (bits <= _INF_BITS), bits, 0)  # negative values have the sign bit set: bits < 0


def _rows(x: jax.Array, stacked: bool) -> jax.Array:
    """x as [R, C]: one row per layer of a stacked leaf, else one per slice along its first axis (so that no int32
    count overflows)."""
    if stacked or x.ndim >= 2:
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return x.reshape(1, x.size)


@functools.partial(jax.jit, static_argnums=2)
def _count_at_least(leaves: list[jax.Array], bits: list[jax.Array], stacked: tuple[bool, ...]) -> list[jax.Array]:
    """Per leaf and row of `_rows`, how many entries have bit pattern >= the leaf's threshold: one threshold, or one
    per layer of a stacked leaf."""
    return [jnp.sum(_positive_bits(_rows(x, s)) >= jnp.reshape(b, (-1, 1)), axis=1, dtype=jnp.int32)
            for x, b, s in zip(leaves, bits, stacked)]


@jax.jit
def _mask_at_least(leaves: list[jax.Array], bits: list[jax.Array]) -> list[jax.Array]:
    return [_positive_bits(x) >= jnp.reshape(b, b.shape + (1,) * (x.ndim - b.ndim)) for x, b in zip(leaves, bits)]


def check_fraction(value, name: str = "top_fraction") -> float:
    """`value` if it is a fraction the top-fraction selection takes, (0, 1]; else an error naming `name` (the one
    check of a top fraction, from a config, a flag or an argument)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise errors.InvalidValue(f"{name}={value!r} is invalid: expected a fraction in (0, 1]")
    return value


def top_fraction_mask(tree, fraction: float, scope: str = "global"):
    """True where a value is positive and among the top `fraction` of the values of its group: all leaves together
    (scope "global"), or each tensor on its own (scope "tensor": every leaf, and every layer of a stacked leaf).

    With k = max(1, round(fraction * group size)), a group's threshold is its exact k-th largest value; every value
    equal to it is included, so ties can select more than k entries. Values <= 0 (and NaN) are never selected, so
    fewer than k positive values select exactly those. Thresholds are found by bisection on the int32 bit patterns of
    the values clipped to >= 0 in float32 (monotone there), all groups at once, counting over the leaves one pass per
    step: no leaf is copied or concatenated.

    Args:
      tree: any pytree of arrays, e.g. an nnx.State like the parameters (`stacking` marks its stacked leaves; leaves
        of a plain pytree are one tensor each).
      fraction: in (0, 1].
      scope: one of SCOPES. A global ranking compares tensors of different gradient scale, so it can fall on a few
        tensors; "tensor" asks where each tensor's own largest values sit.

    Returns:
      A boolean tree with the structure (and nnx metadata) of `tree`.
    """
    check_fraction(fraction, "fraction")
    if scope not in SCOPES:
        raise errors.InvalidValue(f"scope={scope!r} is invalid: expected one of {', '.join(SCOPES)}")
    leaves, treedef = jax.tree.flatten(tree)
    if not sum(x.size for x in leaves):
        raise ValueError("top_fraction_mask got a tree with no values")
    stacked = tuple(scope == "tensor" and s for s in stacking.stacked_leaves(tree))
    if scope == "global":  # one group; its threshold applies to every leaf
        group_sizes = np.array([sum(x.size for x in leaves)])
        def group_counts(counts):
            return np.array([sum(int(c.sum(dtype=np.int64)) for c in counts)])

        def leaf_bits(bits):
            return [bits[0]] * len(leaves)
    else:  # one group per unstacked leaf and per layer of a stacked leaf, in leaf order
        groups = [x.shape[0] if s else 1 for x, s in zip(leaves, stacked)]
        starts = np.cumsum([0] + groups)[:-1]
        group_sizes = np.concatenate([np.full(g, x.size // g) for x, g in zip(leaves, groups)])

        def group_counts(counts):
            return np.concatenate([c.astype(np.int64) if s else [c.sum(dtype=np.int64)]
                                   for c, s in zip(counts, stacked)])

        def leaf_bits(bits):
            return [bits[o:o + g] if s else bits[o] for o, g, s in zip(starts, groups, stacked)]
    k = np.maximum(1, np.round(fraction * group_sizes)).astype(np.int64)
    # invariant per group: at least k values have bits >= lo, fewer than k have bits >= hi
    lo, hi = np.zeros_like(k, np.int32), np.full_like(k, _INF_BITS + 1, np.int32)
    while np.any(hi - lo > 1):
        mid = ((lo.astype(np.int64) + hi) // 2).astype(np.int32)
        enough = group_counts(jax.device_get(_count_at_least(leaves, leaf_bits(mid), stacked))) >= k
        lo, hi = np.where(enough, mid, lo), np.where(enough, hi, mid)
    return treedef.unflatten(_mask_at_least(leaves, leaf_bits(np.maximum(lo, 1))))  # bits >= 1 <=> value > 0


def shared_parameters(result: TraceResult, top_fraction: float = 0.01, rule: str = "intersection",
                      scope: str = "global"):
    """The parameters both tasks rely on, as a boolean tree like the parameters.

    rule "intersection": in the top `top_fraction` by sum_i |g_bio_i| and also in the top `top_fraction` by
    sum_i |g_qa_i| (the paper's definition). rule "cross": in the top `top_fraction` by the positive part of
    sum_i g_bio_i * g_qa_i, i.e. parameters whose BIO and QA gradients agree in sign and are large together.
    scope: where the top fraction is taken (`top_fraction_mask`): over all parameters ("global") or within each
    parameter tensor ("tensor").
    """
    if rule == "intersection":
        return jax.tree.map(jnp.logical_and, top_fraction_mask(result.bio_abs, top_fraction, scope),
                            top_fraction_mask(result.qa_abs, top_fraction, scope))
    if rule == "cross":
        return top_fraction_mask(result.cross, top_fraction, scope)  # negative values are never selected
    raise errors.InvalidValue(f"unknown rule {rule!r}; valid rules: {', '.join(RULES)}")


# ---------------------------------------------------------------------------------------------------------------------
# Where the shared parameters sit.
# ---------------------------------------------------------------------------------------------------------------------

def _mask_leaves(mask) -> Iterator[tuple[str, jax.Array, tuple, bool]]:
    """(dotted path, boolean array, logical axis names or (), whether stacked) for every leaf of a mask."""
    leaves = jax.tree_util.tree_leaves_with_path(mask, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for (path, leaf), stacked in zip(leaves, stacking.stacked_leaves(mask)):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        x = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        if x.dtype != jnp.bool_:
            raise errors.InvalidValue(f"mask leaf {name} has dtype {x.dtype}; a mask must be boolean")
        yield name, x, stacking.axis_names(leaf), stacked


def _share(count: int, size: int) -> dict:
    return {"count": count, "size": size, "fraction": count / size if size else 0.0}


def module_counts(mask) -> dict:
    """How many parameters of each tensor, of each layer and in all are True in `mask`.

    Returns:
      {"total": share, "per_layer": [share of layer l over all stacked tensors], "modules": {path: share plus
      "per_layer": [count in layer l] for stacked tensors, None otherwise}}, where a share is {"count", "size",
      "fraction"} and path is the tensor's dotted path in the parameters, e.g. "layers.self_attn.q_proj.kernel",
      "layers.attention.query_key_value.bias", "embed_tokens.embedding", "norm.scale".
    """
    modules, layer_counts, layer_size = {}, None, 0
    for name, x, _, stacked in _mask_leaves(mask):
        per_layer = None
        if stacked:
            per_layer = np.asarray(jnp.sum(x.reshape(x.shape[0], -1), axis=1, dtype=jnp.int32), np.int64)
            layer_counts = per_layer if layer_counts is None else layer_counts + per_layer
            layer_size += x.size // x.shape[0]
        count = int(jnp.sum(x, dtype=jnp.int32)) if per_layer is None else int(per_layer.sum())
        modules[name] = {**_share(count, x.size), "per_layer": None if per_layer is None else per_layer.tolist()}
    return {"total": _share(sum(m["count"] for m in modules.values()), sum(m["size"] for m in modules.values())),
            "per_layer": [] if layer_counts is None else [_share(c, layer_size) for c in layer_counts.tolist()],
            "modules": modules}


def _axis_counts(mask, axis: str) -> np.ndarray | None:
    """[L, size of `axis`]: True entries per layer and index along `axis`, summed over every stacked leaf that has
    the axis; None when none has."""
    total = None
    for _, x, axes, stacked in _mask_leaves(mask):
        if stacked and axis in axes:
            i = axes.index(axis)
            counts_LA = jnp.sum(x, axis=tuple(a for a in range(1, x.ndim) if a != i), dtype=jnp.int32)
            total = counts_LA if total is None else total + counts_LA
    return None if total is None else np.asarray(total, np.int64)


def head_counts(mask) -> dict:
    """True entries per layer and attention head, from the stacked leaves with a "heads" / "kv_heads" axis.

    Every weight of a head counts towards it: for Llama q_proj and o_proj ("heads") and k_proj, v_proj ("kv_heads",
    shared by the query heads of a group under GQA); for GPT-NeoX the fused query_key_value kernel and bias and the
    attention output dense kernel ("heads"). Parameters per head, for fractions, are the counts of an all-True mask:
    `head_counts(jax.tree.map(lambda x: jnp.ones_like(x, bool), mask))`.

    Returns:
      {"heads": int array [L, N], "kv_heads": int array [L, K], or None when no leaf has a "kv_heads" axis}.
    """
    heads = _axis_counts(mask, HEAD_AXIS)
    if heads is None:
        raise ValueError(f"no stacked leaf of the mask has a {HEAD_AXIS!r} axis in its out_sharding metadata")
    return {"heads": heads, "kv_heads": _axis_counts(mask, KV_HEAD_AXIS)}


def neuron_counts(mask) -> np.ndarray:
    """True entries per layer and MLP neuron [L, F], over the stacked leaves with an "mlp" axis (the neuron's input
    and output weights and biases). Parameters per neuron are the counts of an all-True mask, as for `head_counts`."""
    neurons = _axis_counts(mask, NEURON_AXIS)
    if neurons is None:
        raise ValueError(f"no stacked leaf of the mask has a {NEURON_AXIS!r} axis in its out_sharding metadata")
    return neurons


def concentration(counts, top_k: int = 10) -> dict:
    """How unevenly shared parameters spread over units (heads or neurons), from counts of any shape (flattened).

    Returns:
      {"top_k_share": the share of all counts held by the top min(top_k, n) units, "gini": the Gini coefficient, 0
      when every unit holds the same and (n - 1) / n when one holds all}; both 0 when every count is 0.
    """
    x = np.sort(np.asarray(counts, np.float64).ravel())
    if not x.size or x[0] < 0:
        raise ValueError(f"counts must be a non-empty array of values >= 0; got {x.size} values, minimum "
                         f"{x[0] if x.size else None}")
    if top_k < 1:
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer >= 1")
    total, n = x.sum(), x.size
    if not total:
        return {"top_k_share": 0.0, "gini": 0.0}
    gini = np.sum((2 * np.arange(1, n + 1) - n - 1) * x) / (n * total)
    return {"top_k_share": float(x[-min(top_k, n):].sum() / total), "gini": float(gini)}


# ---------------------------------------------------------------------------------------------------------------------
# Gradient alignment of the pairs.
# ---------------------------------------------------------------------------------------------------------------------

def _cosine(dot, sq_norm_a, sq_norm_b) -> np.ndarray:
    dot, norms = np.asarray(dot, np.float64), np.sqrt(np.asarray(sq_norm_a, np.float64) * np.asarray(sq_norm_b))
    return np.divide(dot, norms, out=np.zeros_like(dot), where=norms > 0)


def pair_cosines(result: PairStatistics) -> np.ndarray:
    """[n] cosine of g_bio_i and g_qa_i over all parameters; 0 where either gradient is 0."""
    return _cosine(result.pair_dot, result.bio_sq_norm, result.qa_sq_norm)


def gradient_consistency(result: PairStatistics, groups: Mapping[str, object] | None = None) -> dict:
    """How well a person's BIO gradient points the same way as the QA gradient for the same fact.

    Args:
      result: a trace of n pairs (TraceResult), or its per-pair fields alone (trace.pair_statistics).
      groups: {name: labels [n]}, e.g. {"attribute": the attribute of each pair}, to average per label as well.

    Returns:
      {"mean": mean pair cosine, "per_layer": [L] mean over pairs of the cosine within layer l, and for each group
      "by_<name>": {label: mean pair cosine}}.
    """
    cosine_n = pair_cosines(result)
    layer_cosine_nL = _cosine(result.layer_pair_dot, result.layer_bio_sq_norm, result.layer_qa_sq_norm)
    out = {"mean": float(cosine_n.mean()), "per_layer": layer_cosine_nL.mean(axis=0).tolist()}
    for name, labels in (groups or {}).items():
        if (labels := np.asarray(labels)).shape != cosine_n.shape:
            raise ValueError(f"groups[{name!r}] has shape {labels.shape}; expected one label per pair {cosine_n.shape}")
        out[f"by_{name}"] = {label: float(cosine_n[labels == label].mean()) for label in np.unique(labels).tolist()}
    return out
