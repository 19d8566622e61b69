"""annotate_file: every input row back unchanged, plus the real classifier's label and probabilities."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from cptune.app.annotate import annotate_file
from cptune.cpt.saving import current_umask
from tiny import write_rows

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TEXTS = [
    'a gripping film, "funny" and\nmoving',  # a comma, quotes and a newline inside one CSV cell
    "dull,  lifeless   and far too long",  # whitespace runs: classified as the normalised text
    "café — naïve crème brûlée 😀",
    "   ",  # blank: empty prediction cells
    "the best movie of the year",
    "a waste of time",
    "",  # blank too
    "the actors shine",
    "terrible, bad",
    "wonderful\tand great",
]
ROWS = [{"id": i + 1, "text": text, "score": i * 1.25 - 3, "label": "pos" if i % 2 else "neg"}
        for i, text in enumerate(TEXTS)]
BLANK = [not text.strip() for text in TEXTS]
CLASSIFIED = [" ".join(text.split()) for text in TEXTS if text.strip()]  # what the classifier should see


@pytest.fixture(scope="module")
def clf(tiny_dir):
    from cptune import CPTClassifier, TrainSettings

    clf = CPTClassifier(str(tiny_dir), labels={"pos": "positive", "neg": "negative"},
                        train=TrainSettings(steps=2, batch_size=2, lr=1e-2, seed=4))
    return clf.fit(["a joy", "a bore", "great fun", "too long"], ["pos", "neg", "pos", "neg"])


class Recording:
    """Wraps a classifier; records how many texts each predict_proba call got and fails on call ``fail_on``."""

    def __init__(self, inner, fail_on=None, error=None):
        self.inner, self.fail_on, self.calls = inner, fail_on, []
        self.error = error if error is not None else RuntimeError("the model died")

    @property
    def classes_(self):
        return self.inner.classes_

    def predict_proba(self, texts):
        self.calls.append(len(texts))
        if len(self.calls) == self.fail_on:
            raise self.error
        return self.inner.predict_proba(texts)


def read_output(path: Path) -> list[dict]:
    if path.suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return pq.read_table(path).to_pylist()


def expected_originals(rows, source: Path, output: Path) -> list[dict]:
    """The input's values as the output holds them: text when either side is CSV/TSV, else the same types."""
    if {source.suffix, output.suffix} & {".csv", ".tsv"}:
        return [{c: str(v) for c, v in row.items()} for row in rows]
    return rows


def is_empty(cell) -> bool:
    return cell is None or cell == ""


@pytest.mark.parametrize("source_name, output_name", [
    ("in.csv", "out.csv"), ("in.tsv", "out.tsv"), ("in.jsonl", "out.jsonl"), ("in.parquet", "out.parquet"),
    ("in.csv", "out.jsonl"), ("in.jsonl", "out.parquet"), ("in.parquet", "out.csv"), ("in.tsv", "out.parquet"),
])
def test_rows_come_back_unchanged_with_the_classifiers_predictions(clf, tmp_path, source_name, output_name):
    source, output = tmp_path / source_name, tmp_path / "results" / output_name
    output.parent.mkdir()
    write_rows(source, ROWS)
    (output.parent / "notes.txt").write_bytes(b"unrelated\n")
    source_bytes = source.read_bytes()
    recording = Recording(clf)

    assert annotate_file(recording, source, output, batch_size=3, progress=False) == len(ROWS)

    batches = [BLANK[i:i + 3] for i in range(0, len(ROWS), 3)]
    assert recording.calls == [len(b) - sum(b) for b in batches]  # 3 rows at a time, blank texts left out
    assert source.read_bytes() == source_bytes
    assert sorted(p.name for p in output.parent.iterdir()) == ["notes.txt", output_name]  # no temporary file
    assert (output.parent / "notes.txt").read_bytes() == b"unrelated\n"
    got = read_output(output)
    assert len(got) == len(ROWS)
    originals = expected_originals(ROWS, source, output)
    added = ["predicted_label", "p_pos", "p_neg"]
    assert [list(row) for row in got] == [[*original, *added] for original in originals]  # column order
    assert [{c: row[c] for c in original} for row, original in zip(got, originals, strict=True)] == originals

    want = iter(clf.predict_proba(CLASSIFIED))
    for row, blank in zip(got, BLANK, strict=True):
        if blank:
            assert all(is_empty(row[c]) for c in added), row
            continue
        probs = next(want)
        assert row["predicted_label"] == clf.classes_[int(probs.argmax())]
        assert [float(row["p_pos"]), float(row["p_neg"])] == pytest.approx(probs.tolist(), abs=1e-6)


