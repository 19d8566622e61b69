"""Labelled text datasets: built-ins, local files, hub names, and seeded, class-balanced k-shot sampling.

Three kinds of source, all returning a :class:`Dataset` with its provenance:

* **Built-ins** (offline; the loaders live in :mod:`cptune.builtin_data`): ``rotten_tomatoes``, ``subj``,
  ``movie_sentiment_5``, ``bbc_news`` and ``reuters_r8``. They read files shipped inside registry
  packages at run time and are *stand-ins* for the paper's benchmarks (SST-2/MR, SUBJ, SST-5,
  AG News/DBpedia), which are not available offline; every report should say so.
* **Local files** (:func:`load_file`): ``.csv``, ``.tsv``, ``.jsonl`` (one JSON object per line) and
  ``.parquet`` (needs ``pyarrow``, which cptune does not install).
* **Hub names** for online users (``glue/sst2``, ``ag_news``, ``trec``, ``dbpedia_14``): loaded with the
  ``datasets`` library when it is installed; :func:`hub_layout` gives each one's columns and label names,
  so a local file written in the same layout loads identically through :func:`load_file`.

Text normalisation, applied to every source: runs of whitespace (newlines included) become one space and
the ends are stripped, so a text never breaks the one-demonstration-per-line context layout.

Truncation rule (:func:`truncate_text`, ``MAX_CHARS`` = 400 characters for built-in and hub datasets; off
for local files unless ``max_chars`` is given): a normalised text longer than the limit keeps its longest
prefix of whole sentences that fits, if that prefix holds at least half the limit; otherwise it is cut at
the last space within the limit (at the limit itself when the first word is longer). A sentence ends at
``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) before a space.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import io
import json
import math
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_CHARS = 400
"""Character limit of built-in and hub texts (see the truncation rule in the module docstring)."""

FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")
"""Local data file extensions that :func:`load_file` reads."""

_TEMPLATE = "input: {x} output: {y}"

DATASET_DEFAULTS: dict[str, tuple[str, dict[str, str]]] = {
    "rotten_tomatoes": (_TEMPLATE, {"negative": "negative", "positive": "positive"}),
    "subj": (_TEMPLATE, {"objective": "objective", "subjective": "subjective"}),
    "movie_sentiment_5": (
        _TEMPLATE,
        {"terrible": "terrible", "bad": "bad", "neutral": "neutral", "good": "good", "great": "great"},
    ),
    "bbc_news": (
        _TEMPLATE,
        {w: w for w in ("business", "entertainment", "politics", "sport", "tech")},
    ),
    "reuters_r8": (
        _TEMPLATE,
        {
            "acq": "acquisition",
            "crude": "oil",
            "earn": "earnings",
            "grain": "grain",
            "interest": "interest",
            "money-fx": "currency",
            "ship": "shipping",
            "trade": "trade",
        },
    ),
    "glue/sst2": (_TEMPLATE, {"negative": "negative", "positive": "positive"}),
    "ag_news": (_TEMPLATE, {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "technology"}),
    "trec": (
        _TEMPLATE,
        {
            "ABBR": "abbreviation",
            "ENTY": "entity",
            "DESC": "description",
            "HUM": "person",
            "LOC": "location",
            "NUM": "number",
        },
    ),
    "dbpedia_14": (
        _TEMPLATE,
        {
            "Company": "company",
            "EducationalInstitution": "school",
            "Artist": "artist",
            "Athlete": "athlete",
            "OfficeHolder": "politician",
            "MeanOfTransportation": "transport",
            "Building": "building",
            "NaturalPlace": "nature",
            "Village": "village",
            "Animal": "animal",
            "Plant": "plant",
            "Album": "album",
            "Film": "film",
            "WrittenWork": "book",
        },
    ),
}
"""Default ``(template, {label: label word})`` per built-in and hub dataset, labels in dataset order.

