"""The contraction of paired per-example gradients, chunk by chunk, and the two public entry points.

Both engines share everything here; they differ in `capture.make_plan`. The reference forms every per-example
gradient whole (`jax.vmap(jax.grad)` of a chunk). The lean one forms only what no rule covers whole; every other
gradient stays a sum of einsum terms of a call's input and output gradient (`rules.Term`), formed a few pairs at a
time for the sums and never formed for the pair dots: for g = sum_p a_p (x) d_p over positions p,
<g_b, g_q> = sum_pq (a_b a_q^T)_pq (d_b d_q^T)_pq (Gram products, ghost clipping's identity).
"""
import functools
import math
import string
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from factrecall_jax import errors, sharding, stacking
from factrecall_jax.trace import capture, xla
from factrecall_jax.trace.results import PAIR_FIELDS, PairStatistics, TraceResult, path_name
from factrecall_jax.trace.rules import OneHot, Term

METHODS = ("lean", "reference")
PyTree = Any  # nested dicts, lists, tuples or an nnx.State of arrays
Loss = Callable[[Any, PyTree], jax.Array]  # (model or params, one example) -> scalar


class Sums(NamedTuple):
    """sum_i |g_b_i|, sum_i |g_q_i|, sum_i g_b_i * g_q_i over pairs: of one parameter, or lists of every leaf's."""
    bio_abs: Any
    qa_abs: Any
    cross: Any


class Dots(NamedTuple):
    """Per pair: g_b . g_q, |g_b|^2, |g_q|^2 ([C], or [C, L] within each layer)."""
    pair: jax.Array
    bio: jax.Array
    qa: jax.Array


# Name scopes, so that a profile can tell the parts apart (launch.benchmark_trace --profile_dir).
TAPS_SCOPE = "taps"  # the forward and backward pass that give every call's input and output gradient
CONTRACT_SCOPE = "contract"  # per-example gradients formed and summed over pairs
DOTS_SCOPE = "pair_dots"  # per-pair dot products and norms


# ---------------------------------------------------------------------------------------------------------------------
# Terms in explicit letters
# ---------------------------------------------------------------------------------------------------------------------

def _fresh(used: set, count: int) -> str:
    letters = "".join(c for c in string.ascii_letters if c not in used)[:count]
    if len(letters) < count:
        raise errors.InvalidValue("trace: a gradient term needs more einsum letters than there are")
    used.update(letters)
    return letters


def _ndim(operand) -> int:
    return operand.ids.ndim + 1 if isinstance(operand, OneHot) else operand.ndim


def _expand(term: Term, param_ndim: int) -> Term:
    """The term with every axis named. A captured call's operands are [*stacking, C, *call, ...]: the stacking axes
    (the parameter's axes beyond the rule's: the layers of a scanned module) and the pair axis lead, "..." is the
    call's batch axes; the output is [C, *stacking, *rule's parameter axes], the per-example gradient."""
    if not term.spec:
        return term
    ins, out = term.spec.replace(" ", "").split("->")
    used = set(term.spec) - set(".,->")
    stack = _fresh(used, param_ndim - len(out))
    pair = _fresh(used, 1)
    batch, explicit = None, []
    for letters, x in zip(ins.split(","), term.operands):
        lead = stack + pair
        if "..." in letters:
            count = _ndim(x) - len(lead) - len(letters.replace("...", ""))
            batch = _fresh(used, count) if batch is None else batch
            letters = letters.replace("...", batch)
        if _ndim(x) != len(lead) + len(letters):
            raise errors.InvalidValue(f"trace: gradient term {term.spec!r} does not fit an operand with {_ndim(x)} "
                                      f"axes for a parameter with {param_ndim}")
        explicit.append(lead + letters)
    return Term(",".join(explicit) + "->" + pair + stack + out, term.operands)


