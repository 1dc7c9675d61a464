"""The train step: its loss against numpy, gradient accumulation, fused steps, weight decay masking, the schedule."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from factrecall_jax import models, train

VOCAB = 50
TINY_LLAMA = dict(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


@pytest.fixture(scope="module")
def model_parts():
    """(graphdef, params) of a tiny random Llama with MLP biases, so masks and decay see every kind of parameter.

    (Not attention biases: softmax ignores the key bias, so its gradient is float noise that Adam scales up to lr.)
    """
    model = models.from_config({**TINY_LLAMA, "mlp_bias": True}, seed=1)
    return nnx.split(model, nnx.Param)


def fresh(params):
    """A copy of `params` whose buffers no donated call can delete."""
    return jax.tree.map(jnp.array, params)


def make_batch(seed, bio=(4, 10), qa=(4, 6)):
    """{"bio", "qa"} streams of random tokens, each row padded (weight 0, pad token 0) after a random length."""
    rng = np.random.default_rng(seed)
    batch = {}
    for task, (rows, length) in (("bio", bio), ("qa", qa)):
        lengths = rng.integers(2, length + 1, rows)
        lengths[0] = length  # one row spans the whole width
        real = np.arange(length) < lengths[:, None]
        inputs = np.where(real, rng.integers(1, VOCAB, (rows, length)), 0).astype(np.int32)
        targets = np.where(real, rng.integers(1, VOCAB, (rows, length)), 0).astype(np.int32)
        # QA-like: only some real positions carry loss
        weights = (real & (rng.random((rows, length)) < (1.0 if task == "bio" else 0.6))).astype(np.float32)
        weights[0, -1] = 1.0
        batch[task] = {"inputs": inputs, "targets": targets, "weights": weights}
    return batch


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, inputs):
    return nnx.merge(graphdef, params)(inputs)


def numpy_losses(graphdef, params, batch):
    """{task: (summed weighted cross-entropy, loss tokens)} with a float64 numpy log-softmax of the model's logits."""
    out = {}
    for task, stream in batch.items():
        logits = np.asarray(_logits(graphdef, params, jnp.asarray(stream["inputs"])), np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, stream["targets"][..., None], -1)[..., 0]
        out[task] = (float((nll * stream["weights"]).sum()), float(stream["weights"].sum()))
    return out


def assert_trees_close(a, b, **kw):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **kw)


def path_names(path):
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


# ---------------------------------------------------------------- the loss

# One AdamW setting and task weighting for every test that takes a step, so they share one compiled step: compiling
# a train step costs seconds, running one microseconds. lr 0.05 from step 0 and decay 0.5 make every step visible.
WEIGHTS = {"bio": 0.25, "qa": 3.0}
CONFIG = train.OptimizerConfig(learning_rate=0.05, warmup_steps=0, weight_decay=0.5)
TX = train.make_optimizer(CONFIG, 10)


@pytest.fixture(scope="module")
def train_step(model_parts):
    """The unjitted step (for jit_steps) and its jitted form."""
    step = train.make_train_step(model_parts[0], TX, train.learning_rate_schedule(CONFIG, 10), task_weights=WEIGHTS)
    return step, jax.jit(step)


def expected_loss(ref, weights):
    return sum(weights.get(t, 1.0) * s for t, (s, _) in ref.items()) / sum(n for _, n in ref.values())


def test_loss_matches_numpy(model_parts, train_step):
    graphdef, params = model_parts
    batch = make_batch(0)
    ref = numpy_losses(graphdef, params, batch)
    _, metrics = train_step[1](train.init_state(fresh(params), TX), batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss(ref, WEIGHTS), rtol=1e-5)
    for task, (summed, n) in ref.items():  # the per-task losses are unweighted token means
        np.testing.assert_allclose(float(metrics[f"loss_{task}"]), summed / n, rtol=1e-5)
    assert float(metrics["learning_rate"]) == pytest.approx(0.05)


@pytest.mark.parametrize("weights", [{}, {"bio": 2.0, "qa": 0.0, "other": 5.0}])  # a task not in the batch: ignored
def test_loss_sums_match_numpy(model_parts, weights):
    graphdef, params = model_parts
    batch = make_batch(1)
    ref = numpy_losses(graphdef, params, batch)
    total, per_task = jax.jit(train.loss_sums, static_argnums=0)(graphdef, params, batch, weights)
    tokens = sum(n for _, n in ref.values())
    np.testing.assert_allclose(float(total), expected_loss(ref, weights) * tokens, rtol=1e-5)
    assert sorted(per_task) == ["bio", "qa"]
    for task, (summed, n) in ref.items():
        np.testing.assert_allclose(float(per_task[task][0]), summed, rtol=1e-5)
        assert float(per_task[task][1]) == n