def test_csv_cells_keep_their_exact_text(clf, tmp_path):
    source, output = tmp_path / "in.csv", tmp_path / "out.csv"
    source.write_bytes(b'text,note,n\n"x, ""y""\r\nz",  spaced  ,007\nplain,"",1e3\n')
    annotate_file(clf, source, output, progress=False)
    with open(output, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "note", "n", "predicted_label", "p_pos", "p_neg"]
    assert [row[:3] for row in rows[1:]] == [['x, "y"\r\nz', "  spaced  ", "007"], ["plain", "", "1e3"]]


def test_integer_labels_stay_integers(tiny_dir, tmp_path):
    from cptune import CPTClassifier, TrainSettings

    clf = CPTClassifier(str(tiny_dir), labels={0: "negative", 1: "positive"},
                        train=TrainSettings(steps=2, batch_size=2, lr=1e-2, seed=4))
    clf.fit(["a joy", "a bore", "great fun", "too long"], [1, 0, 1, 0])
    assert clf.classes_ == [0, 1]
    source = tmp_path / "in.jsonl"
    write_rows(source, ROWS)
    probs = clf.predict_proba(CLASSIFIED)
    want = [int(p.argmax()) for p in probs]
    for name in ("out.jsonl", "out.parquet", "out.csv"):
        annotate_file(clf, source, tmp_path / name, batch_size=4, progress=False)
        got = read_output(tmp_path / name)
        assert list(got[0])[-3:] == ["predicted_label", "p_0", "p_1"]
        labels = [row["predicted_label"] for row, blank in zip(got, BLANK, strict=True) if not blank]
        assert labels == ([str(w) for w in want] if name.endswith(".csv") else want)
    assert pq.read_schema(tmp_path / "out.parquet").field("predicted_label").type == pa.int64()


@pytest.mark.parametrize("output_name", ["out.csv", "out.jsonl", "out.parquet"])
@pytest.mark.parametrize("existing", [None, b"the previous results\n"])
def test_a_failure_midway_leaves_no_output_and_no_temporary_file(clf, tmp_path, output_name, existing):
    source, output = tmp_path / "in.csv", tmp_path / output_name
    write_rows(source, ROWS)
    if existing is not None:
        output.write_bytes(existing)
    before = sorted(p.name for p in tmp_path.iterdir())
    failing = Recording(clf, fail_on=2)
    with pytest.raises(RuntimeError, match="the model died"):
        annotate_file(failing, source, output, batch_size=3, progress=False)
    assert failing.calls == [3, 2]  # it got as far as the second batch
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (output.read_bytes() if output.exists() else None) == existing


