"""Fine-tune Pythia-1B (GPT-NeoX) on bioS, two-stage vs mixed (needs a GPU or TPU).

    python -m launch.reproduce --config=configs/pythia_1b.py --workdir=runs/pythia_1b

The recipe of configs/llama32_1b.py (paper-style fine-tuning, not the paper's exact values) with Pythia's checkpoint
and tokenizer, and the slightly larger learning rate Pythia models are usually fine-tuned with.
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("llama32_1b", os.path.join(os.path.dirname(__file__), "llama32_1b.py"))
llama32_1b = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llama32_1b)

CHECKPOINT = "EleutherAI/pythia-1b"


def get_config():
    config = llama32_1b.get_config()
    config.init_from = CHECKPOINT
    config.tokenizer = CHECKPOINT
    # The checkpoint's architecture (its config.json), as in configs/llama32_1b.py.
    config.model = ml_collections.ConfigDict(dict(
        model_type="gpt_neox", vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=8, max_position_embeddings=2048, rotary_emb_base=10000, rotary_pct=0.25,
        hidden_act="gelu", layer_norm_eps=1e-5, use_parallel_residual=True, tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0))
    config.optimizer.learning_rate = 3e-5
    config.two_stage.stage2_learning_rate = 1.5e-5
    config.reproduce.stage2_learning_rates = (7.5e-6, 1.5e-5, 3e-5)
    return config
