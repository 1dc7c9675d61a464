"""Tokens per second of the library's train step, next to a plain value_and_grad + optax loop on the same model.

All variants train on the same mixed batches from the same init in one process. Each is compiled, then timed over
several windows of `config.train.steps_per_call` steps; the median window counts. Tokens are non-padding targets.
  library: train.make_train_step fused K steps per call (train.jit_steps), as launch.train runs it;
  library, 1 step per call: the same step jitted alone, so its ratio to the inline loop is the framework's overhead;
  inline: the textbook loop written here, one jitted call per step.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from factrecall_jax import configuration, experiment, train
from factrecall_jax.benchmarks import measure
from factrecall_jax.data import schedules


def inline_step(graphdef, tx):
    """The textbook step: mean token loss over the mixed batch, value_and_grad, optax update."""

    @jax.jit
    def step(params, opt_state, batch):
        def loss_fn(p):
            model = nnx.merge(graphdef, p)
            total, count = 0.0, 0.0
            for stream in batch.values():
                ce = optax.softmax_cross_entropy_with_integer_labels(model(stream["inputs"]), stream["targets"])
                total, count = total + jnp.sum(ce * stream["weights"]), count + jnp.sum(stream["weights"])
            return total / count

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def throughput(config, windows: int = 5) -> dict:
    """Times the three variants on `config` (its mixed schedule's first batches), prints them and returns
    {"tokens_per_s", "single_step_tokens_per_s", "inline_tokens_per_s"}.

    Args:
      config: a configs/ file's ConfigDict (checked here) or a configuration.RunConfig.
      windows: timed windows of `config.train.steps_per_call` steps per variant, after one that compiles.
    """
    config = configuration.read(config).replace(schedule="mixed")
    run = experiment.Run(config)
    tables, tokenizer, phases = run.tables, run.tokenizer, experiment.schedule(run.config)
    k = config.train.steps_per_call
    stacked = schedules.phase_batches(phases, 0, 0, k, tables, config.seed, config.train.bio_value_dropout)
    stacked = jax.device_put(stacked)
    singles = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(k)]
    tokens = sum(int(np.count_nonzero(np.asarray(s["targets"]) != tokenizer.pad_token_id)) for s in stacked.values())
    graphdef, params = run.graphdef, run.init_params()
    tx, lr_fn = experiment.phase_optimizer(phases, 0)
    print(f"model: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M parameters; "
          f"{k} steps per window, {tokens} tokens; devices: {jax.devices()}")

    step = train.make_train_step(graphdef, tx, lr_fn, grad_accum_steps=config.train.grad_accum_steps,
                                 task_weights=dict(config.train.task_weights))
    fused, single = train.jit_steps(step), jax.jit(step, donate_argnums=0)
    # each variant gets its own copy: donation deletes the buffers a step consumes
    state = {name: train.init_state(jax.tree.map(jnp.copy, params), tx) for name in ("fused", "single")}

    def run_fused():
        state["fused"], metrics = fused(state["fused"], stacked)
        jax.block_until_ready(metrics)

    def run_single():
        for batch in singles:
            state["single"], metrics = single(state["single"], batch)
        jax.block_until_ready(metrics)

    inline = inline_step(graphdef, tx)
    plain = {"params": jax.tree.map(jnp.copy, params)}
    plain["opt_state"] = tx.init(plain["params"])

    def run_inline():
        for batch in singles:
            plain["params"], plain["opt_state"], loss = inline(plain["params"], plain["opt_state"], batch)
        jax.block_until_ready(loss)

    rates = {name: tokens / measure.timed(run_window, windows)[0] for name, run_window in (
        ("tokens_per_s", run_fused), ("single_step_tokens_per_s", run_single), ("inline_tokens_per_s", run_inline))}
    print(f"library, {k} steps per call:  {rates['tokens_per_s']:>10,.0f} tokens/s")
    print(f"library, 1 step per call:  {rates['single_step_tokens_per_s']:>10,.0f} tokens/s")
    print(f"inline loop:               {rates['inline_tokens_per_s']:>10,.0f} tokens/s")
    print(f"inline / library: {rates['inline_tokens_per_s'] / rates['tokens_per_s']:.2f}x (fused), "
          f"{rates['inline_tokens_per_s'] / rates['single_step_tokens_per_s']:.2f}x (1 step per call)")
    return rates
