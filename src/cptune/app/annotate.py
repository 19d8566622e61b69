"""Annotate a data file: every row back as it was, plus the classifier's label and class probabilities.

:func:`annotate_file` reads a ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` file and writes one row per
input row to an output whose own suffix picks its format (``in.csv`` -> ``out.jsonl`` converts). A row keeps
all its columns, in order, with their values, and gains ``predicted_label`` and one ``p_<label>`` column per
class (in :attr:`classes_` order). The names are fixed so that a gold ``label`` column in the input survives;
``prefix`` changes them when they collide with an input column.

The file is streamed: ``batch_size`` rows at a time are read, classified and written, so a text file larger
than memory works (Parquet goes through ``pyarrow``'s ``iter_batches`` and ``ParquetWriter``). A text file is
read twice: a first pass checks every row (a malformed row fails before any inference) and counts them for the
progress bar; Parquet's row count comes from its metadata.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cptune.cpt.saving import AtomicOutput
from cptune.data.types import FILE_FORMATS, formats, normalize_text, one_line
from cptune.reporting import notice, plural
from cptune.reporting import progress as progress_bar

LABEL_COLUMN = "predicted_label"
"""The predicted label's column (before ``prefix``); not ``label``, so a gold ``label`` column stays."""

CHOOSE_COLUMN = "choose it with --text-column; text_column= in Python"
PROBABILITY_PREFIX = "p_"
"""Start of each class probability column's name: ``p_<label>`` (before ``prefix``)."""

TEXT_DECIMALS = 6
"""Decimals of the probabilities in CSV, TSV and JSONL output (Parquet keeps full float64)."""

PARQUET_ROW_GROUP_ROWS = 65_536
PARQUET_ROW_GROUP_BYTES = 64 * 2**20
"""Parquet output is written in row groups of up to this many rows or bytes: one row group per batch of 64
rows would make files slow to read, and the limits keep the buffered rows small."""


class ProbabilisticClassifier(Protocol):
    """What :func:`annotate_file` needs: :class:`~cptune.app.classifier.CPTClassifier` or any look-alike."""

    classes_: Sequence  # labels (str, int, ...), in predict_proba's column order

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:  # (n, C)
        ...


