"""A user's own files through the command line, on a tiny model: many labels, a k-shot context, a whole
imbalanced test file, integer labels, annotated CSVs, and a command line that answers at once."""

import csv
import json
import subprocess
import sys

import pytest

from cptune import CPTClassifier
from cptune.app.cli import main

WORDS = ["fun", "dull", "great", "bad", "joy", "bore", "gripping", "long", "moving", "thin"]
TRAIN_ROWS = [(f"a {w} film, take {i}", "pos" if k % 2 == 0 else "neg") for i in range(4) for k, w in enumerate(WORDS)]
FAST = ["--steps", "2", "--batch-size", "4", "--lr", "0.01"]


def _csv(path, rows, header=("text", "label")):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def trained(tiny_dir, tmp_path_factory):
    """A classifier trained on 40 labelled rows with a 4-shot context."""
    folder = tmp_path_factory.mktemp("own")
    data = _csv(folder / "train.csv", TRAIN_ROWS)
    out = folder / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--context-size", "4",
                 "--label-words", "pos=positive,neg=negative", *FAST, "--output", str(out)]) == 0
    return out


def test_train_uses_every_row_with_a_k_shot_context(trained, capsys):
    info = json.loads((trained / "cptune_classifier.json").read_text())
    assert info["training_size"] == len(TRAIN_ROWS) and info["context_size"] == 4
    assert info["training_data"] == "context only" and len(info["examples"]) == 4  # the context's rows alone
    config = json.loads((trained / "adapter_config.json").read_text())
    demonstrations = {(code - 1) // 4 for code in config["cpt_tokens_type_mask"] if code > 0}  # 4k + role 1..4
    assert len(demonstrations) == 4  # four demonstrations in the context, 40 training queries
    saved = b"".join(p.read_bytes() for p in trained.rglob("*") if p.is_file())
    context = {text for text, _ in info["examples"]}
    for text, _ in TRAIN_ROWS:  # no file of the output folder spells one of the 36 other rows
        assert (text.encode() in saved) == (text in context), text


def test_keep_training_data_saves_every_row_and_train_says_which(tiny_dir, tmp_path, capsys):
    data = _csv(tmp_path / "train.csv", TRAIN_ROWS[:12])
    for flag, words in (([], "with the context's 2 examples; the other 10 training texts only as salted hashes "
                             "(--keep-training-data keeps them)"),
                        (["--keep-training-data"], "with all 12 training rows (--keep-training-data)")):
        out = tmp_path / f"clf{len(flag)}"
        assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--context-size", "2", *FAST, *flag,
                     "--output", str(out)]) == 0
        assert capsys.readouterr().out.strip().endswith(f"classifier saved to {out} {words}")
        info = json.loads((out / "cptune_classifier.json").read_text())
        assert len(info["examples"]) == (12 if flag else 2)


def test_train_prints_the_context_and_its_size(tiny_dir, tmp_path, capsys):
    data = _csv(tmp_path / "train.csv", TRAIN_ROWS[:12])
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--context-size", "2", *FAST,
                 "--output", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "context: 2 demonstrations" in err and "12 training queries" in err


