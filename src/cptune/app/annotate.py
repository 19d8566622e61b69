"""Annotate a data file: every row back as it was, plus the classifier's label and class probabilities.

:func:`annotate_file` reads a ``.csv``, ``.tsv``, ``.jsonl`` or ``.parquet`` file and writes one row per
input row to an output whose own suffix picks its format (``in.csv`` -> ``out.jsonl`` converts). A row keeps
all its columns, in order, with their values, and gains ``predicted_label`` and one ``p_<label>`` column per
class (in :attr:`classes_` order). The names are fixed so that a gold ``label`` column in the input survives;
``prefix`` changes them when they collide with an input column.

The file is streamed: ``batch_size`` rows at a time are read, classified and written, so a file larger than
memory works. Reading and writing go through :mod:`cptune.data.tables` (pyarrow's streaming CSV and Parquet
readers, ``ParquetWriter``), the reader :func:`cptune.data.load_file` uses too. A CSV, TSV or JSONL file is read
twice: a first pass checks every row (a malformed row fails before any inference) and counts them for the
progress bar; Parquet's row count comes from its metadata.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from cptune.cpt.saving import AtomicOutput
from cptune.data.tables import Batch, Survey, Table, arrow, describe, open_table, open_table_writer, text_of
from cptune.data.types import FILE_FORMATS, ColumnClashError, MissingColumnError, formats
from cptune.reporting import notice, plural
from cptune.reporting import progress as progress_bar

LABEL_COLUMN = "predicted_label"
"""The predicted label's column (before ``prefix``); not ``label``, so a gold ``label`` column stays."""

PROBABILITY_PREFIX = "p_"
"""Start of each class probability column's name: ``p_<label>`` (before ``prefix``)."""

