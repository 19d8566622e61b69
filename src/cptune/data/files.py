"""Labelled datasets from local files: ``.csv``, ``.tsv``, ``.jsonl`` and ``.parquet``.

:func:`load_file` reads a file into a :class:`~cptune.data.Dataset`; :func:`records_to_dataset` turns
``(location, record)`` pairs from any source (a file, a hub split) into one, checking columns, skipping blank
or unlabelled rows with one warning and recording provenance. CSV/TSV need a header row and UTF-8 text; JSONL
holds one JSON object per line; Parquet needs ``pyarrow``, which cptune does not install. Texts are
normalised as :mod:`cptune.data.types` states, and truncated only when ``max_chars`` is given.

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
    examples_sha256,
    formats,
    normalize_text,
    one_line,
    truncate_text,
)


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
            f"data file {source!r} is not valid CSV (after line {reader.line_num}: {one_line(err)}); check the quoting"
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
