"""Sharded training, tracing and checkpoints on 8 fake CPU devices, checked against one device.

The device count is fixed when JAX starts, and this pytest process has started it with one CPU device, so the cases
(tests/sharded_cases.py) run in one subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8. The XLA CPU
backend's optimizations are off there: these tiny programs then compile about twice as fast, and results stay exact.
"""
import os
import subprocess
import sys

CASES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sharded_cases.py")


def test_sharded_cases_on_8_cpu_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                     "--xla_llvm_disable_expensive_passes=true", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "pytest", CASES, "-q", "-p", "no:cacheprovider"], env=env,
                         cwd=os.path.dirname(os.path.dirname(CASES)), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"sharded cases failed:\n{run.stdout}\n{run.stderr}"
