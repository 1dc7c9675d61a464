"""The training launch scripts end to end on the tiny preset: reproduce, evaluate, train errors; report pieces."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import config_file, override
from factrecall_jax import configuration, data, experiment, report, study
from factrecall_jax.data import schedules
from factrecall_jax.evaluate import COMPOSED_KEY, ONE_HOP_KEY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "--config=configs/default.py:tiny"


def launch(script, *args):
    return subprocess.run([sys.executable, "-m", f"launch.{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("reproduce") / "run")
    done = launch("reproduce", TINY, f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        return workdir, json.load(f), done.stdout


def test_reproduce_summary_follows_the_fairest_rule(reproduced):
    workdir, summary, stdout = reproduced
    assert set(summary) >= {"mixed", "two_stage", "two_stage_sweep", "wall_seconds"}
    config = experiment.load_config(workdir)
    assert [(e["stage2_lr"], e["stage2_weight_decay"]) for e in summary["two_stage_sweep"]] == \
        [(lr, wd) for wd in config.reproduce.stage2_weight_decays for lr in config.reproduce.stage2_learning_rates]
    assert summary["two_stage"] == report.fairest(summary["two_stage_sweep"])
    for entry in [summary["mixed"], *summary["two_stage_sweep"]]:
        assert {"qa_train_accuracy", "qa_test_accuracy", "bio_accuracy", "per_attribute", ONE_HOP_KEY, COMPOSED_KEY,
                "composition"} <= set(entry)
        held_out = entry["composition"]
        assert held_out["people"] == held_out["both_known"]["people"] + held_out["others"]["people"] > 0
    assert report.results_table(summary) in stdout  # the table is printed
    assert "qa_test 0." in stdout and "qa_test_one_hop 0." in stdout  # the progress line, beside the overall number
    with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
        text = f.read()
    assert report.composition_table(summary) in text and report.composition_findings(summary) in text
    _assert_figures(workdir, "accuracy_vs_step.png", "per_attribute.png", "stage2_sweep.png")


def _assert_figures(workdir, *names):
    """Each figure is linked from report.md and is a PNG file."""
    with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
        text = f.read()
    for name in names:
        assert f"(figures/{name})" in text
        with open(os.path.join(workdir, "figures", name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_reproduce_looks_inside_both_regimes(reproduced):
    workdir, summary, _ = reproduced
    config = experiment.load_config(workdir)
    phases = experiment.schedule(config.replace(schedule="two_stage"))
    # TracInCP weights: the learning rate of the update that produced each checkpoint; two-stage spans both stages
    assert [c["step"] for c in summary["trace"]["mixed"]["checkpoints"]] == [8, 16, 24]
    stage1_lr = experiment.phase_optimizer(phases, 0)[1]
    two_stage = summary["trace"]["two_stage"]["checkpoints"]
    assert [c["step"] for c in two_stage] == [8, 16, 24]
    assert [c["learning_rate"] for c in two_stage[:2]] == pytest.approx([float(stage1_lr(7)), float(stage1_lr(15))])
    assert summary["trace"]["two_stage"]["stage2_lr"] in [e["stage2_lr"] for e in summary["two_stage_sweep"]]
    rows = {(r["model"], r["kind"], r["scope"], r["mask"]): r for r in summary["interventions"]}
    assert len(rows) == len(summary["interventions"]) == 2 + 2 * 10  # none; per scope 4 ablations each, 2 grafts
    for key in ("qa_train_accuracy", "qa_test_accuracy", "bio_accuracy"):
        assert rows["mixed", "none", "-", "-"]["accuracies"][key] == summary["mixed"][key]  # the trained model
    for scope in ("global", "tensor"):
        for model, kind in [("mixed", "ablate"), ("two_stage", "reset"), ("two_stage", "graft")]:
            assert rows[model, kind, scope, "shared"]["count"] == rows[model, kind, scope, "random"]["count"] > 0
        assert rows["two_stage", "graft", scope, "shared"]["donor"] == "mixed"
        assert rows["two_stage", "graft", scope, "shared"]["count"] == \
            summary["trace"]["mixed"]["shared"][scope]["intersection"]["total"]["count"]
    # ranked within each tensor, every layer's tensors hold shared parameters, not only the largest-gradient ones
    per_tensor = summary["trace"]["mixed"]["shared"]["tensor"]["intersection"]
    assert all(layer["count"] > 0 for layer in per_tensor["per_layer"])
    for regime in ("mixed", "two_stage"):
        for split in ("qa_train", "qa_test"):
            assert len(summary["consistency"]["representation"][regime][split]["subject"]) == 3  # embeddings + 2
            assert -1 <= summary["consistency"]["gradient"][regime][split]["mean"] <= 1
        assert os.path.exists(os.path.join(workdir, "trace", f"{regime}.safetensors"))
    _assert_figures(workdir, "shared_heads.png", "consistency_per_layer.png", "interventions.png")


def test_evaluate_agrees_with_the_summary(reproduced):
    workdir, summary, _ = reproduced
    done = launch("evaluate", f"--workdir={workdir}/mixed")
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(workdir, "mixed", "eval_step24.json"), encoding="utf-8") as f:
        evaluated = json.load(f)
    assert evaluated["step"] == 24
    for key in ("qa_train_accuracy", "qa_test_accuracy", "bio_accuracy", "per_attribute", ONE_HOP_KEY, COMPOSED_KEY,
                "composition"):
        assert evaluated[key] == summary["mixed"][key]


def test_reproduce_again_resumes_every_run(reproduced):
    workdir, summary, _ = reproduced
    done = launch("reproduce", TINY, f"--workdir={workdir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("resumed") == 2 + len(summary["two_stage_sweep"])
    assert done.stdout.count("read back from") == 2 and "traced step" not in done.stdout  # a finished trace is kept
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        again = json.load(f)
    assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
        {k: v for k, v in summary.items() if k != "wall_seconds"}


def test_train_mixes_by_token_share(tmp_path):
    """mixed.qa_token_share sets the QA rows of a step; config.json holds the rows the run read."""
    workdir = str(tmp_path / "run")
    done = launch("train", TINY, f"--workdir={workdir}", "--config.mixed.qa_token_share=0.8",
                  "--config.mixed.steps=4", "--config.train.eval_every=4")
    assert done.returncode == 0, done.stderr[-3000:]
    config = experiment.load_config(workdir)
    tokenized, tokenizer = experiment.load_data(config)
    tables = schedules.token_tables(tokenized, tokenizer.pad_token_id)
    assert config.mixed.qa_batch == schedules.qa_rows_for_token_share(tables, config.mixed.bio_batch, 0.8) > 8
    share = schedules.token_shares(experiment.schedule(config)[0], tables)["qa"]
    assert f"{config.mixed.qa_batch} QA rows ({share:.0%} of the tokens)" in done.stdout and round(share, 1) == 0.8


@pytest.mark.parametrize("args, message", [
    (("--config.schedule=sometimes",), "schedule='sometimes' is invalid"),
    (("--config.optimizer.learning_rate=-1.0",), "learning_rate=-1.0 is invalid"),
    (("--config.dtype=float8",), "dtype='float8' is invalid"),
])
def test_train_rejects_bad_settings_in_one_line(tmp_path, args, message):
    workdir = tmp_path / "run"
    done = launch("train", TINY, f"--workdir={workdir}", *args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and message in done.stderr
    assert "Traceback" not in done.stderr


def test_train_rejects_a_tokenizer_larger_than_the_checkpoint_vocabulary(tmp_path, hf_checkpoints):
    """An id past the embedding of init_from would read NaN and make every logit NaN ("loss is nan ... lower the
    learning rate" after the first steps): refused before anything runs or is written."""
    checkpoint = hf_checkpoints("neox_parallel")  # 128 tokens; the tiny preset's word tokenizer has hundreds
    done = launch("train", TINY, f"--workdir={tmp_path / 'run'}", f"--config.init_from={checkpoint.path}")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tokenizer='word' has ") and "more than the 128 of the vocabulary" in last
    # and config.model (the tiny Llama) is not the checkpoint's architecture: both are named, nothing is trained
    assert "config.model disagrees with init_from=" in last and "model.model_type='llama' (the checkpoint's: " \
        "'gpt_neox')" in last
    assert not (tmp_path / "run").exists()


def test_evaluate_names_a_missing_workdir(tmp_path):
    done = launch("evaluate", f"--workdir={tmp_path}/nothing")
    assert done.returncode == 2 and "config.json does not exist" in done.stderr


def test_fairest_skips_runs_that_forgot_their_biographies():
    def entry(lr, held_out, in_dist, bio):
        return {"stage2_lr": lr, "qa_test_accuracy": held_out, "qa_train_accuracy": in_dist, "bio_accuracy": bio}

    sweep = [entry(1e-4, 0.5, 0.99, 0.99), entry(3e-4, 0.6, 0.97, 0.85), entry(1e-3, 0.9, 1.0, 0.5),
             entry(3e-3, 0.95, 0.90, 0.95)]
    assert report.fairest(sweep)["stage2_lr"] == 3e-4
    assert report.fairest(sweep[2:]) is None


def test_report_gives_held_out_parts_and_reads_the_composition():
    """The results table puts the one-hop mean and the employer's city beside the overall held-out number; the
    composition sentence says the model does not compose two facts it stores only with enough people to say so."""
    def entry(both_known, answered, lr=None):
        return {"qa_test_accuracy": 0.548, ONE_HOP_KEY: 0.65, COMPOSED_KEY: 0.03, "qa_train_accuracy": 1.0,
                "bio_accuracy": 0.9, "stage2_lr": lr, "stage2_weight_decay": 0.1,
                "composition": {"people": 100, "employer_answered": 0.5, "city_completed": 0.9, "city_answered": 0.1,
                                "both_known": {"people": both_known, "city_answered": answered},
                                "others": {"people": 100 - both_known, "city_answered": 0.02}}}

    stores = ": the model stores both facts but does not compose them."
    summary = {"mixed": entry(45, 0.1), "two_stage": None, "two_stage_sweep": [entry(0, None, 1e-4)]}
    results = report.results_table(summary).splitlines()
    assert results[0].startswith("| run | held-out QA, overall | held-out one-hop mean | held-out employer's city |")
    assert results[2] == "| mixed | 0.548 | 0.650 | 0.030 | 1.000 | 0.900 |"
    table = report.composition_table(summary).splitlines()
    assert table[2:] == ["| mixed | 100 | 50% | 90% | 10% | 45 | 10% | 2% |",
                         "| two-stage, stage 2 LR 0.0001, wd 0.1 | 100 | 50% | 90% | 10% | 0 | - | 2% |"]
    assert report.composition_findings(summary) == (
        "Mixed: 45 of 100 held-out people know both hops (the employer answered, the city completed from the "
        "biography); the city is answered for 10% of them and 2% of the other 55" + stores)
    summary["two_stage"] = entry(30, 0.2, 3e-4)
    text = report.composition_findings(summary)
    assert text.count(stores) == 2 and "Two-stage, fairest (stage 2 LR 0.0003, wd 0.1): 30 of 100" in text
    for both_known, answered in ((19, 0.1), (45, 0.5)):  # too few people know both hops; most of them answer
        summary = {"mixed": entry(both_known, answered), "two_stage": None, "two_stage_sweep": []}
        assert report.composition_findings(summary).endswith(f"of the other {100 - both_known}."), both_known
    summary = {"mixed": entry(0, None), "two_stage": None, "two_stage_sweep": []}  # nobody knows both hops
    assert report.composition_findings(summary).endswith("biography); the city is answered for 2% of the other 100.")


def test_chunk_ends_stop_at_every_boundary():
    assert experiment._chunk_ends(0, 12, [5, 8]) == [5, 8, 10, 12]
    assert experiment._chunk_ends(8, 30, [10, 25]) == [10, 20, 25, 30]


def test_memory_check_refuses_a_plan_over_the_limit_before_writing_anything(tmp_path):
    """The plan is compiled before anything is read or written: over config.memory.limit_gib, one line naming the
    program, its size, the limit and what would fit, exit status 2 and no work directory; under it, a line that
    says it fits, and the run trains."""
    workdir = tmp_path / "run"
    done = launch("train", TINY, f"--workdir={workdir}", "--config.memory.limit_gib=0.001")
    assert done.returncode == 2, done.stderr[-3000:]
    printed = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(printed) == 1, done.stderr[-3000:]
    assert printed[0].startswith("error: memory check: train_step (mixed: 8 BIO + 8 QA) needs "), printed
    assert "more than the 0.001 GiB of one device (config.memory.limit_gib; rows of 64 tokens" in printed[0]
    assert not workdir.exists() and os.listdir(tmp_path) == []
    done = launch("train", TINY, f"--workdir={workdir}", "--config.memory.limit_gib=4", "--config.mixed.steps=4",
                  "--config.train.eval_every=4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memory check: fits; the largest program, train_step (mixed: 8 BIO + 8 QA), needs " in done.stdout
    assert os.path.exists(workdir / "metrics.jsonl")


def test_evaluate_a_configs_model_zero_shot(tmp_path):
    """--config evaluates the model a run would start from (here a random init): no work directory needed."""
    out = tmp_path / "zero_shot.json"
    done = launch("evaluate", TINY, f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "zero-shot: a random init of config.model" in done.stdout and "qa_test" in done.stdout
    result = json.loads(out.read_text())
    assert result["step"] == 0 and 0 <= result["qa_test_accuracy"] <= 0.05  # a random model answers nothing
    done = launch("evaluate", TINY, f"--workdir={tmp_path}")
    assert done.returncode == 2 and "give --workdir (a trained run) or --config" in done.stderr


def test_pretrained_base_is_trained_once_and_both_regimes_start_from_it(tmp_path):
    """configs/pretrained_base.py's protocol (study.pretrained_base): a base trained on other people, saved with a
    tokenizer that knows both populations; a fine-tuning run starts from its final weights exactly."""
    config = configuration.read(override(config_file("pretrained_base.py", "tiny"), **{
        "mixed.steps": 8, "train.eval_every": 8, "train.checkpoint_every": 8}), "reproduce")
    base_dir = str(tmp_path / "base")
    tuned = study.pretrained_base(config, base_dir, log=lambda *_: None)
    assert (tuned.init_from, tuned.tokenizer) == (os.path.join(base_dir, "hf"), os.path.join(base_dir, "tokenizer"))
    tokenizer = data.load_tokenizer(tuned.tokenizer)
    base_run = experiment.Run.load(os.path.join(base_dir, "run"))
    names = {which: {p.name for p in data.sample_people(c.num_people, c.seed)}
             for which, c in (("study", config.data), ("base", base_run.given.data))}
    assert base_run.given.data.seed == 1000 and not names["study"] & names["base"]  # two populations
    assert all(tokenizer.unk_token_id not in tokenizer(n)["input_ids"] for n in names["study"] | names["base"])
    start = experiment.Run(tuned).init_params()
    for got, want in zip(jax.tree.leaves(start), jax.tree.leaves(base_run.params())):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    again = study.pretrained_base(config, base_dir, log=lambda *a: None)  # a resumed job reuses the base
    assert again == tuned and experiment.load_config(os.path.join(base_dir, "run")) == base_run.given
