"""The main job's outputs: summary.json, report.md and PNG figures of two-stage vs mixed training."""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)
import numpy as np  # noqa: E402

from factrecall_jax import cli  # noqa: E402
from factrecall_jax.data import ATTRIBUTES  # noqa: E402
from factrecall_jax.evaluate import COMPOSED_KEY, ONE_HOP_KEY  # noqa: E402
from factrecall_jax.interventions import Outcome  # noqa: E402

# The fairest two-stage model must still know its biographies and its training questions: a stage 2 that erased
# the biographies would make mixed training win for the wrong reason.
FAIREST_MIN_BIO = 0.80
FAIREST_MIN_IN_DIST = 0.95
# The report says a model stores both hops of the employer's city but does not compose them when at least this many
# held-out people know both hops and fewer than this share of them get the city answered.
COMPOSITION_MIN_PEOPLE = 20
COMPOSITION_MAX_ANSWERED = 0.5


def fairest(sweep: list[dict]) -> dict | None:
    """The sweep entry with the best held-out QA among those keeping BIO recall and in-distribution QA high."""
    eligible = [e for e in sweep
                if e["bio_accuracy"] >= FAIREST_MIN_BIO and e["qa_train_accuracy"] >= FAIREST_MIN_IN_DIST]
    return max(eligible, key=lambda e: e["qa_test_accuracy"], default=None)


def stage2_setting(entry: dict) -> str:
    """'LR 0.0003, wd 0.1': the stage-2 optimizer settings of a sweep entry."""
    return f"LR {entry['stage2_lr']:g}, wd {entry['stage2_weight_decay']:g}"


def _headline(summary):
    """Mixed and the fairest two-stage run, the two the findings compare."""
    yield "mixed", summary["mixed"]
    if summary["two_stage"] is not None:
        yield f"two-stage, fairest (stage 2 {stage2_setting(summary['two_stage'])})", summary["two_stage"]


def _rows(summary):
    yield from _headline(summary)
    for entry in summary["two_stage_sweep"]:
        yield f"two-stage, stage 2 {stage2_setting(entry)}", entry


HELD_OUT_HEADER = "held-out QA, overall | held-out one-hop mean | held-out employer's city"


def _held_out(e: dict) -> str:
    """Held-out QA's cells: overall, the one-hop mean and the employer's city (they fail for different reasons)."""
    return f"{e['qa_test_accuracy']:.3f} | {e[ONE_HOP_KEY]:.3f} | {e[COMPOSED_KEY]:.3f}"


def results_table(summary: dict) -> str:
    """A markdown table: held-out QA (overall, one-hop mean, employer's city), in-distribution QA and BIO recall of
    every run."""
    lines = [f"| run | {HELD_OUT_HEADER} | in-dist QA | BIO recall |", "|---" * 6 + "|"]
    lines += [f"| {name} | {_held_out(e)} | {e['qa_train_accuracy']:.3f} | {e['bio_accuracy']:.3f} |"
              for name, e in _rows(summary)]
    return "\n".join(lines)


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"