def test_eval_scores_every_row_of_an_imbalanced_file_and_leaves_out_training_texts(trained, tmp_path, capsys):
    test_rows = [(f"an {w} story {i}", "pos" if w in ("fun", "great", "joy") else "neg")
                 for i in range(3) for w in WORDS] + TRAIN_ROWS[:5]  # 9 pos, 21 neg, 5 seen in training
    data = _csv(tmp_path / "test.csv", test_rows)
    assert main(["eval", str(trained), "--data", str(data), "--json", "--output", str(tmp_path / "m.json")]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "left out 5 of 35 rows" in captured.err
    held = {text for text, _ in json.loads((trained / "cptune_classifier.json").read_text())["examples"]}
    assert any(text not in held for text, _ in TRAIN_ROWS[:5])  # some are known by their hashes alone
    assert report["test_size"] == 30 and report["left_out_trained"] == 5
    assert [row["support"] for row in report["per_class"]] == [
        sum(label == c for _, label in test_rows[:30]) for c in report["labels"]]
    # the figures follow from the classifier's own predictions
    clf = CPTClassifier.load(trained)
    predicted = clf.predict([t for t, _ in test_rows[:30]])
    gold = [label for _, label in test_rows[:30]]
    assert report["accuracy"] == pytest.approx(sum(p == g for p, g in zip(predicted, gold, strict=True)) / 30)
    for row in report["per_class"]:
        c = row["label"]
        tp = sum(p == c and g == c for p, g in zip(predicted, gold, strict=True))
        assert row["precision"] == pytest.approx(tp / max(predicted.count(c), 1))
        assert row["recall"] == pytest.approx(tp / gold.count(c))
    assert json.loads((tmp_path / "m.json").read_text()) == report
    # the same metrics as tables
    assert main(["eval", str(trained), "--data", str(data)]) == 0
    table = capsys.readouterr().out
    assert f"accuracy {report['accuracy']:.4f}" in table and "| label | precision | recall | F1 | support |" in table


def test_eval_samples_only_when_asked(trained, tmp_path, capsys):
    data = _csv(tmp_path / "test.csv", [(f"new {w} {i}", "pos" if i % 3 == 0 else "neg")
                                        for i in range(4) for w in WORDS])
    assert main(["eval", str(trained), "--test-data", str(data), "--test-size", "7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_size"] == 7
    assert main(["eval", str(trained), "--data", str(data), "--test-size", "41"]) == 2
    assert f"--test-size 41 is more than the 40 rows of {data}" in capsys.readouterr().err  # before the model loads


def test_integer_labels_end_to_end(tiny_dir, tmp_path, capsys):
    data = _int_rows(tmp_path / "ints.jsonl")
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--shots", "8",
                 "--label-words", "0=negative,1=positive", *FAST, "--output", str(out)]) == 0
    assert CPTClassifier.load(out).classes_ == [0, 1]
    capsys.readouterr()
    assert main(["predict", str(out), "a fun film"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in (0, 1) and set(row["probabilities"]) == {"0", "1"}
    assert main(["eval", str(out), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == [0, 1]


def _int_rows(path):
    path.write_text("".join(json.dumps({"text": t, "label": int(label == "pos")}) + "\n" for t, label in TRAIN_ROWS))
    return path


def test_labels_that_are_not_words_need_label_words(tiny_dir, tmp_path, capsys):
    data = _int_rows(tmp_path / "ints.jsonl")
    out = tmp_path / "clf"
    code = main(["train", "--model", str(tiny_dir), "--data", str(data), *FAST, "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cptune: error: labels 0, 1 are not words the model can answer with"), err
    assert err[0].endswith("give one word per label, e.g. --label-words 0=negative,1=positive"), err
    assert not out.exists()  # refused before anything was written
    codes = _csv(tmp_path / "codes.csv", [(t, f"LABEL_{int(label == 'pos')}") for t, label in TRAIN_ROWS[:8]])
    assert main(["train", "--model", str(tiny_dir), "--data", str(codes), *FAST, "--output", str(out)]) == 2
    assert "--label-words LABEL_0=negative,LABEL_1=positive" in capsys.readouterr().err


def test_word_labels_train_as_themselves(tiny_dir, tmp_path, capsys):
    data = _csv(tmp_path / "words.csv", TRAIN_ROWS[:8])
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--template", "input: {x} output: {y}",
                 *FAST, "--output", str(out)]) == 0
    assert CPTClassifier.load(out).label_words_ == {"neg": "neg", "pos": "pos"}


def test_compare_on_own_data_with_integer_labels(tiny_dir, tmp_path, capsys):
    data = _int_rows(tmp_path / "ints.jsonl")
    grid = ["compare", "--model", str(tiny_dir), "--data", str(data), "--shots", "2", "--seeds", "0",
            "--methods", "zero-shot", "--test-size", "4", "--output", str(tmp_path / "o")]
    assert main(grid) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "labels 0, 1 are not words" in err[0] and "--label-words 0=negative,1=positive" in err[0]
    assert main([*grid, "--label-words", "0=negative,1=positive"]) == 0  # words by the labels' text, ints kept
    row = json.loads((tmp_path / "o" / "results.jsonl").read_text().splitlines()[0])
    assert row["label_words"] == {"0": "negative", "1": "positive"} and row["labels"] == [0, 1]


def test_label_words_must_cover_the_data(tiny_dir, tmp_path, capsys):
    data = _csv(tmp_path / "d.csv", TRAIN_ROWS[:6])
    code = main(["train", "--model", str(tiny_dir), "--data", str(data), "--label-words", "pos=positive,bad=negative",
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "no word for label 'neg'" in capsys.readouterr().err


def test_predict_annotates_a_csv(trained, tmp_path, capsys):
    source = _csv(tmp_path / "in.csv", [("a fun film", "7"), ("so dull, so long", "8")], header=("review", "id"))
    out = tmp_path / "out.csv"
    assert main(["predict", str(trained), "--file", str(source), "--text-column", "review", "--output", str(out)]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    clf = CPTClassifier.load(trained)
    probs = clf.predict_proba(["a fun film", "so dull, so long"])
    assert [r["id"] for r in rows] == ["7", "8"] and [r["review"] for r in rows] == ["a fun film", "so dull, so long"]
    for r, p in zip(rows, probs, strict=True):
        assert r["predicted_label"] == clf.classes_[int(p.argmax())]
        for label, value in zip(clf.classes_, p, strict=True):
            assert float(r[f"p_{label}"]) == pytest.approx(float(value), abs=1e-6)
    assert main(["predict", str(trained), "--file", str(source)]) == 2
    assert "give --output" in capsys.readouterr().err


def test_an_input_column_named_like_an_added_one_needs_the_prefix_flag(trained, tmp_path, capsys):
    source = _csv(tmp_path / "in.csv", [("a fun film", "pos"), ("so dull", "neg")], header=("text", "predicted_label"))
    out = tmp_path / "out.csv"
    assert main(["predict", str(trained), "--file", str(source), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already has a column 'predicted_label'" in err[0]
    assert "--prefix cptune_" in err[0] and "prefix=" not in err[0]  # the flag, not the Python argument
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]
    assert main(["predict", str(trained), "--file", str(source), "--output", str(out), "--prefix", "cptune_"]) == 0
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["predicted_label"] for r in rows] == ["pos", "neg"]  # the input's own column, unchanged
    assert all(r["cptune_predicted_label"] in {str(c) for c in CPTClassifier.load(trained).classes_} for r in rows)
    assert main(["predict", str(trained), "a text", "--prefix", "cptune_"]) == 2
    assert "--prefix names the columns added to an annotated --file" in capsys.readouterr().err


def test_compare_takes_data_and_a_train_size(tiny_dir, tmp_path):
    data = _csv(tmp_path / "d.csv", TRAIN_ROWS + [(f"other {t}", label) for t, label in TRAIN_ROWS])
    for option in ("--data", "--dataset"):
        out = tmp_path / option.strip("-")
        assert main(["compare", option, str(data), "--shots", "2", "--train-size", "6", "--seeds", "0",
                     "--methods", "icl", "cpt", "--test-size", "4", "--steps", "1", "--model", str(tiny_dir),
                     "--output", str(out)]) == 0
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        assert {r["method"] for r in rows} == {"icl", "cpt"} and all(r["train_size"] == 6 for r in rows)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["predict", "--help"],
                                  ["compare", "--help"], ["demo", "--help"], ["download", "--help"],
                                  ["serve", "--help"], ["--version"], ["datasets"]])
def test_the_command_line_answers_without_torch(argv):
    code = ("import sys, runpy; sys.argv = ['cptune', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('cptune', run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pandas') if m in sys.modules]\n"
            "print('HEAVY', heavy, file=sys.stderr); sys.exit(code or 0)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr
    if argv == ["--version"]:
        from cptune import __version__
        assert out.stdout.strip() == f"cptune {__version__}"


def test_the_parser_defaults_agree_with_the_library():
    from cptune.app import cli
    from cptune.app.demo import DemoSettings
    from cptune.methods import ENCODER_METHODS, METHODS
    from cptune.models import DEFAULT_MODEL

    assert cli.DEFAULT_MODEL == DEFAULT_MODEL == DemoSettings.model
    from cptune.app.classifier import CLASSIFIER_FILE
    from cptune.app.commands import CLASSIFIER_INFO_FILE

    assert CLASSIFIER_INFO_FILE == CLASSIFIER_FILE
    assert cli.METHOD_NAMES == METHODS and cli.ENCODER_METHOD_NAMES == ENCODER_METHODS


def test_train_radius_relative_is_recorded(tiny_dir, tmp_path, capsys):
    from cptune.cpt.projection import REFERENCE_EMBEDDING_SCALE
    from cptune.recipe import model_embedding_scale

    data = _csv(tmp_path / "words.csv", TRAIN_ROWS[:8])
    out = tmp_path / "clf"
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--template", "input: {x} output: {y}",
                 "--label-words", "pos=positive,neg=negative", "--radius", "relative", *FAST,
                 "--output", str(out)]) == 0
    clf = CPTClassifier.load(out)
    assert json.loads((out / "cptune_classifier.json").read_text())["cpt"]["radius"] == "relative"
    ratio = model_embedding_scale(clf._base()[0]) / REFERENCE_EMBEDDING_SCALE
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["opt_projection_epsilon"] == pytest.approx(0.2 * ratio, rel=1e-12) and abs(ratio - 1) > 0.1
    capsys.readouterr()
    # argparse's choices: a usage error, status 2 (main returns it, one line, no traceback)
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--radius", "wide",
                 "--output", str(tmp_path)]) == 2
    assert "--radius: invalid choice: 'wide'" in capsys.readouterr().err
