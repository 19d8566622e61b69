"""Data files as tables of rows, read and written a batch at a time: ``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``.

cptune's one reader and writer of data files: :func:`cptune.data.load_file` reads training and test data
through :func:`open_table`, and :func:`cptune.app.annotate.annotate_file` (``cptune predict --file``) streams a
file through it and writes the annotated copy with :func:`open_table_writer`. Nothing here holds more than one
batch of rows (plus one pyarrow block of CSV text), so a file larger than memory streams, and an input file is
only ever opened for reading.

Reading:

* CSV/TSV: ``pyarrow.csv.open_csv``, block by block, with every column read as a string (``007`` stays
  ``"007"``; what a column means is up to its reader: :func:`~cptune.data.load_file` turns a label column of
  integer literals into ints), an empty cell as ``""`` and never null, newlines inside quoted cells kept
  (``\\r\\n`` too), a UTF-8 byte-order mark dropped and blank lines skipped. Rows are numbered as pyarrow numbers
  them: the header is row 1 and a quoted newline does not start a row. pyarrow is more lenient than the
  :mod:`csv` module's strict mode in two corners: a stray quote inside an unquoted cell (``"x"y``) reads as
  ``xy``, and a quote left open at the very end of the file closes there.
* Parquet: ``pyarrow.parquet.ParquetFile.iter_batches``, with the file's own column types; rows numbered from 1.
* JSONL: a line reader over :mod:`json`, not ``pyarrow.json``. pyarrow's reader gives each field one type for the
  whole file, so it refuses a field whose values change type (labels ``"b"``, ``2`` and ``true``, which
  :func:`~cptune.data.load_file` accepts), reads an integer field as floats once one value is ``1.5`` (an
  annotated copy would then say ``1.0`` for ``1``), reads integers beyond 64 bits as floats, gives an object the
  keys it lacks (as nulls) and names no line in its errors. Here each object keeps its own keys, their order and
  their JSON types, and rows are numbered by their line in the file.

Writing: CSV/TSV through the :mod:`csv` module (minimal quoting, ``\\n`` line ends), not
``pyarrow.csv.CSVWriter``, which quotes every string and header name and formats numbers its own way, so an
annotated CSV's bytes would change; JSONL through :mod:`json`, one object per line; Parquet through
``pyarrow.parquet.ParquetWriter``, in row groups of up to :data:`PARQUET_ROW_GROUP_ROWS` rows.

Errors are one-line ``ValueError``\\ s naming the file and, where there is one, the row (``row 3``, ``line 3``).
pyarrow is imported on first use, so ``import cptune.data`` stays light.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptune.data.types import FILE_FORMATS, formats, normalize_text, one_line

CSV_BLOCK_BYTES = 1 << 20
"""Bytes of CSV text pyarrow parses at a time (its own default): what a CSV read holds beyond one batch."""

PARQUET_ROW_GROUP_ROWS = 65_536
PARQUET_ROW_GROUP_BYTES = 64 * 2**20
"""Parquet output is written in row groups of up to this many rows or bytes: one row group per batch of 64
rows would make files slow to read, and the limits keep the buffered rows small."""

HEADER_ROW = 1
"""A CSV/TSV file's header is its row 1, so its first data row is row 2 (pyarrow's numbering, and cptune's)."""

DEFAULT_JSONL_BATCH = 1024
"""JSONL objects per batch when :meth:`Table.batches` is given no size (the other readers have their own)."""

_UTF8_CHUNK = 1 << 20  # bytes decoded at a time when looking for the first byte that is not UTF-8


def describe(path: Path) -> str:
    """How messages name a data file: ``data file '/path/to/file.csv'``."""
    return f"data file {str(path)!r}"


def arrow(what: str):
    """``pyarrow`` (with its ``csv`` and ``parquet`` modules loaded), or a ValueError saying how to install it."""
    try:
        import pyarrow as pa
        import pyarrow.csv
        import pyarrow.parquet  # noqa: F401  (loads pa.parquet)
    except ImportError:
        raise ValueError(f"{what} needs pyarrow, which is not installed; run `pip install pyarrow` "
                         "(`pip install cptune` installs it)") from None
    return pa