def composition_table(summary: dict) -> str:
    """A markdown table of evaluate.composition per run: which hop of name -> employer -> city held-out people lack."""
    lines = ["| run | held-out people | employer answered | city completed from the biography | city answered | "
             "both hops known | city answered: both hops known | city answered: the others |", "|---" * 8 + "|"]
    for name, e in _rows(summary):
        c = e["composition"]
        cells = [c["people"], *map(_percent, (c["employer_answered"], c["city_completed"], c["city_answered"])),
                 c["both_known"]["people"], _percent(c["both_known"]["city_answered"]),
                 _percent(c["others"]["city_answered"])]
        lines.append(f"| {name} | " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def composition_findings(summary: dict) -> str:
    """A sentence per compared run: how many held-out people know both hops, and whether the city is then answered."""
    sentences = []
    for name, e in _headline(summary):
        c = e["composition"]
        both, others = c["both_known"], c["others"]
        answered = [f"{_percent(group['city_answered'])} of {label}" for label, group in
                    (("them", both), (f"the other {others['people']}", others)) if group["people"]]
        text = (f"{name[0].upper() + name[1:]}: {both['people']} of {c['people']} held-out people know both hops "
                "(the employer answered, the city completed from the biography); the city is answered for "
                + " and ".join(answered))
        if both["people"] >= COMPOSITION_MIN_PEOPLE and both["city_answered"] < COMPOSITION_MAX_ANSWERED:
            text += ": the model stores both facts but does not compose them"
        sentences.append(text + ".")
    return " ".join(sentences)


def per_attribute_table(summary: dict) -> str:
    """A markdown table of held-out QA accuracy per attribute."""
    lines = ["| run | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 1) + "|"]
    for name, e in _rows(summary):
        held_out = e["per_attribute"]["qa_test"]
        lines.append(f"| {name} | " + " | ".join(f"{held_out.get(a, float('nan')):.2f}" for a in ATTRIBUTES) + " |")
    return "\n".join(lines)


def _by_weight_decay(sweep: list[dict]) -> dict[float, list[dict]]:
    """{stage-2 weight decay: its sweep entries by learning rate}."""
    out = {}
    for entry in sorted(sweep, key=lambda e: (e["stage2_weight_decay"], e["stage2_lr"])):
        out.setdefault(entry["stage2_weight_decay"], []).append(entry)
    return out


def _declining(per_attribute: dict) -> bool:
    """Whether held-out accuracy falls along the biography's sentence order (first half above the second)."""
    values = [per_attribute.get(a, 0.0) for a in ATTRIBUTES]
    return np.mean(values[:3]) > np.mean(values[3:]) + 0.2


def _parts(e: dict) -> str:
    return f"one-hop mean {e[ONE_HOP_KEY]:.1%}, the employer's city {e[COMPOSED_KEY]:.1%}"


def augmentations(data_config, bio_value_dropout: float) -> list[str]:
    """The augmentations a run uses, in words (Physics 3.1's, and BIO value dropout); [] for bioS single."""
    c = data_config
    return [text for text, on in ((f"{c.bio_variants} biographies per person", c.bio_variants > 1),
                                  ("each biography's own sentence order", c.permute),
                                  ("the full name in every sentence", c.fullname),
                                  (f"BIO value dropout {bio_value_dropout:g}", bio_value_dropout > 0)) if on]


def findings(summary: dict, setting: dict) -> str:
    """One paragraph that states what the numbers show, including where they fall short of the paper's contrast.

    setting: {"augmentations" (`augmentations`), "qa_token_share" (of a mixed step's tokens), "qa_loss"} of the runs.
    """
    mixed, fair, sweep = summary["mixed"], summary["two_stage"], summary["two_stage_sweep"]
    text = ""
    if base := summary.get("base"):
        text += (f"Both regimes fine-tune one base model, trained (mixed) on {base['num_people']} other people, "
                 f"which answers {base['qa_test_accuracy']:.1%} of the questions about its own held-out people "
                 f"(in-distribution {base['qa_train_accuracy']:.1%}, BIO recall {base['bio_accuracy']:.1%}): the "
                 "paper's protocol, one pretrained model fine-tuned both ways. ")
    text += (f"Mixed training (QA {setting['qa_token_share']:.0%} of the training tokens, QA loss on "
            f"{'the whole question and answer' if setting['qa_loss'] == 'all' else 'the answer'}) answers "
            f"{mixed['qa_test_accuracy']:.1%} of the questions about held-out people ({_parts(mixed)}; "
            f"in-distribution {mixed['qa_train_accuracy']:.1%}, BIO recall {mixed['bio_accuracy']:.1%}). ")
    if fair is None:
        text += (f"No two-stage run kept BIO recall >= {FAIREST_MIN_BIO} and in-distribution QA >= "
                 f"{FAIREST_MIN_IN_DIST}, so there is no fair two-stage comparison in this sweep. ")
    else:
        gap = mixed["qa_test_accuracy"] - fair["qa_test_accuracy"]
        text += (f"The fairest two-stage model (stage 2 {stage2_setting(fair)}, BIO recall "
                 f"{fair['bio_accuracy']:.1%}, in-distribution {fair['qa_train_accuracy']:.1%}) answers "
                 f"{fair['qa_test_accuracy']:.1%} ({_parts(fair)}): {abs(gap) * 100:.1f} points "
                 f"{'below' if gap >= 0 else 'above'} mixed. ")
    for wd, entries in _by_weight_decay(sweep).items():
        if len(entries) > 1:
            def series(key, fmt):
                return " -> ".join(format(e[key], fmt) for e in entries)

            text += (f"Across stage-2 learning rates {series('stage2_lr', 'g')} at weight decay {wd:g}, held-out "
                     f"accuracy goes {series('qa_test_accuracy', '.2f')}, BIO recall {series('bio_accuracy', '.2f')} "
                     f"and in-distribution accuracy {series('qa_train_accuracy', '.2f')}. ")
    if setting["augmentations"]:
        text += (f"These runs use augmentation ({', '.join(setting['augmentations'])}): it makes the name a more "
                 "reliable key of every fact and raises both regimes, as Allen-Zhu and Li's augmentations make "
                 "two-stage training work too (configs/default.py is the run without it). ")
    else:
        text += "These runs use no augmentation: one biography per person, sentences in one fixed order. "
        if _declining(mixed["per_attribute"]["qa_test"]):
            in_order = " ".join(f"{mixed['per_attribute']['qa_test'].get(a, 0.0):.2f}" for a in ATTRIBUTES)
            text += (f"Mixed held-out accuracy falls along the biography's sentence order ({in_order}): the tiny model "
                     "keys later facts partly on the earlier values of the same biography rather than on the name "
                     "alone, the chaining Allen-Zhu and Li's probes find after BIO-only training, and mixed training "
                     "undoes it for the early facts only. The employer's city is a property of the employer, so a "
                     "held-out question about it needs two steps (name -> employer -> city). ")
    text += "Allen-Zhu and Li measured 9.7% (two-stage) vs 86.6% (mixed) at 124M parameters without augmentation"
    if fair is not None:
        text += (f"; here the contrast has the same sign and is {gap * 100:.0f} points wide, at "
                 f"{mixed['qa_test_accuracy']:.0%} vs {fair['qa_test_accuracy']:.0%}." if gap > 0 else
                 "; here mixed training does not beat the fairest two-stage model, unlike the paper.")
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
    for (wd, entries), alpha in zip(_by_weight_decay(summary["two_stage_sweep"]).items(), (1.0, 0.55, 0.3, 0.2)):
        lrs = [e["stage2_lr"] for e in entries]
        ax.plot(lrs, [e["qa_test_accuracy"] for e in entries], "-o", color="tab:blue", alpha=alpha,
                label=f"held-out QA, wd {wd:g}")
        ax.plot(lrs, [e["bio_accuracy"] for e in entries], "-s", color="tab:orange", alpha=alpha,
                label=f"BIO recall, wd {wd:g}")
    ax.axhline(summary["mixed"]["qa_test_accuracy"], color="gray", ls="--", label="mixed: held-out QA")
    ax.set_xscale("log")
    ax.set(xlabel="stage-2 peak learning rate", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="Two-stage: held-out QA and BIO recall vs stage-2 LR")
    ax.legend(fontsize=8)
    names.append(_save(fig, out_dir, "stage2_sweep.png"))
    return names


def _save(fig, out_dir, name, tight=True):
    if tight:
        fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=120)
    plt.close(fig)
    return name


def write(workdir: str, summary: dict, curves: dict[str, list[dict]], *, setting: dict, examples: str = "") -> str:
    """Writes summary.json, figures/ and report.md into `workdir`; returns the report's text. setting: as `findings`.

    With the sections of study.mechanisms in `summary` ("trace", "interventions", "consistency"), the report gains
    the shared parameters, the interventions and the consistency between formats.
    """
    figure_dir = os.path.join(workdir, "figures")
    names = figures(figure_dir, summary, curves)
    sections = [
        "# Two-stage vs mixed training: fact recall",
        results_table(summary),
        "Held-out QA accuracy per attribute:\n\n" + per_attribute_table(summary),
        "The employer's city hop by hop, per held-out person (name -> employer -> city; the city is completed from the "
        "biography when BIO recall, given the biography up to it, gets it right in each of the person's biographies):"
        "\n\n" + composition_table(summary),
        composition_findings(summary),
        findings(summary, setting),
        *(f"![{name}](figures/{name})" for name in names),
        *([examples] if examples else []),
    ]
    if "trace" in summary:
        top = next(iter(summary["trace"].values()))["top_fraction"]
        sections += [
            "## Inside the models: the cross-task gradient trace",
            *(f"Shared parameters, top {top:g} {SCOPE_WORDS[scope]} (intersection rule; count and share of each "
              "module group):\n\n" + shared_table(summary["trace"], scope=scope) for scope in SCOPE_WORDS),
            "Interventions on the final models (held-out = questions about people whose QA was never trained):\n\n"
            + interventions_table(summary["interventions"]),
            "Consistency between the BIO and QA formats of the same facts:\n\n"
            + consistency_table(summary["consistency"]),
            mechanism_findings(summary),
            *(f"![{name}](figures/{name})" for name in mechanism_figures(figure_dir, summary)),
        ]
    text = "\n\n".join([*sections, f"Wall time: {summary['wall_seconds']:.0f} s."]) + "\n"
    cli.atomic_write(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2) + "\n")
    cli.atomic_write(os.path.join(workdir, "report.md"), text)
    return text


