"""The main job's outputs: summary.json, report.md and PNG figures of two-stage vs mixed training."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

from factrecall_jax.data import ATTRIBUTES  # noqa: E402

# The fairest two-stage model must still know its biographies and its training questions: a stage 2 that erased
# the biographies would make mixed training win for the wrong reason.
FAIREST_MIN_BIO = 0.80
FAIREST_MIN_IN_DIST = 0.95


def fairest(sweep: list[dict]) -> dict | None:
    """The sweep entry with the best held-out QA among those keeping BIO recall and in-distribution QA high."""
    eligible = [e for e in sweep
                if e["bio_accuracy"] >= FAIREST_MIN_BIO and e["qa_train_accuracy"] >= FAIREST_MIN_IN_DIST]
    return max(eligible, key=lambda e: e["qa_test_accuracy"], default=None)


def _rows(summary):
    yield "mixed", summary["mixed"]
    if summary["two_stage"] is not None:
        yield f"two-stage, fairest (stage-2 LR {summary['two_stage']['stage2_lr']:g})", summary["two_stage"]
    for entry in summary["two_stage_sweep"]:
        yield f"two-stage, stage-2 LR {entry['stage2_lr']:g}", entry


def results_table(summary: dict) -> str:
    """A markdown table: held-out QA, in-distribution QA and BIO recall of every run."""
    lines = ["| run | held-out QA | in-dist QA | BIO recall |", "|---|---|---|---|"]
    lines += [f"| {name} | {e['qa_test_accuracy']:.3f} | {e['qa_train_accuracy']:.3f} | {e['bio_accuracy']:.3f} |"
              for name, e in _rows(summary)]
    return "\n".join(lines)


def per_attribute_table(summary: dict) -> str:
    """A markdown table of held-out QA accuracy per attribute."""
    lines = ["| run | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
    for name, e in _rows(summary):
        held_out = e["per_attribute"]["qa_test"]
        lines.append(f"| {name} | " + " | ".join(f"{held_out.get(a, float('nan')):.2f}" for a in ATTRIBUTES) + " |")
    return "\n".join(lines)


def findings(summary: dict, bio_value_dropout: float) -> str:
    """One paragraph that states what the numbers show, including where they fall short of the paper's contrast."""
    mixed, fair, sweep = summary["mixed"], summary["two_stage"], summary["two_stage_sweep"]
    text = (f"Mixed training answers {mixed['qa_test_accuracy']:.1%} of the questions about held-out people "
            f"(in-distribution {mixed['qa_train_accuracy']:.1%}, BIO recall {mixed['bio_accuracy']:.1%}). ")
    if fair is None:
        text += (f"No two-stage run kept BIO recall >= {FAIREST_MIN_BIO} and in-distribution QA >= "
                 f"{FAIREST_MIN_IN_DIST}, so there is no fair two-stage comparison in this sweep. ")
    else:
        gap = mixed["qa_test_accuracy"] - fair["qa_test_accuracy"]
        text += (f"The fairest two-stage model (stage-2 learning rate {fair['stage2_lr']:g}, BIO recall "
                 f"{fair['bio_accuracy']:.1%}, in-distribution {fair['qa_train_accuracy']:.1%}) answers "
                 f"{fair['qa_test_accuracy']:.1%}: {abs(gap) * 100:.1f} points {'below' if gap >= 0 else 'above'} "
                 "mixed. ")
    by_lr = sorted(sweep, key=lambda e: e["stage2_lr"])
    if len(by_lr) > 1:
        def series(key, fmt):
            return " -> ".join(format(e[key], fmt) for e in by_lr)

        text += (f"Across the stage-2 sweep (learning rates {series('stage2_lr', 'g')}), held-out accuracy goes "
                 f"{series('qa_test_accuracy', '.2f')}, BIO recall {series('bio_accuracy', '.2f')} and "
                 f"in-distribution accuracy {series('qa_train_accuracy', '.2f')}. ")
    if bio_value_dropout > 0:
        text += (f"These runs drop BIO value tokens with probability {bio_value_dropout:g}, an augmentation this tiny "
                 "model needs to key facts on the name; it raises both regimes (configs/plain.py is the control "
                 "without it). ")
    else:
        text += ("These runs use no BIO value dropout: the tiny model then keys later facts on the earlier values of "
                 "the same biography rather than on the name, which caps held-out accuracy for both regimes. ")
    text += "Allen-Zhu and Li measured 9.7% (two-stage) vs 86.6% (mixed) at 124M parameters"
    if fair is not None and fair["qa_test_accuracy"] > 0.25:
        text += (f"; here the fairest two-stage model reaches {fair['qa_test_accuracy']:.0%}, so the contrast is narrower "
                 "than theirs.")
    else:
        text += "."
    return text


