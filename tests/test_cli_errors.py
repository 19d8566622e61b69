"""Honest CLI failures: status 2 for the user's mistakes, 1 for run-time failures, one line each,
the traceback only with --debug; folders that are missing or are plain adapters say so; the demo's
output works with eval and predict as it is."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from cptune.app.cli import main
from cptune.app.demo import CLASSIFIER_SUBDIR

TRAIN = ["--data", "rotten_tomatoes", "--shots", "4", "--batch-size", "2", "--steps", "2"]


@pytest.fixture(scope="module")
def demo_out(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--model", str(tiny_dir), "--test-size", "4", "--steps", "2", "--output", str(out)]) == 0
    return out


def _cli(*args, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "cptune", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def _one_line(err: str) -> str:
    """The error line, checked to be the only one and the last (a progress bar may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert errors == lines[-1:] and lines[-1].startswith("cptune: error: "), err
    return lines[-1]


def test_demo_output_works_with_eval_and_predict(demo_out, capsys):
    folder = demo_out / CLASSIFIER_SUBDIR
    capsys.readouterr()
    assert main(["predict", str(folder), "a gripping film", "dull and far too long"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["a gripping film", "dull and far too long"]
    assert all(set(r["probabilities"]) == {"negative", "positive"} for r in rows)
    assert main(["eval", str(folder), "--data", "rotten_tomatoes", "--test-size", "4", "--json"]) == 0
    assert sum(map(sum, json.loads(capsys.readouterr().out)["confusion"])) == 4


def test_missing_folder_says_it_is_missing(tmp_path, capsys):
    for command in ("eval", "predict"):
        assert main([command, str(tmp_path / "nope"), *(["some text"] if command == "predict" else [])]) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"classifier folder {tmp_path / 'nope'} does not exist" in line


def test_peft_adapter_folder_says_what_is_missing_and_how_to_use_it(demo_out, tmp_path, capsys):
    adapter = tmp_path / "peft-adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # what PEFT's save_pretrained writes
        shutil.copy(demo_out / CLASSIFIER_SUBDIR / name, adapter / name)
    assert main(["predict", str(adapter), "a gripping film"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "no cptune_classifier.json" in line and "--template" in line and "from_adapter" in line

    # with the template and label words it is a classifier, and predicts as the saved one does (the demo
    # chose them with template="auto"; its classifier file records the choice) but for the label bias the
    # balance guard removed, if it removed one: that is in the classifier file, not in PEFT's adapter files
    info = json.loads((demo_out / CLASSIFIER_SUBDIR / "cptune_classifier.json").read_text())
    words = ",".join(f"{label}={word}" for label, word in info["labels"])
    template = info["template"]["format"].replace("\n", "\\n")
    assert main(["predict", str(adapter), "a gripping film", "what a bore", "--template", template,
                 "--label-words", words]) == 0
    from_adapter = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", str(demo_out / CLASSIFIER_SUBDIR), "a gripping film", "what a bore"]) == 0
    saved = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    labels = [label for label, _ in info["labels"]]
    bias = torch.tensor(info["label_bias"] if info["label_bias"] is not None else [0.0] * len(labels))
    for a, b in zip(from_adapter, saved, strict=True):
        corrected = torch.softmax(torch.tensor([a["probabilities"][k] for k in labels]).log() - bias, dim=0)
        assert b["label"] == labels[int(corrected.argmax())]
        assert all(abs(float(p) - b["probabilities"][k]) < 1e-5 for k, p in zip(labels, corrected, strict=True))

    # the adapter options are refused for a classifier, and needed together
    assert main(["predict", str(demo_out / CLASSIFIER_SUBDIR), "x", "--template", "{x} {y}"]) == 2
    assert "are for adapter folders" in _one_line(capsys.readouterr().err)
    assert main(["predict", str(adapter), "x", "--template", "input: {x} output: {y}"]) == 2
    assert "needs both --template and --label-words" in _one_line(capsys.readouterr().err)


def test_nan_loss_is_a_run_time_failure_exit_1(tiny_dir, tmp_path, capsys):
    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    assert main(["train", "--model", str(broken), *TRAIN, "--output", str(tmp_path / "clf")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "loss is nan at step 1 of 2; stopped and kept the state after 0 steps" in line and "--debug" in line


def test_debug_prints_the_traceback_plain_run_does_not(tmp_path):
    plain = _cli("eval", tmp_path / "nope")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    _one_line(plain.stderr)
    for run in (_cli("eval", tmp_path / "nope", "--debug"), _cli("--debug", "eval", tmp_path / "nope"),
                _cli("eval", tmp_path / "nope", env={"CPTUNE_DEBUG": "1"})):
        assert run.returncode == 2
        assert "Traceback (most recent call last)" in run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith("cptune: error: classifier folder")


@pytest.mark.parametrize("args, message", [
    (["demo", "--shots", "abc"], "argument --shots: 'abc' is not an integer >= 1"),
    (["train"], "the following arguments are required: --data, --output"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    # an unknown option names itself, though a required argument (the command, --data) is missing too
    (["--frobnicate"], "unrecognized arguments: --frobnicate (see `cptune --help`)"),
    (["train", "--frobnicate=1", "--dat", "x"], "unrecognized arguments: --frobnicate (see `cptune train --help`)"),
    (["eval", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["train", "--seed", "-1", "--dat", "x"], "the following arguments are required: --output"),  # -1 is a value
])
def test_argument_mistakes_are_one_line_exit_2(args, message):
    run = _cli(*args)
    assert run.returncode == 2
    assert message in _one_line(run.stderr)


def test_output_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("the user's file")
    assert main(["demo", "--output", str(target)]) == 2
    assert "is a file, not a folder" in _one_line(capsys.readouterr().err)
    assert main(["train", "--model", "no-such-model-is-loaded", "--data", "rotten_tomatoes", "--output",
                 str(target)]) == 2
    assert "is a file, not a folder" in _one_line(capsys.readouterr().err)
    assert target.read_text() == "the user's file"
