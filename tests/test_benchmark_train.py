"""launch.benchmark_train on the tiny preset: the JSON of the three rates, and a bad flag in one line."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(*args):
    return subprocess.run([sys.executable, "-m", "launch.benchmark_train", "--config=configs/default.py:tiny", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_benchmark_train_writes_the_rates(tmp_path):
    out = tmp_path / "bench.json"
    done = launch("--windows=1", f"--json_out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    rates = json.loads(out.read_text())
    assert set(rates) == {"tokens_per_s", "single_step_tokens_per_s", "inline_tokens_per_s"}
    assert all(rate > 0 for rate in rates.values())
    assert "inline / library" in done.stdout


def test_benchmark_train_rejects_zero_windows(tmp_path):
    out = tmp_path / "bench.json"
    done = launch("--windows=0", f"--json_out={out}")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: --windows=0 is invalid")
    assert not out.exists()