def text_of(value: Any, column: str, where: str) -> str | None:
    """The normalised text of a cell, or None when it is blank (``None``, NaN, empty or whitespace).

    Raises:
        ValueError: The cell holds a list or an object (``where`` starts the message).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (dict, list)):
        raise ValueError(f"{where}: {column!r} holds a {type(value).__name__}; a text must be a string")
    return normalize_text(str(value)) or None


# -- reading ------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Consecutive rows of a data file.

    Attributes:
        rows: A ``pyarrow.RecordBatch`` (CSV, TSV, Parquet) or a list of dicts (JSONL, one per object).
        numbers: Each row's number as messages give it (:attr:`Table.unit`): CSV/TSV rows count from 2 (the
            header is row 1), Parquet rows from 1, JSONL rows are their line numbers.
    """

    rows: Any
    numbers: Sequence[int]

    def __len__(self) -> int:
        return len(self.numbers)

    def records(self) -> list[dict]:
        """The rows as dicts of Python values (JSONL objects as they were read)."""
        return _records(self.rows)

    def column(self, name: str) -> list:
        """One column's Python values (None where a JSONL object lacks the key)."""
        if isinstance(self.rows, list):
            return [row.get(name) for row in self.rows]
        return self.rows.column(name).to_pylist()


@dataclass
class Survey:
    """What one pass over a table found: its row count, every column and (if asked) a pyarrow schema.

    It has what :func:`open_table_writer` needs of an input: ``columns`` and :meth:`arrow_schema`.
    """

    rows: int
    columns: list[str]
    schema: Any = None

    def arrow_schema(self):
        return self.schema


class Table:
    """A data file opened for reading (:func:`open_table`): its format, its columns, its rows in batches.

    Attributes:
        path: The file.
        format: Its suffix, lower-cased (one of :data:`~cptune.data.types.FILE_FORMATS`).
        name: How messages name it (:func:`describe`).
        columns: The columns it declares: the CSV/TSV header, the Parquet schema's names, the keys of the first
            JSONL object (:meth:`survey` finds every key).
        unit: ``"row"`` or ``"line"`` (JSONL): what :attr:`Batch.numbers` count.
    """

    unit = "row"

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.format, self.name, self.columns = path, path.suffix.lower(), describe(path), columns

    def where(self, number: int) -> str:
        """A row's place in messages: ``data file 'x.csv' row 3``."""
        return f"{self.name} {self.unit} {number}"

    def batches(self, size: int | None = None) -> Iterator[Batch]:
        """The rows, ``size`` at a time (the last batch may be shorter); ``None``: as the reader gives them.

        Raises:
            ValueError: A row cannot be parsed (the message names the file and the row).
        """
        raise NotImplementedError

    def survey(self, size: int, *, schema: bool = False, check: Callable[[Batch], None] | None = None) -> Survey:
        """Count the rows in one pass over the file, calling ``check`` on every batch of ``size`` rows.

        A malformed row fails here, before a caller acts on any row. Parquet reads its count and columns from
        the file's metadata instead (its values have their column's type already), and calls no ``check``.

        Args:
            size: Rows per batch.
            schema: Also find a pyarrow schema for the rows (JSONL: each key's type over every object).
            check: Called with each batch (e.g. to refuse a bad cell before any inference).

        Returns:
            The row count, every column (JSONL: every key seen, first seen first) and the schema if asked.
        """
        rows = 0
        for batch in self.batches(size):
            rows += len(batch)
            if check is not None:
                check(batch)
        return Survey(rows, list(self.columns), self._string_schema() if schema else None)

    def _string_schema(self):
        pa = arrow(f"reading {self.name}")
        return pa.schema([(name, pa.string()) for name in self.columns])


