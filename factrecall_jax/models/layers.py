"""Pieces shared by the Llama and GPT-NeoX ports: RoPE, attention, norms, projections and the stacked-layer scan.

Dimensions: B batch, T query positions, S key positions, D hidden_size, N attention heads, K key/value heads,
G query heads per key/value head (N // K), H head_dim, R rotated dims of a head (H * partial_rotary_factor),
F intermediate_size, V vocab_size, L layers.
"""
import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from factrecall_jax import errors, sharding

# Logical axis names of the einsum letters that appear in weights; sharding.py maps them onto a mesh.
LOGICAL_AXES = {"D": "embed", "N": "heads", "K": "kv_heads", "H": "head_dim", "F": "mlp", "V": "vocab", "C": None}

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # transformers' GELUActivation: exact erf
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # NewGELUActivation, GELUTanh, FastGELU: tanh form
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation transformers' ACT2FN[name] computes; unknown names fail here rather than at call time."""
    if name not in ACTIVATIONS:
        raise errors.InvalidValue(f"unsupported hidden_act {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def with_axes(init: Callable, *names: str | None) -> Callable:
    """Attaches logical axis names to a parameter; eager sharding is off, so no mesh is needed to build one."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def dense(einsum_str: str, kernel_shape: tuple[int, ...], *, use_bias: bool, init_std: float, dtype, param_dtype,
          rngs: nnx.Rngs) -> nnx.Einsum:
    """A projection like transformers' nn.Linear (normal(init_std) kernel, zero bias), with a head-structured kernel.

    The kernel's axes are the letters of the einsum's second operand; the bias covers those that reach the output.
    """
    kernel_letters, out_letters = einsum_str.split(",")[1].split("->")
    bias_letters = [c for c in kernel_letters if c in out_letters]
    bias_shape = tuple(kernel_shape[kernel_letters.index(c)] for c in bias_letters) if use_bias else None
    return nnx.Einsum(
        einsum_str, kernel_shape, bias_shape, dtype=dtype, param_dtype=param_dtype,
        kernel_init=with_axes(nnx.initializers.normal(init_std), *(LOGICAL_AXES[c] for c in kernel_letters)),
        bias_init=with_axes(nnx.initializers.zeros, *(LOGICAL_AXES[c] for c in bias_letters)), rngs=rngs)


def embed(num_embeddings: int, features: int, *, init_std: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Embed:
    """A token embedding [V, D] initialized like transformers' nn.Embedding under _init_weights."""
    return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                 embedding_init=with_axes(nnx.initializers.normal(init_std), "vocab", "embed"), rngs=rngs)


def _last_axis(x: jax.Array, ndim: int) -> jax.Array:
    """A [D] parameter shaped to broadcast against [..., D] explicitly (tests raise on implicit rank promotion)."""
    return x.reshape((1,) * (ndim - 1) + (-1,))


class RMSNorm(nnx.Module):
    """transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(with_axes(nnx.initializers.ones, "embed")(None, (dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalize in float32 and cast back before scaling, as LlamaRMSNorm.forward does.
        x32 = x.astype(jnp.float32)
        y = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)).astype(x.dtype)
        return (_last_axis(self.scale[...], x.ndim) * y).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: statistics and the affine map in float32 (two-pass variance, like torch)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(with_axes(nnx.initializers.ones, "embed")(None, (dim,), param_dtype))
        self.bias = nnx.Param(with_axes(nnx.initializers.zeros, "embed")(None, (dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        centered = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = centered * jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + self.eps)
        scale, bias = (_last_axis(p[...].astype(jnp.float32), x.ndim) for p in (self.scale, self.bias))
        return (y * scale + bias).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """transformers' `rope_parameters` dict as a hashable value; None fields are absent from the dict."""

    rope_type: str = "default"
    rope_theta: float = 10000.0
    partial_rotary_factor: float | None = None
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    SUPPORTED = ("default", "llama3")

    def __post_init__(self):
        if self.rope_type not in self.SUPPORTED:
            raise errors.InvalidValue(f"unsupported rope_type {self.rope_type!r}; "
                                      f"supported: {', '.join(self.SUPPORTED)}")
        if self.rope_type == "llama3":
            needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if missing := [name for name in needed if getattr(self, name) is None]:
                raise errors.InvalidValue(f"rope_type 'llama3' needs {', '.join(missing)} in rope_parameters")

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], default_partial_rotary_factor: float | None = None):
        """Reads `rope_parameters` (transformers >= 5) or the hub-style `rope_theta`, `rope_scaling` (with `type` or
        `rope_type`), `rotary_emb_base`, `rotary_pct` and `partial_rotary_factor` keys of a config.json."""
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        legacy_type = params.pop("type", "default")  # rope_scaling of older config.json files
        params.setdefault("rope_type", legacy_type)
        params.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", cls.rope_theta)))
        partial = hf.get("partial_rotary_factor", hf.get("rotary_pct", default_partial_rotary_factor))
        params.setdefault("partial_rotary_factor", partial)
        if params["rope_type"] == "llama3":  # standardize_rope_params falls back to max_position_embeddings
            params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        fields = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(params) - fields):
            raise errors.InvalidValue(f"unsupported rope_parameters keys {unknown}; supported: {sorted(fields)}")
        return cls(**params)

    def to_hf_config(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# Model-config fields that must be positive integers where a config has them (None takes a default).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings")


class HFConfig:
    """config.json in and out for a frozen model-config dataclass whose fields carry HF config.json names.

    Subclasses set `model_type`, `architecture` and, where transformers has one, the default partial rotary factor.
    """

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    default_partial_rotary_factor: ClassVar[float | None] = None

    def __post_init__(self):
        for name in _SIZES:  # before a subclass divides by one of them
            value = getattr(self, name, None)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise errors.InvalidValue(f"{name}={value!r} is invalid: expected a positive integer")
        if isinstance(self.eos_token_id, list):  # Llama 3.1 lists several; a tuple keeps the config hashable
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]):
        """Reads a config.json dict (hub style or transformers >= 5 style); fields that change nothing are ignored."""
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_parameters"}
        rope = RopeParameters.from_hf_config(hf, default_partial_rotary_factor=cls.default_partial_rotary_factor)
        return cls(**{k: v for k, v in hf.items() if k in names}, rope_parameters=rope)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that the installed transformers writes for this model (rope as `rope_parameters`)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["rope_parameters"] = self.rope_parameters.to_hf_config()
        if isinstance(self.eos_token_id, tuple):
            fields["eos_token_id"] = list(self.eos_token_id)
        return {"model_type": self.model_type, "architectures": [self.architecture], **fields}