def annotate_file(
    classifier: ProbabilisticClassifier,
    source: str | Path,
    output: str | Path,
    text_column: str = "text",
    batch_size: int = 64,
    progress: bool = True,
    prefix: str = "",
) -> int:
    """Write every row of ``source`` to ``output`` with the classifier's prediction added; return the row count.

    Added columns, after the input's own: ``{prefix}predicted_label``, the label the classifier gives the
    highest probability (its own value: ``classifier.classes_[argmax]``, an integer stays an integer in JSONL
    and Parquet), then ``{prefix}p_<label>`` for each class, its probability (float; rounded to 6 decimals in
    CSV, TSV and JSONL). A row whose text is blank (empty, whitespace, null) is written with empty cells there
    (null in JSONL and Parquet) and is not classified.

    The input's columns and values are written unchanged and in order: CSV/TSV cells as the same strings
    (UTF-8, ``\\n`` line ends, quoted where needed; a byte-order mark is dropped), JSONL objects with the same
    keys and values, Parquet columns with the same types. Converting between formats: CSV/TSV cells become
    JSON strings or Parquet string columns; JSON values other than strings become their JSON text in a CSV
    cell; values JSON cannot hold (dates, decimals, bytes) become their ISO form or ``str()``. JSONL objects
    may differ in their keys: CSV output has every key seen (first-seen order), empty where a row has none;
    Parquet output needs each key's values to share one type (ints and floats mix).

    Texts are normalised as :func:`cptune.data.load_file` does (whitespace runs become one space), so a file
    is classified as the same file would be read for training or ``cptune eval``.

    A CSV, TSV or JSONL input is read twice: a first pass checks every row (a malformed row, or a JSONL object
    without ``text_column``, fails before any inference) and counts them for the progress bar; Parquet's count
    comes from its metadata. An input without rows gives an output without rows (CSV/TSV: the header alone).

    ``output`` is written through a hidden temporary file in its folder and renamed into place at the end
    (:class:`cptune.cpt.saving.AtomicOutput`): an error or an interruption leaves no partial output and no
    temporary file, and an existing file of that name stays as it was until the rename. Nothing else in the
    folder is touched.

    Args:
        classifier: has ``classes_`` and ``predict_proba(texts) -> (n, C)`` (a fitted
            :class:`~cptune.app.classifier.CPTClassifier`).
        source: the input file, ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` (CSV/TSV with a header row,
            UTF-8). Parquet, in or out, needs ``pyarrow``.
        output: the output file; its suffix (one of the same four) sets its format.
        text_column: the column (JSON field) holding the text.
        batch_size: rows read, classified and written at a time (the classifier may split them further).
        progress: show a progress bar over rows on standard error (:func:`cptune.reporting.progress`); at the
            end a line says how many rows were annotated and how many were left blank (no text).
        prefix: put before the added column names, e.g. ``"cptune_"`` when the input already has
            ``predicted_label`` or a ``p_<label>`` column.

    Returns:
        The number of rows written (the header not counted).

    Raises:
        FileNotFoundError: ``source`` does not exist, or ``output``'s folder does not.
        NotADirectoryError: ``output``'s folder is a file.
        IsADirectoryError: ``output`` is a folder.
        ValueError: ``output`` is ``source``; a suffix is not one of the four; ``source`` is a folder, cannot be
            parsed, lacks ``text_column`` (the message lists the columns present), repeats a column name, or
            already has an added column's name; two classes give the same column name; a text is a list or
            object; ``predict_proba`` returns the wrong shape; ``pyarrow`` is missing for Parquet.
    """
    source, output = Path(source), Path(output)
    in_format = file_format(source, "input")
    out_format = file_format(output, "output")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    check_paths(source, output)
    if ".parquet" in (in_format, out_format):
        _pyarrow()  # fail before reading anything when it is missing
    classes = [c.item() if isinstance(c, np.generic) else c for c in classifier.classes_]
    new_columns = [f"{prefix}{LABEL_COLUMN}", *(f"{prefix}{PROBABILITY_PREFIX}{c}" for c in classes)]
    repeated = _first_repeat(new_columns)
    if repeated is not None:
        raise ValueError(f"two classes of {classes!r} give the same column name {repeated!r}; "
                         "their labels must differ as text")

    table = _open_table(source, in_format, text_column, batch_size, arrow_schema=out_format == ".parquet")
    clashes = [c for c in new_columns if c in table.columns]
    if clashes:
        raise ValueError(f"{source} already has a column {clashes[0]!r}, a name the annotation adds; pass another "
                         f"prefix= (e.g. prefix='cptune_' gives 'cptune_{LABEL_COLUMN}') for the added columns")

    written = blank = 0
    with (
        AtomicOutput(output) as tmp,
        open_writer(out_format, tmp, table, classes, new_columns) as writer,
        progress_bar(table.rows, "annotate", unit="row", enabled=progress) as bar,
    ):
        for batch in table.batches(batch_size):
            labels, probabilities = predict_rows(classifier, classes, batch.texts)
            writer.write(batch.rows, labels, probabilities)
            written += len(batch.texts)
            blank += sum(text is None for text in batch.texts)
            bar.update(len(batch.texts))
    left = f", {plural(blank, 'row')} without text left blank" if blank else ""
    notice("%s annotated into %s%s", plural(written - blank, "row"), output, left)
    return written


# -- checks -------------------------------------------------------------------------------------


