"""A new user's first hour at the command line (issue 26): mistakes refused before torch loads, no silent
overwrite, and every message in cptune's voice (one-line warnings, counts that say what they count, file
names as given, singular and plural)."""

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from cptune.app.cli import EXIT_USAGE, exit_status, main

WORDS = ["fun", "dull", "great", "bad", "joy", "bore"]
ROWS = [(f"a {w} film, take {i}", "pos" if k % 2 == 0 else "neg") for i in range(2) for k, w in enumerate(WORDS)]
FAST = ["--steps", "1", "--batch-size", "4", "--template", "input: {x} output: {y}"]


def _csv(path, rows, header=("text", "label")):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _run(*args, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "cptune", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hour")
    out = folder / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(_csv(folder / "train.csv", ROWS)), *FAST,
                 "--output", str(out)]) == 0
    return out


# -- item 4: mistakes are found before torch is imported ----------------------------------------

CHECK = """
import json, sys
from cptune.app.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    code = main(argv)
    results.append([code, sorted(m for m in ("torch", "transformers", "huggingface_hub") if m in sys.modules)])
print(json.dumps(results))
"""


def test_usage_mistakes_are_refused_without_importing_torch(tmp_path):
    good = _csv(tmp_path / "good.csv", ROWS)
    no_text = _csv(tmp_path / "review.csv", ROWS, header=("review", "label"))
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "cptune_manifest.json").write_text("{}")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    existing = tmp_path / "labelled.csv"
    existing.write_text("keep me\n")
    out = str(tmp_path / "new")
    cases = [
        (["train", "--data", str(tmp_path / "missing.csv"), "--output", out], "does not exist"),
        (["train", "--data", str(no_text), "--output", out], "text column 'text' not found"),
        (["train", "--data", str(no_text), "--text-column", "review", "--label-column", "stars", "--output", out],
         "label column 'stars' not found in"),
        (["eval", str(saved), "--data", str(no_text)],
         "columns present: 'review', 'label' (choose it with --text-column)"),
        (["train", "--data", str(good), "--output", str(saved)], "already holds a classifier; pass --overwrite"),
        (["train", "--data", str(good), "--output", str(foreign)], "files cptune did not write (notes.txt)"),
        (["train", "--data", str(good), "--output", out, "--steps", "0"], "argument --steps: 0 is not"),
        (["train", "--data", str(good), "--output", out, "--shots", "100"],
         f"--shots 100 is more than the 12 labelled rows of {good}; give at most 12"),
        (["train", "--data", str(good), "--output", out, "--lr", "nan"], "argument --lr: nan is not"),
        (["train", "--data", str(good), "--output", out, "--label-words", "pos=good"], "no word for label"),
        (["train", "--data", str(good), "--output", out, "--label-words", "pos=good,neg=good"],
         "label words must differ; 'good' is used for more than one label"),
        (["train", "--data", str(good), "--output", out, "--template", "no placeholder"], "exactly one {x}"),
        (["train", "--data", str(good), "--output", out, "--model", "./no-such-folder"], "not an existing folder"),
        (["predict", str(tmp_path / "nope"), "--file", str(good), "--output", str(existing)],
         "exists; pass --overwrite"),
        (["predict", str(tmp_path / "nope"), "--file", str(good), "--text-column", "review", "--output",
          str(tmp_path / "o.csv")], "choose it with --text-column"),
        (["predict", str(tmp_path / "nope"), "some text"], "does not exist"),
        (["eval", str(tmp_path / "nope"), "--data", str(good)], "does not exist"),
        (["eval", str(saved), "--data", str(tmp_path / "missing.csv")], "does not exist"),
        (["eval", str(saved), "--data", str(good), "--output", str(existing)], "exists; pass --overwrite"),
        (["eval", str(saved), "--data", str(good), "--output", str(tmp_path / "no-dir" / "m.json")],
         "is not an existing folder"),
        (["eval", str(saved), "--data", str(good), "--output", str(saved)], "is a folder; give a file name"),
        (["train", "--data", str(good), "--output", out, "--device", "tpu"], "argument --device: unknown device 'tpu'"),
        (["train", "--data", str(good), "--output", out, "--dtype", "float8"], "argument --dtype: unsupported dtype"),
        (["predict", str(saved), "some text", "--device", "cuda:x"], "unknown device 'cuda:x'"),
        # compare checks its grid before cptune.app.compare imports torch
        (["compare", "--data", "nope", "--output", out], "unknown dataset 'nope'"),
        (["compare", "--dataset", str(tmp_path / "missing.csv"), "--output", out], "does not exist"),
        (["compare", "--methods", "icl", "magic", "--output", out], "argument --methods: unknown method 'magic'"),
        (["compare", "--shots", "4", "0", "--output", out], "argument --shots: 0 is not an integer >= 1"),
        (["compare", "--test-size", "0", "--output", out], "argument --test-size: 0 is not"),
        (["compare", "--template", "no placeholder", "--output", out], "exactly one {x}"),
        (["compare", "--label-words", "neg", "--output", out], "is not label=word"),
        # eval's common mistakes answer without huggingface_hub either (0.7 s)
        (["eval", str(tmp_path / "nope"), "--data", str(good), "--batch-size", "4"], "does not exist"),
        (["eval", str(saved), "--data", str(good), "--test-size", "0"], "argument --test-size: 0 is not"),
        (["eval", str(saved), "--data", str(good), "--test-size", "100"],
         f"--test-size 100 is more than the 12 rows of {good}"),
        (["eval", str(good), "--data", str(good)], f"classifier folder {good} is a file, not a folder"),
        (["predict", str(good), "some text"], f"classifier folder {good} is a file, not a folder"),
        (["train", "--data", str(good), "--output", out, "--model", "no such model!"], "not a local folder"),  # shape
        # serve: before the socket, the web stack and torch
        (["serve", str(tmp_path / "nope"), "--port", "0"], "does not exist"),
        (["serve", str(good), "--port", "0"], f"classifier folder {good} is a file, not a folder"),
        (["serve", str(saved), "--port", "0", "--model", "./no-such-folder"], "not an existing folder"),
    ]
    asking_the_hub_cache = [  # last: one process runs every case, and these import huggingface_hub
        (["train", "--data", str(good), "--output", out, "--model", "no-such-model"], "not in the Hugging Face cache"),
        (["compare", "--model", "no-such-model", "--output", out], "not in the Hugging Face cache"),
    ]
    first_asking = len(cases)
    cases += asking_the_hub_cache
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps([argv for argv, _ in cases])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(cases), done.stderr  # one line each
    for i, ((argv, message), (code, heavy), line) in enumerate(zip(cases, results, lines, strict=True)):
        assert code == EXIT_USAGE and heavy == ([] if i < first_asking else ["huggingface_hub"]), (argv, heavy, line)
        assert line.startswith("cptune: error: ") and message in line, (argv, line)
        assert not re.search(r"\b[a-z]+_[a-z_]+=", line), line  # flags only, no Python argument (text_column=)
    assert existing.read_text() == "keep me\n" and not (tmp_path / "new").exists()