# --------------------------------------------------------------------------------------------------------------------
# Inside the models: shared parameters, interventions, consistency (study.mechanisms)
# --------------------------------------------------------------------------------------------------------------------

MODULE_GROUPS = {  # path fragments -> the group a module counts in (Llama and GPT-NeoX names)
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "query_key_value": "qkv", "o_proj": "o", "attention.dense": "o",
    "gate_proj": "gate", "up_proj": "up", "dense_h_to_4h": "up", "down_proj": "down", "dense_4h_to_h": "down",
    "embed_tokens": "embeddings", "embed_in": "embeddings", "lm_head": "head", "embed_out": "head",
    "norm": "norms",
}


def _group(module_path: str) -> str:
    return next((g for fragment, g in MODULE_GROUPS.items() if fragment in module_path), "other")


def grouped_counts(stats: dict) -> dict[str, dict]:
    """{group: {"count", "size"}} of analysis.module_counts, modules gathered into q, k, v, o, gate, up, down, ..."""
    groups = {}
    for path, share in stats["modules"].items():
        g = groups.setdefault(_group(path), {"count": 0, "size": 0})
        g["count"] += share["count"]
        g["size"] += share["size"]
    return groups


SCOPE_WORDS = {"global": "over all parameters together", "tensor": "within each parameter tensor"}
# A global shared set that holds at least this share of all norm parameters is said to be dominated by them.
NORM_HEAVY = 0.5


