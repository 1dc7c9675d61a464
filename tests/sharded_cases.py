"""Sharding cases on 8 fake CPU devices. Not collected by default (no test_ prefix): test_sharding.py runs this file
in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8, set before JAX starts."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import tiny_run_config
from factrecall_jax import checkpoint, configuration, experiment, metrics, models, sharding, train, trace
from factrecall_jax.data import schedules
from factrecall_jax.trace import xla

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
CONFIGS = {"llama_gqa": models.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
           "neox": models.GPTNeoXConfig.tiny()}
STEPS, ROWS, SEQ, PAIRS = 2, 8, 16, 12


@pytest.fixture(scope="session", autouse=True)
def eight_devices():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"


def split(name):
    return nnx.split(models.from_config(CONFIGS[name], seed=0), nnx.Param)


def fresh_state(name):
    """A new TrainState every call: the train steps donate theirs."""
    graphdef, params = split(name)
    # Adam divides by sqrt(nu) + eps: a larger eps keeps float rounding in near-zero gradients (which a different
    # reduction order changes) from being amplified into the updates past the tolerance.
    tx = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, eps=1e-4), 10)
    return graphdef, tx, train.init_state(params, tx)


def rows(seed, *lead):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 128, (*lead, SEQ + 1)).astype(np.int32)
    weights = (rng.rand(*lead, SEQ) < 0.7).astype(np.float32)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "weights": weights}


BATCHES = {"bio": rows(0, STEPS, ROWS), "qa": rows(1, STEPS, ROWS)}


def make_step(graphdef, tx):
    return train.make_train_step(graphdef, tx, train.learning_rate_schedule(train.OptimizerConfig(), 10))


@functools.cache
def single_device_train(name):
    graphdef, tx, state = fresh_state(name)
    state, metrics = train.jit_steps(make_step(graphdef, tx))(state, BATCHES)
    return jax.device_get((state, metrics))


@functools.cache
def single_device_trace(name):
    model = models.from_config(CONFIGS[name], seed=0)
    return jax.device_get(trace.cross_task_trace(trace.lm_loss, model, rows(2, PAIRS), rows(3, PAIRS), chunk_size=2))


def assert_trees_close(actual, expected, rtol, atol):
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
                 actual, expected)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_train_steps_equal_single_device(name, shape):
    mesh = sharding.make_mesh(shape)
    graphdef, tx, state = fresh_state(name)
    state_sh = sharding.state_shardings(state, mesh)
    batch_sh = sharding.batch_sharding(mesh, stacked=True)
    steps = train.jit_steps(make_step(graphdef, tx), mesh)
    state, metrics = steps(sharding.shard(state, state_sh), sharding.shard(BATCHES, batch_sh))
    expected_state, expected_metrics = single_device_train(name)
    assert_trees_close(state.params, expected_state.params, 1e-5, 1e-6)
    assert_trees_close(state.opt_state, expected_state.opt_state, 1e-5, 1e-6)
    assert_trees_close(metrics, expected_metrics, 1e-5, 1e-6)
    assert int(state.step) == STEPS
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 state, state_sh)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sharded_trace_equals_unsharded(name, shape, monkeypatch):
    """Every chunk's pairs split over data x fsdp (chunks of that many pairs, the last one padded), the sums laid
    out like the parameters, per-example gradients laid out like their parameter and formed pair by pair where a
    batch axis is left free (every parameter, as at scale): the same trace, and the same pair_statistics, as one
    device in chunks of 2."""
    monkeypatch.setattr(xla, "SMALL", 0)
    mesh = sharding.make_mesh(shape)
    graphdef, params = split(name)
    params_sh = sharding.param_shardings(params, mesh)
    model = nnx.merge(graphdef, sharding.shard(params, params_sh))
    args = (model, rows(2, PAIRS), rows(3, PAIRS))
    result = trace.cross_task_trace(trace.lm_loss, *args, chunk_size=sharding.batch_devices(mesh), mesh=mesh)
    assert_trees_close(result, single_device_trace(name), 1e-5, 1e-6)
    stats = trace.pair_statistics(trace.lm_loss, *args, chunk_size=sharding.batch_devices(mesh), mesh=mesh)
    assert_trees_close(stats, trace.PairStatistics(*(getattr(result, f.name) for f in dataclasses.fields(stats))),
                       1e-5, 1e-6)
    with pytest.raises(ValueError, match="multiple of"):
        trace.cross_task_trace(trace.lm_loss, *args, chunk_size=sharding.batch_devices(mesh) + 1, mesh=mesh)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 result.cross, params_sh)


def test_parameters_are_sharded_on_2x2x2():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, params = split("llama_gqa")
    params = sharding.shard(params, sharding.param_shardings(params, mesh))
    q = params["layers"]["self_attn"]["q_proj"]["kernel"][...]  # [L, D, N, H] = [2, 64, 4, 16]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(q.sharding.device_set) == 8
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 2, 16)}
    assert params["layers"]["self_attn"]["k_proj"]["kernel"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    # the vocabulary rule comes first: embedding rows over tensor x fsdp, the embed dimension whole
    assert params["embed_tokens"]["embedding"][...].sharding.spec == P(("tensor", "fsdp"), None)
    assert params["layers"]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P(None, "tensor", "fsdp")
    _, neox = split("neox")  # the fused qkv kernel [L, D, N, 3, H] has an unnamed axis
    spec = sharding.param_shardings(neox, mesh)["layers"]["attention"]["query_key_value"]["kernel"].get_value().spec
    assert spec == P(None, "fsdp", "tensor", None, None)


def test_logical_to_spec_drops_axes_that_do_not_divide_or_repeat():
    mesh = sharding.make_mesh((2, 4, 1))
    assert sharding.logical_to_spec(("embed",), (6,), mesh) == P(None)
    assert sharding.logical_to_spec(("batch", "embed"), (8, 8), mesh) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("batch", "embed"), (4, 8), mesh) == P("data", "fsdp")
    assert sharding.logical_to_spec(("layers", None, "vocab"), (2, 3, 5), mesh) == P(None, None, "tensor")
    # rules earlier in the table pick first, whatever the dimension order: vocab takes fsdp before embed
    assert sharding.logical_to_spec(("embed", "vocab"), (8, 16), mesh) == P(None, ("tensor", "fsdp"))


def test_make_mesh_shapes_and_errors():
    assert sharding.make_mesh({"fsdp": -1}).shape == {"data": 1, "fsdp": 8, "tensor": 1}
    assert sharding.make_mesh((2, -1, 2)).shape == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad, message in [((2, 2, 1), "needs 4 devices"), ((-1, -1, 1), "more than one -1"),
                         ((0, 8, 1), "positive"), ((3, -1, 1), "not divisible"), ({"model": 8}, "unknown mesh axes"),
                         ((8, 1), "3 sizes")]:
        with pytest.raises(ValueError, match=message):
            sharding.make_mesh(bad)


def test_checkpoint_from_2x4x1_restores_onto_8x1x1(tmp_path):
    _, _, state = fresh_state("llama_gqa")
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5, state.opt_state), step=jnp.asarray(3, jnp.int32))
    expected = jax.device_get(state)
    saved = sharding.shard(state, sharding.state_shardings(state, sharding.make_mesh((2, 4, 1))))
    checkpoints = checkpoint.Checkpoints(str(tmp_path))
    checkpoints.save(saved)
    target = sharding.state_shardings(state, sharding.make_mesh((8, 1, 1)))
    like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, target)
    restored = checkpoints.restore(3, like)
    checkpoints.close()
    assert_trees_close(restored, expected, 0, 0)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 restored, target)


def test_global_batch_from_host_single_process():
    mesh = sharding.make_mesh((2, 4, 1))
    batch = rows(4, ROWS)
    local = jax.tree.map(lambda x: x[sharding.host_batch_slice(ROWS)], batch)
    global_batch = sharding.global_batch_from_host(local, sharding.batch_sharding(mesh))
    assert_trees_close(global_batch, batch, 0, 0)
    assert global_batch["inputs"].sharding.spec == P(("data", "fsdp"))


def test_experiment_train_runs_sharded_and_restores_onto_its_mesh(tmp_path):
    """The training loop on the config's mesh: (2, 2, 2) and (8, 1, 1) give the same run, evaluated the same, and
    restore_params lays the saved parameters out on the config's mesh."""
    losses, params = {}, {}
    for mesh in [(8, 1, 1), (2, 2, 2)]:
        workdir = str(tmp_path / "x".join(map(str, mesh)))
        experiment.train(tiny_run_config(**dict(zip(sharding.MESH_AXES, mesh))), workdir, log=lambda *_: None)
        params[mesh] = experiment.Run.load(workdir).params()
        records = metrics.read_metrics(os.path.join(workdir, "metrics.jsonl"))
        losses[mesh] = [r["loss"] for r in records if "loss" in r]
    assert len(losses[(8, 1, 1)]) == 2 and losses[(2, 2, 2)] == pytest.approx(losses[(8, 1, 1)], rel=1e-5)
    assert_trees_close(params[(2, 2, 2)], params[(8, 1, 1)], rtol=1e-5, atol=1e-6)
    q_proj = params[(2, 2, 2)]["layers"]["self_attn"]["q_proj"]["kernel"][...]
    assert len(q_proj.sharding.device_set) == 8 and q_proj.sharding.spec == P(None, "fsdp", "tensor", None)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2)])