class _CsvTable(Table):
    """CSV or TSV through ``pyarrow.csv.open_csv``: every column a string, a header row required."""

    def __init__(self, path: Path) -> None:
        self.delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        self._ragged: list = []  # pyarrow's InvalidRow of the row that stopped the read: its number and counts
        super().__init__(path, [])
        with self._parsing():  # one block is parsed to learn the header; its names decode lazily
            self.columns = list(self._reader(None).schema.names)

    def _reader(self, column_types):
        pa = arrow(f"reading {self.name}")

        def on_ragged(row) -> str:
            self._ragged.append(row)
            return "error"

        return pa.csv.open_csv(
            self.path,
            # one thread: pyarrow then knows each row's number (for errors), and on 200,000 rows it was faster
            read_options=pa.csv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
            parse_options=pa.csv.ParseOptions(delimiter=self.delimiter, newlines_in_values=True,
                                              invalid_row_handler=on_ragged),
            convert_options=pa.csv.ConvertOptions(column_types=column_types, strings_can_be_null=False),
        )

    @contextlib.contextmanager
    def _parsing(self):
        """pyarrow's and the decoder's errors inside the block as one-line ValueErrors naming the file and row."""
        pa = arrow(f"reading {self.name}")
        self._ragged.clear()
        try:
            yield
        except (pa.ArrowInvalid, UnicodeDecodeError) as err:
            if self._ragged:
                row = self._ragged[0]
                at = f"row {row.number}" if row.number is not None else "a row"
                raise ValueError(f"{self.name} {at} has {row.actual_columns} fields but the header has "
                                 f"{row.expected_columns}; check the quoting and the delimiter") from None
            if "Empty CSV file" in str(err):
                raise ValueError(f"{self.name} is empty; it needs a header row naming its columns") from None
            if isinstance(err, UnicodeDecodeError) or "invalid UTF8" in str(err):
                raise ValueError(_not_utf8(self.path, self.name)) from None
            raise ValueError(f"{self.name} is not valid CSV ({one_line(err)}); check the quoting and the "
                             "delimiter") from None

    def batches(self, size: int | None = None) -> Iterator[Batch]:
        pa = arrow(f"reading {self.name}")
        with self._parsing():
            reader = self._reader({name: pa.string() for name in self.columns})
            yield from _numbered(_sized(reader, size, pa), HEADER_ROW + 1)


class _ParquetTable(Table):
    """Parquet through ``pyarrow.parquet.ParquetFile``: the file's own column types."""

    def __init__(self, path: Path) -> None:
        pa = arrow(f"reading {describe(path)}")
        super().__init__(path, [])
        try:
            with pa.parquet.ParquetFile(path) as file:
                self.schema = file.schema_arrow
                self.rows = file.metadata.num_rows
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable Parquet file"
            raise ValueError(f"cannot read {self.name} as Parquet: {one_line(err)}") from None
        self.columns = list(self.schema.names)

    def batches(self, size: int | None = None) -> Iterator[Batch]:
        pa = arrow(f"reading {self.name}")
        with pa.parquet.ParquetFile(self.path) as file:
            blocks = file.iter_batches(batch_size=size) if size is not None else file.iter_batches()
            yield from _numbered(_sized(blocks, size, pa), 1)

    def survey(self, size: int, *, schema: bool = False, check: Callable[[Batch], None] | None = None) -> Survey:
        return Survey(self.rows, list(self.columns), self.schema if schema else None)