def test_an_interrupt_leaves_no_file_and_a_finished_file_gets_the_umask_permissions(clf, tmp_path):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(source, ROWS)
    with pytest.raises(KeyboardInterrupt):
        annotate_file(Recording(clf, fail_on=3, error=KeyboardInterrupt()), source, output, batch_size=2,
                      progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    annotate_file(clf, source, output, progress=False)
    assert output.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def test_a_missing_text_column_names_it_and_the_columns_present(clf, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("review,label\ngood,pos\n")
    with pytest.raises(ValueError, match=r"text column 'text' not found .* columns present: 'review', 'label'"):
        annotate_file(clf, source, tmp_path / "out.csv", progress=False)
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"review": "good"}\n')
    with pytest.raises(ValueError, match=r"'text' not found on .*line 2; fields present: 'review'"):
        annotate_file(clf, jsonl, tmp_path / "out.jsonl", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "in.jsonl"]
    assert annotate_file(clf, source, tmp_path / "out.csv", text_column="review", progress=False) == 1


def test_refuses_to_overwrite_the_input(clf, tmp_path):
    source = tmp_path / "in.csv"
    write_rows(source, ROWS)
    data = source.read_bytes()
    (tmp_path / "sub").mkdir()
    for output in (source, tmp_path / "sub" / ".." / "in.csv"):
        with pytest.raises(ValueError, match="is the input file"):
            annotate_file(clf, source, output, progress=False)
    assert source.read_bytes() == data


def test_path_errors(clf, tmp_path):
    source = tmp_path / "in.csv"
    write_rows(source, ROWS)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        annotate_file(clf, source, tmp_path / "nowhere" / "out.csv", progress=False)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        annotate_file(clf, tmp_path / "missing.csv", tmp_path / "out.csv", progress=False)
    with pytest.raises(ValueError, match=r"'\.xlsx'; accepted: \.csv, \.tsv, \.jsonl or \.parquet"):
        annotate_file(clf, source, tmp_path / "out.xlsx", progress=False)
    (tmp_path / "out.csv").mkdir()
    with pytest.raises(IsADirectoryError):
        annotate_file(clf, source, tmp_path / "out.csv", progress=False)


def test_added_names_that_collide_need_a_prefix(clf, tmp_path):
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"text": "fun", "p_neg": 0.5}])
    with pytest.raises(ValueError, match="already has a column 'p_neg'.*prefix="):
        annotate_file(clf, source, tmp_path / "out.jsonl", progress=False)
    annotate_file(clf, source, tmp_path / "out.jsonl", progress=False, prefix="cptune_")
    (row,) = read_output(tmp_path / "out.jsonl")
    assert list(row) == ["text", "p_neg", "cptune_predicted_label", "cptune_p_pos", "cptune_p_neg"]
    assert row["p_neg"] == 0.5 and math.isclose(row["cptune_p_pos"] + row["cptune_p_neg"], 1, abs_tol=1e-5)


def test_jsonl_objects_with_different_keys_fill_one_csv_header(clf, tmp_path):
    source = tmp_path / "in.jsonl"
    write_rows(source, [{"text": "fun", "n": 1}, {"extra": [1, "a"], "text": "dull", "flag": True}])
    annotate_file(clf, source, tmp_path / "out.csv", progress=False)
    rows = read_output(tmp_path / "out.csv")
    assert [(r["text"], r["n"], r["extra"], r["flag"]) for r in rows] == [
        ("fun", "1", "", ""), ("dull", "", '[1, "a"]', "true")]


def test_a_parquet_file_is_written_in_few_row_groups(clf, tmp_path):
    source, output = tmp_path / "in.parquet", tmp_path / "out.parquet"
    write_rows(source, ROWS)
    annotate_file(clf, source, output, batch_size=2, progress=False)
    assert pq.ParquetFile(output).metadata.num_row_groups == 1
    assert pq.read_schema(output).field("score").type == pa.float64()  # input types kept


def test_progress_bar_on_stderr_with_the_total(clf, tmp_path, capsys):
    source = tmp_path / "in.csv"
    write_rows(source, ROWS)
    annotate_file(clf, source, tmp_path / "out.csv", batch_size=4)
    captured = capsys.readouterr()
    assert captured.out == "" and f"{len(ROWS)}/{len(ROWS)}" in captured.err


def test_probabilities_are_rounded_in_text_formats(clf, tmp_path):
    source = tmp_path / "in.csv"
    write_rows(source, ROWS)
    annotate_file(clf, source, tmp_path / "out.jsonl", progress=False)
    for row in read_output(tmp_path / "out.jsonl"):
        for p in (row["p_pos"], row["p_neg"]):
            assert p is None or p == round(p, 6)


def test_predictions_equal_predict_proba_in_one_call(clf):
    # guards the comparisons above: batch composition changes probabilities by float32 noise only
    whole = clf.predict_proba(CLASSIFIED)
    pieces = np.concatenate([clf.predict_proba(CLASSIFIED[i:i + 3]) for i in range(0, len(CLASSIFIED), 3)])
    assert np.abs(whole - pieces).max() < 5e-7