Every label word is one common English word that is a single token (with its leading space) for the
embedded SmolLM2 tokenizer; ``tests/test_data.py`` checks this on the real tokenizer.
"""


@dataclass(frozen=True)
class _HubSpec:
    repo: str
    config: str | None
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    stand_in_for: str


HUB_DATASETS: dict[str, _HubSpec] = {
    "glue/sst2": _HubSpec("nyu-mll/glue", "sst2", "sentence", "label", ("negative", "positive"), "SST-2"),
    "ag_news": _HubSpec(
        "fancyzhx/ag_news", None, "text", "label", ("World", "Sports", "Business", "Sci/Tech"), "AG News"
    ),
    "trec": _HubSpec(
        "CogComp/trec", None, "text", "coarse_label", ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), "TREC"
    ),
    "dbpedia_14": _HubSpec(
        "fancyzhx/dbpedia_14", None, "content", "label", tuple(DATASET_DEFAULTS["dbpedia_14"][1]), "DBpedia-14"
    ),
}
"""Hub dataset names accepted by :func:`load_dataset` (online, with the ``datasets`` library)."""

BUILTIN_NAMES = ("rotten_tomatoes", "subj", "movie_sentiment_5", "bbc_news", "reuters_r8")
"""Names of the offline built-in datasets (loaders in :mod:`cptune.builtin_data`)."""


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Attributes:
        text: The input text.
        label: The class name.
    """

    text: str
    label: str


@dataclass
class Dataset:
    """A labelled text classification dataset.

    Attributes:
        name: Dataset name.
        examples: All examples, in file order.
        labels: The class names: sorted, or in the source's own order where it has one (ordinal sentiment,
            a hub dataset's label names).
        provenance: Where the data came from: package, version, file (relative to site-packages or the
            download directory), sha256, ``stand_in_for`` and how the texts were derived.
    """

    name: str
    examples: list[Example]
    labels: list[str]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"labels {self.labels!r} must be at least two distinct class names")
        unknown = sorted({ex.label for ex in self.examples} - set(self.labels))
        if unknown:
            raise ValueError(f"example labels {unknown!r} are not in the dataset labels {self.labels!r}")

    def label_counts(self) -> dict[str, int]:
        """Return the number of examples per label, in ``labels`` order."""
        counts = Counter(ex.label for ex in self.examples)
        return {label: counts[label] for label in self.labels}


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space and strip the ends."""
    return " ".join(text.split())


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?= )")


def truncate_text(text: str, max_chars: int = MAX_CHARS) -> str:
    """Normalise a text and shorten it to at most ``max_chars`` characters by the module's stated rule.

    Args:
        text: Any text.
        max_chars: The limit, at least 1.

    Returns:
        The normalised text, unchanged if it fits; else whole leading sentences if they fill at least half
        the limit, else the text cut at its last space within the limit (or at the limit).

    Raises:
        ValueError: If ``max_chars`` is not a positive integer.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r} must be a positive integer")
    text = normalize_text(text)
    if len(text) <= max_chars:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, max_chars + 1) if m.end() <= max_chars]
    if ends and ends[-1] * 2 >= max_chars:
        return text[: ends[-1]]
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[:cut] if cut > 0 else text[:max_chars]