def test_token_share_rows_split_over_the_batch_devices(mesh):
    """mixed.qa_token_share picks a QA batch the batch axes (data x fsdp) divide, so the mesh can split it."""
    config = tiny_run_config(**dict(zip(sharding.MESH_AXES, mesh)))
    config.mixed.qa_token_share = 0.8
    config = configuration.read(config)
    tokenized, tokenizer = experiment.load_data(config)
    resolved = experiment.resolve_batches(config, schedules.token_tables(tokenized, tokenizer.pad_token_id))
    assert resolved.mixed.qa_batch % (mesh[0] * mesh[1]) == 0 and resolved.mixed.qa_batch > config.mixed.bio_batch


LOAD_CONFIGS = {"llama_bias": models.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 attention_bias=True, mlp_bias=True),
                "neox": models.GPTNeoXConfig.tiny()}


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 2, 4)])
@pytest.mark.parametrize("name", sorted(LOAD_CONFIGS))
def test_from_pretrained_onto_a_mesh_holds_each_device_share(name, shape, tmp_path, monkeypatch):
    """Loading onto a mesh: the unsharded values, in param_shardings' layout, each device holding (and reading from
    the safetensors) exactly its shards: on fsdp 8, 1/8 of every parameter but the replicated biases."""
    models.save_pretrained(models.from_config(LOAD_CONFIGS[name], seed=0), tmp_path, max_shard_size="20KB")
    expected = jax.device_get(nnx.state(models.from_pretrained(tmp_path)))
    read, to_nnx = [], models.hf._to_nnx  # every block read from a safetensors file goes through _to_nnx
    monkeypatch.setattr(models.hf, "_to_nnx", lambda ops, x, config: read.append(x.nbytes) or to_nnx(ops, x, config))
    mesh = sharding.make_mesh(shape)
    params = nnx.state(models.from_pretrained(tmp_path, mesh=mesh))
    assert_trees_close(params, expected, 0, 0)
    leaves, layouts = jax.tree.leaves(params), jax.tree.leaves(sharding.param_shardings(params, mesh))
    for x, layout in zip(leaves, layouts):
        assert x.sharding.is_equivalent_to(layout, x.ndim), f"{x.sharding} != {layout}"
    held = {d: sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == d)
            for d in mesh.devices.flat}
    shard_bytes = [int(np.prod(layout.shard_shape(x.shape))) * x.dtype.itemsize for x, layout in zip(leaves, layouts)]
    share, total = sum(shard_bytes), sum(x.nbytes for x in leaves)
    replicated = sum(x.nbytes for x, layout in zip(leaves, layouts) if layout.is_fully_replicated)
    assert held == dict.fromkeys(mesh.devices.flat, share)
    # Each device reads its own block; make_array_from_callback reads a fully replicated leaf once and copies it.
    assert sum(read) == sum(b if layout.is_fully_replicated else 8 * b for b, layout in zip(shard_bytes, layouts))
    if shape == (1, 8, 1):
        assert share == (total - replicated) // 8 + replicated
    print(f"{name} onto fsdp {shape[1]} x tensor {shape[2]}: {share:,} of {total:,} bytes per device "
          f"({share / total:.3f}; {replicated:,} bytes replicated)")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_init_on_a_mesh_draws_each_shard_where_it_lives(name):
    """models.from_config on fsdp 8: the values of one jitted init on one device, every leaf laid out by name, and
    each device holding exactly its shards (1/8 of every matrix)."""
    mesh = sharding.make_mesh((1, 8, 1))
    build = functools.partial(models.from_config, CONFIGS[name], seed=3)
    expected = jax.jit(lambda: nnx.state(build(), nnx.Param))()
    params = nnx.state(build(mesh=mesh), nnx.Param)
    assert_trees_close(params, expected, 0, 0)
    layouts = sharding.param_shardings(params, mesh)
    held = dict.fromkeys(mesh.devices.flat, 0)
    for x, layout in zip(jax.tree.leaves(params), jax.tree.leaves(layouts)):
        assert x.sharding.is_equivalent_to(layout, x.ndim), (x.sharding, layout)
        for shard in x.addressable_shards:
            held[shard.device] += shard.data.nbytes
    share = sum(np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
                for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(layouts)))
    assert set(held.values()) == {share}
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    print(f"{name}: {share} of {total} bytes per device ({share / total:.3f})")


def test_train_state_initialized_on_the_mesh_equals_one_device():
    """experiment.Run.init_state creates the AdamW moments where their shards live (a jitted init with the state's
    layout), equal to the one-device state."""
    config = tiny_run_config(data=1, fsdp=8)
    run = experiment.Run(configuration.read(config))
    tx = experiment.phase_optimizer(experiment.schedule(run.config), 0)[0]
    state = run.init_state(run.init_params(), tx)
    expected = train.init_state(jax.device_get(run.init_params()), tx)
    assert_trees_close(state, expected, 0, 0)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(f"{x.sharding} != {s}"),
                 state, sharding.state_shardings(state, run.mesh))
