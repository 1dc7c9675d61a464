"""Traces a trained run: TracInCP cross-task gradients of paired BIO and QA examples over its checkpoints.

    python -m launch.trace --workdir=runs/mixed [--num_checkpoints=5] [--num_people=100] [--split=qa_train]
        [--chunk_size=32] [--top_fraction=0.01] [--out=runs/mixed/trace.safetensors] [--overwrite]

A forked stage-2 run is traced over its stage-1 checkpoints too. Writes the learning-rate-weighted sum of the traces
(`--out`, safetensors: `trace.load` reads it back) and `<out without .safetensors>.json`: the traced checkpoints, the
gradient consistency at each, and where the shared parameters of every rule sit (at --top_fraction). `launch.intervene`
reads the trace.
"""
import json
import os

from absl import flags

from factrecall_jax import analysis, cli, errors, experiment, sharding, study
from factrecall_jax.data import pairs as pairs_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory written by launch.train.", required=True)
_NUM_CHECKPOINTS = flags.DEFINE_integer("num_checkpoints", 5, "Checkpoints to trace, spread evenly over the run.")
_NUM_PEOPLE = flags.DEFINE_integer("num_people", 100, "People of --split to pair (each gives one pair per attribute); "
                                                      "all of them when the split has fewer, or when 0.")
_SPLIT = flags.DEFINE_string("split", "qa_train", "The QA split whose facts are paired with the biographies.")
_CHUNK_SIZE = flags.DEFINE_integer("chunk_size", 32, "Pairs whose per-example gradients exist at once.")
_TOP_FRACTION = flags.DEFINE_float("top_fraction", 0.01, "Top fraction of parameters for the shared statistics.")
_OUT = flags.DEFINE_string("out", None, "Output safetensors (default: <workdir>/trace.safetensors).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing trace.")


def json_path(out: str) -> str:
    """The summary written beside a trace: `<out without .safetensors>.json`."""
    return out.removesuffix(".safetensors") + ".json"


def main(_):
    workdir = _WORKDIR.value
    out = _OUT.value or os.path.join(workdir, "trace.safetensors")
    summary_path = json_path(out)
    if not _OVERWRITE.value:
        for path in (out, summary_path):
            if os.path.exists(path):
                raise errors.PathExists(f"{path} already exists; choose another --out, remove it, or pass --overwrite")
    analysis.check_fraction(_TOP_FRACTION.value, "--top_fraction")
    if _NUM_PEOPLE.value < 0:
        raise errors.InvalidValue(f"--num_people={_NUM_PEOPLE.value} is invalid: expected 0 (all) or a positive "
                                  "integer")
    if _CHUNK_SIZE.value < 1:
        raise errors.InvalidValue(f"--chunk_size={_CHUNK_SIZE.value} is invalid: expected a positive integer")
    plan = study.checkpoint_plan(workdir, _NUM_CHECKPOINTS.value)  # fails early on a run without checkpoints
    run = experiment.Run.load(workdir)
    config, tokenized, tokenizer = run.config, run.tokenized, run.tokenizer
    num_people = _NUM_PEOPLE.value or None
    if _SPLIT.value in tokenized:
        available = len(set(tokenized[_SPLIT.value]["person_id"]))
        if num_people is not None and num_people > available:
            print(f"note: {_SPLIT.value} has {available} people; pairing all of them (--num_people={num_people})")
            num_people = None
    fact_pairs = pairs_lib.fact_pairs(tokenized, tokenizer.pad_token_id, _SPLIT.value, num_people, seed=config.seed)
    num_pairs = len(fact_pairs["attribute"])
    print(f"tracing {num_pairs} pairs of {_SPLIT.value} at steps {[e['step'] for e in plan]} of {workdir}")

    combined, records = study.trace_run(run, fact_pairs, num_checkpoints=_NUM_CHECKPOINTS.value,
                                        chunk_size=_CHUNK_SIZE.value, log=print)
    shared = study.shared_statistics(study.shared_masks(combined, _TOP_FRACTION.value))
    summary = {
        "workdir": os.path.abspath(workdir),
        "checkpoints": [{"step": e["step"], "learning_rate": e["learning_rate"], "dir": os.path.abspath(e["dir"])}
                        for e in plan],
        "split": _SPLIT.value,
        "num_people": len(set(fact_pairs["person_id"].tolist())),
        "num_pairs": num_pairs,
        "chunk_size": _CHUNK_SIZE.value,
        "gradient_consistency": [{"step": r["step"], **r["gradient_consistency"]} for r in records],
        "top_fraction": _TOP_FRACTION.value,
        "shared": shared,
    }

    combined = sharding.to_host(combined)  # a collective: every process gathers, process 0 writes
    if sharding.is_writer():
        _write(combined, records, summary, out, summary_path)

    top_k = shared[analysis.SCOPES[0]][analysis.RULES[0]]["head_concentration"]["top_k"]
    print(f"{'scope':<7} {'rule':<14} {'shared':>8} {'fraction':>9} {'head gini':>10} {f'top-{top_k} heads':>13}")
    for scope in analysis.SCOPES:
        for rule in analysis.RULES:
            total, heads = shared[scope][rule]["total"], shared[scope][rule]["head_concentration"]
            print(f"{scope:<7} {rule:<14} {total['count']:>8} {total['fraction']:>9.4f} {heads['gini']:>10.3f} "
                  f"{heads['top_k_share']:>13.3f}")
    print(f"mean BIO-QA gradient cosine at step {records[-1]['step']}: "
          f"{records[-1]['gradient_consistency']['mean']:.3f}")
    if sharding.is_writer():
        print(f"wrote {out} and {summary_path}")


def _write(combined, records, summary, out, summary_path):
    """Both files appear together or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    partial = [out + ".partial", summary_path + ".partial"]
    try:
        study.save_trace(combined, records, partial[0])
        with open(partial[1], "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        os.replace(partial[0], out)
        os.replace(partial[1], summary_path)
    finally:
        for path in partial:
            if os.path.exists(path):
                os.remove(path)


if __name__ == "__main__":
    cli.launch(main)
