"""Labelled datasets from local files: ``.csv``, ``.tsv``, ``.jsonl`` and ``.parquet``.

:func:`load_file` reads a file into a :class:`~cptune.data.Dataset`; :func:`records_to_dataset` turns
``(location, record)`` pairs from any source (a file, a hub split, a DataFrame, Python lists) into one, checking
columns, skipping blank or unlabelled rows with one warning and recording provenance. Files are read through
:mod:`cptune.data.tables` (the one reader of data files, on ``pyarrow``): CSV/TSV need a header row and UTF-8
text; JSONL holds one JSON object per line.
Texts are normalised as :mod:`cptune.data.types` states, and truncated only when ``max_chars`` is given.

Labels keep their type: JSONL and Parquet give their own (an int stays an int, ``1.0`` becomes ``1``); a CSV/TSV
label column whose every non-blank value is an integer literal (``-3``, ``0``, ``+7``) becomes ints, as pandas
reads it; any other CSV/TSV label column stays strings.

Every public name here is also importable from :mod:`cptune.data`.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cptune.data.tables import Batch, Table, open_table, text_of
from cptune.data.types import (
    FILE_FORMATS,
    Dataset,
    Example,
    Label,
    MissingColumnError,
    examples_sha256,
    formats,
    label_sort_key,
    normalize_text,
    one_line,
    truncate_text,
)
from cptune.reporting import CptuneWarning, plural


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

    Texts are normalised (see the module docstring). Rows whose text is blank or whose label is blank are
    skipped, counted in the provenance and reported with one warning. Labels keep their type (see the module
    docstring); with ``label_names``, an integer label ``i`` (or its decimal string) becomes
    ``label_names[i]`` and a negative one (the hub convention for "unlabelled") is skipped.

    Args:
        path: The data file. CSV/TSV need a header row and UTF-8 text; JSONL holds one JSON object per line;
            CSV, TSV and Parquet are read with ``pyarrow``.
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
        raise FileNotFoundError(f"data file {source!r} does not exist; pass an existing {formats()} file")
    if path.is_dir():
        raise ValueError(f"data path {source!r} is a directory; pass a {formats()} file")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"data file {source!r} has extension {suffix or '(none)'!r}; accepted: {formats()}")
    try:
        sha256, nul = _digest(path)
    except OSError as err:
        raise ValueError(f"cannot read data file {source!r}: {err.strerror or one_line(err)}") from None
    if nul and suffix != ".parquet":
        raise ValueError(f"data file {source!r} holds NUL bytes (binary?); accepted: UTF-8 text for .csv/.tsv/.jsonl")
    table = open_table(path)
    batches = list(table.batches())
    if suffix == ".jsonl" and not batches:
        raise ValueError(f"data file {source!r} is empty; a .jsonl file holds one JSON object per line")
    records = _records(table, batches, label_column)
    provenance = {
        "source": "file",
        "package": None,
        "version": None,
        "file": str(path.resolve()),
        "sha256": sha256,
        "format": suffix[1:],
        "stand_in_for": None,
    }
    return records_to_dataset(
        records,
        name=name or path.stem,
        source=source,
        columns=table.columns,
        text_column=text_column,
        label_column=label_column,
        label_names=label_names,
        max_chars=max_chars,
        provenance=provenance,
    )


_HASH_CHUNK = 1 << 20  # bytes hashed at a time


def _digest(path: Path) -> tuple[str, bool]:
    """The file's SHA-256 and whether it holds a NUL byte (a text file never does), read in chunks."""
    digest, nul = hashlib.sha256(), False
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            nul = nul or b"\x00" in chunk
    return digest.hexdigest(), nul


Records = Iterator[tuple[str, dict]]


_INTEGER = re.compile(r"[+-]?\d+")


def _records(table: Table, batches: list[Batch], label_column: str) -> Records:
    """``(" row N", record)`` pairs of a table's rows; a CSV/TSV label column of integer literals as ints."""
    integers = False
    if table.format in (".csv", ".tsv") and label_column in table.columns:
        filled = [value.strip() for batch in batches for value in batch.column(label_column) if value.strip()]
        integers = bool(filled) and all(_INTEGER.fullmatch(value) for value in filled)
    for batch in batches:
        for number, row in zip(batch.numbers, batch.records(), strict=True):
            if integers and row[label_column].strip():
                row[label_column] = int(row[label_column])
            yield f" {table.unit} {number}", row


