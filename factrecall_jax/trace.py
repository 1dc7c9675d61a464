"""The cross-task gradient trace: per-example gradients of paired BIO and QA examples, contracted parameter by
parameter (Zhang et al. 2025), summed over checkpoints TracIn-style.

For pairs i (BIO example i and QA example i state the same fact of the same person), with g = the gradient of one
example's loss with respect to every parameter:
  bio_abs = sum_i |g_bio_i|,  qa_abs = sum_i |g_qa_i|,  cross = sum_i g_bio_i * g_qa_i   (trees like the parameters)
  pair_dot[i] = g_bio_i . g_qa_i,  bio_sq_norm[i] = |g_bio_i|^2,  qa_sq_norm[i] = |g_qa_i|^2      ([n])
  layer_pair_dot[i, l], layer_bio_sq_norm[i, l], layer_qa_sq_norm[i, l]: the same over layer l of the stacked
  layers (the subtree `layers` of the parameters, every leaf with a leading layer axis)                   ([n, L])
"""
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
import safetensors.numpy
from flax import nnx

from factrecall_jax import errors, sharding
from factrecall_jax.models import layers

STACKED_KEY = "layers"


@flax.struct.dataclass
class PairStatistics:
    """Dot products and squared norms of paired gradients, [n] and per stacked layer [n, L]: what gradient
    consistency needs (`pair_statistics` computes these alone)."""
    pair_dot: jax.Array
    bio_sq_norm: jax.Array
    qa_sq_norm: jax.Array
    layer_pair_dot: jax.Array
    layer_bio_sq_norm: jax.Array
    layer_qa_sq_norm: jax.Array


@flax.struct.dataclass
class TraceResult(PairStatistics):
    """The contraction of one set of pairs at one checkpoint, or a learning-rate-weighted sum over checkpoints: the
    per-pair fields and the three parameter-shaped sums."""
    bio_abs: nnx.State
    qa_abs: nnx.State
    cross: nnx.State


_PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(PairStatistics))


@dataclasses.dataclass(frozen=True)
class StackedLoss:
    """A per-example loss written as head(layer(... layer(embed(params, example)) ...), example) over stacked layers.

    Calling it is the plain per-example loss (the reference path uses it so). The lean path uses the three stages to
    differentiate one layer at a time: per-example gradients then exist for one layer of a chunk of pairs at once,
    never for the whole model.
      embed(params, example) -> (x, layer_args)    the residual stream entering layer 0, and what every layer reads
      layer(layer_params, x, layer_args) -> x      one layer; layer_params: one index of params[STACKED_KEY]
      head(params, x, example) -> scalar           the loss given the last layer's output
    `params` is the whole parameter tree in embed and head; they must not read params[STACKED_KEY].
    """
    embed: Callable
    layer: Callable
    head: Callable

    def __call__(self, params, example):
        x, layer_args = self.embed(params, example)

        def body(x, layer_params):
            return self.layer(layer_params, x, layer_args), None

        return self.head(params, jax.lax.scan(body, x, params[STACKED_KEY])[0], example)


@dataclasses.dataclass(frozen=True)
class ModelLoss(StackedLoss):
    """The per-example loss of a `models` causal LM in stages (`lm_loss`), with the modules that compute it.

    Its modules tap (`layers.Tape`), so the lean path runs one forward and one backward pass per chunk and builds every
    per-example gradient from each module's input and output gradient, never running a layer twice.
    """
    graphdef: nnx.GraphDef = None
    layer_graphdef: nnx.GraphDef = None


def example_loss(logits_TV: jax.Array, example: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over the example's weighted positions (the fact's tokens), 0 if it has none."""
    losses_T = optax.softmax_cross_entropy_with_integer_labels(logits_TV, example["targets"])
    weights_T = example["weights"].astype(losses_T.dtype)
    return jnp.sum(losses_T * weights_T) / jnp.maximum(jnp.sum(weights_T), 1.0)


def _embed_rows(model, batch):
    return model.embed(batch["inputs"], batch.get("attention_mask"))


def _head_rows(model, x, batch):
    """[B] losses of a batch of rows, each example_loss."""
    return jax.vmap(example_loss)(model.unembed(x), batch)


def _one_row(example):
    return jax.tree.map(lambda x: x[None], example)


def lm_loss(graphdef: nnx.GraphDef, params: nnx.State) -> ModelLoss:
    """The per-example loss of a `models` causal LM (Llama, GPT-NeoX) in stages.

    An example is one row: {"inputs", "targets", "weights"} [T], optionally "attention_mask" [T] (1 for real tokens).
    One model structure gives one loss object, so every checkpoint and regime reuses one compiled trace.
    """
    return _lm_loss(graphdef, nnx.split(nnx.merge(graphdef, params).layers)[0])


@functools.lru_cache(maxsize=8)
def _lm_loss(graphdef: nnx.GraphDef, layer_graphdef: nnx.GraphDef) -> ModelLoss:

    def embed(params, example):
        return _embed_rows(nnx.merge(graphdef, params), _one_row(example))

    def layer(layer_params, x, layer_args):
        return nnx.merge(layer_graphdef, layer_params)(x, *layer_args)

    def head(params, x, example):
        return _head_rows(nnx.merge(graphdef, params), x, _one_row(example))[0]

    return ModelLoss(embed, layer, head, graphdef, layer_graphdef)


# --------------------------------------------------------------------------------------------------------------------
# Contraction of per-example gradients
# --------------------------------------------------------------------------------------------------------------------

# Name scopes of the lean path, so that a profile can tell its parts apart (launch.benchmark_trace --profile_dir).
CONTRACT_SCOPE = "contract"  # per-example gradients formed and summed over pairs
DOTS_SCOPE = "pair_dots"  # per-pair dot products and norms
TAPS_SCOPE = "taps"  # the forward and backward pass that give every module's input and output gradient


def _is_stacked(path) -> bool:
    return isinstance(path[0], jax.tree_util.DictKey) and path[0].key == STACKED_KEY


def _reduce_pairs(b: jax.Array, q: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum |b|, sum |q|, sum b * q) over the leading pair axis, in one pass over b and q (a variadic reduction:
    XLA:CPU runs three separate reductions over a major axis several times slower)."""
    return jax.lax.reduce((jnp.abs(b), jnp.abs(q), b * q), (jnp.zeros((), b.dtype),) * 3,
                          lambda x, y: tuple(u + v for u, v in zip(x, y)), (0,))


