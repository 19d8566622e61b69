"""The command line: help works, mistakes give one line on stderr, exit 2, and leave no files."""

import subprocess
import sys

import pytest

from cptune.app.cli import main


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "cptune", "demo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--shots" in out.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "0"], "lr=0.0 must be"),
        (["--steps", "0"], "steps=0 must be"),
        (["--decay", "1.5"], "opt_loss_decay_factor=1.5"),
        (["--eps-input", "-1"], "opt_projection_epsilon=-1.0"),
        (["--dataset", "imdb"], "unknown dataset 'imdb'"),
        (["--data", "imdb"], "unknown dataset 'imdb'"),
        (["--shots", "0"], "argument --shots: 0 is not an integer >= 1"),
        (["--test-size", "-2"], "argument --test-size: -2 is not an integer >= 1"),
        (["--model", "/does/not/exist"], "/does/not/exist"),
    ],
)
def test_bad_input_one_line_exit_2_no_files(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["demo", "--output", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("cptune: error:") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("command", ["demo", "train", "eval", "predict", "datasets", "compare"])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "cptune", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout
