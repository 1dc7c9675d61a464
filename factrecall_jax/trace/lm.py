"""The per-example loss of the library's causal LMs (`models.Llama`, `models.GPTNeoX`), for the trace."""
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def example_loss(logits_TV: jax.Array, example: Mapping[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy over the example's weighted positions (the fact's tokens), 0 if it has none."""
    losses_T = optax.softmax_cross_entropy_with_integer_labels(logits_TV, example["targets"])
    weights_T = example["weights"].astype(losses_T.dtype)
    return jnp.sum(losses_T * weights_T) / jnp.maximum(jnp.sum(weights_T), 1.0)


def lm_loss(model: nnx.Module, example: Mapping[str, jax.Array]) -> jax.Array:
    """`example_loss` of a causal LM on one row: {"inputs", "targets", "weights"} [T], optionally "attention_mask"
    [T] (1 for real tokens), as `data.pairs.fact_pairs` builds them."""
    mask = example.get("attention_mask")
    logits_TV = model(example["inputs"][None], None if mask is None else mask[None])[0]
    return example_loss(logits_TV, example)
