"""Evaluates a trained run, or a config's model before any training (a pretrained checkpoint zero-shot): QA exact
match on every split and BIO recall, overall and per attribute.

    python -m launch.evaluate --workdir=runs/mixed [--step=2000]          # writes eval_step<N>.json into the run
    python -m launch.evaluate --config=configs/llama32_1b.py [--config.init_from=DIR] [--out=zero_shot.json]

Prints a table; a trained run's evaluation is written into its work directory, a config's to --out when given.
"""
import json
import os

from absl import flags
from ml_collections import config_flags

from factrecall_jax import checkpoint, cli, configuration, errors, experiment, sharding
from factrecall_jax.data import ATTRIBUTES

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory written by launch.train.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Instead of --workdir: evaluate this config's model as it "
                                          "starts (init_from, or its seeded random init).", lock_config=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the last one).")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON (default: <workdir>/eval_step<N>.json; with --config, "
                                        "nowhere).")


def main(_):
    if (_WORKDIR.value is None) == (_CONFIG.value is None):
        raise errors.InvalidValue("give --workdir (a trained run) or --config (its starting model), not both")
    if _CONFIG.value is not None:
        if _STEP.value is not None:
            raise errors.InvalidValue("--step needs --workdir: a config's model has no checkpoints")
        run = experiment.Run(configuration.read(_CONFIG.value, "train"))
        step, params, out = 0, run.init_params(), _OUT.value
        print(f"zero-shot: {run.given.init_from or 'a random init of config.model'}")
    else:
        run = experiment.Run.load(_WORKDIR.value)
        step = checkpoint.saved_steps(_WORKDIR.value)[-1] if _STEP.value is None else _STEP.value
        params = run.params(step)
        out = _OUT.value or os.path.join(_WORKDIR.value, f"eval_step{step}.json")
    result = run.evaluator(params)
    print(f"step {step}")
    print(f"{'split':<20} {'all':>6} " + " ".join(f"{a[:12]:>12}" for a in ATTRIBUTES))
    for split, per_attribute in result["per_attribute"].items():
        print(f"{split:<20} {result[f'{split}_accuracy']:>6.3f} "
              + " ".join(f"{per_attribute.get(a, float('nan')):>12.3f}" for a in ATTRIBUTES))
    if out and sharding.is_writer():
        cli.atomic_write(out, json.dumps({"step": step, **result}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    cli.launch(main)