def _layered(term: Term) -> bool:
    """Whether a term's operands are [L, C, ...], L the parameter's first axis (a module under one scan)."""
    if not term.spec:
        return False
    ins, out = _parts(term.spec)
    return len(out) > 1 and all(x[:2] == out[1] + out[0] for x in ins)


def _pairs_first(term: Term) -> bool:
    """Whether every operand of a term has the pair axis first (not so under nested scans)."""
    ins, out = _parts(term.spec) if term.spec else ([], "")
    return all(x[0] == out[0] for x in ins)


def _at_layer(term: Term, layer) -> Term:
    """The term of one layer: a layered term's leading axis, or a whole gradient's axis 1, indexed at `layer`."""
    if not term.spec:
        return Term("", (jax.lax.dynamic_index_in_dim(term.operands[0], layer, 1, keepdims=False),))
    ins, out = _parts(term.spec)
    operands = tuple(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), x)
                     for x in term.operands)
    return Term(",".join(x[1:] for x in ins) + "->" + out[0] + out[2:], operands)


def _parts(spec: str) -> tuple[list[str], str]:
    ins, out = spec.split("->")
    return ins.split(","), out


def _pairs(term: Term) -> int:
    """The number of pairs a term's operands hold."""
    if not term.spec:
        return term.operands[0].shape[0]
    ins, out = _parts(term.spec)
    return jax.tree.leaves(term.operands[0])[0].shape[ins[0].index(out[0])]


def _is_lookup(term: Term) -> bool:
    return bool(term.spec) and isinstance(term.operands[0], OneHot)


def _scatter(term: Term, shape, dtype) -> jax.Array:
    """[G, *shape] of a lookup term (OneHot ids, y): rows of y added at the ids; the vocabulary axis comes first."""
    (ids_letters, y_letters), out = _parts(term.spec)
    onehot, y = term.operands
    g = onehot.ids.shape[0]
    if out[1] != ids_letters[-1] or len(out) - 2 != len(shape) - 1:
        raise errors.InvalidValue(f"trace: lookup term {term.spec!r}: the vocabulary axis must come first in the "
                                  "parameter")
    positions = ids_letters[1:-1]
    y = jnp.einsum(f"{y_letters}->{out[0]}{positions}{out[2:]}", y).reshape(g, -1, *shape[1:])
    return jnp.zeros((g, *shape), dtype).at[jnp.arange(g)[:, None], onehot.ids.reshape(g, -1)].add(y.astype(dtype))


def _materialize(terms: Sequence[Term], shape, dtype) -> jax.Array:
    """The per-example gradients [G, *shape] that `terms` (operands with a leading axis G) sum to."""
    total = 0
    for term in terms:
        if not term.spec:
            total = total + term.operands[0].astype(dtype)
        elif _is_lookup(term):
            total = total + _scatter(term, shape, dtype)
        else:
            total = total + jnp.einsum(term.spec, *term.operands, preferred_element_type=dtype)
    return total


# ---------------------------------------------------------------------------------------------------------------------
# Per-pair dot products
# ---------------------------------------------------------------------------------------------------------------------

class _Side(NamedTuple):
    """One operand of a factorable term, in letters of its term's spec."""
    operand: object
    letters: str
    out: str  # the term's output: the pair, stacking axes, then the parameter's axes
    positions: str  # summed by both operands
    carried: str  # output axes only this operand has
    batch: str  # output axes both operands have, kept apart: the pair, the layers
    axes: frozenset  # indices into `out` of the carried axes


def _sides(term: Term) -> tuple[_Side, _Side] | None:
    """The two sides of a factorable term: two operands, each output axis carried by one of them or a batch axis of
    both, every other letter summed by both (a position). None for any other term."""
    if not term.spec:
        return None
    ins, out = _parts(term.spec)
    if len(ins) != 2:
        return None
    both = set(ins[0]) & set(ins[1])
    if any(c not in out and c not in both for c in ins[0] + ins[1]):
        return None
    batch = "".join(c for c in out if c in both)
    sides = []
    for letters, x in zip(ins, term.operands):
        carried = "".join(c for c in letters if c in out and c not in both)
        sides.append(_Side(x, letters, out, "".join(c for c in letters if c in both and c not in out), carried,
                           batch, frozenset(map(out.index, carried))))
    return None if sides[0].axes & sides[1].axes else tuple(sides)


