"""GPT-NeoX (Pythia) in Flax NNX, parameterized one to one like transformers' GPTNeoXForCausalLM.

Dimensions: B batch, T query positions, S key positions, D hidden_size, N attention heads, H head_dim
(hidden_size // N), C the (query, key, value) axis of the fused projection, F intermediate_size, V vocab_size,
L layers (the leading axis of every per-layer weight).
"""
import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from factrecall_jax import errors
from factrecall_jax.models import layers
from factrecall_jax.models.hf import Split, Transpose


@dataclasses.dataclass(frozen=True)
class GPTNeoXConfig(layers.HFConfig):
    """The fields of a GPT-NeoX config.json that shape the computation; defaults are transformers' GPTNeoXConfig."""

    model_type: ClassVar[str] = "gpt_neox"
    architecture: ClassVar[str] = "GPTNeoXForCausalLM"
    # GPTNeoXConfig.convert_rope_params_to_dict: rotary_pct defaults to 0.25, not 1.
    default_partial_rotary_factor: ClassVar[float] = 0.25

    vocab_size: int = 50432
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope_parameters: layers.RopeParameters = layers.RopeParameters(partial_rotary_factor=0.25)
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_attention_heads:
            raise errors.InvalidValue(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                      f"{self.num_attention_heads}")
        layers.activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls) -> "GPTNeoXConfig":
        """A few-thousand-parameter Pythia-style model (partial rotary, parallel residual), for tests."""
        return cls(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=128)


class GPTNeoXAttention(nnx.Module):
    """Self-attention with a fused query_key_value projection and partial RoPE (transformers' GPTNeoXAttention)."""

    def __init__(self, config: GPTNeoXConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
        kw = dict(use_bias=config.attention_bias, init_std=config.initializer_range, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        # HF views the fused output as [.., N, 3 * H] and chunks the last axis: the kernel is [D, N, C=3, H].
        self.query_key_value = layers.dense("BTD,DNCH->BTNCH", (d, n, 3, h), **kw)
        self.dense = layers.dense("BTNH,NHD->BTD", (n, h, d), **kw)

    def __call__(self, x_BTD: jax.Array, cos_sin: tuple[jax.Array, jax.Array], mask_BTS: jax.Array) -> jax.Array:
        qkv_BTNCH = self.query_key_value(x_BTD)
        q_BTNH, k_BSNH = (layers.apply_rope(qkv_BTNCH[:, :, :, c], *cos_sin) for c in (0, 1))
        return self.dense(layers.attention(q_BTNH, k_BSNH, qkv_BTNCH[:, :, :, 2], mask_BTS))


class GPTNeoXMLP(nnx.Module):
    """dense_4h_to_h(act(dense_h_to_4h(x))) (transformers' GPTNeoXMLP)."""

    def __init__(self, config: GPTNeoXConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=True, init_std=config.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense_h_to_4h = layers.dense("BTD,DF->BTF", (d, f), **kw)
        self.dense_4h_to_h = layers.dense("BTF,FD->BTD", (f, d), **kw)
        self.act = layers.activation(config.hidden_act)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x_BTD)))


class GPTNeoXLayer(nnx.Module):
    """Pre-norm block; attention and MLP read the same input (parallel) or one after the other (sequential)."""

    def __init__(self, config: GPTNeoXConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = layers.LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)
        self.post_attention_layernorm = layers.LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)
        self.attention = GPTNeoXAttention(config, **kw, rngs=rngs)
        self.mlp = GPTNeoXMLP(config, **kw, rngs=rngs)

    def __call__(self, x_BTD: jax.Array, cos_sin: tuple[jax.Array, jax.Array], mask_BTS: jax.Array) -> jax.Array:
        attn_BTD = self.attention(self.input_layernorm(x_BTD), cos_sin, mask_BTS)
        # Summation order as in GPTNeoXLayer.forward.
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(x_BTD)) + attn_BTD + x_BTD
        attn_BTD = attn_BTD + x_BTD
        return self.mlp(self.post_attention_layernorm(attn_BTD)) + attn_BTD


class GPTNeoX(layers.CausalLM):
    """GPT-NeoX causal LM; `layers` holds all blocks stacked on a leading axis L and runs them in one scan."""

    def __init__(self, config: GPTNeoXConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: str = "none"):
        self.config = config
        self.remat = layers.check_remat(remat)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_in = layers.embed(config.vocab_size, config.hidden_size, init_std=config.initializer_range,
                                     **kw, rngs=rngs)
        self.layers = layers.stack_layers(lambda r: GPTNeoXLayer(config, **kw, rngs=r), config.num_hidden_layers,
                                          rngs)
        self.final_layer_norm = layers.LayerNorm(config.hidden_size, config.layer_norm_eps, **kw)
        self.embed_out = nnx.data(None) if config.tie_word_embeddings else layers.dense(
            "BTD,DV->BTV", (config.hidden_size, config.vocab_size), use_bias=False,
            init_std=config.initializer_range, **kw, rngs=rngs)

    def _ends(self):
        return self.embed_in, self.final_layer_norm, self.embed_out


_QKV = Split(-1, ("num_attention_heads", 3, "head_dim"))
HF_WEIGHTS = (  # (HF key, NNX path, ops HF->NNX); hf.save applies the inverse ops in reverse order
    ("gpt_neox.embed_in.weight", "embed_in.embedding", ()),
    ("gpt_neox.layers.{i}.attention.query_key_value.weight", "layers.{i}.attention.query_key_value.kernel",
     (Transpose((1, 0)), _QKV)),
    ("gpt_neox.layers.{i}.attention.query_key_value.bias", "layers.{i}.attention.query_key_value.bias", (_QKV,)),
    ("gpt_neox.layers.{i}.attention.dense.weight", "layers.{i}.attention.dense.kernel",
     (Transpose((1, 0)), Split(0, ("num_attention_heads", "head_dim")))),
    ("gpt_neox.layers.{i}.attention.dense.bias", "layers.{i}.attention.dense.bias", ()),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.weight", "layers.{i}.mlp.dense_h_to_4h.kernel", (Transpose((1, 0)),)),
    ("gpt_neox.layers.{i}.mlp.dense_h_to_4h.bias", "layers.{i}.mlp.dense_h_to_4h.bias", ()),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.weight", "layers.{i}.mlp.dense_4h_to_h.kernel", (Transpose((1, 0)),)),
    ("gpt_neox.layers.{i}.mlp.dense_4h_to_h.bias", "layers.{i}.mlp.dense_4h_to_h.bias", ()),
    ("gpt_neox.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.scale", ()),
    ("gpt_neox.layers.{i}.input_layernorm.bias", "layers.{i}.input_layernorm.bias", ()),
    ("gpt_neox.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.scale", ()),
    ("gpt_neox.layers.{i}.post_attention_layernorm.bias", "layers.{i}.post_attention_layernorm.bias", ()),
    ("gpt_neox.final_layer_norm.weight", "final_layer_norm.scale", ()),
    ("gpt_neox.final_layer_norm.bias", "final_layer_norm.bias", ()),
    ("embed_out.weight", "embed_out.kernel", (Transpose((1, 0)),)),
)
# Buffers that Pythia revisions and older transformers versions saved.
HF_IGNORED = (r"rotary_emb\.inv_freq$", r"attention\.(masked_)?bias$")