def rope_inv_freq(rope: RopeParameters, head_dim: int) -> np.ndarray:
    """Inverse frequencies [R // 2] in float32, computed as transformers does for the rope type."""
    dim = int(head_dim * (rope.partial_rotary_factor or 1.0))
    # compute_default_rope_parameters: float32 throughout.
    inv_freq = 1.0 / (rope.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if rope.rope_type == "default":
        return inv_freq
    # _compute_llama3_parameters: scale low frequencies by 1/factor, keep high ones, interpolate in between.
    old_context_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_context_len / rope.low_freq_factor
    high_freq_wavelen = old_context_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / rope.factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_cos_sin(position_ids_BT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, R] in float32, laid out as transformers' rotary embeddings (freqs repeated twice)."""
    freqs_BTR = position_ids_BT[:, :, None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None, :]
    emb_BTR = jnp.concatenate([freqs_BTR, freqs_BTR], axis=-1)
    return jnp.cos(emb_BTR), jnp.sin(emb_BTR)


def apply_rope(x_BTNH: jax.Array, cos_BTR: jax.Array, sin_BTR: jax.Array) -> jax.Array:
    """Rotate-half RoPE on the first R dims of each head, the rest passed through (apply_rotary_pos_emb)."""
    r = cos_BTR.shape[-1]
    cos_BT1R, sin_BT1R = (t[:, :, None, :].astype(x_BTNH.dtype) for t in (cos_BTR, sin_BTR))
    x_rot, x_pass = x_BTNH[..., :r], x_BTNH[..., r:]
    rotated = jnp.concatenate([-x_rot[..., r // 2:], x_rot[..., : r // 2]], axis=-1)
    return jnp.concatenate([x_rot * cos_BT1R + rotated * sin_BT1R, x_pass], axis=-1)


def attention_mask(attention_mask_BT: jax.Array | None, batch: int, length: int) -> jax.Array:
    """Boolean [B, T, S]: key s is visible to query t when s <= t and s is a real (unpadded) token."""
    causal_TS = jnp.tril(jnp.ones((length, length), dtype=bool))
    if attention_mask_BT is None:
        return jnp.broadcast_to(causal_TS[None], (batch, length, length))
    return causal_TS[None] & attention_mask_BT[:, None, :].astype(bool)


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, mask_BTS: jax.Array) -> jax.Array:
    """Grouped-query attention; query head n reads key/value head n // G, as transformers' repeat_kv arranges."""
    b, t, n, h = q_BTNH.shape
    k = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
    # Softmax in float32 as eager_attention_forward. Masked scores get the float32 minimum rather than -inf, so a
    # query with no visible key (a padded row) yields a uniform average instead of NaN.
    scores_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * h**-0.5
    scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH).reshape(b, t, n, h)


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Builds `num_layers` independently initialized layers as one module whose every leaf has a leading axis L."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
        return make_layer(rngs)

    return make(rngs)


# What the backward pass keeps of each layer (`remat`): "none" keeps every intermediate; the others recompute the
# layer's forward in the backward pass and keep only what the policy saves (jax.checkpoint_policies).
REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r} is invalid: expected one of {', '.join(REMAT_POLICIES)}")
    return remat


def scan_layers(stacked: nnx.Module, x: jax.Array, *args, collect: bool = False, remat: str = "none"):
    """x = layer_l(x, *args) for l = 0 .. L-1 under one scan (nnx.scan), so compile time does not grow with depth.

    collect=True also returns every layer's output, stacked [L, *x.shape]. The residual stream entering each layer
    is split by rows over the ambient mesh's batch axes (`sharding.constrain_rows`); `remat` (REMAT_POLICIES) sets
    what the backward pass keeps of each layer. nnx.scan rather than jax.lax.scan over split state, so that what a
    layer's modules sow or perturb under `nnx.capture` (the gradient trace) comes out stacked per layer.
    """
    policy = REMAT_POLICIES[check_remat(remat)]

    def body(carry, layer, args):
        out = layer(sharding.constrain_rows(carry), *args)
        return out, out if collect else None

    if policy is not None:
        body = nnx.remat(body, policy=policy, graph=False)
    # graph=False (modules as pytrees): a model merged outside the current trace (closed over by jax.jit) still runs.
    x, outputs = nnx.scan(body, in_axes=(nnx.Carry, 0, None), out_axes=(nnx.Carry, 0), graph=False)(x, stacked, args)
    return (x, outputs) if collect else x


class CausalLM(nnx.Module):
    """embed -> the stacked layers (`self.layers`, one scan) -> unembed, with each stage callable on its own.

    The stages are public because representation analyses read the residual stream between layers. Subclasses set
    `config`, `layers` and `remat` (what a training step's backward pass keeps of each layer: REMAT_POLICIES) and
    name their embedding, final norm and head as their Hugging Face checkpoints do, returning them from `_ends`.
    """

    def _ends(self) -> tuple[nnx.Embed, nnx.Module, nnx.Module | None]:
        """(token embedding, final norm, untied output head or None when tied)."""
        raise NotImplementedError

    def embed(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None,
              position_ids_BT: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        """(token embeddings [B, T, D], the arguments every layer takes after x: RoPE tables and the mask)."""
        b, t = input_ids_BT.shape
        if position_ids_BT is None:
            position_ids_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
        cos_sin = rope_cos_sin(position_ids_BT, rope_inv_freq(self.config.rope_parameters, self.config.head_dim))
        return self._ends()[0](input_ids_BT), (cos_sin, attention_mask(attention_mask_BT, b, t))

    def unembed(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm, then the head (the embedding's transpose when tied): float32 logits [B, T, V]."""
        embedding, final_norm, head = self._ends()
        x_BTD = final_norm(x_BTD)
        return (embedding.attend(x_BTD) if head is None else head(x_BTD)).astype(jnp.float32)

    def __call__(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None,
                 position_ids_BT: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, T, V]; attention_mask_BT is 1 for real tokens and 0 for padding."""
        x_BTD, layer_args = self.embed(input_ids_BT, attention_mask_BT, position_ids_BT)
        return self.unembed(scan_layers(self.layers, x_BTD, *layer_args, remat=self.remat))

    def hidden_states(self, input_ids_BT: jax.Array, attention_mask_BT: jax.Array | None = None,
                      position_ids_BT: jax.Array | None = None) -> jax.Array:
        """The residual stream [L + 1, B, T, D]: the embeddings, then every layer's output (before the final norm)."""
        x_BTD, layer_args = self.embed(input_ids_BT, attention_mask_BT, position_ids_BT)
        outputs_LBTD = scan_layers(self.layers, x_BTD, *layer_args, collect=True)[1]
        return jnp.concatenate([x_BTD[None], outputs_LBTD])
