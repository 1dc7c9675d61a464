"""The pure train step: TrainState, the token-mean loss, AdamW with warmup and cosine decay, fused steps.

`make_train_step` returns `(state, batch) -> (state, metrics)`; `jit_steps` runs K of them in one jitted call
(`lax.scan` over a stack of K batches) with the state donated, on one device or a mesh, because on a CPU the per-call
dispatch costs as much as a tiny model's step. The loop that drives them (evaluation, checkpoints, logging) is
`experiment.train`.
"""
import dataclasses
from collections.abc import Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from factrecall_jax import sharding

from factrecall_jax import errors


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: the model's parameters, the optimizer state and the global step."""
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, cosine decay to `end_lr_fraction` of the peak, and global-norm clipping.

    decay_fraction: the share of the steps after warmup that the cosine decay spans, at the end; before it the
      learning rate stays at the peak (warmup-stable-decay). 1.0: cosine from the end of warmup.
    Weight decay applies to matrices only (kernels and embeddings), never to norm scales or biases.
    """
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    end_lr_fraction: float = 0.1
    weight_decay: float = 1.0
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    clip_norm: float = 1.0
    decay_fraction: float = 1.0

    def __post_init__(self):
        for name in ("learning_rate", "clip_norm"):
            if not getattr(self, name) > 0:
                raise errors.InvalidValue(f"optimizer.{name}={getattr(self, name)!r} is invalid: "
                                          "expected a positive number")
        for name in ("weight_decay", "warmup_steps"):
            if not getattr(self, name) >= 0:
                raise errors.InvalidValue(f"optimizer.{name}={getattr(self, name)!r} is invalid: "
                                          "expected a number >= 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise errors.InvalidValue(f"optimizer.{name}={getattr(self, name)!r} is invalid: "
                                          f"expected 0 <= {name} < 1")
        if not self.eps >= 0:
            raise errors.InvalidValue(f"optimizer.eps={self.eps!r} is invalid: expected a number >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise errors.InvalidValue(f"optimizer.decay_fraction={self.decay_fraction!r} is invalid: "
                                      "expected 0 < x <= 1")
        if not 0 <= self.end_lr_fraction <= 1:
            raise errors.InvalidValue(f"optimizer.end_lr_fraction={self.end_lr_fraction!r} is invalid: "
                                      "expected 0..1")


def learning_rate_schedule(config: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, the peak until the last `decay_fraction` of the steps after warmup, then
    cosine decay to `end_lr_fraction` of it at `steps`."""
    peak, warmup = config.learning_rate, min(config.warmup_steps, steps)
    if config.decay_fraction == 1:
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1),  # needs decay > warmup
                                                  end_value=peak * config.end_lr_fraction)
    decay = max(1, round((steps - warmup) * config.decay_fraction))
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup),  # holds the peak after warmup
                                 optax.cosine_decay_schedule(peak, decay, alpha=config.end_lr_fraction)],
                                [steps - decay])


def decay_mask(params):
    """True for the matrices weight decay applies to: kernels and embeddings (by name; stacked layers add an axis)."""
    def is_matrix(path, _):
        return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1] in ("kernel", "embedding")

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(config: OptimizerConfig, steps: int, count_offset: int = 0) -> optax.GradientTransformation:
    """Clipping then AdamW; the schedule reads the optimizer's step count minus `count_offset`.

    A phase that carries the previous phase's optimizer state inherits its count, so it passes that phase's end as
    `count_offset` to start its own schedule at zero.
    """
    schedule = learning_rate_schedule(config, steps)
    if count_offset:
        schedule = (lambda base: lambda count: base(count - count_offset))(schedule)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(schedule, config.b1, config.b2, config.eps, weight_decay=config.weight_decay,
                                   mask=decay_mask))


def token_losses(graphdef: nnx.GraphDef, params: nnx.State, stream: Mapping[str, jax.Array]) -> jax.Array:
    """Next-token cross-entropy at every position [B, T] of one task's batch (unweighted)."""
    logits_BTV = nnx.merge(graphdef, params)(stream["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, stream["targets"])


def loss_sums(graphdef, params, batch, task_weights: Mapping[str, float]):
    """(sum over tasks of weight * summed token loss, {task: (summed loss, loss tokens)}) of one batch."""
    total, per_task = 0.0, {}
    for task, stream in batch.items():
        summed = jnp.sum(token_losses(graphdef, params, stream) * stream["weights"])
        per_task[task] = (summed, jnp.sum(stream["weights"]))
        total = total + task_weights.get(task, 1.0) * summed
    return total, per_task


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    learning_rate_fn: Callable[[jax.Array], jax.Array], *,
                    task_weights: Mapping[str, float] | None = None, grad_accum_steps: int = 1):
    """A pure `(state, batch) -> (state, metrics)`; batch is {task: {"inputs", "targets", "weights"} [B, T]}.

    The loss is the (task-weighted) sum of token losses over every loss token of the batch, divided by the number of
    loss tokens: answers are a small share of a mixed batch's tokens, and the notes measured that share to matter.
    With `grad_accum_steps` > 1 the batch is cut into that many micro-batches whose gradient sums are added before the
    one division, so the update equals the full batch's. `learning_rate_fn(step)` is reported as a metric.
    """
    task_weights = dict(task_weights or {})

    def grads_of(params, batch):
        return jax.grad(lambda p: loss_sums(graphdef, p, batch, task_weights), has_aux=True)(params)

    def accumulated(params, batch):
        def micro(x):
            if x.shape[0] % grad_accum_steps:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps={grad_accum_steps}")
            return x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:])

        def add(carry, micro_batch):
            grads, per_task = grads_of(params, micro_batch)
            return jax.tree.map(jnp.add, carry, (grads, per_task)), None

        micro_batches = jax.tree.map(micro, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grads_of, params, first))
        return jax.lax.scan(add, zeros, micro_batches)[0]

    def train_step(state: TrainState, batch):
        grads, per_task = (grads_of if grad_accum_steps == 1 else accumulated)(state.params, batch)
        tokens = sum(n for _, n in per_task.values())
        scale = 1.0 / jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        metrics = {"loss": sum(task_weights.get(t, 1.0) * s for t, (s, _) in per_task.items()) * scale,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": learning_rate_fn(state.step)}
        metrics.update({f"loss_{t}": s / jnp.maximum(n, 1.0) for t, (s, n) in per_task.items()})
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), metrics

    return train_step


def jit_steps(train_step, mesh: jax.sharding.Mesh | None = None):
    """K train steps in one jitted call: `(state, batches) -> (state, metrics)`, every leaf of both stacked [K, ...].

    The state is donated: its buffers become the new state's, so a step never holds two copies of the parameters
    and optimizer moments. On a `mesh` the step runs where its inputs are (the state laid out by name, the batches
    split by rows: `sharding.state_shardings`, `sharding.batch_sharding`), keeps the new state in the same layout,
    splits the activations by rows, and returns replicated metrics. This is the one jit of the train step: the
    training loop, launch.plan and the tests all call it.
    """
    def steps(state, batches):
        state, metrics = jax.lax.scan(train_step, state, batches)
        return sharding.constrain_by_name(state), sharding.constrain_replicated(metrics)

    return jax.jit(sharding.on_mesh(steps, mesh), donate_argnums=0)


def init_state(params: nnx.State, tx: optax.GradientTransformation, step: int = 0) -> TrainState:
    return TrainState(params, tx.init(params), jnp.asarray(step, jnp.int32))