class _JsonlTable(Table):
    """JSONL, one JSON object per line, read with :mod:`json` (the module docstring says why not pyarrow)."""

    unit = "line"

    def __init__(self, path: Path) -> None:
        super().__init__(path, [])
        first = next(self._objects(), None)
        self.columns = list(first[1]) if first is not None else []

    def _objects(self) -> Iterator[tuple[int, dict]]:
        number = 0
        with open(self.path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a byte-order mark is dropped
            try:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{self.where(number)} is not valid JSON ({err.msg} at column "
                                         f"{err.colno}); a .jsonl file holds one JSON object per line") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{self.where(number)} holds a JSON {type(row).__name__}; "
                                         "a .jsonl file holds one JSON object per line")
                    yield number, row
            except UnicodeDecodeError:
                raise ValueError(_not_utf8(self.path, self.name)) from None

    def batches(self, size: int | None = None) -> Iterator[Batch]:
        objects = self._objects()
        while chunk := list(itertools.islice(objects, size or DEFAULT_JSONL_BATCH)):
            yield Batch([row for _, row in chunk], [number for number, _ in chunk])

    def survey(self, size: int, *, schema: bool = False, check: Callable[[Batch], None] | None = None) -> Survey:
        keys: dict[str, None] = {}
        schemas = []
        rows = 0
        for batch in self.batches(size):
            rows += len(batch)
            if check is not None:
                check(batch)
            for row in batch.rows:
                keys.update(dict.fromkeys(row))
            if schema:
                schemas.append(self._batch_schema(batch.rows))
        return Survey(rows, list(keys), self._unify(schemas, keys) if schema else None)

    def _batch_schema(self, rows: list[dict]):
        pa = arrow(f"writing {self.name} as Parquet")
        fields = []
        for key in dict.fromkeys(k for row in rows for k in row):
            try:
                fields.append(pa.field(key, pa.array([row.get(key) for row in rows]).type))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ValueError(self._mixed(key, err)) from None
        return pa.schema(fields)

    def _unify(self, schemas: list, keys: dict[str, None]):
        pa = arrow(f"writing {self.name} as Parquet")
        if not schemas:
            return pa.schema([])
        try:
            unified = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            raise ValueError(self._mixed(None, err)) from None
        return pa.schema([unified.field(key) for key in keys])  # the keys' first-seen order

    def _mixed(self, key: str | None, err: Exception) -> str:
        field = f"field {key!r}" if key is not None else "a field"
        return (f"{self.name}: {field} holds values of different types ({one_line(err)}), which one Parquet "
                "column cannot hold; write .jsonl, .csv or .tsv output instead")


def open_table(path: str | Path) -> Table:
    """Open a ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` file for reading in batches.

    Opening reads the header (CSV/TSV), the metadata (Parquet) or the first object (JSONL), not the rows.

    Raises:
        ValueError: The suffix is not one of the four; the file is empty (CSV/TSV), not UTF-8, not Parquet, or
            its first rows cannot be parsed; pyarrow is missing (CSV, TSV, Parquet).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"{describe(path)} has extension {suffix or '(none)'!r}; accepted: {formats()}")
    if suffix == ".parquet":
        return _ParquetTable(path)
    if suffix == ".jsonl":
        return _JsonlTable(path)
    return _CsvTable(path)


def _sized(blocks: Iterable, size: int | None, pa) -> Iterator:
    """pyarrow record batches re-cut to ``size`` rows each (the last may be shorter); ``None``: as they come."""
    if size is None:
        yield from (block for block in blocks if block.num_rows)
        return
    pending, held = [], 0
    for block in blocks:
        while block.num_rows:
            take = min(size - held, block.num_rows)
            pending.append(block.slice(0, take))
            block, held = block.slice(take), held + take
            if held == size:
                yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)
                pending, held = [], 0
    if held:
        yield pending[0] if len(pending) == 1 else pa.concat_batches(pending)


def _numbered(blocks: Iterable, first: int) -> Iterator[Batch]:
    for block in blocks:
        yield Batch(block, range(first, first + block.num_rows))
        first += block.num_rows


def _not_utf8(path: Path, name: str) -> str:
    """The message for a file that is not UTF-8, with the offset of its first bad byte (found by decoding it)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_UTF8_CHUNK)
            held = len(decoder.getstate()[0])  # bytes of a character the previous chunk left unfinished
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.object: the held bytes, then this chunk
                at = offset - held + err.start
                return f"{name} is not UTF-8 (byte 0x{err.object[err.start]:02x} at offset {at}); save it as UTF-8"
            if not chunk:
                break
            offset += len(chunk)
    return f"{name} is not UTF-8 text; save it as UTF-8"


# -- writing ------------------------------------------------------------------------------------


