"""launch.trace and launch.intervene end to end on one tiny trained run (trained once for the module)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import config_file
from factrecall_jax import analysis, experiment, study, trace
from factrecall_jax.data import pairs as pairs_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACE_ARGS = ("--num_checkpoints=2", "--num_people=4", "--chunk_size=8")


def launch(script, *args):
    return subprocess.run([sys.executable, "-m", f"launch.{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def one_line_error(done, message):
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny mixed run (checkpoints at steps 8, 16, 24) with its final evaluation, the stdout of launch.trace on it,
    and the same trace computed here (study.trace_run, while launch.trace runs)."""
    workdir = str(tmp_path_factory.mktemp("trace") / "mixed")
    final = experiment.train(config_file("default.py", "tiny"), workdir, log=lambda *_: None)
    process = subprocess.Popen([sys.executable, "-m", "launch.trace", f"--workdir={workdir}", *TRACE_ARGS], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        run = experiment.Run.load(workdir)
        fact_pairs = pairs_lib.fact_pairs(run.tokenized, run.tokenizer.pad_token_id, "qa_train", 4,
                                          seed=run.config.seed)
        direct = study.trace_run(run, fact_pairs, num_checkpoints=2, chunk_size=8, log=lambda *_: None)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 0, stderr[-3000:]
    return workdir, final, stdout, direct


def test_trace_writes_what_a_direct_trace_computes(run):
    workdir, _, stdout, (direct, records) = run
    params_like = experiment.Run.load(workdir).abstract_params
    saved, metadata = trace.load(os.path.join(workdir, "trace.safetensors"), params_like)
    assert jax.tree.structure(saved) == jax.tree.structure(direct)
    for got, want in zip(jax.tree.leaves(saved), jax.tree.leaves(direct)):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-7)
    assert [r["step"] for r in json.loads(metadata["checkpoints"])] == [8, 24]

    with open(os.path.join(workdir, "trace.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert [(c["step"], c["learning_rate"]) for c in summary["checkpoints"]] == \
        [(r["step"], r["learning_rate"]) for r in records]
    assert summary["num_pairs"] == 24 and summary["num_people"] == 4 and summary["split"] == "qa_train"
    for got, want in zip(summary["gradient_consistency"], records):
        assert got["step"] == want["step"]
        np.testing.assert_allclose(got["mean"], want["gradient_consistency"]["mean"], rtol=1e-5)
    stats = study.shared_statistics(study.shared_masks(direct, 0.01))
    assert set(summary["shared"]) == set(analysis.SCOPES)
    for scope in analysis.SCOPES:
        assert set(summary["shared"][scope]) == set(analysis.RULES)
        for rule in analysis.RULES:
            assert summary["shared"][scope][rule]["total"]["count"] == stats[scope][rule]["total"]["count"]
            assert f"\n{scope:<7} {rule} " in stdout
    assert stdout.count("traced step") == 2 and "mean BIO-QA gradient cosine at step 24" in stdout


def test_trace_refuses_to_overwrite_and_leaves_the_files(run):
    workdir = run[0]
    paths = [os.path.join(workdir, name) for name in ("trace.safetensors", "trace.json")]
    before = [(os.path.getmtime(p), open(p, "rb").read()) for p in paths]
    done = launch("trace", f"--workdir={workdir}", *TRACE_ARGS)
    one_line_error(done, "trace.safetensors already exists")
    assert [(os.path.getmtime(p), open(p, "rb").read()) for p in paths] == before
    assert not [name for name in os.listdir(workdir) if "partial" in name or name.endswith(".tmp")]


def test_intervene_table(run, tmp_path):
    workdir, final = run[:2]
    # A donor of the same data and init: the run as it was at step 16, with the run's trace as its own.
    donor = str(tmp_path / "donor")
    shutil.copytree(workdir, donor)
    shutil.rmtree(os.path.join(donor, "checkpoints", "24"))
    out = str(tmp_path / "interventions.json")
    done = launch("intervene", f"--workdir={workdir}", f"--donor={donor}", f"--out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "intervention" in done.stdout and "held-out" in done.stdout and "graft from donor" in done.stdout
    with open(out, encoding="utf-8") as f:
        report = json.load(f)
    assert (report["run"]["step"], report["donor"]["step"]) == (24, 16)
    assert report["rule"] == "intersection" and report["scope"] == "global" and report["top_fraction"] == 0.01
    rows = report["rows"]

    accuracies = {k: v for k, v in final.items() if k.endswith("_accuracy")}
    none = [r for r in rows if r["model"] == "run" and r["kind"] == "none"]
    assert len(none) == 1 and none[0]["count"] == 0
    assert none[0]["accuracies"] == accuracies

    params_like = experiment.Run.load(workdir).abstract_params
    result, _ = trace.load(os.path.join(workdir, "trace.safetensors"), params_like)
    expected = int(sum(np.count_nonzero(x) for x in jax.tree.leaves(analysis.shared_parameters(result, 0.01))))
    assert expected > 0
    by_key = {(r["model"], r["kind"], r["mask"]): r for r in rows}
    assert len(by_key) == len(rows) == 12  # run and donor: none and 4 ablations each; 2 grafts
    for model in ("run", "donor"):
        for kind in ("ablate", "reset"):
            assert by_key[model, kind, "shared"]["count"] == by_key[model, kind, "random"]["count"] == expected
    assert by_key["run", "graft", "shared"]["count"] == by_key["run", "graft", "random"]["count"] == expected
    for row in rows:
        assert set(row["accuracies"]) == set(accuracies) and all(0 <= v <= 1 for v in row["accuracies"].values())


@pytest.mark.parametrize("args, message", [
    (("--trace={tmp}/none.safetensors",), "python -m launch.trace --workdir="),
    (("--rule=union",), "--rule='union' is invalid"),
    (("--scope=layer",), "--scope='layer' is invalid: expected one of global, tensor"),
])
def test_intervene_errors_in_one_line(run, tmp_path, args, message):
    done = launch("intervene", f"--workdir={run[0]}", *(a.format(tmp=tmp_path) for a in args),
                  f"--out={tmp_path}/out.json")
    one_line_error(done, message)
    assert not os.path.exists(tmp_path / "out.json")


def test_benchmark_trace_figures_parity_and_profile(tmp_path):
    """launch.benchmark_trace on a small problem: the issue's JSON keys, the pair dots of pair_statistics equal to
    the lean trace's, the lean trace smaller in memory than the reference, and a profile split that adds up (the
    torch peers are checked on a checkpoint folder below)."""
    out, profiles = tmp_path / "bench.json", tmp_path / "profiles"
    done = launch("benchmark_trace", "--sizes=default", "--pairs=8", "--seq_len=16", "--chunk_size=4", "--repeats=1",
                  "--skip_torch", f"--json_out={out}", f"--profile_dir={profiles}")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())["default"]
    for key in ("params", "train_step_s", "lean_trace_s", "pair_stats_s", "reference_trace_s", "train_step_peak_mb",
                "lean_peak_mb", "pair_stats_peak_mb", "reference_peak_mb"):
        assert figures[key] > 0, key
    assert figures["lean_peak_mb"] < figures["reference_peak_mb"]
    assert figures["pair_stats_peak_mb"] < figures["lean_peak_mb"] and figures["pair_stats_parity_max_rel"] < 1e-5
    for name, p in figures["profiles"].items():
        assert p["op_seconds"] == pytest.approx(sum(p["parts"].values())) and p["top_ops"], name
    assert set(figures["profiles"]["lean"]["parts"]) <= {"forward and backward", "per-example gradients, their sums "
                                                          "and dots", "Gram dots", "everything else"}
    assert list(profiles.glob("default/lean/**/*.xplane.pb"))


def test_benchmark_trace_on_a_checkpoint_folder(hf_checkpoints, tmp_path):
    """--model=DIR runs every row on the folder's weights (tied Llama), keyed by the folder's name: the torch peers,
    which load the same folder, agree with the lean trace."""
    checkpoint = hf_checkpoints("llama3_tied")
    out = tmp_path / "bench.json"
    done = launch("benchmark_trace", f"--model={checkpoint.path}", "--pairs=4", "--seq_len=8", "--chunk_size=2",
                  "--repeats=1", f"--json_out={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert list(figures) == [os.path.basename(checkpoint.path)]
    figures = figures[os.path.basename(checkpoint.path)]
    assert figures["params"] == sum(p.numel() for p in checkpoint.model.parameters())
    for key in ("train_step_s", "lean_trace_s", "pair_stats_s", "reference_trace_s", "torch_func_s", "opacus_s"):
        assert figures[key] > 0, key
    for key in ("pair_stats_parity_max_rel", "torch_parity_max_rel", "opacus_parity_max_rel"):
        assert figures[key] < 1e-4, key


@pytest.mark.parametrize("model", ["{tmp}/missing", "{tmp}/file.txt"])
def test_benchmark_trace_refuses_a_model_that_is_not_a_folder(tmp_path, model):
    (tmp_path / "file.txt").write_text("not a checkpoint")
    out = tmp_path / "bench.json"
    done = launch("benchmark_trace", f"--model={model.format(tmp=tmp_path)}", f"--json_out={out}")
    one_line_error(done, "is not a folder")
    assert not out.exists()
