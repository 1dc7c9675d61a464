"""The cross-task gradient trace: per-example gradients of paired BIO and QA examples, contracted parameter by
parameter (Zhang et al. 2025), summed over checkpoints TracIn-style.

For pairs i (BIO example i and QA example i state the same fact of the same person), with g the gradient of one
example's loss with respect to every parameter:
  bio_abs = sum_i |g_bio_i|,  qa_abs = sum_i |g_qa_i|,  cross = sum_i g_bio_i * g_qa_i   (trees like the parameters)
  pair_dot[i] = g_bio_i . g_qa_i,  bio_sq_norm[i] = |g_bio_i|^2,  qa_sq_norm[i] = |g_qa_i|^2      ([n])
  layer_pair_dot[i, l], layer_bio_sq_norm[i, l], layer_qa_sq_norm[i, l]: the same within layer l of the stacked
  parameters (`stacking`: the "layers" axis in their metadata)                                     ([n, L])

    result = trace.cross_task_trace(loss, model, bio_batch, qa_batch)   # loss(model, example) -> scalar
    result = trace.cross_task_trace(loss, params, bio_batch, qa_batch)  # loss(params, example): linen, plain JAX
    stats = trace.pair_statistics(loss, model, bio_batch, qa_batch)     # the per-pair fields alone
    trace.register(MyModule, trace.Rule(...))                           # factor a module type of your own
"""
from factrecall_jax.trace.engine import METHODS, cross_task_trace, jit_pair_statistics, jit_trace, pair_statistics
from factrecall_jax.trace.lm import example_loss, lm_loss
from factrecall_jax.trace.results import PairStatistics, TraceResult, combine, load, save
from factrecall_jax.trace.rules import DIRECT, OneHot, Rule, Term, register, rule_for

__all__ = ["DIRECT", "METHODS", "OneHot", "PairStatistics", "Rule", "Term", "TraceResult", "combine",
           "cross_task_trace", "example_loss", "jit_pair_statistics", "jit_trace", "lm_loss", "load", "pair_statistics",
           "register", "rule_for", "save"]