def examples_sha256(examples: Iterable[Example]) -> str:
    """Fingerprint a derived dataset: sha256 of its ``text<TAB>label<LF>`` lines, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.text}\t{ex.label}\n".encode())
    return digest.hexdigest()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


# ---------------------------------------------------------------------------------------------------------
# Local files


def load_file(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    name: str | None = None,
    *,
    label_names: Sequence[str] | None = None,
    max_chars: int | None = None,
) -> Dataset:
    """Load a labelled dataset from a local ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` file.

    Texts are normalised (see the module docstring). Rows whose text is blank or whose label is blank
    (or a negative integer index, the hub convention for "unlabelled") are skipped, counted in the
    provenance and reported with one warning. Labels are strings; with ``label_names``, an integer label
    ``i`` (or its decimal string, as CSV gives it) becomes ``label_names[i]``.

    Args:
        path: The data file. CSV/TSV need a header row and UTF-8 text; JSONL holds one JSON object per line;
            Parquet needs ``pyarrow``.
        text_column: Column (or JSON field) holding the text.
        label_column: Column (or JSON field) holding the label.
        name: Dataset name; defaults to the file name without its extension.
        label_names: Class names that integer labels index, as in a hub dataset's ``ClassLabel``.
        max_chars: If set, truncate texts to this many characters by :func:`truncate_text`.

    Returns:
        The dataset; labels in ``label_names`` order if given, else sorted.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is a directory, has an unsupported extension, cannot be read or parsed,
            lacks a column, holds no usable example, holds a single class, or a label is not a valid
            index into ``label_names``.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {source!r} does not exist; pass an existing {_formats()} file")
    if path.is_dir():
        raise ValueError(f"data path {source!r} is a directory; pass a {_formats()} file")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"data file {source!r} has extension {suffix or '(none)'!r}; accepted: {_formats()}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read data file {source!r}: {err.strerror or _one_line(err)}") from None
    if suffix == ".parquet":
        columns, records = _read_parquet(raw, source)
    else:
        text = _decode(raw, source)
        if suffix == ".jsonl":
            columns, records = _read_jsonl(text, source)
        else:
            columns, records = _read_csv(text, source, "\t" if suffix == ".tsv" else ",")
    provenance = {
        "package": None,
        "version": None,
        "file": str(path.resolve()),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "format": suffix[1:],
        "stand_in_for": None,
    }
    return records_to_dataset(
        records,
        name=name or path.stem,
        source=source,
        columns=columns,
        text_column=text_column,
        label_column=label_column,
        label_names=label_names,
        max_chars=max_chars,
        provenance=provenance,
    )


def _formats() -> str:
    return ", ".join(FILE_FORMATS[:-1]) + " or " + FILE_FORMATS[-1]


def _decode(raw: bytes, source: str) -> str:
    if b"\x00" in raw:
        raise ValueError(f"data file {source!r} holds NUL bytes (binary?); accepted: UTF-8 text for .csv/.tsv/.jsonl")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {source!r} is not UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None


Records = Iterator[tuple[str, dict]]


def _read_csv(text: str, source: str, delimiter: str) -> tuple[list[str], Records]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(
            f"data file {source!r} is not valid CSV (after line {reader.line_num}: {_one_line(err)}); check the quoting"
        ) from None
    if not columns:
        raise ValueError(f"data file {source!r} is empty; it needs a header row naming its columns and data rows")

    def records() -> Records:
        for index, row in enumerate(rows, start=2):
            extra = row.get(None)
            if extra is not None or None in row.values():
                found = len(columns) + len(extra) if extra is not None else sum(v is not None for v in row.values())
                raise ValueError(
                    f"data file {source!r} row {index} has {found} fields but the header has {len(columns)}; "
                    "check the quoting and the delimiter"
                )
            yield f" row {index}", row

    return columns, records()


def _read_jsonl(text: str, source: str) -> tuple[list[str], Records]:
    objects: list[tuple[str, dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"data file {source!r} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                "a .jsonl file holds one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(
                f"data file {source!r} line {number} holds a JSON {type(obj).__name__}; "
                "a .jsonl file holds one JSON object per line"
            )
        objects.append((f" line {number}", obj))
    if not objects:
        raise ValueError(f"data file {source!r} is empty; a .jsonl file holds one JSON object per line")
    return list(objects[0][1]), iter(objects)


def _read_parquet(raw: bytes, source: str) -> tuple[list[str], Records]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"reading {source!r} needs pyarrow, which is not installed; run `pip install pyarrow` "
            "or convert the file to .csv or .jsonl"
        ) from None
    try:
        table = pq.read_table(io.BytesIO(raw))
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable Parquet file"
        raise ValueError(f"cannot read data file {source!r} as Parquet: {_one_line(err)}") from None
    rows = table.to_pylist()
    return list(table.column_names), ((f" row {i}", row) for i, row in enumerate(rows, start=1))


def records_to_dataset(
    records: Iterable[tuple[str, dict]],
    *,
    name: str,
    source: str,
    columns: Sequence[str],
    text_column: str,
    label_column: str,
    label_names: Sequence[str] | None = None,
    max_chars: int | None = None,
    provenance: dict | None = None,
) -> Dataset:
    """Build a dataset from ``(location, record)`` pairs, as read from a file or a hub split.

    Args:
        records: Pairs of a location suffix for messages (e.g. ``" line 3"``) and a mapping of fields.
        name: Dataset name.
        source: What the records came from, for messages.
        columns: The columns the source declares (checked before any record is read).
        text_column: Field holding the text.
        label_column: Field holding the label.
        label_names: Class names that integer labels index.
        max_chars: If set, the truncation limit.
        provenance: Provenance to extend with the columns and skip counts.

    Returns:
        The dataset.

    Raises:
        ValueError: On a missing column, an unusable value, no usable example or a single class.
    """
    present = ", ".join(repr(c) for c in columns) or "none"
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise ValueError(
                f"{role} column {column!r} not found in {source!r}; columns present: {present} "
                f"(choose with {role}_column= or --{role}-column)"
            )
    names = list(label_names) if label_names is not None else None
    examples: list[Example] = []
    rows = blank = unlabelled = 0
    for where, record in records:
        rows += 1
        for column in (text_column, label_column):
            if column not in record:
                fields = ", ".join(repr(c) for c in record) or "none"
                raise ValueError(f"{source!r}{where} has no {column!r} field; fields present: {fields}")
        text = _cell_text(record[text_column], text_column, source, where)
        label = _cell_label(record[label_column], label_column, names, source, where)
        if text is None:
            blank += 1
        elif label is None:
            unlabelled += 1
        else:
            examples.append(Example(truncate_text(text, max_chars) if max_chars is not None else text, label))
    if blank or unlabelled:
        warnings.warn(
            f"{source}: skipped {blank} rows with blank {text_column!r} and {unlabelled} without a {label_column!r}",
            stacklevel=3,
        )
    if not examples:
        raise ValueError(
            f"{source!r} has no usable examples ({rows} rows: {blank} with blank {text_column!r}, "
            f"{unlabelled} without a {label_column!r}); it needs rows with a non-blank text and label"
        )
    found = {ex.label for ex in examples}
    labels = [n for n in names if n in found] if names is not None else sorted(found)
    if len(labels) < 2:
        raise ValueError(
            f"{source!r} has a single class {labels[0]!r} in column {label_column!r}; at least two classes are needed"
        )
    provenance = dict(provenance or {})
    provenance.update(
        {
            "text_column": text_column,
            "label_column": label_column,
            "label_names": names,
            "rows": rows,
            "skipped_blank_text": blank,
            "skipped_unlabelled": unlabelled,
            "max_chars": max_chars,
            "examples_sha256": examples_sha256(examples),
        }
    )
    return Dataset(name=name, examples=examples, labels=labels, provenance=provenance)


def _cell_text(value: Any, column: str, source: str, where: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{source!r}{where}: {column!r} holds a {type(value).__name__}; a text must be a string")
    text = normalize_text(str(value))
    return text or None


def _cell_label(value: Any, column: str, names: list[str] | None, source: str, where: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{source!r}{where}: {column!r} holds a {type(value).__name__}; a label must be a scalar")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    label = normalize_text(str(value))
    if not label:
        return None
    if names is None or label in names:
        return label
    if re.fullmatch(r"-?\d+", label):
        index = int(label)
        if index < 0:
            return None
        if index < len(names):
            return names[index]
    raise ValueError(
        f"{source!r}{where}: label {label!r} is neither an index 0..{len(names) - 1} into label_names "
        f"nor one of {names!r}"
    )


# ---------------------------------------------------------------------------------------------------------
# Hub names (online users)


def hub_layout(name: str) -> tuple[str, str, tuple[str, ...]]:
    """Return a hub dataset's ``(text_column, label_column, label_names)``.

    A local file in this layout (integer labels indexing ``label_names``) loads like the hub dataset with
    ``load_file(path, text_column, label_column, label_names=label_names)``.

    Args:
        name: A hub dataset name (``glue/sst2``, ``ag_news``, ``trec`` or ``dbpedia_14``).

    Returns:
        The text column, the label column and the class names in index order.

    Raises:
        ValueError: If the name is not a known hub dataset.
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown hub dataset {name!r}; known hub datasets: {', '.join(HUB_DATASETS)}")
    spec = HUB_DATASETS[name]
    return spec.text_column, spec.label_column, spec.label_names


def _load_hub(name: str, text_column: str | None, label_column: str | None) -> Dataset:
    spec = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"hub dataset {name!r} needs the `datasets` library and network access; run `pip install datasets` "
            f"or pass a local {_formats()} file"
        ) from None
    try:
        loaded = datasets.load_dataset(spec.repo, spec.config)
    except Exception as err:  # network, hub and format errors all mean "could not load it"
        raise ValueError(f"could not load hub dataset {name!r} ({spec.repo}): {_one_line(err)}") from None
    text_column = text_column or spec.text_column
    label_column = label_column or spec.label_column
    splits = sorted(loaded)
    columns = list(loaded[splits[0]].column_names) if splits else []

    def records() -> Records:
        for split in splits:
            for index, row in enumerate(loaded[split]):
                yield f" split {split} row {index}", row

    provenance = {
        "package": "datasets",
        "version": getattr(datasets, "__version__", None),
        "hub_id": spec.repo,
        "config": spec.config,
        "splits": {split: len(loaded[split]) for split in splits},
        "file": None,
        "sha256": None,
        "stand_in_for": None,
    }
    return records_to_dataset(
        records(),
        name=name,
        source=f"hub dataset {name}",
        columns=columns,
        text_column=text_column,
        label_column=label_column,
        label_names=spec.label_names if label_column == spec.label_column else None,
        max_chars=MAX_CHARS,
        provenance=provenance,
    )


# ---------------------------------------------------------------------------------------------------------
# Registry


def _builtin():
    # Imported lazily: cptune.builtin_data imports this module.
    return importlib.import_module("cptune.builtin_data")


def __getattr__(name: str):
    # Keeps ``from cptune.data import load_rotten_tomatoes`` (and the other built-in loaders) working.
    if name.startswith("load_") and name[5:] in BUILTIN_NAMES:
        return getattr(_builtin(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_dataset(name_or_path: str | Path, text_column: str | None = None, label_column: str | None = None) -> Dataset:
    """Load a dataset by built-in name, hub name or local file path.

    An existing file is loaded with :func:`load_file`; otherwise a built-in name, then a hub name; a name
    that looks like a path (a data-file extension or a slash that is not a hub name) is loaded as a file.

    Args:
        name_or_path: A built-in name (see :data:`BUILTIN_NAMES`), a hub name (see :data:`HUB_DATASETS`) or
            a path to a .csv, .tsv, .jsonl or .parquet file.
        text_column: Text column of a file (default ``"text"``) or hub dataset (default: its own); not
            accepted for built-ins.
        label_column: Label column, likewise (default ``"label"`` for files).

    Returns:
        The dataset.

    Raises:
        FileNotFoundError: If a path-like name does not exist.
        ValueError: If the name is unknown, columns are given for a built-in, or loading fails (see
            :func:`load_file`).
    """
    key = str(name_or_path)
    path = Path(key)
    if path.is_file():
        return load_file(path, text_column or "text", label_column or "label")
    if key in BUILTIN_NAMES:
        if text_column is not None or label_column is not None:
            raise ValueError(
                f"built-in dataset {key!r} has fixed columns; text_column/label_column apply to files and hub datasets"
            )
        return _builtin().LOADERS[key]()
    if key in HUB_DATASETS:
        return _load_hub(key, text_column, label_column)
    if path.suffix.lower() in FILE_FORMATS or "/" in key or "\\" in key:
        return load_file(path, text_column or "text", label_column or "label")
    raise ValueError(
        f"unknown dataset {key!r}; known datasets: {', '.join(BUILTIN_NAMES)}; "
        f"hub datasets (need `pip install datasets` and network): {', '.join(HUB_DATASETS)}; "
        f"or a path to a {_formats()} file"
    )


def _has_datasets() -> bool:
    try:
        return importlib.util.find_spec("datasets") is not None
    except ValueError:  # a module object without __spec__ already in sys.modules
        return True


def list_datasets(include_hub: bool = True) -> list[dict]:
    """Describe the built-in (and hub) datasets, for ``cptune datasets``.

    Loads every built-in to count it (about a second in all); one whose package is missing is listed with
    ``size`` None, ``available`` False and the install hint as ``note``.

    Args:
        include_hub: Also list the hub names (``size`` None; ``available`` says whether ``datasets`` is
            installed).

    Returns:
        One dict per dataset: ``name``, ``source`` (``"builtin"`` or ``"hub"``), ``classes`` (class names),
        ``num_classes``, ``size`` (examples), ``stand_in_for``, ``licence``, ``available``, ``note``,
        ``template`` and ``label_words``.
    """
    builtin = _builtin()
    rows = []
    for name in BUILTIN_NAMES:
        template, words = DATASET_DEFAULTS[name]
        info = builtin.BUILTIN_INFO[name]
        row = {"name": name, "source": "builtin", "classes": list(words), "size": None, "available": False}
        try:
            dataset = load_dataset(name)
        except (FileNotFoundError, ValueError) as err:
            row["note"] = str(err)
        else:
            row.update(classes=list(dataset.labels), size=len(dataset.examples), available=True, note="")
        row.update(
            num_classes=len(row["classes"]),
            stand_in_for=info["stand_in_for"],
            licence=info["licence"],
            template=template,
            label_words=dict(words),
        )
        rows.append(row)
    if include_hub:
        has_datasets = _has_datasets()
        for name, spec in HUB_DATASETS.items():
            template, words = DATASET_DEFAULTS[name]
            rows.append(
                {
                    "name": name,
                    "source": "hub",
                    "classes": list(spec.label_names),
                    "num_classes": len(spec.label_names),
                    "size": None,
                    "stand_in_for": None,
                    "licence": f"see the dataset card of {spec.repo}",
                    "available": has_datasets,
                    "note": "" if has_datasets else "needs `pip install datasets` and network access",
                    "template": template,
                    "label_words": dict(words),
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Sampling


def _per_class(count: int, what: str, num_classes: int) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or count % num_classes:
        raise ValueError(f"{what}={count!r} must be a non-negative multiple of the number of classes ({num_classes})")
    return count // num_classes


def sample_splits(
    dataset: Dataset, shots: int, test_size: int, seed: int, extra_train: int = 0
) -> tuple[list[Example], list[Example], list[Example]]:
    """Draw class-balanced, text-disjoint demonstrations, extra training queries and a test set.

    Each class's examples are shuffled with ``random.Random(seed)`` and taken in turn for the shots,
    then the extra training queries, then the test set, skipping texts already taken. So for a given
    seed the shots do not depend on ``test_size`` or ``extra_train``. The shots come in rounds that
    hold one example of every class, each round in a seeded random class order, so the context is
    never sorted by class; the extra and test examples are shuffled.

    Args:
        dataset: The dataset to sample from.
        shots: Total number of demonstrations, a multiple of the number of classes.
        test_size: Total number of test examples, a multiple of the number of classes.
        seed: Random seed; the same seed gives the same splits.
        extra_train: Total number of extra labelled training queries, a multiple of the number of classes.

    Returns:
        ``(shots, extra_train, test)`` lists of examples.

    Raises:
        ValueError: If a count is not a non-negative multiple of the number of classes, or a class has
            too few distinct texts.
    """
    labels = dataset.labels
    sizes = [
        _per_class(n, what, len(labels))
        for n, what in ((shots, "shots"), (extra_train, "extra_train"), (test_size, "test_size"))
    ]
    wanted = sum(sizes)
    rng = random.Random(seed)
    pools: dict[str, list[Example]] = {label: [] for label in labels}
    for ex in dataset.examples:
        pools[ex.label].append(ex)
    used: set[str] = set()
    picked: dict[str, list[list[Example]]] = {}
    for label in labels:
        pool = pools[label]
        distinct = len({ex.text for ex in pool})
        if distinct < wanted:
            raise ValueError(
                f"class {label!r} has {distinct} distinct examples but {wanted} were asked "
                f"({sizes[0]} shots + {sizes[1]} extra + {sizes[2]} test)"
            )
        rng.shuffle(pool)
        chosen: list[Example] = []
        for ex in pool:
            if len(chosen) == wanted:
                break
            if ex.text not in used:
                used.add(ex.text)
                chosen.append(ex)
        if len(chosen) < wanted:
            raise ValueError(
                f"class {label!r} has {len(chosen)} texts not shared with other classes; {wanted} were asked"
            )
        picked[label] = [
            chosen[: sizes[0]],
            chosen[sizes[0] : sizes[0] + sizes[1]],
            chosen[sizes[0] + sizes[1] :],
        ]
    demos: list[Example] = []
    for round_index in range(sizes[0]):
        order = list(labels)
        rng.shuffle(order)
        demos.extend(picked[label][0][round_index] for label in order)
    extra = _shuffled([ex for label in labels for ex in picked[label][1]], rng)
    test = _shuffled([ex for label in labels for ex in picked[label][2]], rng)
    return demos, extra, test


def _shuffled(items: Sequence[Example], rng: random.Random) -> list[Example]:
    out = list(items)
    rng.shuffle(out)
    return out