def test_eval_refuses_labels_and_rows_from_the_folder_before_the_model_loads(trained, tmp_path):
    unknown = _csv(tmp_path / "unknown.csv", [("a new film", "pos"), ("another new film", "meh")])
    seen = _csv(tmp_path / "seen.csv", ROWS)  # every text was a training text
    fresh = _csv(tmp_path / "fresh.csv", [("a new film", "pos"), ("another new film", "neg")])
    cases = [(["eval", str(trained), "--data", str(unknown)], "the data has label 'meh', which the classifier"),
             (["eval", str(trained), "--data", str(seen)], f"every row of {seen} was used to train the classifier"),
             (["eval", str(trained), "--data", str(fresh), "--test-size", "2", "--seed", "3"], None)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", CHECK, json.dumps([argv for argv, _ in cases[:2]])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    for (argv, message), (code, heavy), line in zip(cases[:2], json.loads(done.stdout), lines, strict=True):
        assert code == EXIT_USAGE and heavy == [] and message in line, (argv, heavy, line)
    assert main(cases[2][0]) == 0  # a readable folder with good data goes on to the model and scores


def test_the_cli_accepts_the_dtypes_and_devices_the_model_loader_takes():
    from cptune import models
    from cptune.app.cli import DTYPE_NAMES, device_name, dtype_name

    assert DTYPE_NAMES == models.DTYPE_NAMES  # the parser's list cannot drift from the loader's
    for name in ("auto", "float32", "BFloat16", "torch.float16", "float64"):
        assert dtype_name(name) == name
    for name in ("auto", "cpu", "CUDA", "cuda:1", "mps"):
        assert device_name(name) == name


def test_a_missing_extra_is_a_usage_error():
    assert exit_status(ModuleNotFoundError("cptune serve needs fastapi: pip install 'cptune[serve]'")) == EXIT_USAGE


# -- item 3: no silent overwrite ----------------------------------------------------------------

def test_train_refuses_an_existing_classifier_unless_overwrite(trained, tiny_dir, tmp_path, capsys):
    data = _csv(tmp_path / "train.csv", ROWS)
    before = (trained / "cptune_classifier.json").read_text()
    args = ["train", "--model", str(tiny_dir), "--data", str(data), *FAST, "--seed", "1", "--output", str(trained)]
    assert main(args) == 2
    assert "already holds a classifier; pass --overwrite" in capsys.readouterr().err
    assert (trained / "cptune_classifier.json").read_text() == before
    assert main([*args, "--overwrite"]) == 0
    assert json.loads((trained / "cptune_classifier.json").read_text())["train"]["seed"] == 1


def test_train_into_a_folder_of_other_files_only_with_overwrite_and_they_stay(tiny_dir, tmp_path, capsys):
    data = _csv(tmp_path / "train.csv", ROWS)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    args = ["train", "--model", str(tiny_dir), "--data", str(data), *FAST, "--output", str(folder)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "cptune_classifier.json").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*args[:-1], str(empty)]) == 0  # an empty folder holds nothing to lose


