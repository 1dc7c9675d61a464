"""The runnable documentation: examples/ and the end-to-end block of docs/api.md run as written."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code_or_path, *args):
    command = [sys.executable, *((code_or_path,) if code_or_path.endswith(".py") else ("-c", code_or_path)), *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_trace_your_model_matches_a_loop_of_grad_for_each_model():
    done = _run(os.path.join("examples", "trace_your_model.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    errors = re.findall(r"equals a loop of jax.grad to (\S+) \(relative\)", done.stdout)
    assert len(errors) == 3 and all(float(e) < 1e-4 for e in errors), done.stdout
    assert "pair_statistics agrees: True" in done.stdout


def test_the_api_reference_end_to_end_block_runs():
    with open(os.path.join(REPO, "docs", "api.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"## The trace of the library's own models, end to end\n```python\n(.*?)```", text, re.S)
    done = _run(block.group(1))
    assert done.returncode == 0, done.stderr[-3000:]
    layers, cosine = done.stdout.strip().rsplit(" ", 1)
    assert layers.count("'count'") == 2 and -1 <= float(cosine) <= 1, done.stdout
