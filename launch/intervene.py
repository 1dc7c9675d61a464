"""Causal tests of a run's shared parameters: ablate them (to zero, back to the init) or graft them from a donor run,
against random masks of the same size in every tensor, and measure recall again.

    python -m launch.intervene --workdir=runs/two_stage [--trace=runs/two_stage/trace.safetensors]
        [--rule=intersection] [--top_fraction=0.01] [--seed=0] [--out=runs/two_stage/interventions.json]
    # graft the shared parameters of another run (same data and init) into this one:
    python -m launch.intervene --workdir=runs/two_stage --donor=runs/mixed [--donor_trace=runs/mixed/trace.safetensors]

The traces come from `python -m launch.trace`. The final checkpoint of each run is used; the donor is ablated like the
run. Prints a table and writes the rows (every split's accuracy) as JSON.
"""
import dataclasses
import json
import os

from absl import flags
from flax import nnx

from factrecall_jax import analysis, checkpoint, cli, errors, experiment, sharding, study, trace

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory written by launch.train.", required=True)
_TRACE = flags.DEFINE_string("trace", None, "The run's trace (default: <workdir>/trace.safetensors).")
_RULE = flags.DEFINE_string("rule", "intersection", f"Which parameters are shared: {' or '.join(analysis.RULES)}.")
_SCOPE = flags.DEFINE_string("scope", "global", f"Where the top fraction is taken: {' or '.join(analysis.SCOPES)} "
                             "(within each parameter tensor).")
_TOP_FRACTION = flags.DEFINE_float("top_fraction", 0.01, "Top fraction of parameters the rule selects from.")
_DONOR = flags.DEFINE_string("donor", None, "A run of the same data and init whose shared parameters are grafted in.")
_DONOR_TRACE = flags.DEFINE_string("donor_trace", None, "The donor's trace (default: <donor>/trace.safetensors).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random control masks.")
_OUT = flags.DEFINE_string("out", None, "Output JSON (default: <workdir>/interventions.json).")

# Config fields that fix the facts and the init: a graft between runs that differ in one means nothing.
_SAME_FOR_GRAFT = ("seed", "data", "tokenizer", "model", "init_from")
_COLUMNS = (("held-out", "qa_test_accuracy"), ("in-dist", "qa_train_accuracy"), ("BIO", "bio_accuracy"))


def _trace_path(path: str | None, workdir: str, flag: str) -> str:
    path = path or os.path.join(workdir, "trace.safetensors")
    if not os.path.exists(path):
        raise errors.MissingPath(f"no trace at {path} (--{flag}): make it with `python -m launch.trace "
                                 f"--workdir={workdir}" + ("" if path == os.path.join(workdir, "trace.safetensors")
                                                           else f" --out={path}") + "`")
    return path


def _load_trace(path: str, params: nnx.State) -> tuple[trace.TraceResult, list[int]]:
    """The trace at `path` with the structure of `params`, and the steps it sums (trace.load checks that it fits)."""
    result, metadata = trace.load(path, params)
    return result, [r["step"] for r in json.loads(metadata.get("checkpoints", "[]"))]


def main(_):
    workdir, donor = _WORKDIR.value, _DONOR.value
    if _RULE.value not in analysis.RULES:
        raise errors.InvalidValue(f"--rule={_RULE.value!r} is invalid: expected one of {', '.join(analysis.RULES)}")
    if _SCOPE.value not in analysis.SCOPES:
        raise errors.InvalidValue(f"--scope={_SCOPE.value!r} is invalid: expected one of {', '.join(analysis.SCOPES)}")
    analysis.check_fraction(_TOP_FRACTION.value, "--top_fraction")
    if _DONOR_TRACE.value and not donor:
        raise errors.InvalidValue("--donor_trace needs --donor")
    config = experiment.load_config(workdir)
    trace_path = _trace_path(_TRACE.value, workdir, "trace")
    if donor:
        donor_config = experiment.load_config(donor)
        for field in _SAME_FOR_GRAFT:
            mine, theirs = getattr(config, field), getattr(donor_config, field)
            if mine != theirs:
                raise errors.InvalidValue(f"--donor={donor} differs from --workdir={workdir} in config.{field} "
                                          f"({theirs!r} vs {mine!r}): a graft needs runs of the same data and init")
        donor_trace_path = _trace_path(_DONOR_TRACE.value, donor, "donor_trace")

    run = experiment.Run.load(workdir)
    step = checkpoint.saved_steps(workdir)[-1]
    params = run.params(step)
    result, traced = _load_trace(trace_path, params)
    models, masks, sources = {"run": params}, {}, {"run": (workdir, step, trace_path, traced)}
    masks["run"] = analysis.shared_parameters(result, _TOP_FRACTION.value, _RULE.value, _SCOPE.value)
    if donor:
        donor_step = checkpoint.saved_steps(donor)[-1]
        donor_params = run.params(donor_step, donor)  # same data and init: checked above
        donor_result, donor_traced = _load_trace(donor_trace_path, donor_params)
        models["donor"], masks["donor"] = donor_params, analysis.shared_parameters(
            donor_result, _TOP_FRACTION.value, _RULE.value, _SCOPE.value)
        sources["donor"] = (donor, donor_step, donor_trace_path, donor_traced)
    for name, (path, final, trace_file, steps) in sources.items():
        print(f"{name}: {path} at step {final}; trace {trace_file} (steps {steps})")

    outcomes = study.intervention_table(models, {_SCOPE.value: masks}, run.evaluator, run.init_params(), _SEED.value,
                                        graft_pairs=(("run", "donor"),) if donor else ())

    print(f"{'model':<6} {'intervention':<17} {'mask':<7} {'count':>7} "
          + " ".join(f"{title:>9}" for title, _ in _COLUMNS))
    for o in outcomes:
        print(f"{o.model:<6} {o.label:<17} {o.mask:<7} {o.count:>7} "
              + " ".join(f"{o.accuracies.get(key, float('nan')):>9.3f}" for _, key in _COLUMNS))
    rows = [dataclasses.asdict(o) for o in outcomes]

    out = _OUT.value or os.path.join(workdir, "interventions.json")
    report = {name: {"workdir": os.path.abspath(path), "step": final, "trace": os.path.abspath(trace_file),
                     "traced_steps": steps} for name, (path, final, trace_file, steps) in sources.items()}
    report = {**report, "donor": report.get("donor"), "rule": _RULE.value, "scope": _SCOPE.value,
              "top_fraction": _TOP_FRACTION.value, "seed": _SEED.value, "rows": rows}
    if sharding.is_writer():
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        cli.atomic_write(out, json.dumps(report, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    cli.launch(main)
