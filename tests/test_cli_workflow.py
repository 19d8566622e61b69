"""train -> eval -> predict through the command line, on a tiny model saved to disk; kill and resume."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cptune.app.cli import main
from cptune.cpt.files import read_training_state

KILL_SEED = 10
"""Seeds the step after which the interrupted run is killed (reproducible; change it to try another step)."""
TRAIN = ["--data", "rotten_tomatoes", "--shots", "4", "--batch-size", "2", "--lr", "0.01", "--eps-input", "1.0"]


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "clf"
    assert main(["train", "--model", str(tiny_dir), *TRAIN, "--steps", "2", "--output", str(out)]) == 0
    return out


def _cli(*args, stdin=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "cptune", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


def test_train_eval_predict(tiny_dir, tmp_path, capsys):
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), *TRAIN, "--steps", "4", "--output", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "cptune_classifier.json").is_file()
    assert not (out / "checkpoint").exists()  # the final save replaces the folder and its checkpoint
    capsys.readouterr()
    assert main(["eval", str(out), "--data", "rotten_tomatoes", "--test-size", "10", "--json",
                 "--output", str(tmp_path / "m.json")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and sum(map(sum, metrics["confusion"])) == 10
    assert json.loads((tmp_path / "m.json").read_text())["test_size"] == 10

    # predict: arguments, a file, standard input: same answers
    texts = ["a gripping film", "dull and far too long"]
    assert main(["predict", str(out), *texts]) == 0
    from_args = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    f = tmp_path / "texts.txt"
    f.write_text("\n".join(texts) + "\n")
    from_file = [json.loads(line) for line in _cli("predict", out, "--file", f).stdout.splitlines()]
    from_stdin = [json.loads(line) for line in _cli("predict", out, stdin="\n".join(texts)).stdout.splitlines()]
    assert from_args == from_file == from_stdin
    assert [r["text"] for r in from_args] == texts
    for row in from_args:
        assert set(row["probabilities"]) == {"negative", "positive"}
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)

    # --calibrate: the probabilities divided by the content-free ones after the same context
    from cptune import CPTClassifier
    from cptune.scoring import CONTENT_FREE_TEXTS, contextual_calibration

    assert main(["predict", str(out), *texts, "--calibrate"]) == 0
    calibrated = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    clf = CPTClassifier.load(out)
    uncorrected = clf.label_bias_  # measured on uncalibrated scores: --calibrate replaces it (applied_label_bias)
    clf.label_bias_ = None
    expected = contextual_calibration(clf.decision_scores(texts), clf.decision_scores(list(CONTENT_FREE_TEXTS))).exp()
    for row, probs in zip(calibrated, expected.tolist(), strict=True):
        assert [row["probabilities"][c] for c in clf.classes_] == pytest.approx(probs, abs=2e-6)
    assert [r["probabilities"] for r in calibrated] != [r["probabilities"] for r in from_args]
    # saved with calibration on (train --calibrate): predict calibrates unless told --no-calibrate
    assert json.loads((out / "cptune_classifier.json").read_text())["calibrate"] is False
    on = tmp_path / "clf-calibrated"
    assert main(["train", "--model", str(tiny_dir), *TRAIN, "--steps", "4", "--calibrate", "--output", str(on)]) == 0
    assert json.loads((on / "cptune_classifier.json").read_text())["calibrate"] is True
    capsys.readouterr()
    assert main(["predict", str(on), *texts]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    on_bias = CPTClassifier.load(on).label_bias_  # its guard measured calibrated scores
    if on_bias is None:  # the same training as `out`: `out --calibrate`'s answers
        assert got == calibrated
    else:  # those, less the bias `on`'s guard removed from the calibrated scores
        from cptune.scoring import remove_label_bias

        shifted = remove_label_bias(expected.log(), torch.tensor(on_bias)).exp()
        for row, probs in zip(got, shifted.tolist(), strict=True):
            assert [row["probabilities"][c] for c in clf.classes_] == pytest.approx(probs, abs=2e-6)
        assert got != calibrated
    assert main(["predict", str(on), *texts, "--no-calibrate"]) == 0
    plain = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    if uncorrected is None:  # the same training as `out`: its predictions, then
        assert plain == from_args
    else:  # `out`'s without the bias its guard removed (`on`'s guard measured calibrated scores)
        probs = clf.predict_proba(texts)  # clf: `out` without its label bias, not calibrating
        for row, p in zip(plain, probs.tolist(), strict=True):
            assert [row["probabilities"][c] for c in clf.classes_] == pytest.approx(p, abs=2e-6)
        assert plain != from_args


@pytest.mark.parametrize(
    "args, message",
    [
        (["predict", "{clf}", "x", "--file", "f.txt"], "not both"),
        (["predict", "{clf}", "--file", "{tmp}/missing.txt"], "does not exist"),
        (["predict", "{tmp}"], "cptune_classifier.json"),
        (["train", "--output", "{tmp}/o", "--label-words", "negative"], "label=word"),
        (["train", "--output", "{tmp}/o", "--resume"], "no checkpoint"),
        (["train", "--output", "{tmp}/o", "--checkpoint-every", "0"], "checkpoint-every"),
        (["train", "--output", "{tmp}/o", "--decay", "0"], "argument --decay: 0 is not a number in (0, 1]"),
        (["train", "--output", "{tmp}/o", "--template", "no placeholder"], "exactly one {x}"),
        (["train", "--output", "{tmp}/o", "--label-words", "negative=bad,positive=bad"], "must differ"),
        (["train", "--output", "{tmp}/o", "--label-words", "negative=bad"], "no word for label 'positive'"),
    ],
)
def test_cli_mistakes_are_one_line(args, message, tiny_dir, trained, tmp_path, capsys):
    clf = trained
    args = [a.format(clf=clf, tmp=tmp_path) for a in args]
    if args[0] == "train":
        args += ["--model", str(tiny_dir), "--steps", "1", "--data", "rotten_tomatoes"]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("cptune: error:")]  # notices (the model's device) may precede
    assert code == 2 and errors == err[-1:] and message in err[-1], err
    assert not (tmp_path / "o").exists()


def test_sigkill_then_resume_gives_the_uninterrupted_delta(tiny_dir, tmp_path):
    kill_after = random.Random(KILL_SEED).randint(6, 60)
    steps = 120
    args = ["train", "--model", tiny_dir, *TRAIN, "--steps", steps, "--checkpoint-every", "3"]
    reference = tmp_path / "reference"
    done = _cli(*args, "--output", reference)
    assert done.returncode == 0, f"uninterrupted run failed (kill_after={kill_after})\n{done.stderr}"

    out = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "cptune", *map(str, args), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = (read_training_state(out / "checkpoint") or {}).get("step", 0)
        except (ValueError, OSError):
            step = 0  # the folder is being swapped in; try again
        if step >= kill_after:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    where = f"kill_after={kill_after} (seed {KILL_SEED}), killed at checkpoint step {step}"
    assert proc.returncode == -signal.SIGKILL, f"training finished before it could be killed; {where}"
    assert not (out / "cptune_classifier.json").exists(), f"a killed run wrote its classifier; {where}"
    resumed = _cli(*args, "--output", out, "--resume")
    assert resumed.returncode == 0, f"{where}\n{resumed.stderr}"
    a = load_file(str(reference / "cptune_state.safetensors"))["delta"]
    b = load_file(str(out / "cptune_state.safetensors"))["delta"]
    assert torch.equal(a, b), f"resumed delta differs by {(a - b).abs().max()}; {where}"


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], "does not exist"),
        ("text,category\nfun,pos\ndull,neg\n", [], "label"),
        ("text,label\n", [], "no usable examples"),
        ("text,label\nfun,pos\ndull,neg\n", ["--label-column", "sentiment"], "sentiment"),
        ("text,label\nfun,pos\nfine,pos\ndull,neg\n", ["--shots", "4"], "more than the 3 labelled rows"),
        (b"\xff\xfe\x00garbage\x00\xff", [], "data.csv"),
    ],
)
def test_bad_data_files_are_one_line(content, extra, message, tiny_dir, tmp_path, capsys):
    path = tmp_path / "data.csv"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    args = ["train", "--model", str(tiny_dir), "--data", str(path), "--shots", "2", "--steps", "1", *extra,
            "--label-words", "pos=positive,neg=negative", "--output", str(tmp_path / "o")]
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


def test_same_seed_same_predictions(tiny_dir, tmp_path):
    from cptune import CPTClassifier, TrainSettings

    texts, labels = ["a joy", "a bore", "great fun", "too long"], ["pos", "neg", "pos", "neg"]
    probs = []
    for _ in range(2):
        clf = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"},
                            train=TrainSettings(steps=3, batch_size=2, lr=1e-2, seed=4))
        probs.append(clf.fit(texts, labels).predict_proba(["what a film", "dull"]))
    assert (probs[0] == probs[1]).all()


def test_train_on_a_file_with_fewer_shots_than_classes_knows_every_class(tiny_dir, tmp_path, capsys):
    data = tmp_path / "three.csv"
    rows = [f"{word} text {i},{label}" for i in range(6) for word, label in
            (("sunny", "weather"), ("goal", "sport"), ("vote", "politics"))]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--shots", "2", "--steps", "1",
                 "--output", str(out)]) == 0
    info = json.loads((out / "cptune_classifier.json").read_text())
    assert len(info["examples"]) == 2 and len({label for _, label in info["examples"]}) == 2
    assert {label for label, _ in info["labels"]} == {"weather", "sport", "politics"}  # not only the shots' two
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--test-size", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == ["politics", "sport", "weather"]