def test_predict_file_refuses_an_existing_output_unless_overwrite(trained, tmp_path, capsys):
    source = _csv(tmp_path / "in.csv", [("a fun film", "pos"), ("", "neg"), ("a dull film", "neg"), (" ", "pos")])
    out = tmp_path / "out.csv"
    out.write_text("someone's file\n")
    args = ["predict", str(trained), "--file", str(source), "--output", str(out)]
    assert main(args) == 2
    assert "--output" in capsys.readouterr().err and out.read_text() == "someone's file\n"
    assert main([*args, "--overwrite"]) == 0
    # item 5: the count says what it counts
    assert f"cptune: 2 rows annotated into {out}, 2 rows without text left blank" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 5


def test_eval_output_refuses_an_existing_file_unless_overwrite(trained, tmp_path, capsys):
    data = _csv(tmp_path / "test.csv", [(f"an {w} story", "pos" if k % 2 == 0 else "neg") for k, w in enumerate(WORDS)])
    out = tmp_path / "metrics.json"
    out.write_text("someone's file\n")
    args = ["eval", str(trained), "--data", str(data), "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cptune: error: --output {out} exists; pass --overwrite")
    assert out.read_text() == "someone's file\n"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(out.read_text())["test_size"] == len(WORDS)


# -- item 5: cptune's voice -----------------------------------------------------------------------