def file_format(path: Path, role: str) -> str:
    """``path``'s suffix, lower-cased, when it is one of the formats read and written (``role`` names it)."""
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"{role} file {str(path)!r} has extension {suffix or '(none)'!r}; accepted: {formats()}")
    return suffix


def check_paths(source: Path, output: Path) -> None:
    """Refuse a missing or folder ``source``, an ``output`` that cannot be written, or one that is ``source``."""
    if not source.exists():
        raise FileNotFoundError(f"input file {source} does not exist")
    if source.is_dir():
        raise ValueError(f"input {source} is a folder; pass a {formats()} file")
    folder = output.parent
    if not folder.exists():
        raise FileNotFoundError(f"the output's folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {output}: {folder} is a file, not a folder")
    if output.is_dir():
        raise IsADirectoryError(f"cannot write {output}: it is a folder")
    if source.resolve() == output.resolve() or (output.exists() and os.path.samefile(source, output)):
        raise ValueError(f"output {output} is the input file; write the annotations to another file")


def _first_repeat(names: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet files need pyarrow, which is not installed; run `pip install pyarrow` "
                         "or use .csv, .tsv or .jsonl files") from None
    return pa, pq


def text_of(value: Any, column: str, where: str) -> str | None:
    """The normalised text of a cell, or None when it is blank (as :func:`cptune.data.load_file` reads it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: {column!r} holds a {type(value).__name__}; a text must be a string")
    return normalize_text(str(value)) or None


# -- reading ------------------------------------------------------------------------------------


@dataclass
class _Batch:
    rows: Any  # list[dict] (CSV, TSV, JSONL) or a pyarrow.RecordBatch (Parquet)
    texts: list[str | None]  # each row's normalised text; None where blank


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def _record_batches(records: Iterable[tuple[dict, str | None]], size: int) -> Iterator[_Batch]:
    for chunk in _chunks(records, size):
        yield _Batch([row for row, _ in chunk], [text for _, text in chunk])


class _CsvTable:
    """A CSV or TSV file with a header row, read row by row (each row a ``{column: string}`` dict)."""

    def __init__(self, path: Path, delimiter: str, text_column: str) -> None:
        self.path, self.delimiter, self.text_column = path, delimiter, text_column
        self.columns = _csv_header(path, delimiter, text_column)
        self.rows = sum(1 for _ in self._records())  # also checks every row before any inference

    def arrow_schema(self):
        pa, _ = _pyarrow()
        return pa.schema([(name, pa.string()) for name in self.columns])

    def _records(self) -> Iterator[tuple[dict, str | None]]:
        with _utf8(self.path) as f:
            reader = csv.reader(f, delimiter=self.delimiter, strict=True)
            _csv_call(self.path, lambda: next(reader))  # the header
            while (fields := _csv_call(self.path, lambda: next(reader, None), reader)) is not None:
                if not fields:
                    continue  # an empty line between rows
                where = f"{self.path} line {reader.line_num}"
                if len(fields) != len(self.columns):
                    raise ValueError(f"{where} has {len(fields)} fields but the header has {len(self.columns)}; "
                                     "check the quoting and the delimiter")
                row = dict(zip(self.columns, fields, strict=True))
                yield row, text_of(row[self.text_column], self.text_column, where)

    def batches(self, size: int) -> Iterator[_Batch]:
        return _record_batches(self._records(), size)


class _JsonlTable:
    """A JSONL file, one object per line, read object by object; ``columns`` are all keys, first seen first."""

    def __init__(self, path: Path, text_column: str, batch_size: int, arrow_schema: bool) -> None:
        self.path, self.text_column = path, text_column
        keys: dict[str, None] = {}
        schemas = []
        self.rows = 0
        for chunk in _chunks(self._records(), batch_size):  # checks every row before any inference
            self.rows += len(chunk)
            for row, _ in chunk:
                keys.update(dict.fromkeys(row))
            if arrow_schema:
                schemas.append(self._chunk_schema([row for row, _ in chunk]))
        self.columns = list(keys)
        self.schema = self._unify(schemas, keys) if arrow_schema else None

    def arrow_schema(self):
        return self.schema

    def _records(self) -> Iterator[tuple[dict, str | None]]:
        number = 0
        with _utf8(self.path) as f:
            try:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    where = f"{self.path} line {number}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); "
                                         "a .jsonl file holds one JSON object per line") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{where} holds a JSON {type(row).__name__}; "
                                         "a .jsonl file holds one JSON object per line")
                    if self.text_column not in row:
                        fields = ", ".join(repr(k) for k in row) or "none"
                        raise ValueError(f"text column {self.text_column!r} not found on {where}; fields present: "
                                         f"{fields} ({CHOOSE_COLUMN})")
                    yield row, text_of(row[self.text_column], self.text_column, where)
            except UnicodeDecodeError:
                raise ValueError(f"{self.path} is not UTF-8 text (near line {number + 1}); save it as UTF-8") from None

    def _chunk_schema(self, rows: list[dict]):
        pa, _ = _pyarrow()
        fields = []
        for key in dict.fromkeys(k for row in rows for k in row):
            try:
                fields.append(pa.field(key, pa.array([row.get(key) for row in rows]).type))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ValueError(self._mixed(key, err)) from None
        return pa.schema(fields)

    def _unify(self, schemas: list, keys: dict[str, None]):
        pa, _ = _pyarrow()
        if not schemas:
            return pa.schema([])
        try:
            unified = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(self._mixed(None, err)) from None
        return pa.schema([unified.field(key) for key in keys])  # the keys' first-seen order

    def _mixed(self, key: str | None, err: Exception) -> str:
        field = f"field {key!r}" if key is not None else "a field"
        return (f"{self.path}: {field} holds values of different types ({one_line(err)}), which one Parquet column "
                "cannot hold; write .jsonl, .csv or .tsv output instead")

    def batches(self, size: int) -> Iterator[_Batch]:
        return _record_batches(self._records(), size)


class _ParquetTable:
    """A Parquet file, read ``size`` rows at a time as pyarrow record batches (types kept as they are)."""

    def __init__(self, path: Path, text_column: str) -> None:
        pa, pq = _pyarrow()
        self.path, self.text_column = path, text_column
        try:
            with pq.ParquetFile(path) as file:
                self.schema = file.schema_arrow
                self.rows = file.metadata.num_rows
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable Parquet file"
            raise ValueError(f"cannot read {path} as Parquet: {one_line(err)}") from None
        self.columns = list(self.schema.names)
        _check_columns(path, self.columns, text_column)
        kind = self.schema.field(text_column).type
        if pa.types.is_nested(kind):
            raise ValueError(f"{path}: text column {text_column!r} holds {kind} values; a text must be a string")

    def arrow_schema(self):
        return self.schema

    def batches(self, size: int) -> Iterator[_Batch]:
        _, pq = _pyarrow()
        where = f"{self.path}"
        with pq.ParquetFile(self.path) as file:
            for batch in file.iter_batches(batch_size=size):
                cells = batch.column(self.text_column).to_pylist()
                yield _Batch(batch, [text_of(cell, self.text_column, where) for cell in cells])


def _open_table(path: Path, suffix: str, text_column: str, batch_size: int, arrow_schema: bool):
    if suffix == ".parquet":
        return _ParquetTable(path, text_column)
    if suffix == ".jsonl":
        return _JsonlTable(path, text_column, batch_size, arrow_schema)
    return _CsvTable(path, "\t" if suffix == ".tsv" else ",", text_column)


def _utf8(path: Path):
    # utf-8-sig: a byte-order mark (as Excel writes) is not part of the first column's name
    return open(path, encoding="utf-8-sig", newline="")


def _csv_call(path: Path, read, reader=None):
    """``read()``, with csv's and the decoder's errors as a ValueError naming the file and line."""
    try:
        return read()
    except csv.Error as err:
        line = f" (after line {reader.line_num})" if reader is not None else ""
        raise ValueError(f"{path} is not valid CSV{line}: {one_line(err)}; check the quoting") from None
    except UnicodeDecodeError:
        line = f" (after line {reader.line_num})" if reader is not None else ""
        raise ValueError(f"{path} is not UTF-8 text{line}; save it as UTF-8") from None


def _csv_header(path: Path, delimiter: str, text_column: str) -> list[str]:
    """The header row of a CSV/TSV file, checked: present, no repeated name, the text column among them."""
    with _utf8(path) as f:
        columns = _csv_call(path, lambda: next(csv.reader(f, delimiter=delimiter, strict=True), None))
    if not columns:
        raise ValueError(f"{path} is empty; it needs a header row naming its columns")
    _check_columns(path, columns, text_column)
    return columns


def check_annotation(source: str | Path, output: str | Path, text_column: str = "text") -> None:
    """The checks :func:`annotate_file` makes before any row is read, made without a classifier (so a
    command can refuse a mistake before it loads a model): the suffixes, the paths, and a CSV/TSV header
    naming ``text_column``.

    Raises:
        The errors :func:`annotate_file` raises for the same mistakes.
    """
    source, output = Path(source), Path(output)
    in_format = file_format(source, "input")
    file_format(output, "output")
    check_paths(source, output)
    if in_format in (".csv", ".tsv"):
        _csv_header(source, "\t" if in_format == ".tsv" else ",", text_column)


def _check_columns(path: Path, columns: list[str], text_column: str) -> None:
    repeated = _first_repeat(columns)
    if repeated is not None:
        raise ValueError(f"{path} names the column {repeated!r} twice; give each column its own name")
    if text_column not in columns:
        present = ", ".join(repr(c) for c in columns) or "none"
        raise ValueError(f"text column {text_column!r} not found in {path}; columns present: {present} "
                         f"({CHOOSE_COLUMN})")


# -- classifying --------------------------------------------------------------------------------


def predict_rows(classifier, classes: list, texts: list[str | None]) -> tuple[list, np.ndarray]:
    """Each row's predicted class (None for a blank text) and ``(n, C)`` probabilities (NaN rows for blanks)."""
    probabilities = np.full((len(texts), len(classes)), np.nan)  # (n, C)
    keep = [i for i, text in enumerate(texts) if text is not None]
    if keep:
        got = np.asarray(classifier.predict_proba([texts[i] for i in keep]), dtype=np.float64)
        if got.shape != (len(keep), len(classes)):
            raise ValueError(f"predict_proba returned shape {got.shape} for {len(keep)} texts and "
                             f"{len(classes)} classes; expected {(len(keep), len(classes))}")
        probabilities[keep] = got
    labels: list = [None] * len(texts)
    for i in keep:
        labels[i] = classes[int(probabilities[i].argmax())]
    return labels, probabilities


