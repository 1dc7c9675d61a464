"""launch.plan: the compiled programs' memory per device, checked against the bytes each device must hold."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import config_file
from factrecall_jax import configuration, experiment, models, sharding
from factrecall_jax import plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES, SEQ_LEN = 8, 16


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plan") / "plan.json")
    run = subprocess.run([sys.executable, "-m", "launch.plan", "--config=configs/default.py:tiny",
                          f"--devices={DEVICES}", "--config.mesh.data=1", f"--config.mesh.fsdp={DEVICES}",
                          f"--seq_len={SEQ_LEN}", "--top=3", f"--json_out={out}"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(
                             os.environ, XLA_FLAGS="--xla_backend_optimization_level=0"))  # compiles, never runs
    assert run.returncode == 0, run.stderr[-3000:]
    with open(out, encoding="utf-8") as f:
        return json.load(f), run.stdout


def shard_bytes_per_device(config):
    """(bytes of one device's shard of every parameter on fsdp 8, from the shard shapes rather than XLA; leaves)."""
    vocab = len(experiment.load_data(configuration.read(config))[1])
    model = nnx.eval_shape(lambda: models.from_config({**config.model.to_dict(), "vocab_size": vocab}))
    mesh = jax.sharding.AbstractMesh((1, DEVICES, 1), sharding.MESH_AXES)
    total, leaves = 0, nnx.to_flat_state(nnx.state(model, nnx.Param))
    for _, var in leaves:
        names = var.get_metadata()["out_sharding"]
        spec = sharding.logical_to_spec(names, var.shape, mesh)
        split = [np.prod([mesh.shape[a] for a in ((s,) if isinstance(s, str) else s or ())]) for s in spec]
        total += np.prod([n // k for n, k in zip(var.shape, split)]) * np.dtype(var.dtype).itemsize
    return int(total), len(leaves)


def test_plan_arguments_and_outputs_are_the_shards_each_device_holds(plan):
    figures, stdout = plan
    config = config_file("default.py", "tiny")
    params, leaves = shard_bytes_per_device(config)
    gib, pointer = 2 ** 30, 8  # XLA:CPU counts a pointer per buffer of a program's output tuple
    eval_batch = 3 * 4 * config.train.eval_batch_size // DEVICES * SEQ_LEN  # inputs, targets, values: int32
    assert figures["eval"]["arguments_gib"] * gib == pytest.approx(params + eval_batch, rel=1e-6)
    pairs, layers = 6 * config.trace.num_people, config.model.num_hidden_layers
    per_pair = 4 * pairs * (3 + 3 * layers)  # the replicated per-pair and per-layer dots and norms, float32
    assert figures["lean_trace"]["outputs_gib"] * gib == 3 * params + per_pair + pointer * (3 * leaves + 6)
    train = {k: v * gib for k, v in figures["train_step"].items()}
    # the parameters and both AdamW moments out (plus scalars and metrics), reusing the donated inputs
    assert 0 <= train["outputs_gib"] - 3 * params < 1024
    assert 0 <= train["total_gib"] - train["arguments_gib"] - train["temporaries_gib"] < 1024
    assert "| train_step |" in stdout and "largest temporaries of lean_trace:" in stdout


def test_memory_advice_tries_cuts_that_add_up_most_frugal_last():
    """plan.check compiles the last (most frugal) change first: where it does not fit, nothing tried does."""
    fsdp = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
    changes = plan_lib._alternatives(configuration.read(config_file("default.py", "tiny")))
    remat = {**fsdp, "train.remat": "nothing_saveable"}
    assert changes == [fsdp, remat, *({**remat, "train.grad_accum_steps": a} for a in (2, 4, 8))]
    real = configuration.read(config_file("llama32_1b.py"), "data")  # FSDP already; remat is its own
    first = ({"train.remat": "nothing_saveable"} if real.train.remat != "nothing_saveable"
             else {"train.grad_accum_steps": 2 * real.train.grad_accum_steps})
    assert plan_lib._alternatives(real)[0] == first
    assert plan_lib._alternatives(real)[-1]["train.grad_accum_steps"] == 8 * real.train.grad_accum_steps