def test_messages_name_files_as_given_and_count_in_the_singular(trained, tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _csv(tmp_path / "test.csv", [(f"an {w} story", "pos" if k % 2 == 0 else "neg") for k, w in enumerate(WORDS)])
    assert main(["eval", str(trained), "--data", "test.csv", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"] == "test.csv"
    _csv(tmp_path / "train.csv", ROWS)
    assert main(["train", "--model", str(tiny_dir), "--data", "train.csv", *FAST, "--output", "c"]) == 0
    assert "trained 1 step on 12 labelled examples" in capsys.readouterr().out


def test_skipped_rows_are_one_cptune_warning_line(tiny_dir, tmp_path):
    data = _csv(tmp_path / "train.csv", [*ROWS, ("", "pos"), ("  ", "neg")])
    done = _run("train", "--model", tiny_dir, "--data", data, *FAST, "--output", tmp_path / "c")
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    assert warning == [f"cptune: warning: {data}: skipped 2 rows with a blank 'text'; 12 rows used"], done.stderr
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr


def test_eval_shows_a_scoring_progress_bar(trained, tmp_path, capsys, monkeypatch):
    from cptune import scoring

    monkeypatch.setattr(scoring, "BAR_DELAY_S", 0.0)  # the tiny model scores faster than the bar's delay
    data = _csv(tmp_path / "test.csv", [(f"an {w} story {i}", "pos" if k % 2 == 0 else "neg")
                                        for i in range(3) for k, w in enumerate(WORDS)])
    assert main(["eval", str(trained), "--data", str(data), "--batch-size", "4"]) == 0
    err = capsys.readouterr().err
    assert "score: 100%" in err and "18/18" in err, err


# -- item 4: a context too long for the model, found with the tokenizer and named by the CLI's flag ----------

def _short_model(tiny_dir, folder, positions: int, weights: bool):
    """The tiny model with ``positions`` positions; without its weights file when ``weights`` is False (a load
    of the weights then fails, so a check that answers was made before it)."""
    import shutil

    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": positions}))
    if not weights:
        for path in folder.glob("*.safetensors"):
            path.unlink()
    return folder


def test_a_context_too_long_is_found_before_the_weights_load_and_names_the_flag(tiny_dir, tmp_path, capsys):
    model = _short_model(tiny_dir, tmp_path / "short", positions=64, weights=False)
    data = _csv(tmp_path / "train.csv", ROWS)
    args = ["train", "--model", str(model), "--data", str(data), *FAST, "--output", str(tmp_path / "c")]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("cptune: error: the context of 12 demonstrations is ") and "more than the model's 64" in err
    assert err.endswith("use a smaller context size (--context-size) or shorter texts"), err
    assert not (tmp_path / "c").exists()


def test_a_context_too_long_with_template_auto_names_the_flag_too(tiny_dir, tmp_path, capsys):
    model = _short_model(tiny_dir, tmp_path / "short", positions=64, weights=True)
    data = _csv(tmp_path / "train.csv", ROWS)
    args = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--output", str(tmp_path / "c")]
    assert main(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "more than the model's 64" in err and "(--context-size)" in err and "context_size=" not in err, err


def test_predict_from_a_terminal_says_it_reads_standard_input(trained, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("a fun film\n"))
    assert main(["predict", str(trained)]) == 0
    captured = capsys.readouterr()
    assert "cptune: reading texts from standard input, one per line; end with Ctrl-D" in captured.err
    assert json.loads(captured.out)["text"] == "a fun film"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a fun film\n"))  # a pipe: nothing to say
    assert main(["predict", str(trained)]) == 0
    assert "standard input" not in capsys.readouterr().err


def test_predict_says_when_one_label_takes_the_texts(trained, capsys):
    """Labelling many texts is where a collapse the fit missed shows: past the collapse limit a note says
    so (identical texts get one label, so 25 of them are past it); a few texts, or balanced ones, say nothing."""
    assert main(["predict", str(trained), *["a fun film"] * 25]) == 0
    captured = capsys.readouterr()
    labels = {json.loads(line)["label"] for line in captured.out.splitlines()}
    assert len(labels) == 1
    assert (f"cptune: note: {labels.pop()!r} was given to 100% of these 25 texts, against its 50% of the "
            "labelled rows") in captured.err
    assert main(["predict", str(trained), *["a fun film"] * 19]) == 0  # too few to read shares from
    assert "note:" not in capsys.readouterr().err
