"""How the benchmarks measure: the median time after a warm-up, XLA's compiled peak, the growth of resident memory
(torch on a CPU has no allocator statistics) and where a profiled program's time goes."""
import collections
import ctypes
import gc
import glob
import math
import os
import re
import statistics
import threading
import time

import jax

MB = 2**20


def timed(fn, repeats: int):
    """(median seconds of `repeats` calls after one warm-up call that compiles, the last output)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def peak_bytes(compiled) -> int:
    """XLA's account of a compiled program: arguments + outputs + temporaries - aliased buffers (exact, known before
    running)."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def measure_jax(fn, args, repeats: int, max_peak: float = math.inf) -> dict:
    """{"peak_bytes", "compile_s", "seconds", "output", "compiled", "args"} of jax.jit(fn) on args, run only where its
    compiled peak is at most `max_peak` bytes (seconds and output None where not run)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    r = {"peak_bytes": peak_bytes(compiled), "compile_s": time.perf_counter() - start, "seconds": None,
         "output": None, "compiled": compiled, "args": args}
    if r["peak_bytes"] <= max_peak:
        r["seconds"], r["output"] = timed(lambda: jax.block_until_ready(compiled(*args)), repeats)
    return r


def device_memory() -> float:
    """Bytes of the default device: an accelerator's own, or physical memory on a CPU."""
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class RssPeak:
    """Peak growth of this process's resident memory while inside the block (sampled every 5 ms)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.growth = self.peak - self.base


def release_freed_memory():
    """Hands freed heap memory back to the OS (glibc keeps it otherwise), where the C library can, so that the next
    resident-memory growth starts from what is in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def profile(folder: str, compiled, args, parts, rest: str, top: int = 8) -> dict:
    """One run of a compiled program under jax.profiler (the trace lands in `folder`, for TensorBoard or Perfetto),
    and where its time went: XLA op time summed over threads, by `parts` ((name scope, part), the first that matches;
    `rest` for the others), and the costliest ops."""
    ops = {}  # HLO instruction name -> its op_name metadata
    for line in compiled.as_text().splitlines():
        if match := re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', line):
            ops.setdefault(match.group(1), match.group(2))
    with jax.profiler.trace(folder):
        jax.block_until_ready(compiled(*args))
    xspace = max(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(xspace).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in ops:
                    seconds[event.name] += event.duration_ns / 1e9
                    calls[event.name] += 1
    by_part = collections.Counter()
    for name, s in seconds.items():  # a scope appears as "/scope/" or, in the backward pass, as "(scope)"
        by_part[next((part for scope, part in parts if re.search(rf"[/(]{scope}[/)]", ops[name])), rest)] += s
    return {"op_seconds": sum(seconds.values()), "parts": dict(by_part),
            "top_ops": [{"op": name, "seconds": s, "calls": calls[name], "op_name": ops[name]}
                        for name, s in seconds.most_common(top)]}


def print_profile(name: str, p: dict):
    total = p["op_seconds"]
    if not total:
        print(f"  {name}: the profile has no events named like the program's XLA ops")
        return
    print(f"  {name}: {total:.2f} s of XLA op time (summed over threads): "
          + ", ".join(f"{part} {s:.2f} s ({s / total:.0%})" for part, s in p["parts"].items()) + "; costliest ops:")
    for op in p["top_ops"]:
        print(f"    {op['seconds']:6.2f} s {op['calls']:4d} calls  {op['op']}: {op['op_name'][-90:]}")