def shared_table(trace_summary: dict, rule: str = "intersection", scope: str = "global") -> str:
    """Shared parameters per regime: total, and per module group (count and share of the group's parameters)."""
    regimes = list(trace_summary)
    groups = {g for r in regimes for g in grouped_counts(trace_summary[r]["shared"][scope][rule])}
    known = dict.fromkeys(MODULE_GROUPS.values())
    order = [g for g in known if g in groups] + sorted(groups - set(known))
    top_k = trace_summary[regimes[0]]["shared"][scope][rule]["head_concentration"]["top_k"]
    lines = ["| regime | shared | " + " | ".join(order) + f" | share of the top {top_k} heads | Gini (heads) | "
             "share of the top 10 MLP neurons | Gini (neurons) |", "|---" * (len(order) + 6) + "|"]
    for regime in regimes:
        stats = trace_summary[regime]["shared"][scope][rule]
        grouped = grouped_counts(stats)
        cells = [f"{grouped[g]['count']} ({grouped[g]['count'] / grouped[g]['size']:.1%})" if g in grouped else "-"
                 for g in order]
        heads, neurons = stats["head_concentration"], stats["neuron_concentration"]
        lines.append(f"| {regime.replace('_', '-')} | {stats['total']['count']} ({stats['total']['fraction']:.2%}) | "
                     + " | ".join(cells) + f" | {heads['top_k_share']:.2f} | {heads['gini']:.2f} | "
                     f"{neurons['top_k_share']:.2f} | {neurons['gini']:.2f} |")
    return "\n".join(lines)


