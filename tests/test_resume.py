"""experiment.train end to end on a tiny config: interrupted runs resume to bitwise the uninterrupted result, a forked
stage 2 equals the unforked one, and a work directory refuses another config.

Every training run happens once per module (module-scoped fixtures); compiling the fused train step dominates.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import config_file
from factrecall_jax import configuration, experiment, train
from factrecall_jax.checkpoint import Checkpoints

STEPS = 24  # mixed steps; two_stage: 12 + 12


def quiet(*_):
    pass


def tiny_config(schedule="mixed"):
    """configs/default.py:tiny (40 people, a 32-wide model, 24 mixed steps of 8 + 8 rows), stages of 12 + 12 steps."""
    config = config_file("default.py", "tiny")
    config.two_stage.update(stage1_steps=12, stage2_steps=12, qa_batch=8)
    config.schedule = schedule
    return config


@pytest.fixture(scope="module")
def template():
    """A TrainState with the structure every checkpoint of the tiny config has (any phase's optimizer state)."""
    run = experiment.Run(configuration.read(tiny_config()))
    phase = experiment.schedule(run.config)[0]
    return run.abstract_state(train.make_optimizer(phase.optimizer, phase.steps))


def saved_steps(workdir):
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return checkpoints.steps()
    finally:
        checkpoints.close()


def restore(workdir, step, template):
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return checkpoints.restore(step, template)
    finally:
        checkpoints.close()


def metrics_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return f.read().splitlines()


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for (path, x), y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------- mixed


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mixed"))
    return workdir, experiment.train(tiny_config(), workdir, log=quiet)


@pytest.fixture(scope="module")
def mixed_resumed(tmp_path_factory):
    """Stopped at step 12 (steps_per_call 4 and checkpoints every 8: not a checkpoint step), then run again."""
    workdir = str(tmp_path_factory.mktemp("mixed_resumed"))
    first = experiment.train(tiny_config(), workdir, until_step=12, log=quiet)
    steps_after_first, lines_after_first = saved_steps(workdir), metrics_lines(workdir)
    logs = []
    final = experiment.train(tiny_config(), workdir, log=lambda *a: logs.append(" ".join(map(str, a))))
    return workdir, final, dict(first=first, steps=steps_after_first, lines=lines_after_first, logs=logs)


def test_mixed_run_records(mixed_run, template):
    workdir, final = mixed_run
    assert saved_steps(workdir) == [8, 16, 24]
    records = [json.loads(line) for line in metrics_lines(workdir)]
    assert [r["step"] for r in records] == [0, 4, 8, 12, 16, 20, 24]
    assert [r["step"] for r in records if "eval" in r] == [0, 8, 16, 24]
    assert records[-1]["eval"] == final
    assert {"bio_accuracy", "qa_train_accuracy", "qa_test_accuracy"} <= set(final)
    assert all(r["phase"] == "mixed" and np.isfinite(r["loss"]) for r in records[1:])
    assert records[-1]["loss"] < records[1]["loss"]  # it trained
    state = restore(workdir, STEPS, template)
    assert int(state.step) == STEPS
    initial = template.params
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial)))


def test_mixed_interrupted_run_stops_where_asked(mixed_resumed):
    _, _, first = mixed_resumed
    assert max(first["steps"]) == 12 and 8 in first["steps"]
    assert json.loads(first["lines"][-1])["step"] == 12
    assert any("resumed" in line and "step 12" in line for line in first["logs"])


def test_mixed_resume_is_bitwise_the_uninterrupted_run(mixed_run, mixed_resumed, template):
    workdir, final, _ = mixed_resumed
    assert saved_steps(workdir) == [8, 12, 16, 24]
    assert final == mixed_run[1]
    # parameters, optimizer state and step
    assert_bitwise_equal(restore(workdir, STEPS, template), restore(mixed_run[0], STEPS, template))


def test_mixed_resume_writes_the_uninterrupted_metrics(mixed_run, mixed_resumed):
    assert metrics_lines(mixed_resumed[0]) == metrics_lines(mixed_run[0])


def test_rerunning_a_finished_run_changes_nothing(mixed_run, template):
    workdir, final = mixed_run
    lines, steps = metrics_lines(workdir), saved_steps(workdir)
    before = restore(workdir, STEPS, template)
    assert experiment.train(tiny_config(), workdir, log=quiet) == final
    assert metrics_lines(workdir) == lines and saved_steps(workdir) == steps
    assert_bitwise_equal(restore(workdir, STEPS, template), before)


def test_resuming_with_another_config_raises(mixed_run):
    workdir, _ = mixed_run
    lines = metrics_lines(workdir)
    for change in (lambda c: c.mixed.update(steps=30), lambda c: c.optimizer.update(learning_rate=1e-3),
                   lambda c: setattr(c, "schedule", "two_stage")):
        config = tiny_config()
        change(config)
        with pytest.raises(ValueError, match="another config"):
            experiment.train(config, workdir, log=quiet)
    assert metrics_lines(workdir) == lines


