"""Flax NNX ports of Llama and GPT-NeoX (Pythia) that load from and save to Hugging Face checkpoints."""
import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from factrecall_jax import errors, sharding
from factrecall_jax.models import hf
from factrecall_jax.models.gguf import convert_gguf
from factrecall_jax.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from factrecall_jax.models.llama import Llama, LlamaConfig

# config.json `model_type` -> (config class, model class).
MODELS = {"llama": (LlamaConfig, Llama), "gpt_neox": (GPTNeoXConfig, GPTNeoX)}


def _lookup(model_type: str | None):
    if model_type not in MODELS:
        raise errors.InvalidValue(f"unsupported model_type {model_type!r}; supported: {', '.join(MODELS)}")
    return MODELS[model_type]


def from_pretrained(path_or_hub_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                    mesh: Mesh | None = None) -> nnx.Module:
    """Loads a Hugging Face causal LM checkpoint (config.json plus safetensors, single or sharded).

    Args:
      path_or_hub_id: a local folder, or a hub id whose config and safetensors are downloaded.
      dtype: the computation dtype; logits are float32 regardless.
      param_dtype: the dtype parameters are cast to.
      remat: what a training step keeps of each layer (layers.REMAT_POLICIES).
      mesh: lay the parameters out as `sharding.param_shardings` does on this mesh, each device reading only its own
        block of every tensor (so a model too big for one device loads); None: whole arrays, not yet placed.

    Returns:
      A Llama or GPTNeoX module. Any mismatch between checkpoint and model raises one ValueError that lists every
      missing, unexpected and mis-shaped tensor.
    """
    folder = hf.resolve(path_or_hub_id)
    hf_config = hf.read_config(folder)
    config_cls, model_cls = _lookup(hf_config.get("model_type"))
    return hf.load(model_cls, config_cls.from_hf_config(hf_config), folder, dtype=dtype, param_dtype=param_dtype,
                   remat=remat, mesh=mesh)


def save_pretrained(model: nnx.Module, out_dir: str, *, max_shard_size: int | str | None = None) -> None:
    """Writes `model` as a checkpoint transformers' AutoModelForCausalLM loads (a tied lm_head is not written).

    max_shard_size (bytes, or a string like "2GB") splits the weights into shards with an index, as transformers does.
    """
    hf.save(model, out_dir, max_shard_size=max_shard_size)


def from_config(config: Mapping[str, Any] | LlamaConfig | GPTNeoXConfig, *, seed: int = 0, dtype=jnp.float32,
                param_dtype=jnp.float32, remat: str = "none", mesh: Mesh | None = None) -> nnx.Module:
    """A randomly initialized model (initialized as transformers does), for training from scratch.

    `config` is a config dataclass, or a config.json-style mapping with `model_type` (a dict, or the `model`
    ConfigDict of a configs/ file). `remat`: what a training step keeps of each layer (layers.REMAT_POLICIES).
    On a `mesh` of several devices every parameter is drawn where its shard lives (one jitted init whose outputs are
    laid out by name, `sharding.param_shardings`), so no device ever holds the whole model. XLA's fused sampling
    differs from eager sampling in the last bit, so one device keeps the eager init every earlier run started from.
    """
    if not dataclasses.is_dataclass(config):
        hf_config = dict(config)
        config = _lookup(hf_config.get("model_type"))[0].from_hf_config(hf_config)
    model_cls = _lookup(config.model_type)[1]

    def build():
        return model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed), remat=remat)

    if mesh is None or mesh.size == 1:
        return build()
    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.split(build())[1], out_shardings=sharding.param_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


__all__ = ["MODELS", "GPTNeoX", "GPTNeoXConfig", "Llama", "LlamaConfig", "convert_gguf", "from_config",
           "from_pretrained", "save_pretrained"]
