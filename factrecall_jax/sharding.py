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
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from factrecall_jax import trace
from factrecall_jax.train import TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axis (a name, a tuple of names, or None: replicated).
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
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
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
        sizes = [shape.get(axis, 1) for axis in MESH_AXES]
    else:
        sizes = list(shape)
        if len(sizes) != len(MESH_AXES):
            raise ValueError(f"mesh shape {tuple(sizes)} must have {len(MESH_AXES)} sizes, one per axis {MESH_AXES}")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh shape {tuple(sizes)} has more than one -1; at most one axis may take the rest")
    if any(s != -1 and (not isinstance(s, int) or s <= 0) for s in sizes):
        raise ValueError(f"mesh shape {tuple(sizes)} is invalid: sizes must be positive integers (or one -1)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(sizes)}: {len(devices)} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {tuple(sizes)} needs {math.prod(sizes)} devices; there are {len(devices)}")
    return Mesh(mesh_utils.create_device_mesh(sizes, devices), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """The PartitionSpec of an array of `shape` whose axes have logical `names`.

    A mesh axis is used at most once per spec (first dimension wins) and only where it divides the dimension (with
    the mesh axes already kept for that dimension); otherwise that dimension is replicated along it.
    """
    if len(names) != len(shape):
        raise ValueError(f"{len(names)} axis names {tuple(names)} for an array of shape {tuple(shape)}")
    table, used, spec = dict(rules), set(), []
    for name, size in zip(names, shape):
        target = table.get(name) if name is not None else None
        kept = []
        for axis in (target,) if isinstance(target, str) else (target or ()):
            if axis not in used and size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


def _sharded_by_name(tree, mesh: Mesh, rules):
    """Each nnx.Variable with `out_sharding` names -> its NamedSharding (kept in the Variable); others replicated."""
    def one(x):
        names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
        if names is None:
            return replicated(mesh) if not isinstance(x, nnx.Variable) else x.replace(replicated(mesh))
        return x.replace(NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(params: nnx.State, mesh: Mesh, rules=RULES) -> nnx.State:
    """A tree like `params` (from `nnx.split(model, nnx.Param)`) of NamedShardings, from each Param's axis names."""
    return _sharded_by_name(params, mesh, rules)


def state_shardings(state: TrainState, mesh: Mesh, rules=RULES) -> TrainState:
    """A TrainState of NamedShardings: parameters by name, and so are optax's moments (mu, nu), because optax builds
    them with tree maps over the params, which keep each Param wrapper and its axis names. Every other leaf (step,
    optimizer counts) is a scalar and replicated. Works on arrays or `jax.eval_shape` output."""
    return _sharded_by_name(state, mesh, rules)


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Batches split along their rows over data x fsdp: [B, T], or with `stacked` the fused steps' [K, B, T].
    B must be divisible by data * fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def shard(tree, shardings):
    """`tree` placed with `shardings` (a tree like it, or a prefix of it, such as one sharding for a whole batch)."""
    return jax.device_put(tree, shardings)


def jit_train_steps(train_step, state_shardings: TrainState, stacked_batch_sharding: NamedSharding):
    """`train.jit_steps` with explicit layouts: K steps in one call (`lax.scan`), state donated and kept in
    `state_shardings`; batches [K, B, T] in `stacked_batch_sharding`; metrics [K] replicated."""
    metrics_sharding = replicated(stacked_batch_sharding.mesh)
    return jax.jit(lambda state, batches: jax.lax.scan(train_step, state, batches), donate_argnums=0,
                   in_shardings=(state_shardings, stacked_batch_sharding),
                   out_shardings=(state_shardings, metrics_sharding))


def jit_trace(per_example_loss, param_shardings: nnx.State, *, method: str = "lean", chunk_size: int = 16):
    """`(params, bio_batch, qa_batch) -> TraceResult` of `trace.cross_task_trace` with the parameters and the three
    parameter-shaped sums (bio_abs, qa_abs, cross) laid out in `param_shardings`.

    The pair batches and the per-pair outputs are replicated: the trace scans over chunks of pairs, so splitting the
    pair axis would not spread the work, and they are small next to the parameters.
    """
    rep = replicated(jax.tree.leaves(param_shardings)[0].mesh)
    out = trace.TraceResult(param_shardings, param_shardings, param_shardings, rep, rep, rep, rep, rep, rep)
    return jax.jit(lambda params, bio, qa: trace.cross_task_trace(per_example_loss, params, bio, qa, method=method,
                                                                  chunk_size=chunk_size),
                   in_shardings=(param_shardings, rep, rep), out_shardings=out)


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