def _outcomes(rows: list[dict]) -> list[Outcome]:
    """The intervention rows of a summary (study.intervention_table's records, as summary.json holds them)."""
    return [r if isinstance(r, Outcome) else Outcome(**r) for r in rows]


def interventions_table(rows: list[dict]) -> str:
    lines = [f"| model | intervention | scope | mask | parameters | {HELD_OUT_HEADER} | in-dist QA | BIO recall |",
             "|---" * 10 + "|"]
    lines += [f"| {o.model.replace('_', '-')} | {o.label.replace('_', '-')} | {o.scope} | {o.mask} | {o.count} | "
              f"{_held_out(o.accuracies)} | {o.accuracies['qa_train_accuracy']:.3f} | "
              f"{o.accuracies['bio_accuracy']:.3f} |" for o in _outcomes(rows)]
    return "\n".join(lines)


def consistency_table(consistency: dict) -> str:
    """Gradient consistency (mean cosine of paired BIO/QA gradients) and representation consistency (last layer)."""
    lines = ["| regime | gradient cosine, training people | held-out people | hidden-state cosine at subject, "
             "last layer (train / held-out) | at answer position |", "|---|---|---|---|---|"]
    for regime, grad in consistency["gradient"].items():
        rep = consistency["representation"][regime]
        lines.append(f"| {regime.replace('_', '-')} | {grad['qa_train']['mean']:.3f} | {grad['qa_test']['mean']:.3f} | "
                     f"{rep['qa_train']['subject'][-1]:.3f} / {rep['qa_test']['subject'][-1]:.3f} | "
                     f"{rep['qa_train']['answer'][-1]:.3f} / {rep['qa_test']['answer'][-1]:.3f} |")
    return "\n".join(lines)


def _accuracy(rows: list[Outcome], model, kind, mask="-", scope="-"):
    """Held-out accuracy after the intervention of `kind` on `model` with `mask` of `scope`."""
    return next(o.accuracies["qa_test_accuracy"] for o in rows
                if (o.model, o.kind, o.scope, o.mask) == (model, kind, scope, mask))


