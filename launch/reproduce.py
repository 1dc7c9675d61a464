"""The main job: two-stage vs mixed training from one init, evaluated, with summary.json, report.md and figures.

    python -m launch.reproduce --config=configs/default.py --workdir=runs/default

Mixed trains once; two-stage trains stage 1 once and forks stage 2 at each learning rate of
config.reproduce.stage2_learning_rates; then the gradient trace, shared parameters, interventions and consistency
of mixed and the fairest two-stage run (config.trace). Started again on the same work directory, every run resumes.
"""
import jax
from absl import flags
from ml_collections import config_flags

from factrecall_jax import cli, configuration, plan, sharding, study

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (created; resumed if it holds runs).", required=True)
_SKIP_MEMORY_CHECK = flags.DEFINE_bool("skip_memory_check", False, "Start without compiling the plan against the "
                                       "device's memory first (plan.check).")
flags.mark_flag_as_required("config")


def main(_):
    sharding.initialize_distributed(_CONFIG.value.distributed)  # before any other JAX call
    config = configuration.read(_CONFIG.value, "reproduce")  # before anything is written
    print(f"devices: {jax.devices()}")
    if not _SKIP_MEMORY_CHECK.value:
        plan.check(config, "reproduce")  # before any weight is read
    study.reproduce(config, _WORKDIR.value)


if __name__ == "__main__":
    cli.launch(main)
