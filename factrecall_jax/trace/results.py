"""What a trace returns, and how results combine over checkpoints and go to and from disk."""
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np
import safetensors
import safetensors.numpy

from factrecall_jax import cli, errors


@flax.struct.dataclass
class PairStatistics:
    """Dot products and squared norms of paired per-example gradients: [n] over all parameters, and [n, L] within
    each layer of the stacked parameters (`stacking`; L = 0 when none is stacked). What gradient consistency needs;
    `pair_statistics` computes these alone."""
    pair_dot: jax.Array
    bio_sq_norm: jax.Array
    qa_sq_norm: jax.Array
    layer_pair_dot: jax.Array
    layer_bio_sq_norm: jax.Array
    layer_qa_sq_norm: jax.Array


@flax.struct.dataclass
class TraceResult(PairStatistics):
    """The contraction of one set of pairs at one checkpoint, or a learning-rate-weighted sum over checkpoints: the
    per-pair fields and three trees like the parameters (an nnx.State with their axis metadata for a model, a pytree
    like the params otherwise)."""
    bio_abs: Any  # sum_i |g_bio_i|
    qa_abs: Any  # sum_i |g_qa_i|
    cross: Any  # sum_i g_bio_i * g_qa_i


PAIR_FIELDS = tuple(f.name for f in dataclasses.fields(PairStatistics))
TREE_FIELDS = ("bio_abs", "qa_abs", "cross")


def combine(results: Sequence[TraceResult], weights: Sequence[float]) -> TraceResult:
    """TracInCP: sum_c weights[c] * results[c], field by field (weights: the learning rate at each checkpoint)."""
    if len(results) != len(weights) or not results:
        raise errors.InvalidValue(f"combine needs one weight per result and at least one result; got {len(results)} "
                                  f"results and {len(weights)} weights")
    return jax.tree.map(lambda *xs: sum(w * x for w, x in zip(weights, xs)), *results)


def path_name(path) -> str:
    """"layers.mlp.down_proj.kernel": dict keys and list indices (an nnx.Variable's own `.value` step left out)."""
    return ".".join(str(k.key if hasattr(k, "key") else k.idx) for k in path if hasattr(k, "key") or hasattr(k, "idx"))


def save(result: TraceResult, path: str, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a result as safetensors: "<field>/<parameter path>" for the trees, "<field>" for the pair arrays."""
    tensors = {name: np.asarray(getattr(result, name)) for name in PAIR_FIELDS}
    for name in TREE_FIELDS:
        for key_path, x in jax.tree_util.tree_flatten_with_path(getattr(result, name))[0]:
            tensors[f"{name}/{path_name(key_path)}"] = np.asarray(x)
    cli.atomic_write(path, lambda tmp: safetensors.numpy.save_file(tensors, tmp, metadata=dict(metadata or {})))


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
    treedef = jax.tree.structure(params_like)
    fields = {}
    for name in PAIR_FIELDS:
        if name not in tensors:
            raise errors.InvalidValue(f"{path} is not a trace written by trace.save: it has no {name}")
        fields[name] = tensors[name]
    for name in TREE_FIELDS:
        arrays = []
        for key_path, like in leaves:
            key = f"{name}/{path_name(key_path)}"
            if key not in tensors:
                raise errors.InvalidValue(f"{path} does not match the model: no {key}")
            if tensors[key].shape != tuple(like.shape):
                raise errors.InvalidValue(f"{path} does not match the model: {name} of {path_name(key_path)} has "
                                          f"shape {tensors[key].shape}; the parameter has {tuple(like.shape)}")
            arrays.append(tensors[key])
        fields[name] = jax.tree.unflatten(treedef, arrays)
    return TraceResult(**fields), metadata
