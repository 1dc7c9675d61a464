"""Every config file builds a valid dataset config, optimizer and schedule and passes validation (the real-model ones
cannot be run here); a bad value fails through the launch scripts before anything is written."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import config_file, override
from factrecall_jax import configuration, data, errors, experiment, train
from factrecall_jax.data import schedules

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
    for schedule in configuration.SCHEDULES:
        phases = experiment.schedule(configuration.read(override(config, schedule=schedule)))
        assert sum(p.steps for p in phases) > 0
    name = os.path.basename(path)
    if name in REAL_MODELS:  # fine-tuning a pretrained checkpoint with its own tokenizer, bfloat16 compute
        assert (config.init_from, config.tokenizer, config.dtype) == (REAL_MODELS[name], REAL_MODELS[name], "bfloat16")
        assert max(config.reproduce.stage2_learning_rates) <= config.optimizer.learning_rate


def test_schedule_gives_every_phase_the_people_levers():
    levers = {"people.start_fraction": 0.25, "people.widen_fraction": 0.4, "people.power": 0.7}
    config = configuration.read(override(config_file("default.py", "tiny"), **levers))
    for schedule in configuration.SCHEDULES:
        phases = experiment.schedule(config.replace(schedule=schedule))
        assert [p.people for p in phases] == [schedules.PeopleSampling(0.25, 0.4, 0.7)] * len(phases), schedule
    assert not any(p.people.is_on for p in experiment.schedule(configuration.read(config_file("default.py"))))


def test_schedule_of_a_config_json_without_people_reads_epochs():
    """Runs written before the levers existed: their config.json has no people section, and they read epochs."""
    saved = configuration.read(config_file("default.py", "tiny")).to_dict()
    del saved["people"]
    config = configuration.RunConfig.from_dict(saved)
    assert all(p.people == schedules.PeopleSampling() for p in experiment.schedule(config))


def test_every_real_model_has_a_config():
    assert set(REAL_MODELS) <= {os.path.basename(p) for p in CONFIGS}


@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_config_is_fsdp_over_all_devices(name):
    """README's memory plan: on data parallelism every device holds the whole float32 model and AdamW moments (the
    3B train step 71.9 GiB per device of 8), on FSDP an eighth. Every batch and trace chunk splits over 8 devices."""
    config = config_file(name)
    assert dict(config.mesh) == {"data": 1, "fsdp": -1, "tensor": 1}
    rows = (config.mixed.bio_batch, config.mixed.qa_batch, config.two_stage.bio_batch, config.two_stage.qa_batch,
            config.train.eval_batch_size, config.trace.chunk_size)
    assert all(n % 8 == 0 for n in rows), rows


PRESETS = [(os.path.basename(p), ()) for p in CONFIGS] + [("default.py", ("tiny",)), ("augmented.py", ("tiny",))]


@pytest.mark.parametrize("name, args", PRESETS, ids=[":".join((name, *args)) for name, args in PRESETS])
def test_config_validates_offline(name, args):
    """The hub ids of the real-model configs pass as ids: validation reads no weights and downloads nothing."""
    configuration.validate(config_file(name, *args))


# (overrides, message); "{tmp}" is the test's folder. Each is checked in this process through validate (as every
# launch script calls it), and a few through the launch scripts themselves, below.
BAD_SETTINGS = [
    ({"mixed.steps": -5}, "mixed.steps=-5 is invalid: expected a positive integer"),
    ({"schedule": "three_stage"}, "schedule='three_stage' is invalid: expected one of mixed, two_stage"),
    ({"mesh.data": 3}, "mesh={'data': 3, 'fsdp': 1, 'tensor': 1}: mesh shape (3, 1, 1) needs 3 devices"),
    ({"data.qa_train_fraction": 1.0}, "data.qa_train_fraction=1.0 is invalid: it puts 40 of the 40"),
    ({"optimizer.learning_rate": 0.0}, "optimizer.learning_rate=0.0 is invalid: expected a positive"),
    ({"tokenizer": "{tmp}/no_tokenizer"}, "tokenizer='{tmp}/no_tokenizer' is not a folder: expected"),
    ({"dtype": "float16"}, "dtype='float16' is invalid: expected one of float32, bfloat16"),
    ({"people.start_fraction": 0.0}, "people.start_fraction=0.0 is invalid: expected a fraction in (0, 1]"),
    ({"people.start_fraction": 1.5}, "people.start_fraction=1.5 is invalid: expected a fraction in (0, 1]"),
    ({"people.widen_fraction": -0.1}, "people.widen_fraction=-0.1 is invalid: expected a fraction of each phase's"),
    ({"people.widen_fraction": 2.0}, "people.widen_fraction=2.0 is invalid: expected a fraction of each phase's"),
    ({"people.power": -0.6}, "people.power=-0.6 is invalid: expected a number >= 0"),
    ({"people.exponent": 0.7}, "people.exponent is not a field of schedules.PeopleSampling: expected some of power,"),
    ({"mixed.steps": 0, "dtype": "float16"},
     "2 problems in the config: mixed.steps=0 is invalid: expected a positive integer; dtype='float16' is invalid"),
]


@pytest.mark.parametrize("overrides, message", BAD_SETTINGS, ids=[str(c[0]) for c in BAD_SETTINGS])
def test_bad_config_value_is_named(tmp_path, overrides, message):
    config = override(config_file("default.py", "tiny"), **{k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str)
                                                             else v for k, v in overrides.items()})
    with pytest.raises(errors.UserError) as raised:
        configuration.validate(config, job="reproduce")
    assert message.replace("{tmp}", str(tmp_path)) in str(raised.value)


# (script, flags, XLA CPU devices, message): what the launch scripts do with a bad config.
CASES = [
    ("train", ("--config.mixed.steps=-5",), 1, BAD_SETTINGS[0][1]),
    ("train", ("--config.mixed.bio_batch=3",), 2,
     "mixed.bio_batch=3 is invalid: expected a multiple of 2, the devices"),
    # launch.reproduce checks the sections only it reads too, before it writes its config.json
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