# -- writing ------------------------------------------------------------------------------------


def open_writer(suffix: str, path: Path, table, classes: list, new_columns: list[str]):
    """A context-managed writer of ``suffix``'s format at ``path``: ``write(rows, labels, probabilities)``.

    ``table`` gives the input's ``columns`` (CSV/TSV header) and ``arrow_schema()`` (Parquet).
    """
    if suffix == ".parquet":
        return _ParquetWriter(path, table.arrow_schema(), classes, new_columns)
    if suffix == ".jsonl":
        return _JsonlWriter(path, new_columns)
    return _CsvWriter(path, "\t" if suffix == ".tsv" else ",", table.columns, new_columns)


def _python_rows(rows) -> list[dict]:
    return rows if isinstance(rows, list) else rows.to_pylist()


def _probability_cell(p: float) -> float | None:
    return None if math.isnan(p) else round(float(p), TEXT_DECIMALS)


def _json_default(value: Any) -> str:
    """JSON text for values JSON has no type for (Parquet dates, decimals, bytes): ISO form, else ``str()``."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _json_dumps(value: Any) -> str:
    # U+2028/U+2029 are valid raw in JSON strings but split lines for str.splitlines() readers: escape them
    text = json.dumps(value, ensure_ascii=False, default=_json_default)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class _TextWriter:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", encoding="utf-8", newline="")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class _CsvWriter(_TextWriter):
    def __init__(self, path: Path, delimiter: str, columns: list[str], new_columns: list[str]) -> None:
        super().__init__(path)
        self.columns = columns
        self.writer = csv.writer(self.file, delimiter=delimiter, lineterminator="\n")
        self.writer.writerow([*columns, *new_columns])

    def write(self, rows, labels: list, probabilities: np.ndarray) -> None:
        for row, label, probs in zip(_python_rows(rows), labels, probabilities, strict=True):
            self.writer.writerow([*(_csv_cell(row.get(c)) for c in self.columns),
                                  "" if label is None else str(label),
                                  *_probability_texts(probs)])


def _probability_texts(probs: np.ndarray) -> list[str]:
    return ["" if cell is None else repr(cell) for cell in map(_probability_cell, probs)]


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _json_dumps(value) if isinstance(value, (bool, int, float, list, dict)) else _json_default(value)


class _JsonlWriter(_TextWriter):
    def __init__(self, path: Path, new_columns: list[str]) -> None:
        super().__init__(path)
        self.new_columns = new_columns

    def write(self, rows, labels: list, probabilities: np.ndarray) -> None:
        label_column, *probability_columns = self.new_columns
        for row, label, probs in zip(_python_rows(rows), labels, probabilities, strict=True):
            out = {**row, label_column: label}
            out.update((name, _probability_cell(p)) for name, p in zip(probability_columns, probs, strict=True))
            self.file.write(_json_dumps(out) + "\n")


class _ParquetWriter:
    """Appends the added columns to each batch and writes row groups of up to PARQUET_ROW_GROUP_* rows/bytes."""

    def __init__(self, path: Path, schema, classes: list, new_columns: list[str]) -> None:
        pa, pq = _pyarrow()
        self.pa, self.input_schema = pa, schema
        integers = all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
        self.label_type = pa.int64() if integers else pa.string()  # other labels are written as text
        label_column, *probability_columns = new_columns
        self.added = [pa.field(label_column, self.label_type),
                      *(pa.field(name, pa.float64()) for name in probability_columns)]
        self.writer = pq.ParquetWriter(path, pa.schema([*schema, *self.added], metadata=schema.metadata))
        self.pending: list = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self._flush()
        finally:
            self.writer.close()

    def write(self, rows, labels: list, probabilities: np.ndarray) -> None:
        pa = self.pa
        if isinstance(rows, list):
            try:
                table = pa.Table.from_pylist(rows, schema=self.input_schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ValueError(f"a row does not fit the Parquet column types {self.input_schema.types}: "
                                 f"{one_line(err)}; write .jsonl, .csv or .tsv output instead") from None
        else:
            table = pa.Table.from_batches([rows])
        if self.label_type == pa.string():
            labels = [None if label is None else str(label) for label in labels]
        blank = np.array([label is None for label in labels], dtype=bool)
        columns = [pa.array(labels, type=self.label_type),
                   *(pa.array(probabilities[:, j], mask=blank) for j in range(probabilities.shape[1]))]
        for field, column in zip(self.added, columns, strict=True):
            table = table.append_column(field, column)
        self.pending.append(table)
        if (sum(t.num_rows for t in self.pending) >= PARQUET_ROW_GROUP_ROWS
                or sum(t.nbytes for t in self.pending) >= PARQUET_ROW_GROUP_BYTES):
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(self.pa.concat_tables(self.pending))
            self.pending = []