def mechanism_findings(mech: dict) -> str:
    """What the trace and interventions show, stated from the numbers, next to what the paper reports."""
    trace_summary, rows, consistency = mech["trace"], _outcomes(mech["interventions"]), mech["consistency"]
    first = next(iter(trace_summary.values()))
    text = ""
    if "stage2_lr" in trace_summary.get("two_stage", {}):
        text += f"The two-stage model inspected is the one with stage 2 {stage2_setting(trace_summary['two_stage'])}. "
    text += (f"Shared parameters are the top {first['top_fraction']:.0%} by both |BIO gradient| and |QA gradient| "
             f"(TracInCP over {len(first['checkpoints'])} checkpoints), ranked {SCOPE_WORDS['global']} or "
             f"{SCOPE_WORDS['tensor']}. ")
    for scope in SCOPE_WORDS:
        counts = {r: s["shared"][scope]["intersection"]["total"]["count"] for r, s in trace_summary.items()}
        text += f"Ranked {SCOPE_WORDS[scope]}: " + ", ".join(f"{r.replace('_', '-')} {c}" for r, c in counts.items())
        for regime, summary in trace_summary.items():
            stats = summary["shared"][scope]["intersection"]
            if stats["total"]["count"]:
                groups = sorted(grouped_counts(stats).items(), key=lambda kv: -kv[1]["count"])[:2]
                text += (f"; in {regime.replace('_', '-')} mostly "
                         + " and ".join(f"{g} ({v['count'] / stats['total']['count']:.0%})" for g, v in groups)
                         + ", per layer " + ", ".join(str(layer["count"]) for layer in stats["per_layer"]))
        norms = {r: grouped_counts(s["shared"][scope]["intersection"]).get("norms") for r, s in trace_summary.items()}
        if scope == "global" and (heavy := {r: n["count"] / n["size"] for r, n in norms.items()
                                            if n and n["count"] >= NORM_HEAVY * n["size"]}):
            text += ("; " + ", ".join(f"{share:.0%} of all norm parameters are in {r.replace('_', '-')}'s set"
                                      for r, share in heavy.items())
                     + ": a norm scale's gradient is large per parameter (a pretrained model's especially), so a "
                     "global ranking fills with them; the per-tensor ranking compares each tensor with itself")
        if {"mixed", "two_stage"} <= set(counts):
            more = "more" if counts["mixed"] > counts["two_stage"] else "fewer"
            text += f". Mixed has {more} than two-stage" + (", as the paper reports" if more == "more" else
                                                             ", unlike the paper")
        text += ". "
        for regime in trace_summary:
            base = _accuracy(rows, regime, "none")
            shared, rand = (_accuracy(rows, regime, "ablate", m, scope) for m in ("shared", "random"))
            text += (f"Zeroing {regime.replace('_', '-')}'s shared set moves its held-out accuracy {base:.3f} -> "
                     f"{shared:.3f} (a random set of the same size per tensor: {rand:.3f}). ")
        if any(o.kind == "graft" for o in rows):
            base = _accuracy(rows, "two_stage", "none")
            shared, rand = (_accuracy(rows, "two_stage", "graft", m, scope) for m in ("shared", "random"))
            text += (f"Grafting mixed's shared set into the two-stage model moves its held-out accuracy {base:.3f} -> "
                     f"{shared:.3f} (random graft of the same size: {rand:.3f}): "
                     + ("it transfers recall, as the paper reports. " if shared > max(base, rand) + 0.01 else
                        "unlike the paper, it does not transfer recall here. "))
    noisy = sorted({o.model for o in rows if o.kind == "reset" and o.mask == "random" and
                    o.accuracies["qa_test_accuracy"] < _accuracy(rows, o.model, "ablate", "random", o.scope) - 0.1})
    if noisy:
        text += ("Resetting a random set to its initial values already breaks recall in "
                 + ", ".join(r.replace("_", "-") for r in noisy) + ": it writes init-scale weights into a model that "
                 "weight decay kept small, so zeroing is the cleaner test here. ")
    grad = consistency["gradient"]
    text += ("Mean cosine of paired BIO/QA gradients on the final models: "
             + ", ".join(f"{r.replace('_', '-')} {g['qa_train']['mean']:.3f} (held-out people "
                         f"{g['qa_test']['mean']:.3f})" for r, g in grad.items()) + ".")
    return text


