"""Fine-tune Pythia-2.8B (GPT-NeoX) on bioS, two-stage vs mixed: the paper's Pythia (needs GPUs or a TPU slice).

    python -m launch.reproduce --config=configs/pythia_2p8b.py --workdir=runs/pythia_2p8b

The recipe of configs/pythia_1b.py (paper-style fine-tuning, not the paper's exact values) with the 2.8B checkpoint
and a learning rate halved for the larger model.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("pythia_1b", os.path.join(os.path.dirname(__file__), "pythia_1b.py"))
pythia_1b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pythia_1b)

CHECKPOINT = "EleutherAI/pythia-2.8b"


def get_config():
    config = pythia_1b.get_config()
    config.init_from = CHECKPOINT
    config.tokenizer = CHECKPOINT
    config.model.update(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32)
    config.optimizer.learning_rate = 1.5e-5
    config.two_stage.stage2_learning_rate = 7.5e-6
    config.reproduce.stage2_learning_rates = (3.75e-6, 7.5e-6, 1.5e-5)
    config.trace.chunk_size = 8
    # Recompute each layer in the backward pass: launch.plan's train step fits 12 GiB per device on fsdp 8 (README).
    config.train.remat = "nothing_saveable"
    return config
