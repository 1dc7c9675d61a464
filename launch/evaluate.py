"""Evaluates a trained run: QA exact match on every split and BIO recall, overall and per attribute.

    python -m launch.evaluate --workdir=runs/mixed [--step=2000]

Prints a table and writes eval_step<N>.json into the work directory.
"""
import json
import os

from absl import flags

from factrecall_jax import checkpoint, cli, experiment, sharding
from factrecall_jax.data import ATTRIBUTES

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory written by launch.train.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the last one).")


def main(_):
    run = experiment.Run.load(_WORKDIR.value)
    step = checkpoint.saved_steps(_WORKDIR.value)[-1] if _STEP.value is None else _STEP.value
    result = run.evaluator(run.params(step))
    print(f"step {step}")
    print(f"{'split':<20} {'all':>6} " + " ".join(f"{a[:12]:>12}" for a in ATTRIBUTES))
    for split, per_attribute in result["per_attribute"].items():
        print(f"{split:<20} {result[f'{split}_accuracy']:>6.3f} "
              + " ".join(f"{per_attribute.get(a, float('nan')):>12.3f}" for a in ATTRIBUTES))
    if sharding.is_writer():
        path = os.path.join(_WORKDIR.value, f"eval_step{step}.json")
        cli.atomic_write(path, json.dumps({"step": step, **result}, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    cli.launch(main)
