"""Every config file builds a valid dataset config, optimizer and schedule (the real-model ones cannot be run here)."""
import glob
import os

import pytest

from conftest import config_file
from factrecall_jax import data, experiment, train

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "*.py")))
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
