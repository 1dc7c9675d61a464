"""The launch-script conventions: all-or-nothing output folders and one-line user errors."""
import os

import pytest

from factrecall_jax import cli, errors


def test_atomic_output_dir_appears_only_when_the_block_finishes(tmp_path):
    out = tmp_path / "out"
    with cli.atomic_output_dir(out) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).write("done")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "done"
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with cli.atomic_output_dir(out) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").write("half")
            raise RuntimeError("crash mid-write")
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_refuses_to_clobber_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with cli.atomic_output_dir(out):
            pass
    with cli.atomic_output_dir(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert os.listdir(out) == ["new.txt"]


def test_run_turns_user_errors_into_one_line_and_exit_2(capsys):
    def main(argv):
        raise errors.InvalidValue("num_people=7 is not valid: use 1..10")

    with pytest.raises(SystemExit) as exit_info:
        cli.run(main)([])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: num_people=7 is not valid: use 1..10"


@pytest.mark.parametrize("bug", [ZeroDivisionError, ValueError, KeyError, FileNotFoundError])
def test_run_keeps_tracebacks_for_bugs(bug):
    """Only a UserError, raised where input is checked, is one line; a builtin from anywhere else is a bug."""
    def main(argv):
        raise bug("a bug, not a user error")

    with pytest.raises(bug):
        cli.run(main)([])


def test_run_prints_multi_line_messages_on_one_line(capsys):
    def main(argv):
        raise errors.MissingPath("could not be downloaded: ConnectError\nCheck your internet connection.")

    with pytest.raises(SystemExit):
        cli.run(main)([])
    assert capsys.readouterr().err == "error: could not be downloaded: ConnectError Check your internet connection.\n"
