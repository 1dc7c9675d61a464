"""launch/generate_data.py as a user runs it: outputs and summary, or a one-line error and no folder."""
import json
import os
import pathlib
import subprocess
import sys

import datasets
import pytest

from factrecall_jax import data

REPO = pathlib.Path(__file__).resolve().parents[1]


def generate(*flags):
    return subprocess.run([sys.executable, "-m", "launch.generate_data", "--config=configs/default.py", *flags],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def test_writes_dataset_tokenizer_and_config(tmp_path):
    out = tmp_path / "data"
    result = generate(f"--out_dir={out}", "--config.data.num_people=200")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no partial folder left beside it
    for line in ("bio                       200       7400       37", "qa_train                  600",
                 "qa_test                   600", "people: 200, vocabulary:", f"wrote {out}"):
        assert line in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["num_people"] == 200 and config["tokenizer"] == "word"
    tokenized = datasets.load_from_disk(str(out / "dataset"))
    assert {name: len(split) for name, split in tokenized.items()} == {"bio": 200, "qa_train": 600, "qa_test": 600}
    assert tokenized["bio"].features == data.dataset.TOKEN_FEATURES
    tokenizer = data.load_tokenizer(str(out / "tokenizer"))
    row = tokenized["qa_test"][0]
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == row["text"]
    assert f"vocabulary: {len(tokenizer)} tokens" in result.stdout


@pytest.mark.parametrize("flag, message", [
    ("--config.data.nonexistent=1", "no such config field: 'nonexistent'"),
    ("--config.data.num_people=10000000000", "data.num_people=10000000000 is out of range"),
])
def test_user_errors_are_one_line_and_leave_nothing(tmp_path, flag, message):
    result = generate(f"--out_dir={tmp_path / 'data'}", flag)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and f"error: {message}" in result.stderr
    assert os.listdir(tmp_path) == []


def test_existing_out_dir_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused = generate(f"--out_dir={out}", "--config.data.num_people=20")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: {out} already exists" in refused.stderr
    assert os.listdir(out) == ["mine.txt"]
    replaced = generate(f"--out_dir={out}", "--config.data.num_people=20", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert sorted(os.listdir(out)) == ["config.json", "dataset", "tokenizer"]
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_positional_argument_is_an_error(tmp_path):
    result = generate(f"--out_dir={tmp_path / 'data'}", "stray")
    assert result.returncode == 2 and "error: unexpected arguments: stray" in result.stderr
    assert os.listdir(tmp_path) == []