def _plot_curves(ax, records, label, style):
    evals = [r for r in records if "eval" in r]
    steps = [r["step"] for r in evals]
    ax.plot(steps, [r["eval"]["qa_test_accuracy"] for r in evals], style, label=f"{label}: held-out QA")
    ax.plot(steps, [r["eval"]["qa_train_accuracy"] for r in evals], style, alpha=0.4,
            label=f"{label}: in-distribution QA")


def figures(out_dir: str, summary: dict, curves: dict[str, list[dict]]) -> list[str]:
    """Writes the three PNG figures into `out_dir`; returns their file names.

    curves: {"mixed": metrics.jsonl records, "two_stage": the fairest two-stage run's records (stage 1 then 2)}.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = []

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (label, records), style in zip(curves.items(), ("-o", "-s")):
        _plot_curves(ax, records, label.replace("_", "-"), style)
    if stage1 := [r["step"] for r in curves.get("two_stage", []) if r.get("phase") == "bio"]:
        ax.axvline(max(stage1), color="gray", ls=":", label="two-stage: QA starts")
    ax.set(xlabel="step", ylabel="exact match", ylim=(-0.02, 1.02), title="QA accuracy during training")
    ax.legend(fontsize=8)
    names.append(_save(fig, out_dir, "accuracy_vs_step.png"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.38
    runs = [("mixed", summary["mixed"])] + ([("two-stage (fairest)", summary["two_stage"])]
                                           if summary["two_stage"] else [])
    for k, (label, entry) in enumerate(runs):
        held_out = entry["per_attribute"]["qa_test"]
        ax.bar([i + (k - 0.5) * width for i in range(len(ATTRIBUTES))], [held_out.get(a, 0) for a in ATTRIBUTES],
               width, label=label)
    ax.set_xticks(range(len(ATTRIBUTES)), [a.replace("_", " ") for a in ATTRIBUTES], rotation=20)
    ax.set(ylabel="held-out exact match", ylim=(0, 1.05), title="Held-out QA accuracy per attribute")
    ax.legend(fontsize=8)
    names.append(_save(fig, out_dir, "per_attribute.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    by_lr = sorted(summary["two_stage_sweep"], key=lambda e: e["stage2_lr"])
    lrs = [e["stage2_lr"] for e in by_lr]
    ax.plot(lrs, [e["qa_test_accuracy"] for e in by_lr], "-o", label="held-out QA")
    ax.plot(lrs, [e["bio_accuracy"] for e in by_lr], "-s", label="BIO recall")
    ax.axhline(summary["mixed"]["qa_test_accuracy"], color="gray", ls="--", label="mixed: held-out QA")
    ax.set_xscale("log")
    ax.set(xlabel="stage-2 peak learning rate", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="Two-stage: held-out QA and BIO recall vs stage-2 LR")
    ax.legend(fontsize=8)
    names.append(_save(fig, out_dir, "stage2_sweep.png"))
    return names


def _save(fig, out_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=120)
    plt.close(fig)
    return name


def write(workdir: str, summary: dict, curves: dict[str, list[dict]], *, bio_value_dropout: float,
          examples: str = "") -> str:
    """Writes summary.json, figures/ and report.md into `workdir`; returns the report's text."""
    names = figures(os.path.join(workdir, "figures"), summary, curves)
    text = "\n\n".join([
        "# Two-stage vs mixed training: fact recall",
        results_table(summary),
        "Held-out QA accuracy per attribute:\n\n" + per_attribute_table(summary),
        findings(summary, bio_value_dropout),
        *(f"![{name}](figures/{name})" for name in names),
        *([examples] if examples else []),
        f"Wall time: {summary['wall_seconds']:.0f} s.",
    ]) + "\n"
    _write_atomic(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    _write_atomic(os.path.join(workdir, "report.md"), text)
    return text


def _write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)