def test_a_ragged_csv_row_fails_before_any_inference_and_names_its_row(clf, tmp_path):
    source = tmp_path / "in.csv"
    source.write_bytes(b'text,label\n"two\nlines",pos\nfine,neg\nbad,neg,extra\n')
    recording = Recording(clf)
    with pytest.raises(ValueError, match=r"in.csv' row 4 has 3 fields but the header has 2"):  # rows, not lines
        annotate_file(recording, source, tmp_path / "out.csv", progress=False)
    assert recording.calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


@pytest.mark.parametrize("source_name, data, output_name, want", [
    ("in.csv", b"text,label\n", "out.csv", b"text,label,predicted_label,p_pos,p_neg\n"),
    ("in.tsv", b"\xef\xbb\xbftext\tlabel\n\n", "out.tsv", b"text\tlabel\tpredicted_label\tp_pos\tp_neg\n"),
    ("in.jsonl", b"", "out.jsonl", b""),
    ("in.csv", b"text\n", "out.jsonl", b""),
])
def test_a_file_without_rows_gives_an_output_without_rows(clf, tmp_path, source_name, data, output_name, want):
    source, output = tmp_path / source_name, tmp_path / output_name
    source.write_bytes(data)
    recording = Recording(clf)
    assert annotate_file(recording, source, output, progress=False) == 0
    assert recording.calls == [] and output.read_bytes() == want


def test_a_csv_without_rows_gives_a_parquet_file_without_rows(clf, tmp_path):
    source, output = tmp_path / "in.csv", tmp_path / "out.parquet"
    source.write_bytes(b"text,label\n")
    assert annotate_file(clf, source, output, progress=False) == 0
    table = pq.read_table(output)
    assert table.num_rows == 0 and table.column_names == ["text", "label", "predicted_label", "p_pos", "p_neg"]


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_output_bytes(clf, tmp_path, suffix, sep):
    """The exact bytes: the BOM and blank lines dropped, cells as they were, minimal quoting, 6 decimals."""
    source, output = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    text = f'text{sep}note\n"a, ""b""\r\nc"{sep}1\n\n{sep}blank\nplain{sep}  x  \n'
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    annotate_file(clf, source, output, progress=False)
    probs = clf.predict_proba(['a, "b" c', "plain"])
    cells = [[clf.classes_[int(p.argmax())], *(repr(round(float(q), 6)) for q in p)] for p in probs]
    want = (f"text{sep}note{sep}predicted_label{sep}p_pos{sep}p_neg\n"
            f'"a, ""b""\r\nc"{sep}1{sep}{sep.join(cells[0])}\n'
            f"{sep}blank{sep}{sep}{sep}\n"
            f"plain{sep}  x  {sep}{sep.join(cells[1])}\n")
    assert output.read_bytes() == want.encode()


class Leaning:
    """Wraps the real classifier with a heavy prior on one class: its probabilities, reweighted."""

    def __init__(self, inner, label, weight=1e6):
        self.inner, self.weights = inner, np.array([weight if c == label else 1.0 for c in inner.classes_])

    @property
    def classes_(self):
        return self.inner.classes_

    def predict_proba(self, texts):
        probs = np.asarray(self.inner.predict_proba(texts)) * self.weights
        return probs / probs.sum(axis=1, keepdims=True)


def test_a_file_labelled_with_one_label_gets_a_note(clf, tmp_path, caplog):
    """After annotating, a label given to more rows than its collapse limit is named (blank rows not counted);
    a file too small to read shares from gets no note."""
    rows = [{"text": f"text number {i}"} for i in range(24)] + [{"text": ""}] * 3
    write_rows(tmp_path / "in.csv", rows)
    with caplog.at_level("INFO", logger="cptune"):
        annotate_file(Leaning(clf, "neg"), tmp_path / "in.csv", tmp_path / "out.csv")
    assert [row["predicted_label"] for row in read_output(tmp_path / "out.csv")] == ["neg"] * 24 + [""] * 3
    assert "note: 'neg' was given to 100% of these 24 texts" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="cptune"):
        write_rows(tmp_path / "few.csv", rows[:19])
        annotate_file(Leaning(clf, "neg"), tmp_path / "few.csv", tmp_path / "few-out.csv")
    assert "annotated" in caplog.text and "note:" not in caplog.text
