"""Every config file builds a valid dataset config, optimizer and schedule and passes validation (the real-model ones
cannot be run here); a bad value fails through the launch scripts before anything is written."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import config_file
from factrecall_jax import configuration, data, experiment, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
REAL_MODELS = {"llama32_1b.py": "meta-llama/Llama-3.2-1B", "llama32_3b.py": "meta-llama/Llama-3.2-3B",
               "pythia_160m.py": "EleutherAI/pythia-160m", "pythia_1b.py": "EleutherAI/pythia-1b",
               "pythia_2p8b.py": "EleutherAI/pythia-2.8b"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_builds_its_parts(path):
    config = config_file(os.path.basename(path))
    data.DatasetConfig(seed=config.seed, **config.data)
    train.OptimizerConfig(**config.optimizer)
    for schedule in experiment.SCHEDULES:
        phases = experiment.schedule(experiment.override(config, schedule=schedule))
        assert sum(p.steps for p in phases) > 0
    name = os.path.basename(path)
    if name in REAL_MODELS:  # fine-tuning a pretrained checkpoint with its own tokenizer, bfloat16 compute
        assert (config.init_from, config.tokenizer, config.dtype) == (REAL_MODELS[name], REAL_MODELS[name], "bfloat16")
        assert max(config.reproduce.stage2_learning_rates) <= config.optimizer.learning_rate


def test_every_real_model_has_a_config():
    assert set(REAL_MODELS) <= {os.path.basename(p) for p in CONFIGS}


PRESETS = [(os.path.basename(p), ()) for p in CONFIGS] + [("default.py", ("tiny",)), ("augmented.py", ("tiny",))]


@pytest.mark.parametrize("name, args", PRESETS, ids=[":".join((name, *args)) for name, args in PRESETS])
def test_config_validates_offline(name, args):
    """The hub ids of the real-model configs pass as ids: validation reads no weights and downloads nothing."""
    configuration.validate(config_file(name, *args))


# (flags, XLA CPU devices, message); "{tmp}" is the test's folder.
BAD_SETTINGS = [
    (("--config.mixed.steps=-5",), 1, "mixed.steps=-5 is invalid: expected a positive integer"),
    (("--config.schedule=three_stage",), 1, "schedule='three_stage' is invalid: expected one of mixed, two_stage"),
    (("--config.mesh.data=3",), 1, "mesh={'data': 3, 'fsdp': 1, 'tensor': 1}: mesh shape (3, 1, 1) needs 3 devices"),
    (("--config.data.qa_train_fraction=1.0",), 1, "data.qa_train_fraction=1.0 is invalid: it puts 40 of the 40"),
    (("--config.optimizer.learning_rate=0.0",), 1, "optimizer.learning_rate=0.0 is invalid: expected a positive"),
    (("--config.tokenizer={tmp}/no_tokenizer",), 1, "tokenizer='{tmp}/no_tokenizer' is not a folder: expected"),
    (("--config.dtype=float16",), 1, "dtype='float16' is invalid: expected one of float32, bfloat16"),
    (("--config.mixed.bio_batch=3",), 2, "mixed.bio_batch=3 is invalid: expected a multiple of 2, the devices"),
    (("--config.mixed.steps=0", "--config.dtype=float16"), 1,
     "2 problems in the config: mixed.steps=0 is invalid: expected a positive integer; dtype='float16' is invalid"),
]
# launch.reproduce checks what launch.train does, and the sections only it reads, before it writes its config.json.
CASES = [("train", *case) for case in BAD_SETTINGS] + [
    ("reproduce", *BAD_SETTINGS[0]),
    ("reproduce", ("--config.trace.num_people=30",), 1, "trace.num_people=30 is invalid: expected at most 20")]


@pytest.mark.parametrize("script, flags, devices, message", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_config_fails_before_anything_is_written(tmp_path, script, flags, devices, message):
    """One `error:` line naming the field, exit status 2, and no work directory: the corrected rerun starts clean."""
    workdir = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    done = subprocess.run([sys.executable, "-m", f"launch.{script}", "--config=configs/default.py:tiny",
                           f"--workdir={workdir}", *(f.replace("{tmp}", str(tmp_path)) for f in flags)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    printed = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(printed) == 1 and message.replace("{tmp}", str(tmp_path)) in printed[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert not os.path.exists(workdir) and os.listdir(tmp_path) == []
