"""The benchmarks behind BENCHMARKS.md, as functions of plain sizes that print their tables and return the figures;
launch/benchmark_trace.py and launch/benchmark_train.py parse the flags, call them and write the JSON.

  measure: timing, XLA's compiled peak, resident-memory growth, jax.profiler summaries (shared by both);
  trace: the gradient trace against a training step, the reference path and the torch peers, per model;
  torch_peers: per-example gradients from torch.func and Opacus on the same transformers checkpoint;
  train: tokens per second of the library's train step next to a textbook value_and_grad + optax loop.
"""