def records_to_dataset(
    records: Iterable[tuple[str, dict]],
    *,
    name: str,
    source: str,
    columns: Sequence[str],
    text_column: str,
    label_column: str,
    label_names: Sequence[Label] | None = None,
    max_chars: int | None = None,
    provenance: dict | None = None,
) -> Dataset:
    """Build a dataset from ``(location, record)`` pairs, as read from any source.

    A label keeps its type (see :data:`cptune.data.types.Label`); a NumPy scalar becomes a Python one, an
    integral float an int; a blank string, ``None`` or NaN means "unlabelled" and the row is skipped.

    Args:
        records: Pairs of a location suffix for messages (e.g. ``" line 3"``) and a mapping of fields.
        name: Dataset name.
        source: What the records came from, for messages.
        columns: The columns the source declares (checked before any record is read).
        text_column: Field holding the text.
        label_column: Field holding the label.
        label_names: The classes in the source's own order (a ``ClassLabel``'s names, a categorical's
            categories): a label among them is kept, an integer label ``i`` (or its decimal string) becomes
            ``label_names[i]`` and a negative one means "unlabelled".
        max_chars: If set, the truncation limit.
        provenance: Provenance to extend with the columns and skip counts.

    Returns:
        The dataset; labels in ``label_names`` order if given, else sorted by :func:`label_sort_key`.

    Raises:
        ValueError: On a missing column, an unusable value, no usable example or a single class.
    """
    for role, column in (("text", text_column), ("label", label_column)):
        if column not in columns:
            raise MissingColumnError(role, column, f"in {source!r}", columns)
    names = list(label_names) if label_names is not None else None
    examples: list[Example] = []
    rows = blank = unlabelled = 0
    for where, record in records:
        rows += 1
        for column in (text_column, label_column):
            if column not in record:
                fields = ", ".join(repr(c) for c in record) or "none"
                raise ValueError(f"{source!r}{where} has no {column!r} field; fields present: {fields}")
        text = text_of(record[text_column], text_column, f"{source!r}{where}")
        label = _cell_label(record[label_column], label_column, names, source, where)
        if text is None:
            blank += 1
        elif label is None:
            unlabelled += 1
        else:
            examples.append(Example(truncate_text(text, max_chars) if max_chars is not None else text, label))
    if blank or unlabelled:
        parts = [f"{plural(blank, 'row')} with a blank {text_column!r}"] if blank else []
        parts += [f"{plural(unlabelled, 'row')} without a {label_column!r}"] if unlabelled else []
        warnings.warn(f"{source}: skipped {' and '.join(parts)}; {plural(len(examples), 'row')} used",
                      CptuneWarning, stacklevel=3)
    if not examples:
        raise ValueError(
            f"{source!r} has no usable examples ({rows} rows: {blank} with blank {text_column!r}, "
            f"{unlabelled} without a {label_column!r}); it needs rows with a non-blank text and label"
        )
    found = {ex.label for ex in examples}
    _refuse_merged_labels([ex.label for ex in examples], source)
    labels = [n for n in names if n in found] if names is not None else sorted(found, key=label_sort_key)
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


def _refuse_merged_labels(labels: list[Label], source: str) -> None:
    """Refuse labels that Python counts as one (``True == 1``, ``False == 0``), which would merge two classes."""
    first: dict[Label, Label] = {}
    for label in labels:
        seen = first.setdefault(label, label)
        if type(seen) is not type(label) and bool in (type(seen), type(label)):
            raise ValueError(
                f"{source!r}: labels {seen!r} and {label!r} are equal in Python, so they would be one class; "
                "make the label column one type (e.g. all strings)"
            )


def _scalar(value: Any) -> Any:
    """A NumPy scalar as the Python scalar it holds (``numpy.int64(3)`` -> ``3``); anything else unchanged."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _cell_label(value: Any, column: str, names: list[Label] | None, source: str, where: str) -> Label | None:
    value = _scalar(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        value = normalize_text(value)
        if not value:
            return None
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    elif not isinstance(value, (int, float)):  # bool is an int
        raise ValueError(
            f"{source!r}{where}: {column!r} holds a {type(value).__name__}; a label must be a scalar "
            "(a string, integer, boolean or number)"
        )
    if names is None or value in names:
        return value
    index = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        index = int(value)
    if index is not None and index < 0:
        return None
    if index is not None and index < len(names):
        return names[index]
    raise ValueError(
        f"{source!r}{where}: label {value!r} is neither an index 0..{len(names) - 1} into label_names "
        f"nor one of {names!r}"
    )
