"""Device mesh and sharding by name: one code path from 1 CPU to a pod.

Every parameter carries logical axis names (`models.layers.with_axes`: ("layers", "embed", "heads", "head_dim"),
("vocab", "embed"), ...) and one rules table, `RULES`, maps those names onto a three-axis mesh ("data", "fsdp",
"tensor"). Changing how a model is laid out is changing the mesh shape, never the model or the step: on 1 CPU every
mesh axis has size 1 and every array is whole; on 8 fake CPU devices (`XLA_FLAGS=
--xla_force_host_platform_device_count=8`, the tests) or an accelerator pod the same jitted steps run partitioned.

Layout: the batch is split over data x fsdp; FSDP (ZeRO-3 style) also shards the `embed` dimension of every parameter
and optimizer moment, so XLA gathers a layer's weights where it uses them; tensor parallelism (Megatron style) shards
the heads, key/value heads, MLP and vocabulary dimensions. A mesh axis that does not divide a dimension is dropped
for that array (it is replicated along that axis instead), so tiny models and odd sizes shard where they can.
"""
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from factrecall_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (a name, a tuple of names, or None: replicated). Earlier rows pick their mesh axes
# first. The vocabulary comes before embed and takes fsdp too: an embedding or head split by vocabulary rows is never
# gathered whole (Llama-3.2-3B's tied [128256, 3072] embedding is 1.5 GB in float32), the logits are computed
# split by vocabulary, and only the small activations are gathered.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", ("tensor", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),  # the stacked-layer axis is scanned over, never split
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh; `shape` is a dict by axis name or a 3-tuple, and one size may be -1
    ("the rest of the devices"). Defaults to all devices (every host's, under jax.distributed)."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise errors.InvalidValue(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
        sizes = [shape.get(axis, 1) for axis in MESH_AXES]
    else:
        sizes = list(shape)
        if len(sizes) != len(MESH_AXES):
            raise errors.InvalidValue(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} sizes, one per axis "
                                      f"{MESH_AXES}")
    if sizes.count(-1) > 1:
        raise errors.InvalidValue(f"mesh shape {tuple(sizes)} has more than one -1; at most one axis may take the rest")
    if any(s != -1 and (not isinstance(s, int) or s <= 0) for s in sizes):
        raise errors.InvalidValue(f"mesh shape {tuple(sizes)} is invalid: sizes must be positive integers (or one -1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise errors.InvalidValue(f"mesh shape {tuple(sizes)}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise errors.InvalidValue(f"mesh shape {tuple(sizes)} needs {math.prod(sizes)} devices; "
                                  f"there are {len(devices)}")
    return Mesh(mesh_utils.create_device_mesh(sizes, devices), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """The PartitionSpec of an array of `shape` whose axes have logical `names`.

    A mesh axis is used at most once per spec (the dimension whose rule comes first in `rules` wins) and only where
    it divides the dimension (with the mesh axes already kept for that dimension); otherwise that dimension is
    replicated along it.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for an array of shape {tuple(shape)}")
    table, priority = dict(rules), {name: i for i, (name, _) in enumerate(rules)}
    used, spec = set(), [None] * len(shape)
    for dim in sorted((d for d, name in enumerate(names) if table.get(name)), key=lambda d: priority[names[d]]):
        target, kept = table[names[dim]], []
        for axis in (target,) if isinstance(target, str) else target:
            if axis not in used and shape[dim] % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        used.update(kept)
        spec[dim] = None if not kept else kept[0] if len(kept) == 1 else tuple(kept)
    return P(*spec)


def _sharded_by_name(tree, mesh: Mesh, rules):
    """Each nnx.Variable with `out_sharding` names -> its NamedSharding (kept in the Variable); others replicated."""
    def one(x):
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        if names is None:
            return replicated(mesh) if not isinstance(x, nnx.Variable) else x.replace(replicated(mesh))
        return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_on(tree, shardings):
    """Abstract arrays (shape, dtype) of `tree` that carry `shardings`: templates for restores, inits and compiles."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(params: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """A tree like `params` (from `nnx.split(model, nnx.Param)`) of NamedShardings, from each Param's axis names."""
    return _sharded_by_name(params, mesh, rules)


def state_shardings(state, mesh: Mesh, rules=RULES):
    """A train.TrainState of NamedShardings: parameters by name, and so are optax's moments (mu, nu): optax builds
    them with tree maps over the params, which keep each Param wrapper and its axis names. Every other leaf (step,
    optimizer counts) is a scalar and replicated. Works on arrays or `jax.eval_shape` output."""
    return _sharded_by_name(state, mesh, rules)


def constrain_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """`x` with its rows (`axis`) split over the batch axes of the ambient mesh (`jax.sharding.use_abstract_mesh`);
    unchanged without one. Rows the axes do not divide (one example) are kept whole: under the gradient trace's
    per-example `jax.vmap(..., spmd_axis_name=batch axes)` that splits the examples over the batch axes instead.

    The models call this on the residual stream entering every layer. Without it XLA meets FSDP's conflict (rows and
    the weights' embed dimension both split over fsdp) by gathering the rows, so every device computes the whole
    batch: for Llama-3.2-3B on fsdp 8 that was 8x the activations, 37 GiB of temporaries per device.
    """
    axes = batch_axes_in_use()
    if not axes:
        return x
    mesh = jax.sharding.get_abstract_mesh()
    rows = axes if x.shape[axis] % math.prod(mesh.shape[a] for a in axes) == 0 else None
    return jax.lax.with_sharding_constraint(x, P(*(None,) * axis, rows))


def batch_axes_in_use() -> tuple[str, ...]:
    """The batch axes (data, fsdp) of the ambient mesh that split anything: those of size > 1; () without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def constrain_by_name(tree, rules=RULES):
    """`tree` with every nnx.Variable that carries axis names laid out by them on the ambient mesh (as
    `param_shardings` would place it); unchanged without a mesh. Inside a jitted step this fixes the layout of what
    the step creates (new parameters and moments, parameter-shaped sums) without passing shardings around."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names:
        return tree

    def one(x):
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        if names is None:
            return x
        return x.replace(jax.lax.with_sharding_constraint(x[...], logical_to_spec(names, x.shape, mesh, rules)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain_replicated(tree):
    """`tree` whole on every device of the ambient mesh (small results every host reads); unchanged without one."""
    if not jax.sharding.get_abstract_mesh().axis_names:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


def on_mesh(fn, mesh: Mesh | None):
    """`fn` traced with `mesh` as the ambient mesh of `constrain_rows` and `constrain_by_name` (None: as it is)."""
    if mesh is None:
        return fn

    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return functools.wraps(fn)(wrapped)


def batch_devices(mesh: Mesh) -> int:
    """How many ways a batch's rows are split: data x fsdp."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def per_example_layout(names: Sequence[str | None] | None, shape: Sequence[int], rules=RULES):
    """(constrain, devices) for per-example arrays [G, *shape] of a parameter with logical axis `names` (None:
    replicated) on the ambient mesh: constrain(x) lays the parameter's dimensions out by name, as the parameter
    lies, and splits the examples over the batch axes the parameter does not use, `devices` of them. Each device
    then forms its slice of the gradients of its examples; on fsdp no device holds a whole parameter's gradient.
    Without a mesh: (identity, 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.axis_names:
        return (lambda x: x), 1
    spec = logical_to_spec(names, shape, mesh, rules) if names is not None else P(*(None,) * len(shape))
    used = {a for dim in spec if dim is not None for a in ((dim,) if isinstance(dim, str) else dim)}
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in used and mesh.shape[a] > 1)
    devices = math.prod(mesh.shape[a] for a in axes)

    def constrain(x):
        rows = axes if axes and x.shape[0] % devices == 0 else None
        return jax.lax.with_sharding_constraint(x, P(rows, *spec))

    return constrain, devices


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Batches split along their rows over data x fsdp: [B, T], or with `stacked` the fused steps' [K, B, T].
    B must be divisible by data * fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def shard(tree, shardings):
    """`tree` placed with `shardings` (a tree like it, or a prefix of it, such as one sharding for a whole batch)."""
    return jax.device_put(tree, shardings)


# ---------------------------------------------------------------------------------------------------------------------
# Multi-host: every process runs the same program; process 0 alone writes host-side files. On one host these reduce
# to the identity. tests/multiprocess_cases.py runs them in two processes.
# ---------------------------------------------------------------------------------------------------------------------

def initialize_distributed(enabled: bool) -> None:
    """Joins the hosts of a multi-host job (TPU pod, multi-node GPU) before any other JAX call; a no-op when not
    `enabled`. jax.distributed.initialize() reads the coordinator and process ids from the cluster environment."""
    if enabled:
        jax.distributed.initialize()


def is_writer() -> bool:
    """Whether this process writes host-side files (config.json, metrics.jsonl, traces, reports): process 0. Every
    process still takes part in every collective (checkpoints, `to_host`), and reads what process 0 wrote."""
    return jax.process_index() == 0


def to_host(tree):
    """numpy copies of a tree of arrays on every process. An array split across hosts is gathered, which is a
    collective: every process must call this."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def host_batch_slice(global_batch_size: int) -> slice:
    """The rows of a global batch that this process loads and feeds (contiguous, equal shares)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {count} processes")
    share = global_batch_size // count
    return slice(index * share, (index + 1) * share)


def global_batch_from_host(local, sharding: NamedSharding):
    """The global batch (a tree of arrays in `sharding`) from this process's rows of it (`host_batch_slice`)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