# ---------------------------------------------------------------- two stage


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("two_stage"))
    return workdir, experiment.train(tiny_config("two_stage"), workdir, log=quiet)


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A stage-1-only run: until_step = stage1_steps, as a run that stage 2 forks from."""
    workdir = str(tmp_path_factory.mktemp("stage1"))
    experiment.train(tiny_config("two_stage"), workdir, until_step=12, log=quiet)
    return workdir, saved_steps(workdir), metrics_lines(workdir)


@pytest.fixture(scope="module")
def forked_run(tmp_path_factory, stage1_run):
    workdir = str(tmp_path_factory.mktemp("forked"))
    config = tiny_config("two_stage")
    config.two_stage.fork_from = stage1_run[0]
    logs = []
    final = experiment.train(config, workdir, log=lambda *a: logs.append(" ".join(map(str, a))))
    return workdir, final, logs


@pytest.fixture(scope="module")
def two_stage_resumed(stage1_run, forked_run):
    """The stage-1 run continued: to step 20 (inside stage 2), then killed before its checkpoint at 20 (emulated by
    deleting it: checkpoints are every 8 steps, so a run killed after step 20 has only 16), then run to the end."""
    workdir = stage1_run[0]
    config = tiny_config("two_stage")
    experiment.train(config, workdir, until_step=20, log=quiet)
    steps = saved_steps(workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "20"))
    final = experiment.train(config, workdir, log=quiet)
    return workdir, final, steps


def test_stage1_run_stops_at_the_boundary(stage1_run):
    _, steps, lines = stage1_run
    assert steps == [8, 12]
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [0, 4, 8, 12] and {r.get("phase") for r in records[1:]} == {"bio"}


def test_two_stage_run_records(two_stage_run):
    workdir, final = two_stage_run
    assert saved_steps(workdir) == [8, 12, 16, 24]  # 12: the stage boundary
    records = [json.loads(line) for line in metrics_lines(workdir)]
    assert [(r["step"], r.get("phase")) for r in records] == [
        (0, None), (4, "bio"), (8, "bio"), (12, "bio"), (16, "qa"), (20, "qa"), (24, "qa")]
    assert records[-1]["eval"] == final
    assert all(r["loss_bio"] > 0 and "loss_qa" not in r for r in records[1:4])
    assert all(r["loss_qa"] > 0 and "loss_bio" not in r for r in records[4:])
    # stage 2's own schedule: warmup from 0 to stage2_learning_rate (3e-4) over 4 steps of the 12
    lrs = [r["learning_rate"] for r in records[4:]]  # means over each fused call of 4 steps
    assert lrs[0] == pytest.approx(np.mean([0, 0.75e-4, 1.5e-4, 2.25e-4]), rel=1e-5)
    assert max(lrs) <= 3e-4 * (1 + 1e-6)


def test_two_stage_resume_is_bitwise_the_uninterrupted_run(two_stage_run, two_stage_resumed, template):
    workdir, final, steps = two_stage_resumed
    assert steps == [8, 12, 16, 20]
    assert saved_steps(workdir) == [8, 12, 16, 24]
    assert final == two_stage_run[1]
    assert_bitwise_equal(restore(workdir, STEPS, template), restore(two_stage_run[0], STEPS, template))


def test_two_stage_resume_writes_the_uninterrupted_metrics(two_stage_run, two_stage_resumed):
    assert metrics_lines(two_stage_resumed[0]) == metrics_lines(two_stage_run[0])


def test_forked_stage2_equals_the_unforked_run(two_stage_run, forked_run, template):
    """fresh_optimizer=True: stage 2 starts from the stage-1 parameters with a new optimizer state, forked or not."""
    workdir, final, logs = forked_run
    assert any("forked" in line for line in logs)
    assert saved_steps(workdir) == [16, 24]
    assert_bitwise_equal(restore(workdir, STEPS, template).params, restore(two_stage_run[0], STEPS, template).params)
    assert final == two_stage_run[1]
    reference = [line for line in metrics_lines(two_stage_run[0]) if json.loads(line)["step"] > 12]
    assert metrics_lines(workdir) == reference


def test_unforked_stage2_starts_with_a_fresh_optimizer(two_stage_run, template):
    """With fresh_optimizer=True the Adam moments and count of stage 2 start at zero at the boundary; after 12 steps
    of stage 2 the optimizer's step count is 12, not 24."""
    state = restore(two_stage_run[0], STEPS, template)
    counts = [int(x) for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
              if "count" in jax.tree_util.keystr(path)]
    assert counts and all(c == 12 for c in counts)
