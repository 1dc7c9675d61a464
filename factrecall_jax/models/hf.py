"""Hugging Face checkpoints: config.json and safetensors in and out, driven by the weight table of each model file.

A model file ends with HF_WEIGHTS, rows `(HF key, NNX path, ops HF->NNX)`, and HF_IGNORED, regexes of buffers that
some checkpoints carry. `{i}` in a row marks a per-layer tensor: HF layer i fills slice i of the leading (layer) axis
of the stacked NNX leaf, whose path is the template without `{i}.`. Loading applies a row's ops in order; saving
applies their inverses in reverse order. A row whose leaf the model does not have (a tied lm_head, a disabled bias)
is inactive: its key is neither required nor accepted. Nothing here knows a model by name.

Loading onto a mesh reads each device's block only: an op maps a box (a (start, stop) range per axis) of its output
back to the box of its input that holds it (`read_box`) and forward to what that input box yields (`out_box`), so
one device's block of an NNX leaf comes from a safetensors slice of the HF tensor, of only the layers it spans.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.numpy import save_file

from factrecall_jax import errors, sharding

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]


@dataclasses.dataclass(frozen=True)
class Transpose:
    """Permutes axes: an HF [out, in] matrix becomes an NNX [in, out] kernel with perm (1, 0)."""

    perm: tuple[int, ...]

    def forward(self, x, config):
        return x.transpose(self.perm)

    def inverse(self, x, config):
        return x.transpose(tuple(int(a) for a in np.argsort(self.perm)))

    def read_box(self, box, config):
        return [box[int(a)] for a in np.argsort(self.perm)]

    def out_box(self, box, config):
        return [box[a] for a in self.perm]


@dataclasses.dataclass(frozen=True)
class Split:
    """Splits one axis into several, e.g. N*H into (N, H); sizes are ints or names of config fields.

    The first size is inferred, so a block of whole leading entries (one device's heads) splits as the full axis does.
    """

    axis: int
    sizes: tuple[int | str, ...]

    def _sizes(self, config):
        return tuple(getattr(config, s) if isinstance(s, str) else s for s in self.sizes)

    def forward(self, x, config):
        axis = self.axis % x.ndim
        return x.reshape(x.shape[:axis] + (-1, *self._sizes(config)[1:]) + x.shape[axis + 1:])

    def inverse(self, x, config):
        axis = self.axis % (x.ndim - len(self.sizes) + 1)
        end = axis + len(self.sizes)
        return x.reshape(x.shape[:axis] + (math.prod(x.shape[axis:end]),) + x.shape[end:])

    def read_box(self, box, config):
        """A range of leading entries with the other split axes whole is one contiguous range; else the whole axis."""
        axis, sizes = self.axis % (len(box) - len(self.sizes) + 1), self._sizes(config)
        (start, stop), rest, inner = box[axis], box[axis + 1:axis + len(sizes)], math.prod(sizes[1:])
        whole = all(r == (0, n) for r, n in zip(rest, sizes[1:]))
        merged = (start * inner, stop * inner) if whole else (0, math.prod(sizes))
        return box[:axis] + [merged] + box[axis + len(sizes):]

    def out_box(self, box, config):
        axis, sizes = self.axis % len(box), self._sizes(config)
        (start, stop), inner = box[axis], math.prod(sizes[1:])
        return box[:axis] + [(start // inner, stop // inner)] + [(0, n) for n in sizes[1:]] + box[axis + 1:]


def _to_nnx(ops, x, config):
    for op in ops:
        x = op.forward(x, config)
    return x


def _to_hf(ops, x, config):
    for op in reversed(ops):
        x = op.inverse(x, config)
    return x


def _tables(model_cls):
    """The HF_WEIGHTS and HF_IGNORED tables at the end of the model class's file."""
    module = sys.modules[model_cls.__module__]
    return module.HF_WEIGHTS, module.HF_IGNORED


def _flat_state(model) -> dict[str, tuple[tuple, nnx.Variable]]:
    return {".".join(map(str, path)): (path, var) for path, var in nnx.to_flat_state(nnx.state(model))}


def _active_rows(model_cls, leaves):
    """(HF key template, leaf path, per_layer, ops) for the rows whose leaf exists in the model."""
    table, _ = _tables(model_cls)
    rows = [(hf_key, nnx_path.replace("{i}.", ""), "{i}" in nnx_path, ops) for hf_key, nnx_path, ops in table]
    return [row for row in rows if row[1] in leaves]


def resolve(path_or_hub_id: str | os.PathLike) -> str:
    """A local folder as is; otherwise a hub id, downloaded (config and safetensors only) to the local HF cache."""
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.path.exists(path):
        raise errors.MissingPath(f"{path} is not a folder")
    try:
        return snapshot_download(path, allow_patterns=HUB_PATTERNS)
    except Exception as e:  # offline, unknown repository, gated repository, malformed id: one message for all
        raise errors.MissingPath(f"{path} is not a local folder and could not be downloaded: {e}") from e


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise errors.MissingPath(f"{folder} has no config.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _weight_map(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file name; the single file wins over a shard index, as in transformers."""
    if os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        with safe_open(os.path.join(folder, SINGLE_FILE), framework="numpy") as f:
            return dict.fromkeys(f.keys(), SINGLE_FILE)
    if os.path.isfile(os.path.join(folder, INDEX_FILE)):
        with open(os.path.join(folder, INDEX_FILE), encoding="utf-8") as f:
            return json.load(f)["weight_map"]
    raise errors.MissingPath(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_block(tensor, ops, box, config, param_dtype) -> np.ndarray:
    """NNX block `box` of one HF tensor (a safetensors slice): the HF box that covers it, converted, then cut out."""
    hf_box = box
    for op in reversed(ops):
        hf_box = op.read_box(hf_box, config)
    covered = hf_box
    for op in ops:
        covered = op.out_box(covered, config)
    block = _to_nnx(ops, tensor[tuple(slice(*r) for r in hf_box)], config)
    return block[tuple(slice(s - c, e - c) for (s, e), (c, _) in zip(box, covered))].astype(param_dtype)


def _reader(tensors, row, shape, config, param_dtype):
    """`index -> block` for jax.make_array_from_callback: one leaf's block, read from the layers it spans only."""
    hf_key, _, per_layer, ops = row

    def read(index):
        box = [s.indices(n)[:2] for s, n in zip(index, shape)]
        if not per_layer:
            return _read_block(tensors[hf_key], ops, box, config, param_dtype)
        return np.stack([_read_block(tensors[hf_key.format(i=i)], ops, box[1:], config, param_dtype)
                         for i in range(*box[0])])

    return read


def load(model_cls, config, folder: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
         mesh=None) -> nnx.Module:
    """Builds `model_cls(config)` with every parameter read from the safetensors in `folder`.

    With a `mesh`, each parameter is laid out as `sharding.param_shardings` says and every device reads only its own
    block, so no device ever holds more than its share; without one, parameters are whole, uncommitted arrays.
    All problems (missing, unexpected and mis-shaped tensors, parameters no table row fills) are collected and
    raised together as one ValueError of one line, which launch scripts print as it is, before any tensor is read.
    """
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0),
                                                remat=remat))
    graphdef, _ = nnx.split(abstract)
    leaves = _flat_state(abstract)
    rows = {row[1]: row for row in _active_rows(model_cls, leaves)}
    weight_map = _weight_map(folder)
    missing, wrong_shape, tensors = [], [], {}
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(safe_open(os.path.join(folder, name), framework="numpy"))
                 for name in sorted(set(weight_map.values()))}
        for hf_key, path, per_layer, ops in rows.values():
            shape = leaves[path][1].shape
            hf_shape = jax.eval_shape(lambda x, ops=ops: _to_hf(ops, x, config),
                                      jax.ShapeDtypeStruct(shape[1:] if per_layer else shape, jnp.float32)).shape
            for key in [hf_key.format(i=i) for i in range(shape[0])] if per_layer else [hf_key]:
                if key not in weight_map:
                    missing.append(key)
                    continue
                tensors[key] = files[weight_map[key]].get_slice(key)
                if (got := tuple(tensors[key].get_shape())) != hf_shape:
                    wrong_shape.append(f"{key} (expected {hf_shape}, got {got})")
        _, ignored = _tables(model_cls)
        unexpected = sorted(k for k in set(weight_map) - set(tensors) if not any(re.search(p, k) for p in ignored))
        unmapped = sorted(set(leaves) - set(rows))
        problems = [f"{label} ({len(names)}): {', '.join(names)}" for label, names in (
            ("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape),
            (f"parameters without a row in {model_cls.__module__}.HF_WEIGHTS", unmapped)) if names]
        if problems:
            raise errors.InvalidValue(f"{folder} does not fit {model_cls.__name__}: " + "; ".join(problems))

        shardings = {} if mesh is None else _flat_state(sharding.param_shardings(nnx.state(abstract), mesh))

        def value(name, shape):
            read = _reader(tensors, rows[name], shape, config, param_dtype)
            if mesh is None:
                return jnp.asarray(read((slice(None),) * len(shape)))
            return jax.make_array_from_callback(shape, shardings[name][1].get_value(), read)

        state = nnx.from_flat_state([(p, var.replace(value(name, var.shape))) for name, (p, var) in leaves.items()])
    return nnx.merge(graphdef, state)


def _shard_bytes(max_shard_size: int | str) -> int:
    if isinstance(max_shard_size, int):
        return max_shard_size
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)\s*", max_shard_size)
    if not match:
        raise ValueError(f"max_shard_size {max_shard_size!r}: expected bytes as an int or a string like '5GB'")
    number, unit = match.groups()
    base = 1024 if "i" in unit else 1000
    return int(number) * base ** ("KMG".index(unit[0]) + 1)


