"""Fine-tune Pythia-160M (GPT-NeoX) on bioS, two-stage vs mixed: the smallest real model (one GPU is plenty).

    python -m launch.reproduce --config=configs/pythia_160m.py --workdir=runs/pythia_160m

The recipe of configs/pythia_1b.py (paper-style fine-tuning, not the paper's exact values) with a learning rate
raised for the smaller model.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("pythia_1b", os.path.join(os.path.dirname(__file__), "pythia_1b.py"))
pythia_1b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pythia_1b)

CHECKPOINT = "EleutherAI/pythia-160m"


def get_config():
    config = pythia_1b.get_config()
    config.init_from = CHECKPOINT
    config.tokenizer = CHECKPOINT
    config.model.update(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config.optimizer.learning_rate = 6e-5
    config.two_stage.stage2_learning_rate = 3e-5
    config.reproduce.stage2_learning_rates = (1.5e-5, 3e-5, 6e-5)
    return config