def _gram(u: _Side, v: _Side, dtype) -> jax.Array:
    """[*batch, P_u, P_v]: inner products, over the parameter axes both sides carry, between their positions;
    one-hot ids compared or gathered, never built."""
    if isinstance(u.operand, OneHot) or isinstance(v.operand, OneHot):
        return _onehot_gram(u, v, dtype)
    rename = {vc: uc for vc, uc in zip(v.out, u.out)}  # an output axis has one letter in both
    rename.update(zip(v.positions, _fresh(set(u.letters) | set(u.out), len(v.positions))))
    lv = "".join(rename[c] for c in v.letters)
    pv = "".join(rename[c] for c in v.positions)
    gram = jnp.einsum(f"{u.letters},{lv}->{u.batch}{u.positions}{pv}", u.operand, v.operand,
                      preferred_element_type=dtype)
    nb = len(u.batch)
    return gram.reshape(*gram.shape[:nb], math.prod(gram.shape[nb:nb + len(u.positions)]), -1)


def _onehot_gram(u: _Side, v: _Side, dtype) -> jax.Array:
    if isinstance(v.operand, OneHot) and not isinstance(u.operand, OneHot):
        return jnp.swapaxes(_onehot_gram(v, u, dtype), -1, -2)
    nb = len(u.batch)
    batch_shape = u.operand.ids.shape[:nb]
    ids_u = u.operand.ids.reshape(math.prod(batch_shape), -1)
    if isinstance(v.operand, OneHot):
        gram = (ids_u[:, :, None] == v.operand.ids.reshape(ids_u.shape[0], -1)[:, None, :]).astype(dtype)
    else:  # v's vocabulary entries at u's ids
        (vocab,) = v.carried
        y = jnp.einsum(f"{v.letters}->{v.batch}{v.positions}{vocab}", v.operand)
        y = y.reshape(ids_u.shape[0], -1, y.shape[-1])
        gram = jnp.take_along_axis(y, ids_u[:, None, :], axis=2).swapaxes(1, 2).astype(dtype)
    return gram.reshape(*batch_shape, *gram.shape[1:])


def _pair_dot(terms_b: Sequence[Term], terms_q: Sequence[Term], shape, dtype, per_layer: bool) -> jax.Array:
    """[C] (or [C, L] per layer of a stacked parameter): <g_b, g_q> of each pair, from the terms of their gradients.
    Factorable terms never form the gradient (Gram products); others are formed and multiplied."""
    sides_b, sides_q = [_sides(t) for t in terms_b], [_sides(t) for t in terms_q]
    keep = 2 if per_layer else 1
    matched = all(sides_b + sides_q) and all({b[0].axes, b[1].axes} == {q[0].axes, q[1].axes}
                                              for b in sides_b for q in sides_q)
    if matched and all(s[0].batch[:keep] == s[0].out[:keep] for s in sides_b + sides_q):
        total = 0
        for b_sides in sides_b:
            for q_sides in sides_q:
                if (b_sides[0].axes, b_sides[1].axes) != (q_sides[0].axes, q_sides[1].axes):
                    q_sides = q_sides[::-1]  # the terms name their operands in the other order
                grams = [xla.replicated(_gram(u, v, dtype)) for u, v in zip(b_sides, q_sides)]
                total = total + jnp.sum(grams[0] * grams[1], axis=(-2, -1))
        return jnp.sum(total, axis=tuple(range(keep, total.ndim)))
    b, q = _materialize(terms_b, shape, dtype), _materialize(terms_q, shape, dtype)
    (product,) = xla.written_once(b * q)
    return jnp.sum(product.reshape(*product.shape[:keep], -1), axis=-1)


