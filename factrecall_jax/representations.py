"""Representation consistency: do the BIO and QA formats map one fact to the same internal representation?

The paper's v2 asks this of the two training schedules: a model that stores a fact from biographies and retrieves it
from questions must reach related hidden states for the subject in both formats, and mixed training should make the
two formats' residual streams more alike than two-stage training does. For each fact pair (data.pairs.fact_pairs) this
compares the residual stream of its BIO and QA examples, layer by layer, at the subject's last token and at the
position that predicts the answer.
"""
import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SITES = ("subject", "answer")


@functools.partial(jax.jit, static_argnums=0)
def _hidden_at_batch(graphdef: nnx.GraphDef, params: nnx.State, inputs_BT: jax.Array, positions_BK: jax.Array):
    """The residual stream [L + 1, B, K, D] at K positions of each row."""
    hidden_LBTD = nnx.merge(graphdef, params).hidden_states(inputs_BT)
    return jnp.take_along_axis(hidden_LBTD, positions_BK[None, :, :, None], axis=2)


def hidden_at(graphdef: nnx.GraphDef, params: nnx.State, inputs_NT, positions_N, batch_size: int = 256) -> np.ndarray:
    """The residual stream (layer 0: the embeddings, then each layer's output) of row i at input position positions[i].

    Rows run in batches of min(batch_size, N), the last one padded, so the model compiles once. No attention mask is
    needed: padding sits on the right, where causal attention never reaches from real tokens.

    Args:
      inputs_NT: int token ids [N, T].
      positions_N: [N] positions in [0, T), or [N, K] for K positions per row.

    Returns:
      float32 [L + 1, N, D], or [L + 1, N, K, D] for [N, K] positions.
    """
    inputs_NT, positions = np.asarray(inputs_NT, np.int32), np.asarray(positions_N, np.int32)
    if inputs_NT.ndim != 2 or not inputs_NT.size:
        raise ValueError(f"inputs of shape {inputs_NT.shape} are invalid: expected [N, T] with N, T >= 1")
    n, length = inputs_NT.shape
    if positions.ndim not in (1, 2) or len(positions) != n or not positions.size:
        raise ValueError(f"positions of shape {positions.shape} are invalid: expected [{n}] or [{n}, K]")
    if positions.min() < 0 or positions.max() >= length:
        raise ValueError(f"positions in [{positions.min()}, {positions.max()}] are invalid: expected values in "
                         f"[0, {length})")
    if not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid: expected a positive integer")
    positions_NK = positions.reshape(n, -1)
    size = min(batch_size, n)
    rows = np.arange(-(-n // size) * size) % n  # the last batch repeats early rows, dropped below
    batches = [rows[i:i + size] for i in range(0, len(rows), size)]
    outputs = [np.asarray(_hidden_at_batch(graphdef, params, inputs_NT[rows_B], positions_NK[rows_B]), np.float32)
               for rows_B in batches]
    hidden = np.concatenate(outputs, axis=1)[:, :n]
    return hidden.reshape(*hidden.shape[:2], *positions.shape[1:], hidden.shape[-1])


def representation_consistency(graphdef: nnx.GraphDef, params: nnx.State, pairs: dict, batch_size: int = 256) -> dict:
    """{"subject": [L + 1], "answer": [L + 1]}: per layer (0: embeddings), the mean over pairs of the cosine between the
    BIO and the QA hidden state at that site. Plain floats, ready for JSON.

    pairs: from data.pairs.fact_pairs (its "bio" / "qa" inputs and "bio_positions" / "qa_positions").
    """
    hidden = {}
    for fmt in ("bio", "qa"):
        positions_NK = np.stack([pairs[f"{fmt}_positions"][site] for site in SITES], axis=1)
        hidden[fmt] = hidden_at(graphdef, params, pairs[fmt]["inputs"], positions_NK, batch_size).astype(np.float64)
    bio_LNKD, qa_LNKD = hidden["bio"], hidden["qa"]
    cosine_LNK = (np.sum(bio_LNKD * qa_LNKD, axis=-1)
                  / (np.linalg.norm(bio_LNKD, axis=-1) * np.linalg.norm(qa_LNKD, axis=-1)))
    return {site: cosine_LNK[:, :, k].mean(axis=1).tolist() for k, site in enumerate(SITES)}
