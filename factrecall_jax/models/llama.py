"""Llama 2, 3, 3.1 and 3.2 in Flax NNX, parameterized one to one like transformers' LlamaForCausalLM.

Dimensions: B batch, T query positions, S key positions, D hidden_size, N attention heads, K key/value heads,
H head_dim, F intermediate_size, V vocab_size, L layers (the leading axis of every per-layer weight).
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
class LlamaConfig(layers.HFConfig):
    """The fields of a Llama config.json that shape the computation; defaults are transformers' LlamaConfig ones."""

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no grouping)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: layers.RopeParameters = layers.RopeParameters()
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise errors.InvalidValue(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                                      f"num_key_value_heads {self.num_key_value_heads}")
        layers.activation(self.hidden_act)

    @classmethod
    def tiny(cls) -> "LlamaConfig":
        """A few-thousand-parameter model with grouped-query attention, for tests."""
        return cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with RoPE (transformers' LlamaAttention)."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(use_bias=config.attention_bias, init_std=config.initializer_range, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        self.q_proj = layers.dense("BTD,DNH->BTNH", (d, n, h), **kw)
        self.k_proj = layers.dense("BSD,DKH->BSKH", (d, k, h), **kw)
        self.v_proj = layers.dense("BSD,DKH->BSKH", (d, k, h), **kw)
        self.o_proj = layers.dense("BTNH,NHD->BTD", (n, h, d), **kw)

    def __call__(self, x_BTD: jax.Array, cos_sin: tuple[jax.Array, jax.Array], mask_BTS: jax.Array) -> jax.Array:
        q_BTNH = layers.apply_rope(self.q_proj(x_BTD), *cos_sin)
        k_BSKH = layers.apply_rope(self.k_proj(x_BTD), *cos_sin)
        return self.o_proj(layers.attention(q_BTNH, k_BSKH, self.v_proj(x_BTD), mask_BTS))


class LlamaMLP(nnx.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)) (transformers' LlamaMLP)."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=config.mlp_bias, init_std=config.initializer_range, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
        self.gate_proj = layers.dense("BTD,DF->BTF", (d, f), **kw)
        self.up_proj = layers.dense("BTD,DF->BTF", (d, f), **kw)
        self.down_proj = layers.dense("BTF,FD->BTD", (f, d), **kw)
        self.act = layers.activation(config.hidden_act)

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.self_attn = LlamaAttention(config, **kw, rngs=rngs)
        self.mlp = LlamaMLP(config, **kw, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)

    def __call__(self, x_BTD: jax.Array, cos_sin: tuple[jax.Array, jax.Array], mask_BTS: jax.Array) -> jax.Array:
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_sin, mask_BTS)
        return x_BTD + self.mlp(self.post_attention_layernorm(x_BTD))


class Llama(layers.CausalLM):
    """Llama causal LM; `layers` holds all decoder layers stacked on a leading axis L and runs them in one scan."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 remat: str = "none"):
        self.config = config
        self.remat = layers.check_remat(remat)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = layers.embed(config.vocab_size, config.hidden_size, init_std=config.initializer_range,
                                         **kw, rngs=rngs)
        self.layers = layers.stack_layers(lambda r: LlamaDecoderLayer(config, **kw, rngs=r),
                                          config.num_hidden_layers, rngs)
        self.norm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.lm_head = nnx.data(None) if config.tie_word_embeddings else layers.dense(
            "BTD,DV->BTV", (config.hidden_size, config.vocab_size), use_bias=False,
            init_std=config.initializer_range, **kw, rngs=rngs)

    def _ends(self):
        return self.embed_tokens, self.norm, self.lm_head


_HEADS = Split(-1, ("num_attention_heads", "head_dim"))
_KV_HEADS = Split(-1, ("num_key_value_heads", "head_dim"))
HF_WEIGHTS = (  # (HF key, NNX path, ops HF->NNX); hf.save applies the inverse ops in reverse order
    ("model.embed_tokens.weight", "embed_tokens.embedding", ()),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.self_attn.q_proj.kernel", (Transpose((1, 0)), _HEADS)),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.self_attn.q_proj.bias", (_HEADS,)),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.self_attn.k_proj.kernel", (Transpose((1, 0)), _KV_HEADS)),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.self_attn.k_proj.bias", (_KV_HEADS,)),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.self_attn.v_proj.kernel", (Transpose((1, 0)), _KV_HEADS)),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.self_attn.v_proj.bias", (_KV_HEADS,)),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attn.o_proj.kernel",
     (Transpose((1, 0)), Split(0, ("num_attention_heads", "head_dim")))),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.self_attn.o_proj.bias", ()),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.kernel", (Transpose((1, 0)),)),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers.{i}.mlp.gate_proj.bias", ()),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.kernel", (Transpose((1, 0)),)),
    ("model.layers.{i}.mlp.up_proj.bias", "layers.{i}.mlp.up_proj.bias", ()),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.kernel", (Transpose((1, 0)),)),
    ("model.layers.{i}.mlp.down_proj.bias", "layers.{i}.mlp.down_proj.bias", ()),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.scale", ()),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.scale", ()),
    ("model.norm.weight", "norm.scale", ()),
    ("lm_head.weight", "lm_head.kernel", (Transpose((1, 0)),)),
)
HF_IGNORED = (r"rotary_emb\.inv_freq$",)  # a buffer older transformers versions saved