def mechanism_figures(out_dir: str, mech: dict) -> list[str]:
    """Shared parameters per attention head (layers x heads, regimes side by side), consistency per layer and over
    the traced checkpoints, and held-out accuracy after each intervention."""
    os.makedirs(out_dir, exist_ok=True)
    names = []
    trace_summary = mech["trace"]
    regimes = list(trace_summary)
    fig, axes = plt.subplots(len(SCOPE_WORDS), len(regimes), figsize=(3.2 * len(regimes) + 1, 3.2 * len(SCOPE_WORDS)),
                             squeeze=False, layout="constrained")
    for row, scope in zip(axes, SCOPE_WORDS):
        heads = {r: np.array(trace_summary[r]["shared"][scope]["intersection"]["heads"]) for r in regimes}
        vmax = max(1, *(h.max() for h in heads.values()))
        for ax, regime in zip(row, regimes):
            image = ax.imshow(heads[regime], cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
            ax.set(title=f"{regime.replace('_', '-')}, top of {'all' if scope == 'global' else 'each tensor'}",
                   xlabel="query head", ylabel="layer")
            ax.set_xticks(range(heads[regime].shape[1]))
            ax.set_yticks(range(heads[regime].shape[0]))
        fig.colorbar(image, ax=row.tolist(), label="shared parameters")
    fig.suptitle("Shared parameters per attention head (query and output weights)")
    names.append(_save(fig, out_dir, "shared_heads.png", tight=False))

    fig, (ax_grad, ax_time, ax_rep) = plt.subplots(1, 3, figsize=(15, 3.8))
    for (regime, grad), style, color in zip(mech["consistency"]["gradient"].items(), ("-o", "-s"), ("C0", "C1")):
        per_layer = grad["qa_train"]["per_layer"]
        ax_grad.plot(range(len(per_layer)), per_layer, style, color=color, label=regime.replace("_", "-"))
        steps = [c["step"] for c in grad["per_checkpoint"]]
        for key, people, alpha in (("mean", "training people", 1.0), ("held_out_mean", "held-out", 0.45)):
            ax_time.plot(steps, [c[key] for c in grad["per_checkpoint"]], style, color=color, alpha=alpha,
                         label=f"{regime.replace('_', '-')}: {people}")
        rep = mech["consistency"]["representation"][regime]["qa_train"]
        for site, alpha in (("subject", 1.0), ("answer", 0.45)):
            ax_rep.plot(range(len(rep[site])), rep[site], style, color=color, alpha=alpha,
                        label=f"{regime.replace('_', '-')}: {site}")
    ax_grad.set(xlabel="layer", ylabel="mean cosine", title="Gradient consistency (BIO vs QA, per layer)")
    ax_time.set(xlabel="step", ylabel="mean cosine", title="Gradient consistency at each traced checkpoint")
    ax_rep.set(xlabel="layer (0: embeddings)", ylabel="mean cosine", title="Hidden-state consistency (BIO vs QA)")
    ax_time.legend(fontsize=7)
    for ax in (ax_grad, ax_rep):
        ax.legend(fontsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    names.append(_save(fig, out_dir, "consistency_per_layer.png"))

    outcomes = _outcomes(mech["interventions"])
    rows = [o for o in outcomes if o.kind != "none"]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.22 * len(rows)), layout="constrained")
    labels = [f"{o.model.replace('_', '-')}: {o.label} ({o.scope}, {o.mask})" for o in rows]
    colors = ["tab:red" if o.mask == "shared" else "tab:gray" for o in rows]
    ax.barh(range(len(rows)), [o.accuracies["qa_test_accuracy"] for o in rows], color=colors)
    for regime, style in zip(regimes, ("--", ":")):
        ax.axvline(_accuracy(outcomes, regime, "none"), color="k", ls=style,
                   label=f"{regime.replace('_', '-')}: no intervention")
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="held-out QA exact match", xlim=(0, 1.02), title="After interventions (red: shared, grey: random)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    names.append(_save(fig, out_dir, "interventions.png", tight=False))
    return names
