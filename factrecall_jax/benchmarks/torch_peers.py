"""PyTorch's per-example gradient tools on a transformers checkpoint, contracted as the trace contracts: the peers
the lean trace is timed and checked against.

  torch.func: torch.func.vmap(torch.func.grad(loss)), eager attention (sdpa has no vmap batching rule);
  opacus: Opacus' GradSampleModule, hooks that build per-sample gradients from activations and output gradients
    (functorch for modules without a grad sampler, e.g. LlamaRMSNorm); sdpa attention.
Both use the loss of trace.example_loss, go through chunks of pairs and return the same pair dots as the trace.
"""
import os
import re
import warnings

import jax
import numpy as np

from factrecall_jax.benchmarks import measure


def _example_losses(logits, targets, weights):
    """trace.example_loss of each row."""
    import torch

    ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), reduction="none")
    return (ce.view(targets.shape) * weights).sum(-1) / weights.sum(-1).clamp(min=1.0)


def _func_grads(hf):
    """rows -> {name: [C, ...] per-example gradients} by torch.func."""
    import torch

    params = {k: v.detach() for k, v in hf.named_parameters()}

    def loss(p, inputs, targets, weights):
        logits = torch.func.functional_call(hf, p, (), {"input_ids": inputs[None], "use_cache": False}).logits
        return _example_losses(logits, targets[None], weights[None])[0]

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))
    return lambda rows: grads(params, *rows)


def _opacus_grads(hf):
    """rows -> {name: [C, ...] per-example gradients} by Opacus' hooks."""
    from opacus import GradSampleModule

    # its hooks skip eval mode; the models have no dropout
    module = GradSampleModule(hf.train(), loss_reduction="sum", strict=False)
    named = list(hf.named_parameters())

    def grads(rows):
        inputs, targets, weights = rows
        with warnings.catch_warnings():  # its hook on the embedding fires on output gradients: as intended
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            _example_losses(module(input_ids=inputs, use_cache=False).logits, targets, weights).sum().backward()
        out = {k: p.grad_sample for k, p in named}
        for _, p in named:
            p.grad_sample = p.grad = None
        return out

    return grads


def _trace(hf, grads_fn, bio_t, qa_t, chunk: int, repeats: int, device: str) -> dict:
    """Times the chunked per-example gradients and their contraction (|g_bio|, |g_qa|, g_bio * g_qa sums; per-pair
    and per-layer dots) as the trace computes them."""
    import torch

    names = [k for k, _ in hf.named_parameters()]
    layer_of = [int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", k)) else -1 for k in names]
    n, num_layers = len(bio_t[0]), hf.config.num_hidden_layers

    @torch.no_grad()
    def contract(gb, gq, sums, pair_dot, bio_sq, qa_sq, layer):
        for i, k in enumerate(names):
            b, q = gb[k].float(), gq[k].float()
            sums[0][k] += b.abs().sum(0)
            sums[1][k] += q.abs().sum(0)
            sums[2][k] += (b * q).sum(0)
            dots = [(x * y).flatten(1).sum(1) for x, y in ((b, q), (b, b), (q, q))]
            for total, d in zip((pair_dot, bio_sq, qa_sq), dots):
                total += d
            if layer_of[i] >= 0:
                for total, d in zip(layer, dots):
                    total[:, layer_of[i]] += d

    def trace_once():
        sums = [{k: torch.zeros_like(v, dtype=torch.float32) for k, v in hf.named_parameters()} for _ in range(3)]
        pair_dot, bio_sq, qa_sq = (torch.zeros(n, device=device) for _ in range(3))
        layer = [torch.zeros(n, num_layers, device=device) for _ in range(3)]
        for s in range(0, n, chunk):
            gb = grads_fn([x[s:s + chunk] for x in bio_t])
            gq = grads_fn([x[s:s + chunk] for x in qa_t])
            contract(gb, gq, sums, pair_dot[s:s + chunk], bio_sq[s:s + chunk], qa_sq[s:s + chunk],
                     [x[s:s + chunk] for x in layer])
            del gb, gq
        if device == "cuda":
            torch.cuda.synchronize()
        return pair_dot

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds, pair_dot = measure.timed(trace_once, repeats)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with measure.RssPeak() as rss:
            seconds, pair_dot = measure.timed(trace_once, repeats)
        peak = rss.growth
    num_params = sum(v.numel() for v in hf.parameters())
    return {"seconds": seconds, "peak_bytes": peak, "grads_bytes": 2 * min(chunk, n) * num_params * 4,
            "pair_dot": pair_dot.cpu().numpy()}


def _has_opacus() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


def measure_peers(folder: str, bio: dict, qa: dict, *, dtype: str, chunk_size: int, repeats: int) -> dict:
    """Per-example gradient traces of the HF checkpoint in `folder` by torch.func and by Opacus.

    Args:
      folder: a Hugging Face folder that transformers' AutoModelForCausalLM loads.
      bio, qa: {"inputs", "targets", "weights"} arrays with a leading pair axis, as the trace takes them.
      dtype: "float32" or "bfloat16", the dtype the torch models hold their weights in.
      chunk_size: pairs per chunk (a chunk's whole-model per-example gradients are held at once).
      repeats: timed runs after one warm-up run.

    Returns:
      {"torch.func": r, "opacus": r}, r = {"seconds", "peak_bytes", "grads_bytes", "pair_dot"}: peak_bytes is
      torch.cuda's on a GPU and the growth of resident memory on a CPU. A peer that cannot run here is left out,
      with a printed reason.
    """
    try:
        import torch
        import transformers
    except ImportError:
        print("  torch peers: not run (torch or transformers is not installed)")
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and jax.default_backend() != "cpu":
        print(f"  torch peers: not run (JAX runs on {jax.default_backend()}, torch has no GPU here)")
        return {}
    torch.set_num_threads(os.cpu_count())
    transformers.logging.disable_progress_bar()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    bio_t, qa_t = ([torch.from_numpy(np.asarray(rows[k], np.float32 if k == "weights" else np.int64)).to(device)
                    for k in ("inputs", "targets", "weights")] for rows in (bio, qa))  # ids as torch wants them
    results = {}
    for name, attention, grads_fn in (("torch.func", "eager", _func_grads), ("opacus", "sdpa", _opacus_grads)):
        if name == "opacus" and not _has_opacus():
            print("  opacus: not run (opacus is not installed)")
            continue
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation=attention).to(device).eval()
        results[name] = _trace(hf, grads_fn(hf), bio_t, qa_t, chunk_size, repeats, device)
        del hf
        measure.release_freed_memory()  # so that the next peer's resident-memory growth starts from what is in use
    return results