def save(model: nnx.Module, out_dir: str, *, max_shard_size: int | str | None = None) -> None:
    """Writes config.json and model.safetensors (or shards and their index) that transformers loads.

    Existing model*.safetensors files and index in `out_dir` are removed first, as transformers' save_pretrained
    does, so no stale shard is read back.
    """
    config = model.config
    leaves = _flat_state(model)
    rows = _active_rows(type(model), leaves)
    if unmapped := sorted(set(leaves) - {row[1] for row in rows}):
        raise ValueError(f"parameters without a row in {type(model).__module__}.HF_WEIGHTS: {', '.join(unmapped)}")
    tensors = {}
    for hf_key, path, per_layer, ops in rows:
        value = np.asarray(leaves[path][1][...])
        for i, layer_value in enumerate(value) if per_layer else [(None, value)]:
            tensors[hf_key.format(i=i)] = np.ascontiguousarray(_to_hf(ops, layer_value, config))

    shards, shard_bytes = [{}], 0
    limit = _shard_bytes(max_shard_size) if max_shard_size is not None else math.inf
    for key, value in tensors.items():
        if shards[-1] and shard_bytes + value.nbytes > limit:
            shards, shard_bytes = shards + [{}], 0
        shards[-1][key] = value
        shard_bytes += value.nbytes

    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if re.fullmatch(r"model.*\.safetensors(\.index\.json)?", name):
            os.remove(os.path.join(out_dir, name))
    hf_config = {**config.to_hf_config(), "dtype": np.dtype(next(iter(tensors.values())).dtype).name}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    if len(shards) == 1:
        save_file(tensors, os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())}, "weight_map": weight_map}
    with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