def _contract(bio_CX: Sequence[jax.Array], qa_CX: Sequence[jax.Array], dtype, per_layer: bool):
    """Sums over a chunk's pairs of |g_b|, |g_q|, g_b * g_q (one array per leaf), and per pair the dot product and
    squared norms, summed over the leaves ([C]) or, with per_layer, per index of their second axis ([C, L], for
    stacked leaves [C, L, ...]). Padding pairs have zero gradients."""
    keep = 2 if per_layer else 1
    sums, pair_sums = ([], [], []), [0.0, 0.0, 0.0]
    with jax.named_scope(CONTRACT_SCOPE):
        for bio, qa in zip(bio_CX, qa_CX):
            b, q = (x.reshape(*x.shape[:keep], -1).astype(dtype) for x in (bio, qa))
            for total, x in zip(sums, _reduce_pairs(b, q)):
                total.append(x.reshape(bio.shape[1:]))
            # The products are written once: left to itself, XLA:CPU fuses each product into its reduction and
            # tree-rewrites those into slow kernels.
            for i, p in enumerate(jax.lax.optimization_barrier((b * q, b * b, q * q))):
                pair_sums[i] += jnp.sum(p, axis=-1)
    return sums, tuple(pair_sums)


def _pair_sums(bio_CX, qa_CX, dtype, stacked):
    """_contract over whole-model per-example gradients (lists of leaves), with per-layer dots over `stacked` leaves."""
    sums, totals = _contract(bio_CX, qa_CX, dtype, per_layer=False)
    pick = lambda leaves: [g for g, s in zip(leaves, stacked) if s]  # noqa: E731
    if any(stacked):
        by_layer = _contract(pick(bio_CX), pick(qa_CX), dtype, per_layer=True)[1]
    else:
        by_layer = (jnp.zeros((len(bio_CX[0]), 0), dtype),) * 3
    return sums, (*totals, *by_layer)


