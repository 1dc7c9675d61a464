"""Fine-tune Llama-3.2-3B on bioS, two-stage vs mixed: the paper's Llama (needs GPUs or a TPU slice).

    python -m launch.reproduce --config=configs/llama32_3b.py --workdir=runs/llama32_3b

The recipe of configs/llama32_1b.py (paper-style full fine-tuning: bfloat16 compute, float32 master weights and
AdamW state; not the paper's exact values) with the 3B checkpoint and a learning rate halved for the larger model.
README's memory plan (launch.plan) sizes it for 8 devices.
"""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location("llama32_1b", os.path.join(os.path.dirname(__file__), "llama32_1b.py"))
llama32_1b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama32_1b)

CHECKPOINT = "meta-llama/Llama-3.2-3B"


def get_config():
    config = llama32_1b.get_config()
    config.init_from = CHECKPOINT
    config.tokenizer = CHECKPOINT
    config.model.update(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)
    config.optimizer.learning_rate = 1e-5
    config.two_stage.stage2_learning_rate = 5e-6
    config.reproduce.stage2_learning_rates = (2.5e-6, 5e-6, 1e-5)
    config.trace.chunk_size = 8
    # Recompute each layer in the backward pass: launch.plan's train step fits 12 GiB per device on fsdp 8 (README).
    config.train.remat = "nothing_saveable"
    return config
