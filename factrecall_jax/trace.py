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

STACKED_KEY = "layers"


@flax.struct.dataclass
class TraceResult:
    """The contraction of one set of pairs at one checkpoint, or a learning-rate-weighted sum over checkpoints."""
    bio_abs: nnx.State
    qa_abs: nnx.State
    cross: nnx.State
    pair_dot: jax.Array
    bio_sq_norm: jax.Array
    qa_sq_norm: jax.Array
    layer_pair_dot: jax.Array
    layer_bio_sq_norm: jax.Array
    layer_qa_sq_norm: jax.Array


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


def example_loss(logits_TV: jax.Array, example: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over the example's weighted positions (the fact's tokens), 0 if it has none."""
    losses_T = optax.softmax_cross_entropy_with_integer_labels(logits_TV, example["targets"])
    weights_T = example["weights"].astype(losses_T.dtype)
    return jnp.sum(losses_T * weights_T) / jnp.maximum(jnp.sum(weights_T), 1.0)


def lm_loss(graphdef: nnx.GraphDef, params: nnx.State) -> StackedLoss:
    """The per-example loss of a `models` causal LM (Llama, GPT-NeoX) in stages.

    An example is one row: {"inputs", "targets", "weights"} [T], optionally "attention_mask" [T] (1 for real tokens).
    One model structure gives one loss object, so every checkpoint and regime reuses one compiled trace.
    """
    return _lm_loss(graphdef, nnx.split(nnx.merge(graphdef, params).layers)[0])


@functools.lru_cache(maxsize=8)
def _lm_loss(graphdef: nnx.GraphDef, layer_graphdef: nnx.GraphDef) -> StackedLoss:

    def embed(params, example):
        mask = example.get("attention_mask")
        return nnx.merge(graphdef, params).embed(example["inputs"][None], None if mask is None else mask[None])

    def layer(layer_params, x, layer_args):
        return nnx.merge(layer_graphdef, layer_params)(x, *layer_args)

    def head(params, x, example):
        return example_loss(nnx.merge(graphdef, params).unembed(x)[0], example)

    return StackedLoss(embed, layer, head)


# --------------------------------------------------------------------------------------------------------------------
# Contraction of per-example gradients
# --------------------------------------------------------------------------------------------------------------------

# Name scopes of the lean path, so that a profile can tell its parts apart (launch.benchmark_trace --profile_dir).
CONTRACT_SCOPE = "contract"
OUTER_SCOPE = "embedding_and_head"


def _is_stacked(path) -> bool:
    return isinstance(path[0], jax.tree_util.DictKey) and path[0].key == STACKED_KEY


def _contract(bio_CX: Sequence[jax.Array], qa_CX: Sequence[jax.Array], valid_C: jax.Array, dtype, per_layer: bool):
    """Sums over a chunk's valid pairs of |g_bio|, |g_qa|, g_bio * g_qa (one array per leaf), and per pair the dot
    product and squared norms, summed over the leaves ([C]) or, with per_layer, per index of their second axis
    ([C, L], for stacked leaves [C, L, ...])."""
    keep = 2 if per_layer else 1
    weights_C = valid_C.astype(dtype)
    sums, pair_sums = ([], [], []), [0.0, 0.0, 0.0]
    with jax.named_scope(CONTRACT_SCOPE):
        for bio, qa in zip(bio_CX, qa_CX):
            b, q = (x.reshape(*x.shape[:keep], -1).astype(dtype) for x in (bio, qa))
            # The products are written once and read by both the sum over pairs and the per-pair sums. Left to
            # itself, XLA:CPU fuses each product into each reduction and tree-rewrites those into slow kernels.
            products = jax.lax.optimization_barrier((b * q, b * b, q * q))
            for total, x in zip(sums, (jnp.abs(b), jnp.abs(q), products[0])):
                total.append(jnp.tensordot(weights_C, x, axes=1).reshape(bio.shape[1:]))
            for i, p in enumerate(products):
                pair_sums[i] += jnp.sum(p, axis=-1)
    return sums, tuple(pair_sums)


def _pair_sums(bio_CX, qa_CX, valid_C, dtype, stacked):
    """_contract over whole-model per-example gradients (lists of leaves), with per-layer dots over `stacked` leaves."""
    sums, totals = _contract(bio_CX, qa_CX, valid_C, dtype, per_layer=False)
    pick = lambda leaves: [g for g, s in zip(leaves, stacked) if s]  # noqa: E731
    if any(stacked):
        layers = _contract(pick(bio_CX), pick(qa_CX), valid_C, dtype, per_layer=True)[1]
    else:
        layers = (jnp.zeros((len(valid_C), 0), dtype),) * 3
    return sums, (*totals, *layers)


def _whole_model_chunk(loss, params, acc, bio_C, qa_C, valid_C, dtype):
    """`acc` (the three sums, lists of leaves) plus a chunk's contraction from whole-model per-example gradients,
    for a loss with no stages; and the chunk's per-pair sums."""
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))
    stacked = [_is_stacked(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    sums, pairs = _pair_sums(jax.tree.leaves(grads(params, bio_C)), jax.tree.leaves(grads(params, qa_C)), valid_C,
                             dtype, stacked)
    return jax.tree.map(jnp.add, acc, sums), pairs


def _staged_chunk(loss: StackedLoss, params, acc, bio_C, qa_C, valid_C, dtype):
    """`acc` plus a chunk's contraction one layer at a time: per-example gradients exist for one layer of C pairs at
    once.

    Forward: each example's layer inputs are kept (as a training step keeps activations). Backward: a scan over the
    layers from the top pulls each example's cotangent through layer l, contracts layer l's per-example gradients at
    once and adds them into slice l of the sums, in place (a fresh [L, ...] array per chunk would be a second copy
    of the three parameter-sized sums). The vocabulary-sized embedding and head are contracted one pair at a time,
    from the cotangent that reaches the embeddings and the last layer's output.
    """
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    stacked = [_is_stacked(path) for path, _ in path_leaves]
    outer = [x for (_, x), s in zip(path_leaves, stacked) if not s]
    layers = params[STACKED_KEY]

    def with_outer(outer_leaves):
        it, leaves = iter(outer_leaves), jax.tree.leaves(params)
        return jax.tree.unflatten(treedef, [x if s else next(it) for x, s in zip(leaves, stacked)])

    def forward(example):
        x, layer_args = loss.embed(params, example)

        def body(x, layer_params):
            return loss.layer(layer_params, x, layer_args), x

        x_last, layer_inputs = jax.lax.scan(body, x, layers)
        return layer_inputs, x_last, jax.grad(loss.head, argnums=1)(params, x_last, example), layer_args

    (bio_inputs, bio_last, bio_dx, bio_args), (qa_inputs, qa_last, qa_dx, qa_args) = (
        jax.vmap(forward)(bio_C), jax.vmap(forward)(qa_C))

    def layer_grads(layer_params, x_C, args_C, dx_C):
        def one(x, args, dx):
            return jax.vjp(lambda p, x: loss.layer(p, x, args), layer_params, x)[1](dx)
        return jax.vmap(one)(x_C, args_C, dx_C)

    def backward(carry, xs):
        (bio_dx, qa_dx), layer_acc = carry
        index, layer_params, bio_x, qa_x = xs
        (bio_g, bio_dx), (qa_g, qa_dx) = (layer_grads(layer_params, bio_x, bio_args, bio_dx),
                                          layer_grads(layer_params, qa_x, qa_args, qa_dx))
        sums, pairs = _contract(jax.tree.leaves(bio_g), jax.tree.leaves(qa_g), valid_C, dtype, False)
        layer_acc = tuple([a.at[index].add(x) for a, x in zip(a_i, s_i)] for a_i, s_i in zip(layer_acc, sums))
        return ((bio_dx, qa_dx), layer_acc), pairs

    pick = lambda leaves, keep: [x for x, s in zip(leaves, stacked) if s == keep]  # noqa: E731
    layer_axis_first = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731  [C, L, ...] -> [L, C, ...]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    ((bio_dx0, qa_dx0), layer_sums), layer_pairs = jax.lax.scan(
        backward, ((bio_dx, qa_dx), tuple(pick(a, True) for a in acc)),
        (jnp.arange(num_layers), layers, layer_axis_first(bio_inputs), layer_axis_first(qa_inputs)), reverse=True)

    def outer_grad(example, x_last, dx0):
        def direct(outer_leaves):  # the head's own dependence plus the embeddings' share of the layers' gradient
            p = with_outer(outer_leaves)
            return loss.head(p, x_last, example) + jnp.vdot(loss.embed(p, example)[0], dx0)
        return jax.grad(direct)(outer)

    @jax.named_scope(OUTER_SCOPE)
    def per_pair(acc, xs):
        bio_ex, b_last, b_dx0, qa_ex, q_last, q_dx0, valid = xs
        sums, pairs = _contract([g[None] for g in outer_grad(bio_ex, b_last, b_dx0)],
                                [g[None] for g in outer_grad(qa_ex, q_last, q_dx0)], valid[None], dtype, False)
        return jax.tree.map(jnp.add, acc, sums), jax.tree.map(lambda x: x[0], pairs)

    outer_sums, outer_pairs = jax.lax.scan(
        per_pair, tuple(pick(a, False) for a in acc), (bio_C, bio_last, bio_dx0, qa_C, qa_last, qa_dx0, valid_C))

    def merged(outer_leaves, layer_leaves):
        it_outer, it_layer = iter(outer_leaves), iter(layer_leaves)
        return [next(it_layer) if s else next(it_outer) for s in stacked]

    sums = tuple(merged(o, l) for o, l in zip(outer_sums, layer_sums))
    layer_pairs_CL = tuple(x.T for x in layer_pairs)
    totals = tuple(o + l.sum(axis=1) for o, l in zip(outer_pairs, layer_pairs_CL))
    return sums, (*totals, *layer_pairs_CL)


def _trace(loss, params, bio_batch, qa_batch, method, chunk_size, dtype):
    n = jax.tree.leaves(bio_batch)[0].shape[0]
    if method == "reference":
        chunk_size, num_chunks = n, 1
        chunk_fn = _whole_model_chunk
    else:
        num_chunks = -(-n // chunk_size)
        chunk_fn = _staged_chunk if isinstance(loss, StackedLoss) else _whole_model_chunk
    index = jnp.arange(num_chunks * chunk_size)
    valid = (index < n).reshape(num_chunks, chunk_size)

    def chunks(batch):  # pad with repeats of real pairs (masked out by `valid`) to whole chunks, split over devices
        return jax.tree.map(lambda x: sharding.constrain_rows(
            x[index % n].reshape(num_chunks, chunk_size, *x.shape[1:]), axis=1), batch)

    treedef = jax.tree.structure(params)

    def by_name(leaves):
        return jax.tree.leaves(sharding.constrain_by_name(jax.tree.unflatten(treedef, leaves)))

    def body(acc, xs):
        acc, pairs = chunk_fn(loss, params, acc, *xs, dtype)
        return tuple(by_name(a) for a in acc), pairs

    zeros = tuple(by_name([jnp.zeros(x.shape, dtype) for x in jax.tree.leaves(params)]) for _ in range(3))
    sums, pairs = jax.lax.scan(body, zeros, (chunks(bio_batch), chunks(qa_batch), sharding.constrain_rows(valid, 1)))
    pairs = [x.reshape(num_chunks * chunk_size, *x.shape[2:])[:n] for x in pairs]
    return TraceResult(*(jax.tree.unflatten(treedef, s) for s in sums), *sharding.constrain_replicated(pairs))


@functools.lru_cache(maxsize=16)
def jit_trace(per_example_loss: Callable, *, method: str = "lean", chunk_size: int = 16, dtype=jnp.float32,
              mesh: jax.sharding.Mesh | None = None):
    """The one jit of the trace: `(params, bio_batch, qa_batch) -> TraceResult` (see `cross_task_trace`, which
    checks its arguments and calls this; launch.plan lowers it). On a `mesh` the parameters stay where they are
    (laid out by name), every chunk's pairs are split over the batch axes (each device traces its share of every
    chunk; the sums are reduced), the three parameter-shaped sums are laid out like the parameters and the per-pair
    arrays are replicated. The same arguments give the same compiled function."""
    def cross_task(params, bio_batch, qa_batch):
        return _trace(per_example_loss, params, bio_batch, qa_batch, method, chunk_size, jnp.dtype(dtype))

    return jax.jit(sharding.on_mesh(cross_task, mesh))


METHODS = ("lean", "reference")


def cross_task_trace(per_example_loss: Callable, params: nnx.State, bio_batch, qa_batch, *, method: str = "lean",
                     chunk_size: int = 16, dtype=jnp.float32, mesh: jax.sharding.Mesh | None = None) -> TraceResult:
    """The cross-task contraction of paired per-example gradients (module docstring), jitted.

    Args:
      per_example_loss: `(params, example) -> scalar`; a `StackedLoss` (e.g. `lm_loss(graphdef, params)`) lets the
        lean path go one layer at a time. Pass the same object across calls to reuse the compiled trace.
      params: the parameter tree; leaves under the key `layers` are stacked layers (leading axis L).
      bio_batch, qa_batch: pytrees of arrays with a leading pair axis n; pair i is (bio_batch[i], qa_batch[i]).
      method: "lean" (default): chunks of `chunk_size` pairs, one layer at a time for a StackedLoss, whole-model
        per-example gradients of one chunk otherwise. "reference": `jax.vmap(jax.grad(per_example_loss))` over all n
        pairs, then the contraction (memory grows with n x parameters; for tests and small models).
      chunk_size: pairs per chunk in the lean path; n need not be a multiple.
      dtype: the dtype of the contraction and its sums (float32 by default).
      mesh: the device mesh the parameters are laid out on (`sharding.param_shardings`); each chunk's pairs are
        split over its batch axes, so chunk_size must be a multiple of their size. None: one device.
    """
    if method not in METHODS:
        raise errors.InvalidValue(f"method={method!r} is invalid: expected one of {', '.join(METHODS)}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise errors.InvalidValue(f"chunk_size={chunk_size!r} is invalid: expected a positive integer")
    sizes = {x.shape[0] for x in jax.tree.leaves((bio_batch, qa_batch))}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"bio_batch and qa_batch must share one non-zero leading pair axis; got sizes {sorted(sizes)}")
    if mesh is not None and method == "lean" and chunk_size % (split := sharding.batch_devices(mesh)):
        raise errors.InvalidValue(f"chunk_size={chunk_size} is invalid on a mesh whose batch axes span {split} "
                                  f"devices: expected a multiple of {split}")
    return jit_trace(per_example_loss, method=method, chunk_size=chunk_size, dtype=jnp.dtype(dtype),
                     mesh=mesh)(params, bio_batch, qa_batch)


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