def _whole_model_chunk(loss, params, acc, bio_C, qa_C, valid_C, dtype, group):
    """`acc` (the three sums, lists of leaves) plus a chunk's contraction from whole-model per-example gradients,
    for a loss with no stages; and the chunk's per-pair sums."""
    grads = jax.vmap(jax.grad(lambda p, example, valid: valid * loss(p, example)), in_axes=(None, 0, 0))
    stacked = [_is_stacked(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    valid = valid_C.astype(dtype)
    sums, pairs = _pair_sums(jax.tree.leaves(grads(params, bio_C, valid)), jax.tree.leaves(grads(params, qa_C, valid)),
                             dtype, stacked)
    return jax.tree.map(jnp.add, acc, sums), pairs


def _staged_chunk(loss: StackedLoss, params, acc, bio_C, qa_C, valid_C, dtype, group):
    """`acc` plus a chunk's contraction one layer at a time, for any StackedLoss: per-example gradients exist for one
    layer of C pairs at once.

    Forward: each example's layer inputs are kept (as a training step keeps activations). Backward: a scan over the
    layers from the top pulls each example's cotangent through layer l (running the layer's forward again inside its
    `vjp`), contracts layer l's per-example gradients at once and adds them into slice l of the sums, in place. The
    embedding and head are contracted one pair at a time, from the cotangent that reaches the embeddings and the last
    layer's output.
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    stacked = [_is_stacked(path) for path, _ in path_leaves]
    outer = [x for (_, x), s in zip(path_leaves, stacked) if not s]
    stacked_params = params[STACKED_KEY]

    def with_outer(outer_leaves):
        it, leaves = iter(outer_leaves), jax.tree.leaves(params)
        return jax.tree.unflatten(treedef, [x if s else next(it) for x, s in zip(leaves, stacked)])

    def forward(example, valid):
        x, layer_args = loss.embed(params, example)

        def body(x, layer_params):
            return loss.layer(layer_params, x, layer_args), x

        x_last, layer_inputs = jax.lax.scan(body, x, stacked_params)
        dx = jax.grad(lambda x: valid * loss.head(params, x, example))(x_last)
        return layer_inputs, x_last, dx, layer_args

    valid = valid_C.astype(dtype)
    (bio_inputs, bio_last, bio_dx, bio_args), (qa_inputs, qa_last, qa_dx, qa_args) = (
        jax.vmap(forward)(bio_C, valid), jax.vmap(forward)(qa_C, valid))

    def layer_grads(layer_params, x_C, args_C, dx_C):
        def one(x, args, dx):
            return jax.vjp(lambda p, x: loss.layer(p, x, args), layer_params, x)[1](dx)
        return jax.vmap(one)(x_C, args_C, dx_C)

    def backward(carry, xs):
        (bio_dx, qa_dx), layer_acc = carry
        index, layer_params, bio_x, qa_x = xs
        (bio_g, bio_dx), (qa_g, qa_dx) = (layer_grads(layer_params, bio_x, bio_args, bio_dx),
                                          layer_grads(layer_params, qa_x, qa_args, qa_dx))
        sums, pairs = _contract(jax.tree.leaves(bio_g), jax.tree.leaves(qa_g), dtype, False)
        layer_acc = tuple([a.at[index].add(x) for a, x in zip(a_i, s_i)] for a_i, s_i in zip(layer_acc, sums))
        return ((bio_dx, qa_dx), layer_acc), pairs

    pick = lambda leaves, keep: [x for x, s in zip(leaves, stacked) if s == keep]  # noqa: E731
    layer_axis_first = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  [C, L, ...] -> [L, C, ...]
    num_layers = jax.tree.leaves(stacked_params)[0].shape[0]
    ((bio_dx0, qa_dx0), layer_sums), layer_pairs = jax.lax.scan(
        backward, ((bio_dx, qa_dx), tuple(pick(a, True) for a in acc)),
        (jnp.arange(num_layers), stacked_params, layer_axis_first(bio_inputs), layer_axis_first(qa_inputs)), reverse=True)

    def outer_grad(example, x_last, dx0, valid):
        def direct(outer_leaves):  # the head's own dependence plus the embeddings' share of the layers' gradient
            p = with_outer(outer_leaves)
            return valid * loss.head(p, x_last, example) + jnp.vdot(loss.embed(p, example)[0], dx0)
        return jax.grad(direct)(outer)

    def per_pair(acc, xs):
        bio_ex, b_last, b_dx0, qa_ex, q_last, q_dx0, valid = xs
        sums, pairs = _contract([g[None] for g in outer_grad(bio_ex, b_last, b_dx0, valid)],
                                [g[None] for g in outer_grad(qa_ex, q_last, q_dx0, valid)], dtype, False)
        return jax.tree.map(jnp.add, acc, sums), jax.tree.map(lambda x: x[0], pairs)

    outer_sums, outer_pairs = jax.lax.scan(
        per_pair, tuple(pick(a, False) for a in acc), (bio_C, bio_last, bio_dx0, qa_C, qa_last, qa_dx0, valid))

    def merged(outer_leaves, layer_leaves):
        it_outer, it_layer = iter(outer_leaves), iter(layer_leaves)
        return [next(it_layer) if s else next(it_outer) for s in stacked]

    sums = tuple(merged(o, l) for o, l in zip(outer_sums, layer_sums))
    layer_pairs_CL = tuple(x.T for x in layer_pairs)
    totals = tuple(o + l.sum(axis=1) for o, l in zip(outer_pairs, layer_pairs_CL))
    return sums, (*totals, *layer_pairs_CL)


# --------------------------------------------------------------------------------------------------------------------
# Per-example gradients factored through the modules' taps (ModelLoss)
# --------------------------------------------------------------------------------------------------------------------

@flax.struct.dataclass
class _OneHot:
    """Token ids [..., B, T] standing for their one-hot vectors over the vocabulary (never built)."""
    ids: jax.Array


def _save_all_but_casts(primitive, *_, **__) -> bool:
    """A jax.checkpoint policy: the backward pass keeps every value of a layer's forward but its dtype casts,
    which it recomputes. Left to itself, scan's autodiff keeps each layer's weights cast to the compute dtype: a
    second copy of every weight."""
    return primitive.name != "convert_element_type"


def _tapped_forward(loss: ModelLoss, params, static: dict, batch_C, probes):
    """(losses [C], taps) of a chunk's examples run as one batch (rows split over the mesh's batch axes, as in a
    training step), each stage under a layers.Tape: taps = {"embed", "layers", "head": the tapped inputs, or with
    probes=None the outputs, by key; the layers' stacked [L, C, ...]}. The tapes' modules and aliases land in
    `static`."""
    model = nnx.merge(loss.graphdef, params)

    def tapped(stage, root, fn, stage_probes):
        with layers.Tape(root, stage_probes) as tape:
            out = fn()
        static[stage] = (tape.modules, tape.aliases)
        return out, tape.outputs if probes is None else tape.inputs

    (x, layer_args), embed_taps = tapped("embed", model, lambda: _embed_rows(model, batch_C),
                                         probes and probes["embed"])

    @functools.partial(jax.checkpoint, policy=_save_all_but_casts)
    def body(x, xs):
        layer = nnx.merge(loss.layer_graphdef, xs[0])
        return tapped("layers", layer, lambda: layer(sharding.constrain_rows(x), *layer_args), xs[1])

    x, layer_taps = jax.lax.scan(body, x, (params[STACKED_KEY], probes and probes["layers"]))
    values, head_taps = tapped("head", model, lambda: _head_rows(model, x, batch_C), probes and probes["head"])
    return values, {"embed": embed_taps, "layers": layer_taps, "head": head_taps}


def _taps(loss: ModelLoss, params, batch_C, valid_C):
    """One forward and one backward pass over a chunk: (static, inputs, output gradients) of every tap, each as
    [C, 1, ...] (pair, then the one row of the module's batch axis; the layers' [L, C, 1, ...]). Padding pairs
    (valid 0) get zero output gradients."""
    static = {}
    forward = functools.partial(_tapped_forward, loss, params, static)
    shapes = jax.eval_shape(lambda batch: forward(batch, None)[1], batch_C)

    def total(probes):
        values, inputs = forward(batch_C, probes)
        return jnp.vdot(values, valid_C.astype(values.dtype)), inputs

    grads, inputs = jax.grad(total, has_aux=True)(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def per_pair(taps):  # the modules' batch axis B is the pair axis; a per-example gradient sums over B, so [C, 1]
        return {stage: jax.tree.map(lambda x: jnp.expand_dims(x, 2 if stage == "layers" else 1), t)
                for stage, t in taps.items()}

    return static, per_pair(inputs), per_pair(grads)


def _terms(static, inputs, grads) -> dict[str, list]:
    """{parameter path: [(einsum spec, operands)]}: the terms each parameter's per-example gradient sums, from one
    stage's taps (operands keep the taps' leading axes)."""
    modules, aliases = static
    terms = {}
    for key, dy in grads.items():
        module_path, name = key.rsplit("/", 1)
        x = inputs[aliases.get(key, key)]
        for param, (spec, kinds) in modules[key].grad_specs(name).items():
            operands = tuple({"x": x, "dy": dy, "onehot": _OneHot(x)}[kind] for kind in kinds)
            terms.setdefault(f"{module_path}.{param}".lstrip("."), []).append((spec, operands))
    return terms


def _leaf_terms(terms: dict, names: Sequence[str]) -> list[list]:
    if missing := [name for name in names if name not in terms]:
        raise ValueError(f"no tapped module computes the gradient of {', '.join(missing)}: the factored trace needs "
                         "every parameter's module to tap (models.layers.Tape)")
    return [terms[name] for name in names]


def _materialize(terms, shape, dtype) -> jax.Array:
    """The per-example gradients [G, *shape] that `terms` (operands with one leading axis G) sum to."""
    total = 0
    for spec, operands in terms:
        if isinstance(operands[0], _OneHot):  # a lookup: rows of dy added at the token ids
            ids, dy = operands[0].ids, operands[1]
            g = ids.shape[0]
            total = total + jnp.zeros((g, *shape), dtype).at[jnp.arange(g)[:, None], ids.reshape(g, -1)].add(
                dy.reshape(g, -1, shape[-1]).astype(dtype))
        else:
            inputs, out = _letters(spec)
            total = total + jnp.einsum(",".join("..." + x for x in inputs) + "->..." + out, *operands,
                                       preferred_element_type=dtype)
    return total


def _letters(spec: str):
    inputs, out = spec.split("->")
    return inputs.split(","), out


def _factorable(term) -> bool:
    """Two operands that share only summed letters (positions) and split the parameter's axes between them."""
    operands, out = _letters(term[0])
    if len(operands) != 2:
        return False
    summed = (set(operands[0]) & set(operands[1])) - set(out)
    sides = [set(x) - summed for x in operands]
    return not (sides[0] & sides[1]) and sides[0] | sides[1] == set(out)


def _side(term, axes):
    """(operand, its letters, the summed letters: positions) of a factorable term: the operand that carries the
    parameter axes `axes`."""
    operands, out = _letters(term[0])
    summed = "".join(c for c in operands[0] if c in operands[1] and c not in out)
    for letters, x in zip(operands, term[1]):
        if set(letters) - set(summed) == set(axes):
            return x, letters, summed
    raise ValueError(f"no operand of {term[0]} carries the axes {axes}")


def _gram(side_u, side_v, dtype) -> jax.Array:
    """[C, n_u, n_v]: inner products over the parameter axes they carry between the positions of two operands
    (_side), one-hot ids compared or gathered; only position axes are ever merged."""
    (u, lu, su), (v, lv, sv) = side_u, side_v
    fresh = dict(zip(sv, (c for c in "abcdefghijklmnopqrstuvwxyz" if c not in lu + lv)))
    lv, sv = ("".join(fresh.get(c, c) for c in x) for x in (lv, sv))
    positions = lambda x, n: x.reshape(x.shape[0], -1, *x.shape[1 + n:])  # noqa: E731  [C, positions, ...]
    if isinstance(u, _OneHot) and isinstance(v, _OneHot):
        return (positions(u.ids, len(su))[:, :, None] == positions(v.ids, len(sv))[:, None, :]).astype(dtype)
    if isinstance(v, _OneHot):
        return jnp.swapaxes(_gram(side_v, side_u, dtype), 1, 2)
    if isinstance(u, _OneHot):  # v's vocabulary entries at u's ids
        vocab = lv.replace(sv, "")
        v = positions(jnp.einsum(f"...{lv}->...{sv}{vocab}", v), len(sv))
        return jnp.take_along_axis(v, positions(u.ids, len(su))[:, None, :], axis=2).swapaxes(1, 2).astype(dtype)
    gram = jnp.einsum(f"...{lu},...{lv}->...{su}{sv}", u, v, preferred_element_type=dtype)
    return gram.reshape(gram.shape[0], math.prod(gram.shape[1:1 + len(su)]), -1)


def _pair_dot(terms_b, terms_q, shape, dtype) -> jax.Array:
    """[C]: <g_b, g_q> of each pair, from the terms of their gradients (operands with a leading pair axis C).

    Factorable terms never form the gradient: for g = sum_t a_t (x) d_t, <g_b, g_q> = sum_ts (a_b a_q^T)_ts
    (d_b d_q^T)_ts, at positions^2 (features) instead of the parameter's size (ghost clipping's identity). Other
    parameters (norm scales, biases: small) are formed and multiplied."""
    if all(map(_factorable, terms_b + terms_q)):
        total = 0
        for tb in terms_b:
            operands, out = _letters(tb[0])
            sides = [[c for c in out if c in x] for x in operands]
            for tq in terms_q:
                # Each Gram whole on every device (small): XLA's SPMD partitioner (jax 0.10.2) otherwise reshards a
                # Gram summed over a vocabulary split on (tensor, fsdp) to pairs split on (data, fsdp) without
                # reducing it, and the product is wrong on a (2, 2, 2) mesh (tests/sharded_cases.py).
                total = total + math.prod(sharding.constrain_replicated(_gram(_side(tb, axes), _side(tq, axes), dtype))
                                          for axes in sides)
        return jnp.sum(total, axis=(1, 2))
    b, q = _materialize(terms_b, shape, dtype), _materialize(terms_q, shape, dtype)
    return jnp.sum((b * q).reshape(b.shape[0], -1), axis=1)


def _pair_dots(terms_b, terms_q, shape, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """([C] each) g_b . g_q, |g_b|^2 and |g_q|^2 of each pair."""
    return (_pair_dot(terms_b, terms_q, shape, dtype), _pair_dot(terms_b, terms_b, shape, dtype),
            _pair_dot(terms_q, terms_q, shape, dtype))


def _lookup_sums(terms_b, terms_q, sums, dtype):
    """_contract_terms of a parameter whose gradients are embedding lookups alone (an untied embedding): each
    example's gradient is formed at the rows its tokens use only, never as a [V, D] array."""
    (_, (onehot_b, dy_b)), (_, (onehot_q, dy_q)) = terms_b[0], terms_q[0]
    ids_b, ids_q = (x.ids.reshape(x.ids.shape[0], -1) for x in (onehot_b, onehot_q))
    dy_b, dy_q = (x.reshape(*ids.shape, -1).astype(dtype) for x, ids in ((dy_b, ids_b), (dy_q, ids_q)))

    def at_rows(ids, other_ids, other_dy):  # [C, n, D]: other's gradient row at each of ids' tokens
        return jnp.einsum("cns,csd->cnd", (ids[:, :, None] == other_ids[:, None, :]).astype(dtype), other_dy)

    def first(ids):  # [C, n, 1]: the position is its token's first occurrence in the example
        n = ids.shape[1]
        earlier = (ids[:, :, None] == ids[:, None, :]) & (jnp.arange(n)[None, None, :] < jnp.arange(n)[None, :, None])
        return (~earlier.any(axis=2))[..., None].astype(dtype)

    def scatter(total, ids, values):
        return total.at[ids.reshape(-1)].add(values.reshape(-1, total.shape[-1]))

    row_b, row_q = at_rows(ids_b, ids_b, dy_b), at_rows(ids_q, ids_q, dy_q)
    return (scatter(sums[0], ids_b, first(ids_b) * jnp.abs(row_b)),
            scatter(sums[1], ids_q, first(ids_q) * jnp.abs(row_q)),
            scatter(sums[2], ids_b, first(ids_b) * row_b * at_rows(ids_b, ids_q, dy_q)))


# A parameter whose per-example gradients for a whole chunk take at most this many elements is contracted at once.
_SMALL = 2**20
# On an accelerator, the per-example gradients of one parameter formed at once take at most this many elements.
_GROUP_ELEMENTS = 2**28


def _contract_terms(terms_b, terms_q, sums, names, group: int | None, dtype):
    """`sums` (of |g_b|, |g_q|, g_b * g_q, one parameter's shape each) plus a chunk's pairs, from the terms of their
    gradients.

    The gradients exist for `group` pairs at a time (a scan over the chunk): one pair's fits in a CPU's cache, so
    forming it, reading it and adding it costs about what the chunk's batched weight gradient costs; forming the whole
    chunk's first would write and read them through memory. On a mesh they lie like the parameter (`names`: its
    logical axes) and the pairs are split over the batch axes it leaves free (sharding.per_example_layout). None:
    one pair per such device on a CPU; on an accelerator, as many as keep a step's gradients within _GROUP_ELEMENTS.
    """
    if all(isinstance(ops[0], _OneHot) for _, ops in terms_b + terms_q):
        return _lookup_sums(terms_b, terms_q, sums, dtype)
    shape = sums[0].shape
    num_pairs, size = jax.tree.leaves(terms_b[0][1])[0].shape[0], math.prod(shape)
    layout, devices = sharding.per_example_layout(names, shape)
    if group is None:
        group = devices if jax.default_backend() == "cpu" else max(
            g for g in range(devices, num_pairs + 1, devices) if num_pairs % g == 0
            and (g == devices or g * size <= _GROUP_ELEMENTS))

    def add(sums, terms):
        b, q = (layout(_materialize(t, shape, dtype)) for t in terms)
        return tuple(a + x for a, x in zip(sums, _reduce_pairs(b, q)))

    if num_pairs * size <= _SMALL or group >= num_pairs:
        return add(sums, (terms_b, terms_q))

    def steps(x):  # [C, ...] -> [C // group, group, ...]; pair g * (C // group) + s at step s
        return jnp.swapaxes(x.reshape(group, num_pairs // group, *x.shape[1:]), 0, 1)

    def body(sums, xs):
        return add(sums, [[(spec, ops) for (spec, _), ops in zip(t, x)] for t, x in zip((terms_b, terms_q), xs)]), None

    operands = jax.tree.map(steps, [[ops for _, ops in t] for t in (terms_b, terms_q)])
    return jax.lax.scan(body, tuple(sums), operands)[0]


def _factored_chunk(loss: ModelLoss, params, acc, bio_C, qa_C, valid_C, dtype, group, sums=True):
    """`acc` plus a chunk's contraction, every per-example gradient built from the taps of one forward and one
    backward pass per task (`_taps`); and the chunk's per-pair sums. Without `sums`, only the per-pair sums
    (`pair_statistics`): no per-example gradient is formed but those of small parameters."""
    path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    stacked = [_is_stacked(path) for path, _ in path_leaves]
    names = [_path_name(path) for path, _ in path_leaves]
    shapes = [x.shape for _, x in path_leaves]
    axes = [x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
            for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))]
    with jax.named_scope(TAPS_SCOPE):
        (static_b, inputs_b, grads_b), (static_q, inputs_q, grads_q) = (_taps(loss, params, batch, valid_C)
                                                                        for batch in (bio_C, qa_C))
    layer_leaves = [(name.split(".", 1)[1], shape[1:], a and a[1:])
                    for name, shape, a, s in zip(names, shapes, axes, stacked) if s]
    outer_leaves = [(name, shape, a) for name, shape, a, s in zip(names, shapes, axes, stacked) if not s]

    def contract(leaves, terms_b, terms_q, leaf_sums):
        """(leaf_sums, [per leaf: its three sums], plus the chunk's pairs, or None without `sums`; the three per-pair
        sums over the leaves)"""
        tb, tq = (_leaf_terms(t, [name for name, _, _ in leaves]) for t in (terms_b, terms_q))
        with jax.named_scope(DOTS_SCOPE):
            pairs = [sum(x) for x in zip(*(_pair_dots(b, q, shape, dtype)
                                           for b, q, (_, shape, _) in zip(tb, tq, leaves)))]
        if not sums:
            return None, pairs
        with jax.named_scope(CONTRACT_SCOPE):  # added into the sums in place: no second parameter-sized copy
            return [_contract_terms(b, q, three, names, group, dtype)
                    for b, q, three, (_, _, names) in zip(tb, tq, leaf_sums, leaves)], pairs

    def layer_body(layer_acc, xs):
        index, in_b, dy_b, in_q, dy_q = xs
        layer_sums, pairs = contract(layer_leaves, _terms(static_b["layers"], in_b, dy_b),
                                     _terms(static_q["layers"], in_q, dy_q),
                                     zip(*([a[index] for a in a_i] for a_i in layer_acc)) if sums else None)
        if sums:
            layer_acc = tuple([a.at[index].set(x) for a, x in zip(a_i, s_i)]
                              for a_i, s_i in zip(layer_acc, zip(*layer_sums)))
        return layer_acc, pairs

    pick = lambda leaves, keep: [x for x, s in zip(leaves, stacked) if s == keep]  # noqa: E731
    num_layers = shapes[stacked.index(True)][0]
    layer_acc = tuple(pick(a, True) for a in acc) if sums else ()
    layer_acc, layer_pairs = jax.lax.scan(
        layer_body, layer_acc, (jnp.arange(num_layers), inputs_b["layers"], grads_b["layers"], inputs_q["layers"],
                                grads_q["layers"]))

    def outer_terms(static, inputs, grads):
        terms = {}
        for stage in ("embed", "head"):
            for name, t in _terms(static[stage], inputs[stage], grads[stage]).items():
                terms.setdefault(name, []).extend(t)
        return terms

    outer_sums, outer_pairs = contract(outer_leaves, outer_terms(static_b, inputs_b, grads_b),
                                       outer_terms(static_q, inputs_q, grads_q),
                                       zip(*(pick(a, False) for a in acc)) if sums else None)
    layer_pairs_CL = tuple(x.T for x in layer_pairs)
    totals = tuple(o + l.sum(axis=1) for o, l in zip(outer_pairs, layer_pairs_CL))
    if not sums:
        return acc, (*totals, *layer_pairs_CL)
    outer_acc = list(zip(*outer_sums))

    def merged(outer_leaves, layer_leaves):
        it_outer, it_layer = iter(outer_leaves), iter(layer_leaves)
        return [next(it_layer) if s else next(it_outer) for s in stacked]

    return tuple(merged(o, l) for o, l in zip(outer_acc, layer_acc)), (*totals, *layer_pairs_CL)


def _chunk_fn(loss, method):
    if method == "reference":
        return _whole_model_chunk
    if isinstance(loss, ModelLoss):
        return _factored_chunk
    return _staged_chunk if isinstance(loss, StackedLoss) else _whole_model_chunk


def _trace(loss, params, bio_batch, qa_batch, method, chunk_size, dtype, group, sums=True):
    n = jax.tree.leaves(bio_batch)[0].shape[0]
    if method == "reference":
        chunk_size = n
    num_chunks = -(-n // chunk_size)
    chunk_fn = _chunk_fn(loss, method)
    if not sums:
        chunk_fn = functools.partial(_factored_chunk, sums=False)
    index = jnp.arange(num_chunks * chunk_size)
    valid = (index < n).reshape(num_chunks, chunk_size)

    def chunks(batch):  # pad with repeats of real pairs (masked out by `valid`) to whole chunks, split over devices
        return jax.tree.map(lambda x: sharding.constrain_rows(
            x[index % n].reshape(num_chunks, chunk_size, *x.shape[1:]), axis=1), batch)

    treedef = jax.tree.structure(params)

    def by_name(leaves):
        return jax.tree.leaves(sharding.constrain_by_name(jax.tree.unflatten(treedef, leaves)))

    def body(acc, xs):
        acc, pairs = chunk_fn(loss, params, acc, *xs, dtype, group)
        return tuple(by_name(a) for a in acc), pairs

    zeros = tuple(by_name([jnp.zeros(x.shape, dtype) for x in jax.tree.leaves(params)]) for _ in range(3)) if sums \
        else ()
    sums_, pairs = jax.lax.scan(body, zeros, (chunks(bio_batch), chunks(qa_batch), sharding.constrain_rows(valid, 1)))
    pairs = sharding.constrain_replicated([x.reshape(num_chunks * chunk_size, *x.shape[2:])[:n] for x in pairs])
    if not sums:
        return PairStatistics(*pairs)
    return TraceResult(*pairs, *(jax.tree.unflatten(treedef, s) for s in sums_))


@functools.lru_cache(maxsize=16)
def jit_trace(per_example_loss: Callable, *, method: str = "lean", chunk_size: int = 16, dtype=jnp.float32,
              mesh: jax.sharding.Mesh | None = None, group: int | None = None, sums: bool = True):
    """The one jit of the trace: `(params, bio_batch, qa_batch) -> TraceResult` (see `cross_task_trace`, which
    checks its arguments and calls this; launch.plan lowers it), or with sums=False `-> PairStatistics`
    (`pair_statistics`). On a `mesh` the parameters stay where they are (laid out by name), every chunk's pairs are
    split over the batch axes (each device traces its share of every chunk; the sums are reduced), the three
    parameter-shaped sums are laid out like the parameters and the per-pair arrays are replicated. The same arguments
    give the same compiled function."""

    def cross_task(params, bio_batch, qa_batch):
        return _trace(per_example_loss, params, bio_batch, qa_batch, method, chunk_size, jnp.dtype(dtype), group,
                      sums)

    return jax.jit(sharding.on_mesh(cross_task, mesh))


METHODS = ("lean", "reference")


def _check(bio_batch, qa_batch, method, chunk_size, group, mesh):
    if method not in METHODS:
        raise errors.InvalidValue(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise errors.InvalidValue(f"chunk_size={chunk_size!r} is invalid: expected a positive integer")
    sizes = {x.shape[0] for x in jax.tree.leaves((bio_batch, qa_batch))}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"bio_batch and qa_batch must share one non-zero leading pair axis; got sizes {sorted(sizes)}")
    split = 1 if mesh is None else sharding.batch_devices(mesh)
    if method == "lean" and chunk_size % split:
        raise errors.InvalidValue(f"chunk_size={chunk_size} is invalid on a mesh whose batch axes span {split} "
                                  f"devices: expected a multiple of {split}")
    if group is not None and not (isinstance(group, int) and group > 0 and chunk_size % group == 0
                                  and group % split == 0):
        raise errors.InvalidValue(f"group={group!r} is invalid: expected a divisor of chunk_size={chunk_size}"
                                  + (f" and a multiple of {split} (the devices the pairs are split over)"
                                     if split > 1 else ""))


def cross_task_trace(per_example_loss: Callable, params: nnx.State, bio_batch, qa_batch, *, method: str = "lean",
                     chunk_size: int = 16, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None,
                     group: int | None = None) -> TraceResult:
    """The cross-task contraction of paired per-example gradients (module docstring), jitted.

    Args:
      per_example_loss: `(params, example) -> scalar`. `lm_loss(graphdef, params)` (a ModelLoss) lets the lean path
        build every per-example gradient from the modules' taps of one forward and one backward pass per chunk; any
        other `StackedLoss` goes one layer at a time; any other function forms a chunk's whole-model per-example
        gradients. Pass the same object across calls to reuse the compiled trace.
      params: the parameter tree; leaves under the key `layers` are stacked layers (leading axis L).
      bio_batch, qa_batch: pytrees of arrays with a leading pair axis n; pair i is (bio_batch[i], qa_batch[i]).
      method: "lean" (default): chunks of `chunk_size` pairs, as above. "reference": `jax.vmap(jax.grad(
        per_example_loss))` over all n pairs, then the contraction (memory grows with n x parameters; for tests and
        small models).
      chunk_size: pairs per chunk in the lean path (their activations exist at once); n need not be a multiple.
      dtype: the dtype of the contraction and its sums (float32 by default).
      mesh: the device mesh the parameters are laid out on (`sharding.param_shardings`); each chunk's pairs are
        split over its batch axes, so chunk_size must be a multiple of their size. None: one device.
      group: for a ModelLoss, pairs whose per-example gradients of one parameter exist at once (a divisor of
        chunk_size, a multiple of the mesh's batch devices). Default: one per device on a CPU, where one pair's
        gradient stays in cache; on an accelerator, as many as keep them within 2**28 elements.
    """
    _check(bio_batch, qa_batch, method, chunk_size, group, mesh)
    return jit_trace(per_example_loss, method=method, chunk_size=chunk_size, dtype=jnp.dtype(dtype), mesh=mesh,
                     group=group)(params, bio_batch, qa_batch)


def pair_statistics(per_example_loss: Callable, params: nnx.State, bio_batch, qa_batch, *, chunk_size: int = 16,
                    dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None) -> PairStatistics:
    """The per-pair fields of `cross_task_trace` alone (dot products and squared norms of paired gradients, overall
    and per layer: what gradient consistency needs), at about the cost of a forward and a backward pass.

    For a ModelLoss (`lm_loss`) no per-example gradient of a matrix is formed: for a gradient sum_t a_t (x) d_t over
    positions t (a module's input and output gradient), <g_b, g_q> = sum_ts (a_b a_q^T)_ts (d_b d_q^T)_ts. Any other
    loss falls back to `cross_task_trace` and keeps its per-pair fields. Arguments as in `cross_task_trace`.
    """
    _check(bio_batch, qa_batch, "lean", chunk_size, None, mesh)
    if not isinstance(per_example_loss, ModelLoss):
        result = cross_task_trace(per_example_loss, params, bio_batch, qa_batch, chunk_size=chunk_size, dtype=dtype,
                                  mesh=mesh)
        return PairStatistics(*(getattr(result, name) for name in _PAIR_FIELDS))
    return jit_trace(per_example_loss, chunk_size=chunk_size, dtype=jnp.dtype(dtype), mesh=mesh, sums=False)(
        params, bio_batch, qa_batch)


def combine(results: Sequence[TraceResult], weights: Sequence[float]) -> TraceResult:
    """TracInCP: sum_c weights[c] * results[c], field by field (weights: the learning rate at each checkpoint)."""
    if len(results) != len(weights) or not results:
        raise ValueError(f"combine needs one weight per result and at least one result; got {len(results)} results "
                         f"and {len(weights)} weights")
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *results)


_TREES = ("bio_abs", "qa_abs", "cross")


def save(result: TraceResult, path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a result as safetensors: "<field>/<parameter path>" for the trees, "<field>" for the pair arrays."""
    tensors = {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if field.name in _TREES:
            for key_path, x in jax.tree_util.tree_flatten_with_path(value)[0]:
                tensors[f"{field.name}/{_path_name(key_path)}"] = np.asarray(x)
        else:
            tensors[field.name] = np.asarray(value)
    safetensors.numpy.save_file(tensors, path + ".tmp", metadata=dict(metadata or {}))
    os.replace(path + ".tmp", path)


def load(path: str, params_like) -> tuple[TraceResult, dict[str, str]]:
    """(result, metadata) of `save`; the trees take the structure (and axis metadata) of `params_like`.

    A file that is not a trace, or a trace of another model, raises one ValueError that says which.
    """
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except safetensors.SafetensorError as e:
        raise errors.InvalidValue(f"{path} is not a trace written by trace.save: {e}") from e
    leaves = jax.tree_util.tree_flatten_with_path(params_like)[0]
    paths = [_path_name(key_path) for key_path, _ in leaves]
    treedef = jax.tree.structure(params_like)
    fields = {}
    for field in dataclasses.fields(TraceResult):
        if field.name in _TREES:
            missing = [p for p in paths if f"{field.name}/{p}" not in tensors]
            if missing:
                raise errors.InvalidValue(f"{path} does not match the model: no {field.name} for "
                                          f"{', '.join(missing[:3])}")
            for p, (_, x) in zip(paths, leaves):
                if tensors[f"{field.name}/{p}"].shape != tuple(x.shape):
                    raise errors.InvalidValue(f"{path} does not match the model: {field.name} of {p} has shape "
                                              f"{tensors[f'{field.name}/{p}'].shape}; the parameter has "
                                              f"{tuple(x.shape)}")
            fields[field.name] = jax.tree.unflatten(treedef, [tensors[f"{field.name}/{p}"] for p in paths])
        elif field.name not in tensors:
            raise errors.InvalidValue(f"{path} is not a trace written by trace.save: it has no {field.name}")
        else:
            fields[field.name] = tensors[field.name]
    return TraceResult(**fields), metadata


def _path_name(path) -> str:
    """"layers.mlp.down_proj.kernel": dict keys and list indices (an nnx.Variable's own `.value` step left out)."""
    return ".".join(str(k.key if hasattr(k, "key") else k.idx) for k in path if hasattr(k, "key") or hasattr(k, "idx"))
