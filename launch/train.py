"""Trains one schedule in a work directory; run the same command again to resume from its last checkpoint.

    python -m launch.train --config=configs/default.py --workdir=runs/mixed
    python -m launch.train --config=configs/default.py --config.schedule=two_stage --workdir=runs/two_stage
    # a second stage 2 from the same stage 1:
    python -m launch.train --config=configs/default.py --config.schedule=two_stage \
        --config.two_stage.stage2_learning_rate=1e-3 --config.two_stage.fork_from=runs/two_stage --workdir=runs/lr1e-3

The work directory holds config.json, checkpoints/ and metrics.jsonl.
"""
import json

import jax
from absl import flags
from ml_collections import config_flags

from factrecall_jax import cli, configuration, experiment, plan, sharding

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if it holds a run).", required=True)
_SKIP_MEMORY_CHECK = flags.DEFINE_bool("skip_memory_check", False, "Start without compiling the plan against the "
                                       "device's memory first (plan.check).")
flags.mark_flag_as_required("config")


def main(_):
    sharding.initialize_distributed(_CONFIG.value.distributed)  # before any other JAX call
    config = configuration.read(_CONFIG.value, "train")  # before anything is written
    print(f"devices: {jax.devices()}")
    if not _SKIP_MEMORY_CHECK.value:
        plan.check(config, "train")  # before any weight is read
    final = experiment.train(config, _WORKDIR.value)
    print(json.dumps({k: v for k, v in final.items() if k != "per_attribute"}))


if __name__ == "__main__":
    cli.launch(main)
