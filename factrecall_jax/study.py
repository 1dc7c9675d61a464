"""The main job (`reproduce`), and the looks inside trained runs it takes: the gradient trace over checkpoints,
shared parameters, interventions, and how consistently each model treats the BIO and QA formats of one fact.

`launch.reproduce`, `launch.trace` and `launch.intervene` call these; each takes work directories written by
`experiment.train`.
"""
import dataclasses
import functools
import json
import os
import time

import jax
import numpy as np
import safetensors
from flax import nnx

from factrecall_jax import (analysis, checkpoint, cli, configuration, data, errors, evaluate, experiment,
                            interventions, metrics, models, report, representations, sharding, trace)
from factrecall_jax.data import pairs as pairs_lib, schedules
from factrecall_jax.interventions import Outcome


def run_dirs(workdir: str) -> list[str]:
    """The directories holding a run's checkpoints: a forked stage 2's stage-1 run first, then the run itself."""
    config = experiment.load_config(workdir)
    fork = config.two_stage.fork_from if config.schedule == "two_stage" else ""
    return [fork, workdir] if fork else [workdir]


def checkpoint_plan(workdir: str, num_checkpoints: int) -> list[dict]:
    """`num_checkpoints` saved steps spread evenly over the run (the last one included), each with its directory and
    the learning rate of the update that produced it: the TracInCP weight.

    Step 0 (the init) is left out: no update produced it.
    """
    if num_checkpoints < 1:
        raise errors.InvalidValue(f"num_checkpoints={num_checkpoints} is invalid: expected at least 1")
    config = experiment.load_config(workdir)
    where = {step: d for d in run_dirs(workdir) for step in checkpoint.saved_steps(d) if step > 0}
    steps = sorted(where)
    if not steps:
        raise errors.MissingPath(f"{workdir} has no checkpoint after step 0")
    picks = sorted({steps[int(round(i))] for i in np.linspace(len(steps) - 1, 0, num_checkpoints)})
    phases = experiment.schedule(config)
    starts = schedules.phase_starts(phases)
    plan = []
    for step in picks:
        index = max(i for i in range(len(phases)) if starts[i] <= step - 1)
        learning_rate = float(experiment.phase_optimizer(phases, index)[1](step - 1))
        plan.append({"dir": where[step], "step": step, "learning_rate": learning_rate})
    return plan


@functools.partial(jax.jit, donate_argnums=0)
def _add_weighted(total: trace.TraceResult, result: trace.TraceResult, weight) -> trace.TraceResult:
    """total + weight * result, in place of total (TracInCP without a third parameter-sized copy)."""
    return jax.tree.map(lambda t, r: t + weight * r, total, result)


def trace_run(run: experiment.Run, fact_pairs: dict, *, num_checkpoints: int = 5, chunk_size: int = 32,
              held_out: dict | None = None, log=print) -> tuple[trace.TraceResult, list[dict]]:
    """TracInCP over `checkpoint_plan` of the run: (sum_c lr_c * trace_c, [per checkpoint: step, lr, gradient
    consistency]). fact_pairs: from data.fact_pairs. With `held_out` (pairs of other people), each record also
    holds their gradient consistency ("held_out_gradient_consistency", from trace.pair_statistics: no sums kept)."""
    plan = checkpoint_plan(run.workdir, num_checkpoints)
    combined, records = None, []
    for entry in plan:
        start = time.perf_counter()
        model = run.model(entry["step"], entry["dir"])
        result = trace.cross_task_trace(trace.lm_loss, model, fact_pairs["bio"], fact_pairs["qa"],
                                        chunk_size=chunk_size, mesh=run.mesh)
        records.append({"step": entry["step"], "learning_rate": entry["learning_rate"], "gradient_consistency":
                        analysis.gradient_consistency(result, {"attribute": fact_pairs["attribute"]})})
        combined = trace.combine([result], [entry["learning_rate"]]) if combined is None else \
            _add_weighted(combined, result, entry["learning_rate"])
        if held_out is not None:
            stats = trace.pair_statistics(trace.lm_loss, model, held_out["bio"], held_out["qa"], chunk_size=chunk_size,
                                          mesh=run.mesh)
            records[-1]["held_out_gradient_consistency"] = analysis.gradient_consistency(
                stats, {"attribute": held_out["attribute"]})
        log(f"traced step {entry['step']} of {entry['dir']} ({len(fact_pairs['attribute'])} pairs, lr "
            f"{entry['learning_rate']:.2e}, mean cosine {records[-1]['gradient_consistency']['mean']:.3f}"
            + (f", held-out {records[-1]['held_out_gradient_consistency']['mean']:.3f}" if held_out else "")
            + f") in {time.perf_counter() - start:.1f} s")
    return combined, records