def open_table_writer(path: Path, suffix: str, source, added: Sequence[str], added_types: Sequence | None = None):
    """A context-managed writer of ``suffix``'s format at ``path``: ``write(rows, added_values)``.

    Each row is written with the input's columns and then the ``added`` ones. ``write`` takes the rows of a
    :class:`Batch` (a record batch or a list of dicts) and one sequence of values per added column.

    Args:
        path: The file to write (a temporary name: the caller renames it into place).
        suffix: The format: ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet``.
        source: Has ``columns`` (the CSV/TSV header's first names) and ``arrow_schema()`` (the Parquet columns'
            types): a :class:`Survey` of the input.
        added: Names of the columns written after the input's.
        added_types: pyarrow types of the added columns (Parquet only).
    """
    if suffix == ".parquet":
        return _ParquetWriter(path, source.arrow_schema(), added, added_types)
    if suffix == ".jsonl":
        return _JsonlWriter(path, added)
    return _CsvWriter(path, "\t" if suffix == ".tsv" else ",", source.columns, added)


def _records(rows) -> list[dict]:
    return rows if isinstance(rows, list) else rows.to_pylist()


def _json_default(value: Any) -> str:
    """JSON text for values JSON has no type for (Parquet dates, decimals, bytes): ISO form, else ``str()``."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _json_dumps(value: Any) -> str:
    # U+2028/U+2029 are valid raw in JSON strings but split lines for str.splitlines() readers: escape them
    text = json.dumps(value, ensure_ascii=False, default=_json_default)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return _json_dumps(value) if isinstance(value, (bool, int, float, list, dict)) else _json_default(value)


class _TextWriter:
    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", encoding="utf-8", newline="")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class _CsvWriter(_TextWriter):
    def __init__(self, path: Path, delimiter: str, columns: list[str], added: Sequence[str]) -> None:
        super().__init__(path)
        self.columns = columns
        self.writer = csv.writer(self.file, delimiter=delimiter, lineterminator="\n")
        self.writer.writerow([*columns, *added])

    def write(self, rows, added_values: Sequence[Sequence]) -> None:
        for row, *extra in zip(_records(rows), *added_values, strict=True):
            self.writer.writerow([*(_csv_cell(row.get(c)) for c in self.columns), *map(_csv_cell, extra)])


class _JsonlWriter(_TextWriter):
    def __init__(self, path: Path, added: Sequence[str]) -> None:
        super().__init__(path)
        self.added = list(added)

    def write(self, rows, added_values: Sequence[Sequence]) -> None:
        for row, *extra in zip(_records(rows), *added_values, strict=True):
            self.file.write(_json_dumps({**row, **dict(zip(self.added, extra, strict=True))}) + "\n")


class _ParquetWriter:
    """Appends the added columns to each batch and writes row groups of up to PARQUET_ROW_GROUP_* rows/bytes."""

    def __init__(self, path: Path, schema, added: Sequence[str], added_types: Sequence) -> None:
        pa = self.pa = arrow(f"writing {path} as Parquet")
        self.input_schema = schema
        self.added = [pa.field(name, kind) for name, kind in zip(added, added_types, strict=True)]
        self.writer = pa.parquet.ParquetWriter(path, pa.schema([*schema, *self.added], metadata=schema.metadata))
        self.pending: list = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self._flush()
        finally:
            self.writer.close()

    def write(self, rows, added_values: Sequence[Sequence]) -> None:
        pa = self.pa
        if isinstance(rows, list):
            try:
                table = pa.Table.from_pylist(rows, schema=self.input_schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise ValueError(f"a row does not fit the Parquet column types {self.input_schema.types}: "
                                 f"{one_line(err)}; write .jsonl, .csv or .tsv output instead") from None
        else:
            table = pa.Table.from_batches([rows])
        for field, values in zip(self.added, added_values, strict=True):
            table = table.append_column(field, pa.array(values, type=field.type))
        self.pending.append(table)
        if (sum(t.num_rows for t in self.pending) >= PARQUET_ROW_GROUP_ROWS
                or sum(t.nbytes for t in self.pending) >= PARQUET_ROW_GROUP_BYTES):
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(self.pa.concat_tables(self.pending))
            self.pending = []
