"""A multi-host job in miniature: two JAX processes of two CPU devices each (tests/multiprocess_cases.py) train the
tiny preset on one data 2 x fsdp 2 mesh, trace it and save the trace; every parameter is split across the two
processes. Checked here, in this one-device process: process 0 alone wrote the files, and what it wrote agrees with
the same run on one device.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import tiny_run_config
from factrecall_jax import experiment, metrics, study, trace
from factrecall_jax.data import pairs as pairs_lib

TESTS = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("multiprocess"))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
    port = str(_free_port())
    processes = [subprocess.Popen([sys.executable, os.path.join(TESTS, "multiprocess_cases.py"), str(i), port, workdir],
                                  env=env, cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-5000:]}"
    return workdir


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_device") / "run")
    experiment.train(tiny_run_config(), workdir, log=lambda *_: None)
    return workdir


def test_metrics_written_once_and_equal_to_one_device(two_process_run, one_device_run):
    multi = metrics.read_metrics(os.path.join(two_process_run, "run", "metrics.jsonl"))
    single = metrics.read_metrics(os.path.join(one_device_run, "metrics.jsonl"))
    assert [r["step"] for r in multi] == [r["step"] for r in single] == [0, 4, 8]  # no record twice
    for m, s in zip(multi, single):
        numbers = lambda record: {k: v for k, v in record.items() if isinstance(v, float)}  # noqa: E731
        assert numbers(m) == pytest.approx(numbers(s), rel=1e-5) and m.get("phase") == s.get("phase")
        assert m.get("eval") == s.get("eval")
    assert not [name for name in os.listdir(os.path.join(two_process_run, "run")) if name.endswith(".tmp")]


def test_checkpoints_saved_across_processes_restore_on_one_device(two_process_run, one_device_run):
    run = experiment.Run.load(one_device_run)
    multi, single = run.params(8, os.path.join(two_process_run, "run")), run.params(8)
    for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_trace_gathered_and_saved_by_process_0_equals_one_device(two_process_run, one_device_run):
    run = experiment.Run.load(one_device_run)
    pairs = pairs_lib.fact_pairs(run.tokenized, run.tokenizer.pad_token_id, "qa_train", 4, seed=run.config.seed)
    expected, records = study.trace_run(run, pairs, num_checkpoints=2, chunk_size=4, log=lambda *_: None)
    saved, metadata = trace.load(os.path.join(two_process_run, "trace.safetensors"), run.abstract_params)
    assert [r["step"] for r in json.loads(metadata["checkpoints"])] == [r["step"] for r in records] == [4, 8]
    for field in ("bio_abs", "qa_abs", "cross", "pair_dot", "bio_sq_norm", "qa_sq_norm", "layer_pair_dot"):
        for a, b in zip(jax.tree.leaves(getattr(saved, field)), jax.tree.leaves(getattr(expected, field))):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-3, atol=1e-6, err_msg=field)
