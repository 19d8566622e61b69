"""Labelled datasets from local files: ``.csv``, ``.tsv``, ``.jsonl`` and ``.parquet``.

:func:`load_file` reads a file into a :class:`~cptune.data.Dataset`; :func:`records_to_dataset` turns
``(location, record)`` pairs from any source (a file, a hub split, a DataFrame, Python lists) into one, checking
columns, skipping blank or unlabelled rows with one warning and recording provenance. CSV/TSV need a header row
and UTF-8 text; JSONL holds one JSON object per line; Parquet needs ``pyarrow``, which cptune does not install.
Texts are normalised as :mod:`cptune.data.types` states, and truncated only when ``max_chars`` is given.

Labels keep their type: JSONL and Parquet give their own (an int stays an int, ``1.0`` becomes ``1``); a CSV/TSV
label column whose every non-blank value is an integer literal (``-3``, ``0``, ``+7``) becomes ints, as pandas
reads it; any other CSV/TSV label column stays strings.

Every public name here is also importable from :mod:`cptune.data`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cptune.data.types import (
    FILE_FORMATS,
    Dataset,
    Example,
    Label,
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
        raise FileNotFoundError(f"data file {source!r} does not exist; pass an existing {formats()} file")
    if path.is_dir():
        raise ValueError(f"data path {source!r} is a directory; pass a {formats()} file")
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"data file {source!r} has extension {suffix or '(none)'!r}; accepted: {formats()}")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read data file {source!r}: {err.strerror or one_line(err)}") from None
    if suffix == ".parquet":
        columns, records = _read_parquet(raw, source)
    else:
        text = _decode(raw, source)
        if suffix == ".jsonl":
            columns, records = _read_jsonl(text, source)
        else:
            columns, records = _read_csv(text, source, "\t" if suffix == ".tsv" else ",", label_column)
    provenance = {
        "source": "file",
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


_INTEGER = re.compile(r"[+-]?\d+")


def _read_csv(text: str, source: str, delimiter: str, label_column: str) -> tuple[list[str], Records]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(
            f"data file {source!r} is not valid CSV (after line {reader.line_num}: {one_line(err)}); check the quoting"
        ) from None
    if not columns:
        raise ValueError(f"data file {source!r} is empty; it needs a header row naming its columns and data rows")
    labels = [row.get(label_column) for row in rows]
    filled = [value.strip() for value in labels if isinstance(value, str) and value.strip()]
    integers = bool(filled) and all(_INTEGER.fullmatch(value) for value in filled)

    def records() -> Records:
        for index, row in enumerate(rows, start=2):
            extra = row.get(None)
            if extra is not None or None in row.values():
                found = len(columns) + len(extra) if extra is not None else sum(v is not None for v in row.values())
                raise ValueError(
                    f"data file {source!r} row {index} has {found} fields but the header has {len(columns)}; "
                    "check the quoting and the delimiter"
                )
            if integers and row[label_column].strip():
                row[label_column] = int(row[label_column])
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
        raise ValueError(f"cannot read data file {source!r} as Parquet: {one_line(err)}") from None
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


def _cell_text(value: Any, column: str, source: str, where: str) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{source!r}{where}: {column!r} holds a {type(value).__name__}; a text must be a string")
    text = normalize_text(str(value))
    return text or None


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
