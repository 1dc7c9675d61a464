"""The gradient trace: the lean path and the reference path against a Python loop of jax.grad, one pair at a time."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from factrecall_jax import models, trace
from factrecall_jax.models import layers

RTOL = 1e-5


def _batch(rng, n, length, vocab, left_pad=False):
    """Rows of random tokens; each padded to a random length (right, or left with an attention mask), sparse weights."""
    ids = rng.integers(1, vocab, (n, length + 1)).astype(np.int32)
    lengths = rng.integers(3, length + 1, n)
    real = np.arange(length)[None, :] < lengths[:, None]
    if left_pad:
        real = real[:, ::-1]
    weights = (real & (rng.random((n, length)) < 0.5)).astype(np.float32)
    weights[np.arange(n), np.argmax(real, axis=1)] = 1.0  # every example has a loss token
    batch = {"inputs": np.where(real, ids[:, :-1], 0), "targets": np.where(real, ids[:, 1:], 0), "weights": weights}
    if left_pad:
        batch["attention_mask"] = real.astype(np.int32)
    return batch


def _loop(loss, params, bio, qa):
    """The contraction from per-example gradients computed one by one, summed in float64 numpy."""
    grad = jax.jit(jax.grad(loss))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    stacked = [trace._is_stacked(path) for path, _ in leaves]
    n = len(bio["inputs"])
    sums = [[np.zeros(x.shape) for _, x in leaves] for _ in range(3)]
    pairs = {k: [] for k in ("pair_dot", "bio_sq_norm", "qa_sq_norm", "layer_pair_dot", "layer_bio_sq_norm",
                             "layer_qa_sq_norm")}
    for i in range(n):
        b, q = ([np.asarray(g, np.float64) for g in jax.tree.leaves(grad(params, jax.tree.map(lambda x: x[i], batch)))]
                for batch in (bio, qa))
        for k, (gb, gq) in enumerate(zip(b, q)):
            sums[0][k] += np.abs(gb)
            sums[1][k] += np.abs(gq)
            sums[2][k] += gb * gq
        for name, (x, y) in {"pair_dot": (b, q), "bio_sq_norm": (b, b), "qa_sq_norm": (q, q)}.items():
            pairs[name].append(sum(np.vdot(u, v) for u, v in zip(x, y)))
            pairs["layer_" + name].append(sum((u * v).reshape(len(u), -1).sum(axis=1)
                                              for u, v, s in zip(x, y, stacked) if s))
    return sums, {k: np.array(v) for k, v in pairs.items()}


def _assert_matches(result, expected):
    """The trace's sums and per-pair fields (a PairStatistics has the per-pair fields only) against the loop's."""
    sums, pairs = expected
    for name, tree_sums in zip(("bio_abs", "qa_abs", "cross"), sums):
        if not hasattr(result, name):
            continue
        for path_x, want in zip(jax.tree_util.tree_flatten_with_path(getattr(result, name))[0], tree_sums):
            path, got = path_x
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")
    for name, want in pairs.items():
        np.testing.assert_allclose(getattr(result, name), want, rtol=RTOL, atol=RTOL * np.abs(want).max(),
                                   err_msg=name)


MODELS = {
    "llama_gqa": models.LlamaConfig.tiny(),
    "llama_tied": models.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                     initializer_range=0.1),
    "pythia": models.GPTNeoXConfig.tiny(),
}


@pytest.mark.parametrize("name, left_pad", [("llama_gqa", False), ("llama_tied", False), ("pythia", True)])
def test_lean_and_reference_equal_a_loop_of_grad(name, left_pad, monkeypatch):
    config = MODELS[name]
    graphdef, params = nnx.split(models.from_config(config, seed=1), nnx.Param)
    rng = np.random.default_rng(0)
    n = 7  # not a multiple of the chunk size
    bio, qa = _batch(rng, n, 12, config.vocab_size, left_pad), _batch(rng, n, 6, config.vocab_size, left_pad)
    loss = trace.lm_loss(graphdef, params)
    expected = _loop(loss, params, bio, qa)
    _assert_matches(trace.cross_task_trace(loss, params, bio, qa, chunk_size=3), expected)
    _assert_matches(trace.pair_statistics(loss, params, bio, qa, chunk_size=4), expected)
    if name == "llama_tied":  # every parameter contracted pair by pair, as on a CPU at scale: the tied embedding's
        monkeypatch.setattr(trace, "_SMALL", 0)  # lookup rows added into its head gradient
        _assert_matches(trace.cross_task_trace(loss, params, bio, qa, chunk_size=4, group=1), expected)
    if name == "llama_gqa":
        _assert_matches(trace.cross_task_trace(loss, params, bio, qa, method="reference"), expected)
        # any StackedLoss goes one layer at a time; a plain function takes the whole-model chunked path
        _assert_matches(trace.cross_task_trace(trace.StackedLoss(loss.embed, loss.layer, loss.head), params, bio, qa,
                                               chunk_size=3), expected)
        plain = lambda p, ex: loss(p, ex)  # noqa: E731
        _assert_matches(trace.cross_task_trace(plain, params, bio, qa, chunk_size=4), expected)
        _assert_matches(trace.pair_statistics(plain, params, bio, qa, chunk_size=4), expected)


def test_the_trace_sees_the_facts_tokens_only():
    """Weights select the loss tokens: zero weights outside them make gradients independent of other targets."""
    config = MODELS["llama_gqa"]
    graphdef, params = nnx.split(models.from_config(config, seed=2), nnx.Param)
    rng = np.random.default_rng(1)
    bio, qa = _batch(rng, 4, 8, config.vocab_size), _batch(rng, 4, 5, config.vocab_size)
    loss = trace.lm_loss(graphdef, params)
    changed = dict(bio, targets=np.where(bio["weights"] > 0, bio["targets"], (bio["targets"] + 1) % config.vocab_size))
    a, b = (trace.cross_task_trace(loss, params, x, qa, chunk_size=4) for x in (bio, changed))
    np.testing.assert_array_equal(a.pair_dot, b.pair_dot)


def test_combine_is_the_weighted_sum_and_save_load_round_trips(tmp_path):
    params = nnx.split(models.from_config(MODELS["llama_gqa"]), nnx.Param)[1]
    rng = np.random.default_rng(3)

    def random_result():
        tree = lambda: jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)  # noqa: E731
        pairs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in [(5,)] * 3 + [(5, 2)] * 3]
        return trace.TraceResult(*pairs, bio_abs=tree(), qa_abs=tree(), cross=tree())

    r1, r2 = random_result(), random_result()
    combined = trace.combine([r1, r2], [0.5, 2.0])
    for x, a, b in zip(jax.tree.leaves(combined), jax.tree.leaves(r1), jax.tree.leaves(r2)):
        np.testing.assert_allclose(x, 0.5 * a + 2.0 * b, rtol=1e-6)
    trace.save(combined, str(tmp_path / "trace.safetensors"), {"steps": "[1, 2]"})
    loaded, metadata = trace.load(str(tmp_path / "trace.safetensors"), params)
    assert metadata == {"steps": "[1, 2]"}
    assert jax.tree.structure(loaded.cross) == jax.tree.structure(params)  # axis metadata comes back with the tree
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(combined)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="one weight per result"):
        trace.combine([r1], [1.0, 2.0])
    other = nnx.split(models.from_config(dataclasses.replace(MODELS["llama_gqa"], hidden_size=32)), nnx.Param)[1]
    with pytest.raises(ValueError, match="does not match the model: bio_abs of embed_tokens.embedding has shape"):
        trace.load(str(tmp_path / "trace.safetensors"), other)
    (tmp_path / "garbage.safetensors").write_bytes(b"not a trace")
    with pytest.raises(ValueError, match="is not a trace"):
        trace.load(str(tmp_path / "garbage.safetensors"), params)


def test_bad_arguments_are_named():
    params = nnx.split(models.from_config(MODELS["llama_gqa"]), nnx.Param)[1]
    batch = {"inputs": np.zeros((3, 4), np.int32)}
    with pytest.raises(ValueError, match="method='exact'"):
        trace.cross_task_trace(lambda p, ex: 0.0, params, batch, batch, method="exact")
    with pytest.raises(ValueError, match="chunk_size=0"):
        trace.cross_task_trace(lambda p, ex: 0.0, params, batch, batch, chunk_size=0)
    with pytest.raises(ValueError, match="group=3 is invalid: expected a divisor of chunk_size=4"):
        trace.cross_task_trace(lambda p, ex: 0.0, params, batch, batch, chunk_size=4, group=3)
    with pytest.raises(ValueError, match=r"sizes \[2, 3\]"):
        trace.cross_task_trace(lambda p, ex: 0.0, params, batch, {"inputs": np.zeros((2, 4), np.int32)})


def test_a_tape_records_each_module_once_and_changes_nothing_outside():
    """Under a Tape a module records its input and adds its probe; a second call would give it two output
    gradients and no one per-example gradient, so it is refused; outside a tape the module computes as before."""
    dense = layers.dense("BTD,DF->BTF", (4, 3), use_bias=True, init_std=1.0, dtype=jnp.float32,
                         param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.ones((1, 2, 4))
    plain = dense(x)
    with layers.Tape(dense, {"/out": jnp.full((1, 2, 3), 5.0)}) as tape:
        np.testing.assert_array_equal(dense(x), plain + 5.0)
        with pytest.raises(ValueError, match="ran twice under one tape"):
            dense(x)
    assert tape.inputs["/out"] is x and list(tape.modules) == ["/out"]
    np.testing.assert_array_equal(dense(x), plain)
