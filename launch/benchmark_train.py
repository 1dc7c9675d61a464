"""Tokens per second of the library's train step, next to a plain value_and_grad + optax loop on the same model
(benchmarks.train.throughput says how).

    python -m launch.benchmark_train --config=configs/default.py [--windows=5] [--json_out=bench.json]
"""
import json

from absl import flags
from ml_collections import config_flags

from factrecall_jax import cli, errors
from factrecall_jax.benchmarks import train as train_bench

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py.", lock_config=True)
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timed windows per variant (after one untimed compile window).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write {tokens_per_s, inline_tokens_per_s, ...} here.")
flags.mark_flag_as_required("config")


def main(_):
    if _WINDOWS.value < 1:
        raise errors.InvalidValue(f"--windows={_WINDOWS.value} is invalid: expected at least 1")
    rates = train_bench.throughput(_CONFIG.value, _WINDOWS.value)
    if _JSON_OUT.value:
        cli.atomic_write(_JSON_OUT.value, json.dumps(rates, indent=2))


if __name__ == "__main__":
    cli.launch(main)