def _pair_dots(terms_b, terms_q, shape, dtype, per_layer) -> Dots:
    return Dots(*(_pair_dot(x, y, shape, dtype, per_layer)
                  for x, y in ((terms_b, terms_q), (terms_b, terms_b), (terms_q, terms_q))))


# ---------------------------------------------------------------------------------------------------------------------
# Sums over pairs
# ---------------------------------------------------------------------------------------------------------------------

def _lookup_sums(terms_b, terms_q, sums, dtype):
    """The sums of a parameter whose gradients are embedding lookups alone (an untied embedding): each example's
    gradient is formed at the rows its tokens use only, never as a [V, D] array."""
    def rows(term):
        (ids_letters, y_letters), out = _parts(term.spec)
        onehot, y = term.operands
        ids = onehot.ids.reshape(onehot.ids.shape[0], -1)
        return ids, jnp.einsum(f"{y_letters}->{out[0]}{ids_letters[1:-1]}{out[2:]}", y).reshape(
            *ids.shape, -1).astype(dtype)

    (ids_b, dy_b), (ids_q, dy_q) = rows(terms_b[0]), rows(terms_q[0])

    def at_rows(ids, other_ids, other_dy):  # [C, n, D]: other's gradient row at each of ids' tokens
        return jnp.einsum("cns,csd->cnd", (ids[:, :, None] == other_ids[:, None, :]).astype(dtype), other_dy)

    def first(ids):  # [C, n, 1]: the position is its token's first occurrence in the example
        n = ids.shape[1]
        earlier = (ids[:, :, None] == ids[:, None, :]) & (jnp.arange(n)[None, None, :] < jnp.arange(n)[None, :, None])
        return (~earlier.any(axis=2))[..., None].astype(dtype)

    def scatter(total, ids, values):
        return total.at[ids.reshape(-1)].add(values.reshape(-1, *total.shape[1:]))

    row_b, row_q = at_rows(ids_b, ids_b, dy_b), at_rows(ids_q, ids_q, dy_q)
    return Sums(scatter(sums.bio_abs, ids_b, first(ids_b) * jnp.abs(row_b)),
                scatter(sums.qa_abs, ids_q, first(ids_q) * jnp.abs(row_q)),
                scatter(sums.cross, ids_b, first(ids_b) * row_b * at_rows(ids_b, ids_q, dy_q)))


def _dots(b: jax.Array, q: jax.Array, keep: int) -> Dots:
    """The dots of formed per-example gradients, over all but their first `keep` axes."""
    return Dots(*(jnp.sum(p.reshape(*p.shape[:keep], -1), axis=-1) for p in xla.written_once(b * q, b * b, q * q)))


def _contract(terms_b, terms_q, sums: Sums, names, group: int | None, dtype, per_layer: bool) -> tuple[Sums, Dots]:
    """`sums` (each of the parameter's shape) plus a chunk's pairs, and the pairs' dots ([C], or [C, L] per_layer).
    A parameter of a scanned module goes one layer at a time, so that a pair's gradient of one layer is what exists
    at once."""
    terms = list(terms_b) + list(terms_q)
    if all(_is_lookup(t) and len(_parts(t.spec)[1]) == 3 for t in terms):
        return (_lookup_sums(terms_b, terms_q, sums, dtype),
                _pair_dots(terms_b, terms_q, sums.bio_abs.shape, dtype, False))
    if not (any(t.spec for t in terms) and all(_layered(t) or not t.spec for t in terms)):
        return _contract_pairs(terms_b, terms_q, sums, names, group, dtype, 2 if per_layer else 1)

    def layer(acc, index):
        at = functools.partial(jax.lax.dynamic_index_in_dim, index=index, axis=0, keepdims=False)
        new, dots = _contract_pairs([_at_layer(t, index) for t in terms_b], [_at_layer(t, index) for t in terms_q],
                                    Sums(*map(at, acc)), names and names[1:], group, dtype, 1)
        return Sums(*(jax.lax.dynamic_update_index_in_dim(a, x, index, 0) for a, x in zip(acc, new))), dots

    sums, dots_LC = jax.lax.scan(layer, sums, jnp.arange(sums.bio_abs.shape[0]))
    return sums, Dots(*(d.T if per_layer else d.sum(axis=0) for d in dots_LC))