TEXT_DECIMALS = 6
"""Decimals of the probabilities in CSV, TSV and JSONL output (Parquet keeps full float64)."""


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
    (UTF-8, ``\\n`` line ends, quoted where needed; a byte-order mark and blank lines are dropped), JSONL
    objects with the same keys and values, Parquet columns with the same types. Converting between formats:
    CSV/TSV cells become JSON strings or Parquet string columns; JSON values other than strings become their
    JSON text in a CSV cell; values JSON cannot hold (dates, decimals, bytes) become their ISO form or
    ``str()``. JSONL objects
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
            object; ``predict_proba`` returns the wrong shape; ``pyarrow`` is missing (CSV, TSV, Parquet). Errors
            in a row name the file and the row (:mod:`cptune.data.tables`: CSV/TSV rows count the header as row
            1, JSONL rows are lines).
    """
    source, output = Path(source), Path(output)
    in_format = file_format(source, "input")
    out_format = file_format(output, "output")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
    check_paths(source, output)
    if in_format != ".jsonl" or out_format == ".parquet":
        arrow(f"reading {describe(source)}")  # fail before reading anything when it is missing
    classes = [c.item() if isinstance(c, np.generic) else c for c in classifier.classes_]
    new_columns = [f"{prefix}{LABEL_COLUMN}", *(f"{prefix}{PROBABILITY_PREFIX}{c}" for c in classes)]
    repeated = _first_repeat(new_columns)
    if repeated is not None:
        raise ValueError(f"two classes of {classes!r} give the same column name {repeated!r}; "
                         "their labels must differ as text")

    table, survey = _open_input(source, text_column, batch_size, arrow_schema=out_format == ".parquet")
    clashes = [c for c in new_columns if c in survey.columns]
    if clashes:
        raise ColumnClashError(source, clashes[0])

    written = blank = 0
    counts = [0] * len(classes)  # rows given each class, for share_note
    with (
        AtomicOutput(output) as tmp,
        open_writer(out_format, tmp, survey, classes, new_columns) as writer,
        progress_bar(survey.rows, "annotate", unit="row", enabled=progress) as bar,
    ):
        for batch in table.batches(batch_size):
            texts = _texts(table, batch, text_column)
            labels, probabilities = predict_rows(classifier, classes, texts)
            writer.write(batch.rows, labels, probabilities)
            written += len(texts)
            blank += sum(text is None for text in texts)
            for best in probabilities[[i for i, text in enumerate(texts) if text is not None]].argmax(axis=1):
                counts[int(best)] += 1
            bar.update(len(texts))
    left = f", {plural(blank, 'row')} without text left blank" if blank else ""
    notice("%s annotated into %s%s", plural(written - blank, "row"), output, left)
    note_shares(classifier, counts)
    return written


def note_shares(classifier, counts: list[int]) -> None:
    """After labelling texts: :func:`cptune.balance.share_note`'s line, if any, as a notice. The labelled
    rows' shares come from the classifier's balance record (balanced classes assumed without one)."""
    from cptune.balance import share_note  # torch's module: this one is imported before the CLI needs torch

    reference = (getattr(classifier, "balance_", None) or {}).get("reference_shares")
    classes = [c.item() if isinstance(c, np.generic) else c for c in classifier.classes_]  # 1, not np.int64(1)
    note = share_note(counts, classes, reference)
    if note:
        notice("note: %s", note)


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
        _check_columns(source, open_table(source).columns, text_column)


def _check_columns(path: Path, columns: list[str], text_column: str) -> None:
    repeated = _first_repeat(columns)
    if repeated is not None:
        raise ValueError(f"{path} names the column {repeated!r} twice; give each column its own name")
    if text_column not in columns:
        raise MissingColumnError("text", text_column, f"in {path}", columns)


def _first_repeat(names: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


# -- reading ------------------------------------------------------------------------------------


def _open_input(path: Path, text_column: str, batch_size: int, arrow_schema: bool) -> tuple[Table, Survey]:
    """The input opened, its columns checked, and every row checked and counted by one pass (Parquet: none)."""
    table = open_table(path)
    if table.format != ".jsonl":  # a JSONL object's keys are checked object by object, in the pass
        _check_columns(path, table.columns, text_column)
    if table.format == ".parquet":
        kind = table.schema.field(text_column).type
        if arrow(f"reading {table.name}").types.is_nested(kind):
            raise ValueError(f"{path}: text column {text_column!r} holds {kind} values; a text must be a string")
    check = (lambda batch: _texts(table, batch, text_column)) if table.format == ".jsonl" else None
    return table, table.survey(batch_size, schema=arrow_schema, check=check)


def _texts(table: Table, batch: Batch, text_column: str) -> list[str | None]:
    """Each row's normalised text, None where blank; a JSONL object without ``text_column`` is refused."""
    if table.format == ".jsonl":
        for number, row in zip(batch.numbers, batch.rows, strict=True):
            if text_column not in row:
                raise MissingColumnError("text", text_column, f"on {table.where(number)}", list(row), "fields")
    cells = batch.column(text_column)
    return [text_of(cell, text_column, table.where(number)) for number, cell in zip(batch.numbers, cells, strict=True)]


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

    ``table`` gives the input's ``columns`` (CSV/TSV header) and ``arrow_schema()`` (Parquet); ``rows`` are a
    list of dicts or a pyarrow record batch; ``labels`` and ``probabilities`` come from :func:`predict_rows`.
    """
    return _PredictionWriter(suffix, path, table, classes, new_columns)


def _probability_cell(p: float) -> float | None:
    return None if math.isnan(p) else round(float(p), TEXT_DECIMALS)


class _PredictionWriter:
    """The predictions as the added columns of :func:`cptune.data.tables.open_table_writer`'s output.

    CSV/TSV: the label as text (``str(label)``), probabilities rounded to :data:`TEXT_DECIMALS`; JSONL: the
    label's own value, rounded probabilities; Parquet: an int64 label column when every class is an int (a
    string column otherwise), full float64 probabilities. Blank rows: empty cells, nulls.
    """

    def __init__(self, suffix: str, path: Path, table, classes: list, new_columns: list[str]) -> None:
        self.suffix = suffix
        types = None
        if suffix == ".parquet":
            pa = arrow(f"writing {path} as Parquet")
            integers = all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
            self.label_type = pa.int64() if integers else pa.string()  # other labels are written as text
            types = [self.label_type, *(pa.float64() for _ in new_columns[1:])]
        self.writer = open_table_writer(path, suffix, table, new_columns, types)

    def __enter__(self):
        self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.__exit__(*exc)

    def write(self, rows, labels: list, probabilities: np.ndarray) -> None:  # probabilities: (n, C)
        if self.suffix == ".parquet":
            if self.label_type == self.writer.pa.string():
                labels = [None if label is None else str(label) for label in labels]
            columns = [[None if label is None else float(p) for label, p in zip(labels, probabilities[:, j],
                                                                                 strict=True)]
                       for j in range(probabilities.shape[1])]
        else:
            if self.suffix != ".jsonl":
                labels = [None if label is None else str(label) for label in labels]
            columns = [[_probability_cell(p) for p in probabilities[:, j]] for j in range(probabilities.shape[1])]
        self.writer.write(rows, [labels, *columns])