def test_unweighted_step_and_its_gradient(model_parts):
    """Default task weights; with SGD at rate 1 the update is minus the gradient g, and the loss's finite difference
    along g (computed in numpy) must be |g|^2: that checks the gradient's 1/tokens scaling against the loss."""
    graphdef, params = model_parts
    batch = make_batch(2)
    sgd = optax.sgd(1.0)
    state, metrics = jax.jit(train.make_train_step(graphdef, sgd, lambda s: 1.0))(train.init_state(params, sgd), batch)
    ref = numpy_losses(graphdef, params, batch)
    np.testing.assert_allclose(float(metrics["loss"]), expected_loss(ref, {}), rtol=1e-5)
    assert int(state.step) == 1 and float(metrics["learning_rate"]) == 1.0

    grads = jax.tree.map(lambda p, q: np.asarray(p, np.float64) - np.asarray(q, np.float64), params, state.params)
    norm = float(np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads))))
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    h = 1e-2 / norm

    def loss_at(sign):
        moved = jax.tree.map(lambda p, g: jnp.asarray(np.asarray(p) + sign * h * g, jnp.float32), params, grads)
        return expected_loss(numpy_losses(graphdef, moved, batch), {})

    directional = (loss_at(1) - loss_at(-1)) / (2 * h)  # <grad, update> = |grad|^2 when the update is the gradient
    np.testing.assert_allclose(directional, norm ** 2, rtol=2e-2)


# ---------------------------------------------------------------- accumulation and fused steps


def test_grad_accumulation_equals_full_batch(model_parts, train_step):
    graphdef, params = model_parts
    batches = [make_batch(3), make_batch(4)]
    accumulated = jax.jit(train.make_train_step(graphdef, TX, train.learning_rate_schedule(CONFIG, 10),
                                                task_weights=WEIGHTS, grad_accum_steps=2))
    results = {}
    for accum, step in ((1, train_step[1]), (2, accumulated)):
        state = train.init_state(fresh(params), TX)
        metrics = []
        for batch in batches:
            state, m = step(state, batch)
            metrics.append(m)
        results[accum] = state, metrics
    (full, full_metrics), (state, metrics) = results[1], results[2]
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(params)))
    assert moved > 1e-2  # the steps did update the parameters
    assert int(state.step) == 2
    # Adam divides by the gradient's size, so float noise in a tiny gradient element moves it by up to ~lr * 1e-5
    assert_trees_close(state.params, full.params, rtol=1e-5, atol=1e-6)
    for m, f in zip(metrics, full_metrics):
        for key in ("loss", "loss_bio", "loss_qa", "grad_norm", "learning_rate"):
            np.testing.assert_allclose(float(m[key]), float(f[key]), rtol=1e-5, err_msg=key)


def test_grad_accumulation_rejects_indivisible_batch(model_parts):
    graphdef, params = model_parts
    step = train.make_train_step(graphdef, TX, lambda s: 0.0, grad_accum_steps=2)
    with pytest.raises(ValueError, match=r"batch size 3 .*grad_accum_steps=2"):
        step(train.init_state(params, TX), make_batch(5, bio=(3, 8)))


def test_jit_steps_equals_separate_steps(model_parts, train_step):
    _, params = model_parts
    step, jitted = train_step
    batches = [make_batch(10 + k) for k in range(3)]

    state = train.init_state(fresh(params), TX)
    separate = []
    for batch in batches:
        state, metrics = jitted(state, batch)
        separate.append(metrics)

    stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
    fused_state, fused = train.jit_steps(step)(train.init_state(fresh(params), TX), stacked)
    assert int(fused_state.step) == int(state.step) == 3
    assert_trees_close(fused_state.params, state.params, rtol=1e-6, atol=1e-7)
    assert_trees_close(fused_state.opt_state, state.opt_state, rtol=1e-6, atol=1e-9)
    assert sorted(fused) == sorted(separate[0])
    for key, values in fused.items():
        assert values.shape == (3,), key
        np.testing.assert_allclose(np.asarray(values), [float(m[key]) for m in separate], rtol=1e-6, err_msg=key)


# ---------------------------------------------------------------- weight decay


def test_decay_mask_selects_kernels_and_embeddings(model_parts):
    _, params = model_parts
    mask = train.decay_mask(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    mask_leaves = jax.tree.leaves(mask)
    assert len(leaves) == len(mask_leaves)
    kinds = set()
    for (path, _), masked in zip(leaves, mask_leaves):
        name = path_names(path)
        kind = "matrix" if {"kernel", "embedding"} & set(name) else "scale" if "scale" in name else "bias"
        assert "bias" in name or kind != "bias", name
        kinds.add(kind)
        assert bool(masked) is (kind == "matrix"), name
    assert kinds == {"matrix", "scale", "bias"}


def test_weight_decay_shrinks_matrices_only(model_parts, train_step):
    _, params = model_parts
    batch = make_batch(6)
    for stream in batch.values():
        stream["weights"][:] = 0.0  # no loss tokens: zero gradients, so only weight decay moves anything
    state, metrics = train_step[1](train.init_state(fresh(params), TX), batch)
    assert float(metrics["grad_norm"]) == 0.0 and float(metrics["loss"]) == 0.0
    shrink = 1 - CONFIG.learning_rate * CONFIG.weight_decay
    for (path, new), old in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(params)):
        name = path_names(path)
        if {"kernel", "embedding"} & set(name):
            np.testing.assert_allclose(np.asarray(new), shrink * np.asarray(old), rtol=1e-6, atol=1e-9,
                                       err_msg=str(name))
        else:
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=str(name))