def shared_statistics(masks: dict[str, dict[str, nnx.State]]) -> dict:
    """{scope: {rule: counts per module and layer, per head and neuron, and their concentration}} of the masks of
    `shared_masks`."""
    stats = {}
    for scope, by_rule in masks.items():
        for rule, mask in by_rule.items():
            heads, neurons = analysis.head_counts(mask), analysis.neuron_counts(mask)
            top_k = max(1, min(10, heads["heads"].size // 4))  # "top 10 heads" says nothing about a model with 8
            stats.setdefault(scope, {})[rule] = {
                **analysis.module_counts(mask),
                "heads": heads["heads"].tolist(),
                "kv_heads": None if heads["kv_heads"] is None else heads["kv_heads"].tolist(),
                "neurons": neurons.tolist(),
                "head_concentration": {"top_k": top_k, **analysis.concentration(heads["heads"], top_k)},
                "neuron_concentration": analysis.concentration(neurons)}
    return stats


def shared_masks(result: trace.TraceResult, top_fraction: float) -> dict[str, dict[str, nnx.State]]:
    """{scope: {rule: mask}} for every scope and rule of `analysis.shared_parameters`."""
    return {scope: {rule: analysis.shared_parameters(result, top_fraction, rule, scope) for rule in analysis.RULES}
            for scope in analysis.SCOPES}


def save_trace(result: trace.TraceResult, records: list[dict], path: str) -> None:
    """trace.save with the checkpoints' records as metadata. Call it on every process: process 0 writes."""
    host = sharding.to_host(result)
    if sharding.is_writer():
        trace.save(host, path, {"checkpoints": json.dumps(records)})


def save_look(path: str, masks: dict, records: list[dict], result: trace.TraceResult | None) -> None:
    """What the main job keeps of a regime's trace, proportionate to the model: the shared masks of every scope and
    rule as bits (1/8 byte per parameter each) and the checkpoints' records; with `result`, the three float32 sums
    too (`launch.trace` writes those alone; config.trace.save_sums). Call it on every process: process 0 writes."""
    names = [trace.results.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        next(iter(next(iter(masks.values())).values())))[0]]
    tensors = {f"mask/{scope}/{rule}/{name}": np.packbits(np.asarray(x).ravel())
               for scope, by_rule in masks.items() for rule, mask in by_rule.items()
               for name, x in zip(names, sharding.to_host(jax.tree.leaves(mask)))}
    if result is not None:
        host = sharding.to_host(result)
        tensors |= {f"{field}/{name}": x for field in trace.results.TREE_FIELDS
                    for name, x in zip(names, jax.tree.leaves(getattr(host, field)))}
    if sharding.is_writer():
        cli.atomic_write(path, lambda tmp: safetensors.numpy.save_file(
            tensors, tmp, metadata={"checkpoints": json.dumps(records)}))


def load_look(path: str, params_like) -> tuple[dict, list[dict]]:
    """(masks, records) of `save_look`: a finished regime's look is read back, not traced again."""
    with safetensors.safe_open(path, framework="numpy") as f:
        records = json.loads(f.metadata()["checkpoints"])
        leaves = jax.tree_util.tree_flatten_with_path(params_like)[0]
        treedef = jax.tree.structure(params_like)

        def mask(scope, rule):
            return jax.tree.unflatten(treedef, [
                np.unpackbits(f.get_tensor(f"mask/{scope}/{rule}/{trace.results.path_name(p)}"))[:x.size]
                .reshape(x.shape).astype(bool) for p, x in leaves])

        masks = {scope: {rule: mask(scope, rule) for rule in analysis.RULES} for scope in analysis.SCOPES}
    return masks, records


def intervention_table(models: dict[str, nnx.State], masks: dict[str, dict[str, nnx.State]],
                       evaluator: evaluate.Evaluator, init_params: nnx.State, seed: int = 0,
                       graft_pairs=(("two_stage", "mixed"),), log=print) -> list[Outcome]:
    """Accuracy after each intervention, against a random control with the same count in every tensor.

    models: {regime: params}; masks: {scope: {regime: shared-parameter mask}} (one scope or several, e.g. "global"
    and "tensor" of analysis.shared_parameters). Each model is scored as it is, then ablated with each scope's mask of
    its own (set to zero, and reset to the init); for (recipient, donor) in graft_pairs the donor's values under the
    donor's mask are grafted into the recipient. Each evaluation is logged as it ends (they take minutes at scale).
    """
    planned = [Outcome(regime, "none") for regime in models]
    for scope, scope_masks in masks.items():
        for regime in models:
            planned += [Outcome(regime, kind, scope, mask) for mask in ("shared", "random")
                        for kind in ("ablate", "reset")]
        planned += [Outcome(recipient, "graft", scope, mask, donor=donor) for recipient, donor in graft_pairs
                    for mask in ("shared", "random")]

    def mask_of(o: Outcome):
        shared = masks[o.scope][o.donor or o.model]
        return shared if o.mask == "shared" else interventions.random_mask(shared, seed)

    rows = []
    for i, o in enumerate(planned, 1):
        start, m = time.perf_counter(), None if o.kind == "none" else mask_of(o)
        params = {"none": lambda: models[o.model], "ablate": lambda: interventions.ablate(models[o.model], m),
                  "reset": lambda: interventions.ablate(models[o.model], m, init_params),
                  "graft": lambda: interventions.graft(models[o.model], models[o.donor], m)}[o.kind]()
        result = evaluator(params)
        count = 0 if m is None else int(sum(np.count_nonzero(np.asarray(x)) for x in jax.tree.leaves(m)))
        rows.append(dataclasses.replace(o, count=count, accuracies={
            k: v for k, v in result.items() if k.endswith("_accuracy")}))
        log(f"intervention {i}/{len(planned)}: {o.model} {o.label} ({o.scope}, {o.mask}): held-out "
            f"{result['qa_test_accuracy']:.3f} in {time.perf_counter() - start:.1f} s")
    return rows


def mechanisms(runs: dict[str, str], out_dir: str, trace_config: configuration.Trace, *, seed: int,
               log=print) -> dict:
    """The main job's second half for {regime: final work directory} (runs of one data and model): trace, shared
    parameters, interventions and consistency. Writes `out_dir/<regime>.safetensors` (`save_look`), and reads it
    back instead of tracing again when the main job is resumed; returns the summary's sections."""
    regimes = {regime: experiment.Run.load(workdir) for regime, workdir in runs.items()}
    data_of = {regime: (run.given.data, run.given.tokenizer, run.given.qa_loss) for regime, run in regimes.items()}
    if len(set(data_of.values())) > 1:
        raise errors.InvalidValue(f"the runs {sorted(runs)} hold different data; their traces cannot be compared")
    first = next(iter(regimes.values()))
    pairs = {split: pairs_lib.fact_pairs(first.tokenized, first.tokenizer.pad_token_id, split,
                                         trace_config.num_people, seed) for split in ("qa_train", "qa_test")}
    os.makedirs(out_dir, exist_ok=True)
    trace_summary, consistency, masks, finals = {}, {"gradient": {}, "representation": {}}, {}, {}
    for regime, run in regimes.items():
        path = os.path.join(out_dir, f"{regime}.safetensors")
        if os.path.exists(path):
            log(f"== trace: {regime}: read back from {path}")
            regime_masks, records = load_look(path, run.abstract_params)
        else:
            log(f"== trace: {regime}")
            combined, records = trace_run(run, pairs["qa_train"], num_checkpoints=trace_config.num_checkpoints,
                                          chunk_size=trace_config.chunk_size, held_out=pairs["qa_test"], log=log)
            regime_masks = shared_masks(combined, trace_config.top_fraction)
            save_look(path, regime_masks, records, combined if trace_config.save_sums else None)
            del combined
        for scope, by_rule in regime_masks.items():
            masks.setdefault(scope, {})[regime] = by_rule["intersection"]
        trace_summary[regime] = {"checkpoints": [{k: r[k] for k in ("step", "learning_rate")} for r in records],
                                 "top_fraction": trace_config.top_fraction, "shared": shared_statistics(regime_masks)}
        final_step = records[-1]["step"]
        params = finals[regime] = run.params(final_step)
        consistency["gradient"][regime] = {
            "step": final_step,
            "qa_train": records[-1]["gradient_consistency"],
            "qa_test": records[-1]["held_out_gradient_consistency"],
            "per_checkpoint": [{"step": r["step"], "mean": r["gradient_consistency"]["mean"],
                                "held_out_mean": r["held_out_gradient_consistency"]["mean"]} for r in records]}
        consistency["representation"][regime] = {
            split: representations.representation_consistency(run.graphdef, params, p) for split, p in pairs.items()}
    log("== interventions")
    graft_pairs = (("two_stage", "mixed"),) if {"two_stage", "mixed"} <= set(runs) else ()
    table = intervention_table(finals, masks, first.evaluator, first.init_params(), seed, graft_pairs, log=log)
    return {"trace": trace_summary, "interventions": [dataclasses.asdict(o) for o in table],
            "consistency": consistency}


def held_out_examples(run: experiment.Run, run_dirs: dict[str, str], person_index: int = 0) -> str:
    """A markdown table: each run's (of the model and data of `run`) greedy answers to the questions about one
    held-out person."""
    answers, tokenized, tokenizer = {}, run.tokenized, run.tokenizer
    for name, run_dir in run_dirs.items():
        split = tokenized["qa_test"]
        person = sorted(set(split["person_id"]))[person_index]
        rows = split.filter(lambda r: r["person_id"] == person).to_dict()
        prompts = [ids[:next(i for i, v in enumerate(values) if v >= 0)]  # up to the answer's first token
                   for ids, values in zip(rows["input_ids"], rows["value_attribute_ids"])]
        generated = evaluate.generate(run.graphdef, run.params(workdir=run_dir), prompts,
                                      max(map(len, rows["input_ids"])), tokenizer.pad_token_id).tolist()
        eos = tokenizer.eos_token_id
        answers[name] = [tokenizer.decode(g[:g.index(eos)] if eos in g else g, skip_special_tokens=True).strip()
                         for g in generated]
    lines = ["| question | answer | " + " | ".join(answers) + " |", "|---" * (2 + len(answers)) + "|"]
    for i, (prompt, answer) in enumerate(zip(rows["prompt"], rows["answer"])):
        lines.append(f"| {prompt} | {answer} | " + " | ".join(a[i] for a in answers.values()) + " |")
    return "Greedy answers about a held-out person:\n\n" + "\n".join(lines)


def _stage2_name(lr: float, weight_decay: float) -> str:
    return f"two_stage/stage2_lr{lr:g}_wd{weight_decay:g}"


def pretrained_base(config: configuration.RunConfig, base_dir: str, log=print) -> configuration.RunConfig:
    """The paper's protocol in miniature: a base model trained (mixed) on config.base's own people, saved once as a
    Hugging Face folder with a word tokenizer that knows both populations; returns `config` fine-tuning from it
    (init_from and tokenizer the base's). The paper fine-tunes one pretrained model both ways, which is what lets
    grafting one regime's shared parameters into the other transfer recall. Started again, the base is reused."""
    hf_dir, tokenizer_dir = os.path.join(base_dir, "hf"), os.path.join(base_dir, "tokenizer")
    base_data = dataclasses.replace(config.data, num_people=config.base.num_people, seed=config.base.seed)
    if config.tokenizer == "word" and not os.path.isdir(tokenizer_dir):
        both = [data.build_dataset(c) for c in (config.data, base_data)]
        tokenizer = data.train_word_tokenizer({f"{name}_{i}": split for i, d in enumerate(both)
                                               for name, split in d.items()})
        if sharding.is_writer():
            with cli.atomic_output_dir(tokenizer_dir) as tmp:
                tokenizer.save_pretrained(tmp)
    tokenizer = tokenizer_dir if config.tokenizer == "word" else config.tokenizer
    base = config.replace(schedule="mixed", seed=config.base.seed, data=base_data, tokenizer=tokenizer)
    log(f"== base: mixed on {config.base.num_people} other people (seed {config.base.seed})")
    final = experiment.train(base, os.path.join(base_dir, "run"), log=log)
    log(f"base: held-out {final['qa_test_accuracy']:.3f}, in-distribution {final['qa_train_accuracy']:.3f}, BIO "
        f"{final['bio_accuracy']:.3f}")
    if not os.path.isdir(hf_dir) and sharding.is_writer():
        with cli.atomic_output_dir(hf_dir) as tmp:
            models.save_pretrained(experiment.Run.load(os.path.join(base_dir, "run")).model(), tmp)
    return config.replace(init_from=hf_dir, tokenizer=tokenizer, model={})


def reproduce(config, workdir: str, log=print) -> dict:
    """The main job: mixed and two-stage from one init, stage 2 forked at each `config.reproduce` learning rate and
    weight decay; then the trace, shared parameters, interventions and consistency of mixed and the fairest two-stage
    run (study.mechanisms); then summary.json, report.md and figures in `workdir` (from process 0). Started again,
    every run resumes. `config`: a ConfigDict (checked for the whole job before anything is written) or RunConfig."""
    start = time.perf_counter()
    config = configuration.read(config, "reproduce")  # before the work directory exists
    experiment.write_config(config, workdir)
    if config.base.num_people:
        config = pretrained_base(config, os.path.join(workdir, "base"), log)
    runs = {}

    def run(name, run_config, **kw):
        log(f"== {name}")
        runs[name] = os.path.abspath(os.path.join(workdir, name))
        return experiment.train(run_config, runs[name], log=log, **kw)

    mixed = run("mixed", config.replace(schedule="mixed"))
    two_stage = config.replace(schedule="two_stage")
    stage1 = run("two_stage/stage1", two_stage, until_step=config.two_stage.stage1_steps)
    sweep = []
    for wd in config.reproduce.stage2_weight_decays:
        for lr in config.reproduce.stage2_learning_rates:
            forked = two_stage.replace(**{"two_stage.stage2_learning_rate": float(lr),
                                          "two_stage.stage2_weight_decay": float(wd),
                                          "two_stage.fork_from": runs["two_stage/stage1"]})
            sweep.append({"stage2_lr": float(lr), "stage2_weight_decay": float(wd),
                          **run(_stage2_name(lr, wd), forked)})
    fairest = report.fairest(sweep)
    # Without a fair two-stage run, look inside the one with the best held-out accuracy (the report says which).
    inspected = fairest or max(sweep, key=lambda e: e["qa_test_accuracy"])
    stage2_dir = runs[_stage2_name(inspected["stage2_lr"], inspected["stage2_weight_decay"])]
    summary = {"mixed": mixed, "two_stage": fairest, "two_stage_sweep": sweep, "two_stage_after_stage1": stage1,
               **({} if not config.base.num_people else {"base": metrics.read_metrics(os.path.join(
                   workdir, "base", "run", "metrics.jsonl"))[-1]["eval"] | {"num_people": config.base.num_people}}),
               **mechanisms({"mixed": runs["mixed"], "two_stage": stage2_dir}, os.path.join(workdir, "trace"),
                            config.trace, seed=config.seed, log=log),
               "wall_seconds": time.perf_counter() - start}
    summary["trace"]["two_stage"].update({k: inspected[k] for k in ("stage2_lr", "stage2_weight_decay")})
    if not sharding.is_writer():
        return summary
    curves = {"mixed": metrics.read_metrics(os.path.join(runs["mixed"], "metrics.jsonl")),
              "two_stage": [*metrics.read_metrics(os.path.join(runs["two_stage/stage1"], "metrics.jsonl")),
                            *metrics.read_metrics(os.path.join(stage2_dir, "metrics.jsonl"))]}
    mixed_run = experiment.Run.load(runs["mixed"])
    setting = {"augmentations": report.augmentations(config.data, config.train.bio_value_dropout),
               "qa_loss": config.qa_loss,
               "qa_token_share": schedules.token_shares(experiment.schedule(mixed_run.config)[0],  # rows as resolved
                                                        mixed_run.tables)["qa"]}
    summary["setting"] = setting
    text = report.write(workdir, summary, curves, setting=setting,
                        examples=held_out_examples(mixed_run, {"mixed": runs["mixed"], "two-stage": stage2_dir}))
    log(text.split("\n\n")[1])
    return summary