def _contract_pairs(terms_b, terms_q, sums: Sums, names, group: int | None, dtype, keep: int) -> tuple[Sums, Dots]:
    """`_contract` of the whole parameter. The gradients exist for `group` pairs at a time (xla.default_group); on a
    mesh they lie like the parameter (`names`: its logical axes), with the pairs split over the batch axes it leaves
    free (sharding.per_example_layout)."""
    shape = sums.bio_abs.shape
    num_pairs = _pairs(terms_b[0])
    layout, devices = sharding.per_example_layout(names, shape)
    group = group or xla.default_group(devices, num_pairs, math.prod(shape))

    def add(sums, terms):
        b, q = (layout(_materialize(t, shape, dtype)) for t in terms)
        return Sums(*(a + x for a, x in zip(sums, xla.reduce_pairs(b, q)))), _dots(b, q, keep)

    if xla.contract_at_once(num_pairs, math.prod(shape), group) or not all(map(_pairs_first, terms_b + terms_q)):
        return add(sums, (terms_b, terms_q))

    def steps(x):  # [C, ...] -> [C // group, group, ...]; pair g * (C // group) + s at step s
        return jnp.swapaxes(x.reshape(group, num_pairs // group, *x.shape[1:]), 0, 1)

    specs = [[t.spec for t in terms] for terms in (terms_b, terms_q)]

    def body(sums, operands):
        return add(sums, [[Term(s, ops) for s, ops in zip(ss, o)] for ss, o in zip(specs, operands)])

    operands = jax.tree.map(steps, [[t.operands for t in terms] for terms in (terms_b, terms_q)])
    sums, dots = jax.lax.scan(body, sums, operands)
    return sums, Dots(*(jnp.swapaxes(d, 0, 1).reshape(num_pairs, *d.shape[2:]) for d in dots))


# ---------------------------------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------------------------------

def _chunk(loss, graphdef, plans, params, rest, bio_C, qa_C, valid_C, acc: Sums | None, dtype, group, stacked):
    """(`acc` plus the chunk's contraction, or None for the dots alone; the chunk's PairStatistics). `acc`: Sums of
    lists of leaves."""
    leaves = jax.tree.leaves(params)
    names = [stacking.axis_names(v) or None
             for v in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    with jax.named_scope(TAPS_SCOPE):
        terms_b, terms_q = (capture.per_example_terms(loss, graphdef, plan, params, rest, batch, valid_C)
                            for plan, batch in zip(plans, (bio_C, qa_C)))
    zeros = lambda *shape: jnp.zeros((*valid_C.shape, *shape), dtype)  # noqa: E731
    totals, by_layer = Dots(zeros(), zeros(), zeros()), Dots(*(zeros(stacking.num_layers(params, stacked)),) * 3)
    new_acc = Sums([], [], [])
    for i, x in enumerate(leaves):
        tb, tq = ([_expand(t, x.ndim) for t in terms[i]] for terms in (terms_b, terms_q))
        if acc is None:  # the dots alone: from Gram products, no gradient formed
            with jax.named_scope(DOTS_SCOPE):
                dots = _pair_dots(tb, tq, x.shape, dtype, stacked[i])
        else:  # the gradients are formed for the sums: their dots come with them
            with jax.named_scope(CONTRACT_SCOPE):  # added into the sums in place: no second parameter-sized copy
                sums, dots = _contract(tb, tq, Sums(*(a[i] for a in acc)), names[i], group, dtype, stacked[i])
            for total, x_sum in zip(new_acc, sums):
                total.append(x_sum)
        totals = Dots(*(t + (d.sum(axis=1) if stacked[i] else d) for t, d in zip(totals, dots)))
        if stacked[i]:
            by_layer = Dots(*(t + d for t, d in zip(by_layer, dots)))
    return (new_acc if acc is not None else None), PairStatistics(*totals, *by_layer)


def _trace(loss, graphdef, params, rest, bio_batch, qa_batch, method, chunk_size, dtype, group, sums):
    n = jax.tree.leaves(bio_batch)[0].shape[0]
    num_chunks = -(-n // chunk_size)
    index = jnp.arange(num_chunks * chunk_size)
    valid = (index < n).reshape(num_chunks, chunk_size)
    stacked = stacking.stacked_leaves(params)
    plans = [capture.make_plan(loss, graphdef, params, rest, jax.tree.map(lambda x: x[0], batch), method)
             for batch in (bio_batch, qa_batch)]  # the same calls; their shapes differ with the examples'

    def chunks(batch):  # pad with repeats of real pairs (masked out by `valid`) to whole chunks, split over devices
        return jax.tree.map(lambda x: sharding.constrain_rows(
            x[index % n].reshape(num_chunks, chunk_size, *x.shape[1:]), axis=1), batch)

    treedef = jax.tree.structure(params)

    def by_name(leaves):
        return jax.tree.leaves(sharding.constrain_by_name(jax.tree.unflatten(treedef, leaves)))

    def body(acc, xs):
        acc, pairs = _chunk(loss, graphdef, plans, params, rest, *xs, acc, dtype, group, stacked)
        return (None if acc is None else Sums(*map(by_name, acc))), pairs

    zeros = Sums(*(by_name([jnp.zeros(x.shape, dtype) for x in jax.tree.leaves(params)]) for _ in range(3))) \
        if sums else None
    acc, pairs = jax.lax.scan(body, zeros, (chunks(bio_batch), chunks(qa_batch), sharding.constrain_rows(valid, 1)))
    pairs = sharding.constrain_replicated(jax.tree.map(
        lambda x: x.reshape(num_chunks * chunk_size, *x.shape[2:])[:n], pairs))
    if not sums:
        return pairs
    return TraceResult(**{f: getattr(pairs, f) for f in PAIR_FIELDS},
                       **{f: jax.tree.unflatten(treedef, a) for f, a in zip(Sums._fields, acc)})


@functools.lru_cache(maxsize=16)
def _jit(per_example_loss, graphdef, sums, method, chunk_size, dtype, mesh, group):
    def fn(params, rest, bio_batch, qa_batch):
        return _trace(per_example_loss, graphdef, params, rest, bio_batch, qa_batch, method, chunk_size, dtype,
                      group, sums)

    return jax.jit(sharding.on_mesh(fn, mesh))


def jit_trace(per_example_loss: Loss, graphdef: nnx.GraphDef | None, *, method: str = "lean",
              chunk_size: int = 16, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
              group: int | None = None) -> Callable:
    """The one jit of `cross_task_trace`: `(params, rest, bio_batch, qa_batch) -> TraceResult`, where
    `graphdef, params, rest = nnx.split(model, nnx.Param, ...)` (graphdef None and rest None for a params pytree).
    No argument is checked here: `launch.plan` lowers it with abstract arrays. The same arguments give the same
    compiled function."""
    return _jit(per_example_loss, graphdef, True, method, chunk_size, jnp.dtype(dtype), mesh, group)


def jit_pair_statistics(per_example_loss: Loss, graphdef: nnx.GraphDef | None, *, chunk_size: int = 16,
                        dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None) -> Callable:
    """The one jit of `pair_statistics`: `(params, rest, bio_batch, qa_batch) -> PairStatistics`, as `jit_trace`."""
    return _jit(per_example_loss, graphdef, False, "lean", chunk_size, jnp.dtype(dtype), mesh, None)


# ---------------------------------------------------------------------------------------------------------------------
# Checks and the public entry points
# ---------------------------------------------------------------------------------------------------------------------

def _split(model):
    """(graphdef, params, rest) of a model; (None, params, None) of a params pytree."""
    if isinstance(model, nnx.Module):
        return nnx.split(model, nnx.Param, ...)
    if isinstance(model, nnx.GraphDef):
        raise errors.InvalidValue("model is an nnx.GraphDef: pass the module (nnx.merge(graphdef, params))")
    return None, model, None


def _is_nested_numbers(x) -> bool:
    """A Python list or tuple of numbers (or of such lists): data meant as an array, not a pytree of arrays."""
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(e, (int, float, bool, np.number)) or _is_nested_numbers(e) for e in x)


def _leaf_names(tree) -> list[tuple[str, object]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_nested_numbers)[0]
    return [(path_name(p) or "(the root)", x) for p, x in leaves]


def _check_arguments(params, bio_batch, qa_batch, method, chunk_size, dtype, mesh, group) -> None:
    if method not in METHODS:
        raise errors.InvalidValue(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise errors.InvalidValue(f"chunk_size={chunk_size!r} is invalid: expected a positive integer")
    try:
        name = jnp.dtype(dtype).name
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        name, floating = repr(dtype), False
    if not floating:
        raise errors.InvalidValue(f"dtype={name} is invalid: expected a floating dtype (float32, bfloat16, ...)")
    split = 1 if mesh is None else sharding.batch_devices(mesh)
    if chunk_size % split:
        raise errors.InvalidValue(f"chunk_size={chunk_size} is invalid on a mesh whose batch axes span {split} "
                                  f"devices: expected a multiple of {split}")
    if group is not None and not (isinstance(group, int) and group > 0 and chunk_size % group == 0
                                  and group % split == 0):
        raise errors.InvalidValue(f"group={group!r} is invalid: expected a divisor of chunk_size={chunk_size}"
                                  + (f" and a multiple of {split} (the devices the pairs are split over)"
                                     if split > 1 else ""))
    leaves = _leaf_names(params)
    if not leaves:
        raise errors.InvalidValue("the model has no parameters to trace")
    for name, x in leaves:
        if not hasattr(x, "dtype"):
            raise errors.InvalidValue(f"parameter {name} is a {type(x).__name__}, not an array")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise errors.InvalidValue(f"parameter {name} has dtype {x.dtype}: every parameter is differentiated, so "
                                      "each must be floating (close over integer constants instead)")
    sizes = {}
    for label, batch in (("bio_batch", bio_batch), ("qa_batch", qa_batch)):
        rows = _leaf_names(batch)
        if not rows:
            raise errors.InvalidValue(f"{label} has no arrays")
        for name, x in rows:
            where = f"{label}[{name}]" if name != "(the root)" else label
            if isinstance(x, (int, float, np.generic)) or getattr(x, "ndim", None) == 0:
                raise errors.InvalidValue(f"{where} is a scalar: every leaf needs a leading pair axis")
            if not isinstance(x, (np.ndarray, jax.Array)):
                raise errors.InvalidValue(f"{where} is a {type(x).__name__}: pass arrays (np.asarray) with a "
                                          "leading pair axis")
            sizes[where] = x.shape[0]
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise errors.InvalidValue("bio_batch and qa_batch must share one non-zero leading pair axis; got "
                                  + ", ".join(f"{k}: {v}" for k, v in sizes.items()))


@jax.jit
def _finite(tree):
    return [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]


def _check_finite(params, bio_batch, qa_batch) -> None:
    for label, tree in (("parameter", params), ("bio_batch", bio_batch), ("qa_batch", qa_batch)):
        floating = [(name, x) for name, x in _leaf_names(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
        flags = jax.device_get(_finite([x for _, x in floating]))
        if bad := [name for (name, _), ok in zip(floating, flags) if not ok]:
            raise errors.InvalidValue(f"{label} {bad[0]} has non-finite values (NaN or inf)"
                                      + (f"; so do {len(bad) - 1} more" if len(bad) > 1 else "")
                                      + " (check_finite=False skips this check)")


def _prepare(model, bio_batch, qa_batch, method, chunk_size, dtype, mesh, group, check_finite):
    graphdef, params, rest = _split(model)
    _check_arguments(params, bio_batch, qa_batch, method, chunk_size, dtype, mesh, group)
    if check_finite:
        _check_finite(params, bio_batch, qa_batch)
    return graphdef, params, rest


def cross_task_trace(per_example_loss: Loss, model: nnx.Module | PyTree, bio_batch: PyTree, qa_batch: PyTree, *,
                     method: str = "lean", chunk_size: int = 16, dtype=jnp.float32,
                     mesh: jax.sharding.Mesh | None = None, group: int | None = None,
                     check_finite: bool = True) -> TraceResult:
    """The cross-task contraction of paired per-example gradients (TraceResult), jitted.

    Args:
      per_example_loss: `(model, example) -> scalar` for an nnx.Module, `(params, example) -> scalar` for a params
        pytree. Pass the same function across calls to reuse the compiled trace.
      model: an nnx.Module (its nnx.Param are traced; other state is held fixed), or a pytree of parameter arrays
        (linen, plain JAX). A module's calls of registered module types (`trace.register`) are captured and their
        gradients factored; every other gradient, and every gradient of a params pytree, is formed whole.
      bio_batch, qa_batch: pytrees of arrays with one leading pair axis n; pair i is (bio_batch[i], qa_batch[i]).
      method: "lean" (default), or "reference": every per-example gradient formed whole (`jax.vmap(jax.grad)` of
        each chunk), the check of the lean engine.
      chunk_size: pairs per chunk (their activations and captured calls exist at once); n need not be a multiple.
      dtype: the floating dtype of the contraction and its sums.
      mesh: the mesh the parameters are laid out on (`sharding.param_shardings`); each chunk's pairs are split over
        its batch axes, so chunk_size must be a multiple of their size. None: one device.
      group: pairs whose per-example gradients of one parameter exist at once (a divisor of chunk_size, a multiple of
        the mesh's batch devices). Default: one per device on a CPU, where one pair's gradient stays in cache; on an
        accelerator, as many as keep them within 2**28 elements.
      check_finite: first refuse parameters or batches holding NaN or inf (one pass over them).

    Returns:
      TraceResult: bio_abs, qa_abs, cross (trees like the parameters) and the per-pair fields.
    """
    graphdef, params, rest = _prepare(model, bio_batch, qa_batch, method, chunk_size, dtype, mesh, group,
                                      check_finite)
    return jit_trace(per_example_loss, graphdef, method=method, chunk_size=chunk_size, dtype=dtype, mesh=mesh,
                     group=group)(params, rest, bio_batch, qa_batch)


def pair_statistics(per_example_loss: Loss, model: nnx.Module | PyTree, bio_batch: PyTree, qa_batch: PyTree, *,
                    chunk_size: int = 16, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                    check_finite: bool = True) -> PairStatistics:
    """The per-pair fields of `cross_task_trace` alone (dot products and squared norms of paired gradients, overall
    and per layer: what gradient consistency needs), from Gram products of the captured calls: no per-example
    gradient of a factored parameter is formed, so a module costs about a forward and a backward pass. Arguments
    as in `cross_task_trace`."""
    graphdef, params, rest = _prepare(model, bio_batch, qa_batch, "lean", chunk_size, dtype, mesh, None,
                                      check_finite)
    return jit_pair_statistics(per_example_loss, graphdef, chunk_size=chunk_size, dtype=dtype, mesh=mesh)(
        params, rest, bio_batch, qa_batch)