# ---------------------------------------------------------------- learning rate schedule


def test_learning_rate_schedule_values():
    config = train.OptimizerConfig(learning_rate=2e-3, warmup_steps=4, end_lr_fraction=0.1)
    schedule = train.learning_rate_schedule(config, 20)
    lrs = np.array([float(schedule(s)) for s in range(21)])
    assert lrs[0] == 0.0
    np.testing.assert_allclose(lrs[:5], 2e-3 * np.arange(5) / 4, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(lrs[4], 2e-3, rtol=1e-6)  # the peak at the end of the warmup
    np.testing.assert_allclose(lrs[20], 2e-4, rtol=1e-5)  # end_lr_fraction of the peak after `steps`
    assert np.all(np.diff(lrs[4:]) < 0)  # cosine decay
    np.testing.assert_allclose(lrs[12], (2e-3 + 2e-4) / 2, rtol=1e-5)  # half-way through the decay
    np.testing.assert_allclose(float(schedule(30)), 2e-4, rtol=1e-5)  # and it stays there


def test_learning_rate_schedule_warmup_stable_decay_values():
    config = train.OptimizerConfig(learning_rate=2e-3, warmup_steps=4, end_lr_fraction=0.1, decay_fraction=0.25)
    schedule = train.learning_rate_schedule(config, 20)
    lrs = np.array([float(schedule(s)) for s in range(21)])
    np.testing.assert_allclose(lrs[:5], 2e-3 * np.arange(5) / 4, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(lrs[4:17], 2e-3, rtol=1e-6)  # stable: the last 25% of the 16 steps after warmup decay
    assert np.all(np.diff(lrs[16:]) < 0)
    np.testing.assert_allclose(lrs[18], (2e-3 + 2e-4) / 2, rtol=1e-5)  # half-way through the decay
    np.testing.assert_allclose([lrs[20], float(schedule(30))], 2e-4, rtol=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 1.5])
def test_optimizer_rejects_bad_decay_fraction(fraction):
    with pytest.raises(ValueError, match=f"decay_fraction={fraction!r} is invalid"):
        train.OptimizerConfig(decay_fraction=fraction)


@pytest.mark.parametrize("warmup_steps, steps", [(4, 4), (10, 3), (1, 1)])
def test_learning_rate_schedule_phase_not_longer_than_warmup(warmup_steps, steps):
    """A phase no longer than the warmup (the code clamps the warmup to `steps`) still gets a schedule."""
    config = train.OptimizerConfig(learning_rate=1.0, warmup_steps=warmup_steps, end_lr_fraction=0.1)
    schedule = train.learning_rate_schedule(config, steps)
    lrs = [float(schedule(s)) for s in range(steps + 1)]
    assert lrs[0] == 0.0
    assert all(np.isfinite(lrs)) and max(lrs) <= 1.0 + 1e-6 and lrs[-1] > 0


def _lrs_applied(tx, updates=6):
    """The learning rate of each of `updates` AdamW updates, read off pure weight decay of a kernel of ones."""
    params = {"layer": {"kernel": jnp.ones((2, 2))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state, out = tx.init(params), []
    for _ in range(updates):
        update, state = tx.update(zeros, state, params)
        out.append(-float(update["layer"]["kernel"][0, 0]))  # lr * weight_decay * 1
    return np.array(out)


def test_make_optimizer_count_offset_shifts_the_schedule():
    config = train.OptimizerConfig(learning_rate=1.0, warmup_steps=4, end_lr_fraction=0.1, weight_decay=0.5)
    schedule = train.learning_rate_schedule(config, 8)
    plain = _lrs_applied(train.make_optimizer(config, 8))
    np.testing.assert_allclose(plain, [0.5 * float(schedule(s)) for s in range(6)], rtol=1e-6, atol=1e-9)
    assert plain[1] > 0
    shifted = _lrs_applied(train.make_optimizer(config, 8, count_offset=3), updates=9)
    np.testing.assert_allclose(shifted[3:], plain, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(shifted[:3], 0.0)  # before its phase starts the schedule is still in warmup


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0.0), ("learning_rate", -1e-3), ("learning_rate", float("nan")),
    ("clip_norm", 0.0), ("weight_decay", -0.1), ("warmup_steps", -1),
    ("end_lr_fraction", 1.5), ("end_lr_fraction", -0.1),
    ("b1", 1.0), ("b1", -0.1), ("b2", 1.5), ("eps", -1e-8),
])
def test_optimizer_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"\b{field}={re.escape(repr(value))}"):
        train.OptimizerConfig(**{field: value})


def test_optimizer_config_accepts_edge_values():
    train.OptimizerConfig(weight_decay=0.0, warmup_steps=0, end_lr_fraction=0.0)
    train.OptimizerConfig(end_lr_fraction=1.0, b1=0.0, b2=0.0)
