"""Fine-tune Llama-3.2-1B on bioS, two-stage vs mixed (needs a GPU or TPU; bfloat16 compute, float32 master weights).

    python -m launch.reproduce --config=configs/llama32_1b.py --workdir=runs/llama32_1b
    python -m launch.reproduce --config=configs/llama32_1b.py --config.init_from=/path/to/Llama-3.2-1B --workdir=...

Hyperparameters are in the style of the paper's fine-tuning runs (full fine-tuning with AdamW, a small peak learning
rate with warmup and decay, five BIO templates, the model's own tokenizer); they are a starting point, not the
paper's exact values. A pretrained model needs no BIO value dropout.
"""
import importlib.util
import os

import ml_collections

_spec = importlib.util.spec_from_file_location("default", os.path.join(os.path.dirname(__file__), "default.py"))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)

CHECKPOINT = "meta-llama/Llama-3.2-1B"


def get_config():
    config = default.get_config()
    config.init_from = CHECKPOINT  # a hub id or a local folder with config.json and safetensors
    config.tokenizer = CHECKPOINT
    # The checkpoint's architecture (its config.json): launch.plan compiles from it without a download, and loading
    # checks that init_from agrees with it.
    config.model = ml_collections.ConfigDict(dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192),
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001))
    config.dtype = "bfloat16"
    # FSDP over all devices: float32 weights and AdamW moments do not fit whole on every device (launch.plan, README).
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    # bioS as Allen-Zhu & Li generate it: five templates per attribute, several biographies per person.
    config.data.num_people = 2000
    config.data.bio_templates = 5
    config.data.bio_variants = 3
    config.optimizer.learning_rate = 2e-5
    config.optimizer.warmup_steps = 100
    config.optimizer.weight_decay = 0.1
    config.optimizer.b2 = 0.999
    # The paper's fine-tuning: QA loss on the answer, BIO and QA rows in equal numbers (not Physics 3.1's token share).
    config.qa_loss = "answer"
    config.mixed.steps = 6000
    config.mixed.bio_batch = 16
    config.mixed.qa_batch = 16
    config.mixed.qa_token_share = 0.0
    config.two_stage.stage1_steps = 4000
    config.two_stage.bio_batch = 16
    config.two_stage.stage2_steps = 2000
    config.two_stage.qa_batch = 32
    config.two_stage.stage2_learning_rate = 1e-5
    config.reproduce.stage2_learning_rates = (5e-6, 1e-5, 2e-5)
    config.train.bio_value_dropout = 0.0
    config.train.steps_per_call = 10
    config.train.eval_every = 500
    config.train.eval_batch_size = 128
    config.train.checkpoint_every = 1000
    # The lean trace keeps each chunk's taps: 32 pairs plan to 82.9 GiB on one device, over an 80 GiB GPU (README).
    config.trace.chunk_size = 16
    # The masks only: three float32 sums of a 1B model are 15 GiB per regime.
    config.trace.save_sums = False
    return config
