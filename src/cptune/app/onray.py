"""cptune on a Ray cluster: ``predict --file`` with one stateful actor per worker, ``compare``'s cells as Ray tasks.

Ray is an extra (``pip install 'cptune[ray]'``): nothing in the core imports this module, and this module
imports ``ray`` only inside its functions, so without it ``--ray`` fails with one line naming the pip command.

Annotating (:func:`annotate_file_ray`): Ray Data reads the input (a CSV, TSV, JSONL or Parquet file, or a folder
of files of one format) in order (``preserve_order``), ``map_batches`` sends the batches to a pool of actors,
each of which loads the classifier once from its folder (by path: the folder must be readable at the same path
on every node) and encodes its context once (:class:`cptune.scoring.ContextScorer`, as ``cptune serve`` does),
and the driver writes the scored rows with :func:`cptune.app.annotate.open_writer`, the writer
:func:`cptune.app.annotate.annotate_file` uses, into a temporary file renamed into place at the end.

Grids (:func:`run_grid_ray`): the same plan as the serial run (:func:`cptune.app.compare.plan_grid`), each cell
left a Ray task; the driver appends each finished row with :func:`cptune.app.compare.append_result` as soon as
it arrives, so a grid resumes whichever way it was started.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cptune.app.annotate import (
    LABEL_COLUMN,
    PROBABILITY_PREFIX,
    check_paths,
    file_format,
    open_writer,
    predict_rows,
    text_of,
)
from cptune.cpt.saving import AtomicOutput
from cptune.data.types import ColumnClashError, MissingColumnError
from cptune.reporting import CptuneWarning, notice, plural
from cptune.reporting import progress as progress_bar

RAY_EXTRA = "pip install 'cptune[ray]'"
INDEX_COLUMN = "__cptune_class"  # per row: the predicted class's index in ``classes``, -1 for a blank text
PROBABILITIES_COLUMN = "__cptune_probabilities"  # per row: (C,) float64 probabilities, NaN for a blank text
ERROR_COLUMN = "__cptune_error"  # per row: null, or "Kind<TAB>message" of the error that failed its batch
ERROR_SEPARATOR = "\t"
LINE_COLUMN, WHERE_COLUMN = "__cptune_line", "__cptune_where"  # JSONL: a line's text, "file line N"
METADATA_PREFETCH_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"
DEFAULT_BATCH_ROWS = 64  # rows per actor call, as annotate_file's default batch_size


def require_ray():
    """``import ray``, or one line saying how to install it.

    Raises:
        ModuleNotFoundError: ray is not installed; the message names ``pip install 'cptune[ray]'``.
    """
    # Ray Data 2.60 fetches block metadata on a background thread by default; on this project's loaded 2-core
    # machine a run then waited for ever with both actors idle (the executor waiting on a finished task, seen in
    # tests/test_ray.py's JSONL cases). The inline fetch is Ray's documented fallback; read when ray.data is
    # first imported, so a user's own setting stays.
    os.environ.setdefault(METADATA_PREFETCH_ENV, "0")
    try:
        import ray
        import ray.data  # noqa: F401 - the data extra (pyarrow, pandas) is part of cptune[ray]
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"--ray needs {err.name or 'ray'}, which is not installed: {RAY_EXTRA}",
                                  name=err.name) from None
    return ray


def connect(address: str | None = None):
    """Join the Ray cluster at ``address`` (``auto``, ``host:port``, ``ray://host:port``); with None, the one
    ``RAY_ADDRESS`` names, else a new local cluster on this machine's CPUs. A process already connected stays
    on its cluster. Returns the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
    return ray


# -- annotating a file ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedClassifier:
    """What travels to each worker: a saved classifier's folder (by path) and how to load it.

    The folder must be readable at the same path on every node (shared storage); ``model`` (default: the one
    the classifier was trained on) is a path every node can read, or a hub id each node downloads or has in its
    cache.
    """

    folder: str
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8  # texts per forward
    calibrate: bool | None = None  # None: as the classifier was saved

    def classes(self) -> list:
        """The classifier's classes, in its probability columns' order, read from its folder (no model loaded)."""
        from cptune.app.classifier import CLASSIFIER_FILE, label_table
        from cptune.cpt.files import read_json_object
        from cptune.cpt.hub import resolve_folder

        folder = Path(resolve_folder(self.folder))  # a hub id: its cached snapshot
        if not (folder / CLASSIFIER_FILE).is_file():
            raise FileNotFoundError(f"{self.folder} holds no {CLASSIFIER_FILE}; --ray needs a classifier folder "
                                    "(cptune train --output)")
        info = read_json_object(folder, CLASSIFIER_FILE, "a folder saved by CPTClassifier")
        labels = info["labels"] if "labels" in info else info["label_words"]  # as CPTClassifier.load reads them
        return list(label_table(dict(map(tuple, labels)) if isinstance(labels, list) else labels))

    def load(self):
        """The classifier with its context encoded once: ``classes_`` and ``predict_proba(texts) -> (n, C)``."""
        from cptune.app.serve import load_served

        return _ScorerClassifier(load_served(self.folder, self.model, self.device, self.dtype, None,
                                             self.batch_size, self.calibrate))


class _ScorerClassifier:
    """``predict_proba`` over a :class:`cptune.app.serve.ServedClassifier`'s scorer: the context's cache is built
    once, so each batch pays only for its own queries. The same probabilities as ``CPTClassifier.predict_proba``
    (softmax of the same label scores)."""

    def __init__(self, served) -> None:
        self.served, self.classes_ = served, served.classes

    def predict_proba(self, texts):
        import torch

        scorer = self.served.scorer
        return torch.softmax(scorer.scores(scorer.query_ids(texts)), dim=-1).cpu().numpy()  # (n, C)


class _Columns:
    """The input's columns and Arrow schema, as :func:`cptune.app.annotate.open_writer` asks of a table."""

    def __init__(self, columns: list[str], schema) -> None:
        self.columns, self.schema = columns, schema

    def arrow_schema(self):
        return self.schema


class _Annotator:
    """The stateful Ray Data UDF: one per actor, the classifier loaded once, each batch scored."""

    def __init__(self, loader, classes: list, text_column: str, threads: int, in_format: str, where: str) -> None:
        import torch

        torch.set_num_threads(threads)  # the actor's CPUs; a worker may be one of several on a node
        self.classifier = loader.load()
        self.classes, self.text_column, self.in_format, self.where = classes, text_column, in_format, where

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        try:
            labels, probabilities = self._score(batch)  # (n,), (n, C)
            error = None
        except Exception as err:  # noqa: BLE001 - sent back in the batch: Ray's wrapper would hide its type
            labels, probabilities = [None] * batch.num_rows, np.full((batch.num_rows, len(self.classes)), np.nan)
            kind = "ValueError" if isinstance(err, ValueError) else type(err).__name__
            error = f"{kind}{ERROR_SEPARATOR}{str(err).strip()}"
        index = [-1 if label is None else int(probabilities[i].argmax()) for i, label in enumerate(labels)]
        flat = pa.array(np.asarray(probabilities, dtype=np.float64).ravel())
        return (batch.append_column(INDEX_COLUMN, pa.array(index, type=pa.int64()))
                .append_column(PROBABILITIES_COLUMN, pa.FixedSizeListArray.from_arrays(flat, len(self.classes)))
                .append_column(ERROR_COLUMN, pa.array([error] * batch.num_rows, type=pa.string())))

    def _score(self, batch):
        if self.in_format == ".jsonl":
            texts = [self._json_text(line, where) for line, where in
                     zip(batch.column(LINE_COLUMN).to_pylist(), batch.column(WHERE_COLUMN).to_pylist(), strict=True)]
        else:
            cells = batch.column(self.text_column).to_pylist()
            texts = [text_of(cell, self.text_column, self.where) for cell in cells]
        return predict_rows(self.classifier, self.classes, texts)

    def _json_text(self, line: str, where: str):
        row = _json_row(line, where)
        if self.text_column not in row:
            fields = ", ".join(repr(k) for k in row) or "none"
            raise ValueError(f"text column {self.text_column!r} not found on {where}; fields present: {fields}")
        return text_of(row[self.text_column], self.text_column, where)


def _json_row(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); a .jsonl file holds one "
                         "JSON object per line") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where} holds a JSON {type(row).__name__}; a .jsonl file holds one JSON object per line")
    return row


def _jsonl_lines(batch):
    """Whole JSONL files -> one row per non-blank line (``\\n`` ends a line, as Python's file iteration reads it;
    not ``str.splitlines``, which would also split at U+2028 inside a JSON string)."""
    import pyarrow as pa

    lines, where = [], []
    for path, data in zip(batch.column("path").to_pylist(), batch.column("bytes").to_pylist(), strict=True):
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first object
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text; save it as UTF-8") from None
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                lines.append(line)
                where.append(f"{path} line {number}")
    return pa.table({LINE_COLUMN: pa.array(lines, type=pa.string()), WHERE_COLUMN: pa.array(where, type=pa.string())})


def input_files(source: Path) -> tuple[list[Path], str]:
    """The files to read and their format: ``source`` itself, or a folder's files of one format (sorted by name,
    hidden files left out).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a bad suffix, a folder without such files or with several formats.
    """
    if not source.exists():
        raise FileNotFoundError(f"input {source} does not exist")
    if not source.is_dir():
        return [source], file_format(source, "input")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    formats = {p.suffix.lower() for p in files}
    if not files or len(formats) != 1:
        found = ", ".join(sorted(formats)) or "no files"
        raise ValueError(f"input folder {source} must hold files of one format (.csv, .tsv, .jsonl or .parquet); "
                         f"found {found}")
    return files, file_format(files[0], "input")


def _csv_columns(files: list[Path], delimiter: str) -> list[str]:
    """The header row every file shares (the first line, read with the csv module)."""
    headers = []
    for path in files:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter=delimiter), None)
        if not header:
            raise ValueError(f"{path} is empty; it needs a header row naming its columns")
        headers.append(header)
    if any(h != headers[0] for h in headers):
        raise ValueError(f"the files of {files[0].parent} have different header rows; every file needs the same")
    return headers[0]


def _check_columns(source: Path, columns: list[str], text_column: str, new_columns: list[str]) -> None:
    if len(set(columns)) != len(columns):
        raise ValueError(f"{source} names a column twice; give each column its own name")
    if text_column not in columns:
        raise MissingColumnError("text", text_column, f"in {source}", columns)
    clashes = [c for c in new_columns if c in columns]
    if clashes:
        raise ColumnClashError(source, clashes[0])


def read_input(ray, files: list[Path], in_format: str, columns: list[str]):
    """The input as a Ray dataset whose every task asks for no CPU: the actors hold the cluster's CPUs, and a
    task waiting for one of them would wait for ever, the actors idle for want of input (a 2-CPU cluster with 2
    one-CPU actors).

    Parquet is read by Ray Data's first reader: Ray 2.60's ``read_parquet`` by default runs a ``ListFiles`` task
    ahead of the read tasks, which asks for one CPU whatever ``num_cpus`` says; when both actors had started
    first it never ran and the run waited for ever (``tests/test_ray.py``'s Parquet cases, now and then).
    """
    import pyarrow as pa
    import pyarrow.csv as pcsv

    paths = [str(p) for p in files]
    if in_format == ".parquet":
        context = ray.data.DataContext.get_current()
        kept, context.use_datasource_v2 = context.use_datasource_v2, False  # the dataset keeps a copy of the context
        try:
            return ray.data.read_parquet(paths, num_cpus=0)
        finally:
            context.use_datasource_v2 = kept
    if in_format == ".jsonl":
        return ray.data.read_binary_files(paths, include_paths=True, num_cpus=0).map_batches(
            _jsonl_lines, batch_format="pyarrow", num_cpus=0)
    # every cell as the string it is in the file: no type inference, an empty cell "" and not null
    return ray.data.read_csv(
        paths, num_cpus=0,
        parse_options=pcsv.ParseOptions(delimiter="\t" if in_format == ".tsv" else ",", newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns}, strings_can_be_null=False,
                                            quoted_strings_can_be_null=False))


def default_workers(ray, threads: int, gpus: float) -> int:
    """Actors that fit the cluster: its CPUs over ``threads`` (and its GPUs over ``gpus``), at least 1."""
    resources = ray.cluster_resources()
    workers = int(resources.get("CPU", 1) // threads)
    if gpus > 0:
        workers = min(workers, int(resources.get("GPU", 0) // gpus))
    return max(workers, 1)


def annotate_file_ray(
    classifier: SavedClassifier | str | Path,
    source: str | Path,
    output: str | Path,
    text_column: str = "text",
    batch_size: int = DEFAULT_BATCH_ROWS,
    progress: bool = True,
    prefix: str = "",
    workers: int | None = None,
    threads: int = 1,
    gpus: float = 0,
    address: str | None = None,
) -> int:
    """:func:`cptune.app.annotate.annotate_file` on a Ray cluster; returns the number of rows written.

    The output has the same columns, rows and order as the single-process run's (the same bytes for CSV, TSV and
    JSONL up to the probabilities' float rounding: within 1e-6 on the CPU, since the rows are scored in other
    batches). ``source`` may also be a folder of files of one format, read in name order. A JSONL input is
    written as JSONL (its objects may differ in keys, which a CSV header or a Parquet schema needs to know first).

    An error in any batch (a malformed row, a text too long for the model) stops the run and leaves no output:
    the output is written to a temporary file renamed into place at the end, and an existing file of that name
    stays as it was. Ray restarts an actor whose process dies and retries its batch.

    Args:
        classifier: the classifier's folder (or a :class:`SavedClassifier` naming the model, device, dtype,
            batch size and calibration); every worker loads it by this path.
        source, output, text_column, progress, prefix: as for ``annotate_file``.
        batch_size: rows sent to an actor at a time.
        workers: actors (default: the cluster's CPUs over ``threads``, and its GPUs over ``gpus``).
        threads: torch threads (and CPUs asked of Ray) per actor.
        gpus: GPUs per actor (fractions share one).
        address: the Ray cluster (see :func:`connect`).

    Raises:
        ModuleNotFoundError: ray is not installed.
        ValueError, FileNotFoundError, ...: as ``annotate_file`` for the same mistakes.
    """
    loader = classifier if isinstance(classifier, SavedClassifier) else SavedClassifier(str(classifier))
    source, output = Path(source), Path(output)
    files, in_format = input_files(source)
    out_format = file_format(output, "output")
    for name, value in (("batch_size", batch_size), ("threads", threads), ("workers", workers)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name}={value!r} must be a positive integer")
    if gpus < 0:
        raise ValueError(f"gpus={gpus!r} must be >= 0")
    if in_format == ".jsonl" and out_format != ".jsonl":
        raise ValueError(f"on Ray a .jsonl input is written as .jsonl, not {out_format} (its objects may differ in "
                         "keys); write .jsonl, or annotate without --ray")
    for path in files:
        check_paths(path, output)
    classes = [c.item() if hasattr(c, "item") else c for c in loader.classes()]
    new_columns = [f"{prefix}{LABEL_COLUMN}", *(f"{prefix}{PROBABILITY_PREFIX}{c}" for c in classes)]
    if len(set(new_columns)) != len(new_columns):
        raise ValueError(f"two classes of {classes!r} give the same column name; their labels must differ as text")

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows_known = None
    if in_format == ".parquet":
        schemas = [pq.read_schema(p) for p in files]
        if any(not s.equals(schemas[0]) for s in schemas):
            raise ValueError(f"the files of {source} have different Parquet schemas; every file needs the same")
        table = _Columns(list(schemas[0].names), schemas[0])
        rows_known = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
    elif in_format == ".jsonl":
        table = _Columns([], None)
    else:
        columns = _csv_columns(files, "\t" if in_format == ".tsv" else ",")
        table = _Columns(columns, pa.schema([(c, pa.string()) for c in columns]))
    if in_format != ".jsonl":
        _check_columns(source, table.columns, text_column, new_columns)

    ray = connect(address)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in the input's order
    context.enable_progress_bars = False  # cptune draws its own bar
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    workers = workers or default_workers(ray, threads, gpus)
    scored = read_input(ray, files, in_format, table.columns).map_batches(
        _Annotator, fn_constructor_kwargs={"loader": loader, "classes": classes, "text_column": text_column,
                                           "threads": threads, "in_format": in_format, "where": str(source)},
        batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads, num_gpus=gpus)

    written = blank = 0
    with (
        contextlib.ExitStack() as stack,
        AtomicOutput(output) as tmp,
        open_writer(out_format, tmp, table, classes, new_columns) as writer,
        progress_bar(rows_known, "annotate", unit="row", enabled=progress) as bar,
    ):
        batches = scored.iter_batches(batch_size=None, batch_format="pyarrow")
        stack.callback(_close, batches)  # shut the run's executor (and its actors' CPUs) down now, not at GC
        for batch in batches:
            _raise_batch_error(batch)
            index = batch.column(INDEX_COLUMN).to_pylist()
            probabilities = (batch.column(PROBABILITIES_COLUMN).combine_chunks().flatten().to_numpy()
                             .reshape(len(index), len(classes)))  # (n, C)
            labels = [None if i < 0 else classes[i] for i in index]
            writer.write(_rows(batch, in_format, table), labels, probabilities)
            written += len(index)
            blank += sum(i < 0 for i in index)
            bar.update(len(index))
    left = f", {plural(blank, 'row')} without text left blank" if blank else ""
    notice("%s annotated into %s%s", plural(written - blank, "row"), output, left)
    return written


def _close(batches) -> None:
    """Close a Ray Data batch iterator, finished or not: a run that raised (a bad row) or a reference cycle would
    otherwise keep its actors, and the cluster's CPUs, until the garbage collector gets to them."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    gc.collect()


def _raise_batch_error(batch) -> None:
    """Raise, on the driver, the error an actor met on this batch: a ValueError (bad data, a text too long) as a
    ValueError with its message, anything else as a RuntimeError naming its type."""
    errors = batch.column(ERROR_COLUMN).drop_null()
    if len(errors):
        kind, _, message = errors[0].as_py().partition(ERROR_SEPARATOR)
        raise ValueError(message) if kind == "ValueError" else RuntimeError(f"{kind}: {message}")


def _rows(batch, in_format: str, table: _Columns) -> Any:
    """A scored batch's input rows as the writer takes them: dicts for text input, a record batch for Parquet."""
    if in_format == ".jsonl":
        return [_json_row(line, where) for line, where in
                zip(batch.column(LINE_COLUMN).to_pylist(), batch.column(WHERE_COLUMN).to_pylist(), strict=True)]
    original = batch.select(table.columns)
    if in_format == ".parquet":
        import pyarrow as pa

        original = original.cast(table.schema)
        return pa.RecordBatch.from_pylist([], schema=table.schema) if original.num_rows == 0 else (
            original.combine_chunks().to_batches()[0])
    return original.to_pylist()


def _cause(err: BaseException) -> BaseException:
    """The exception a worker's code raised, out of Ray's wrappers (RayTaskError, UserCodeException), so that a
    bad row reads as its ValueError; other errors stay as they are."""
    seen = err
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if inner is None or inner is seen:
            return seen
        seen = inner


# -- a grid's cells ---------------------------------------------------------------------------------


def _run_cell_task(cell, dataset, model: str, test_size: int, settings, template, label_words, train_size,
                   model_options: dict, threads: int) -> dict:
    """One grid cell in a Ray worker: the model loaded once per worker process and kept for its next cells."""
    import torch

    from cptune.app.classifier import shared_model
    from cptune.app.compare import run_cell

    torch.set_num_threads(threads)
    options = {"device": "auto", "dtype": "auto", "device_map": None, **model_options}
    base_model, tokenizer = shared_model(model, options["device"], options["dtype"], options["device_map"])
    return run_cell(cell, dataset, base_model, tokenizer, model, test_size, settings, template, label_words,
                    train_size)


def run_grid_ray(cells, output: Path, model: str | None = None, test_size: int = 200, settings=None,
                 progress: bool = True, template: str | None = None, label_words: dict[str, str] | None = None,
                 train_size: int | None = None, model_options: dict | None = None, address: str | None = None,
                 cpus_per_cell: float = 1, gpus_per_cell: float = 0) -> tuple[list[dict], list[tuple[Any, Exception]]]:
    """:func:`cptune.app.compare.run_grid` with each cell left a Ray task (``cpus_per_cell`` CPUs, the torch
    threads too, and ``gpus_per_cell`` GPUs each).

    The plan and the resume rule are the serial run's (:func:`cptune.app.compare.plan_grid`); the driver appends
    each row as its cell finishes (:func:`cptune.app.compare.append_result`), so the file holds the same rows as
    a serial run's, in the order the cells finished. A cell that fails is reported on one line and the others go
    on. Cells of one split that use ``template="auto"`` each choose it (the same choice: it is seeded), where the
    serial run chooses once per split.

    Returns:
        All rows in the file afterwards, and each failed cell with its error.
    """
    from cptune.app.compare import append_result, cell_name, plan_grid
    from cptune.methods import MethodSettings
    from cptune.models import DEFAULT_MODEL

    model, settings = model or DEFAULT_MODEL, settings or MethodSettings()
    for name, value in (("cpus_per_cell", cpus_per_cell), ("gpus_per_cell", gpus_per_cell)):
        if value < 0 or (name == "cpus_per_cell" and value == 0):
            raise ValueError(f"{name}={value!r} must be {'> 0' if name == 'cpus_per_cell' else '>= 0'}")
    plan = plan_grid(cells, output, model, test_size, settings, progress, template, label_words, train_size)
    rows, failures = plan.rows, []
    if not plan.todo:
        return rows, failures
    ray = connect(address)
    task = ray.remote(_run_cell_task).options(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell)
    datasets = {name: ray.put(dataset) for name, dataset in plan.datasets.items()}  # sent once, not once per cell
    threads = max(int(cpus_per_cell), 1)
    pending = {task.remote(cell, datasets[cell.dataset], model, test_size, settings, template,
                           label_words, train_size, model_options or {}, threads): cell for cell in plan.todo}
    with progress_bar(len(pending), "compare", unit="cell", enabled=progress) as bar:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                row = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - a failed cell is reported, the others go on
                error = _cause(err)
                failures.append((cell, error))
                message = str(error).strip().splitlines()[0] if str(error).strip() else ""
                warnings.warn(f"cell {cell_name(cell)} failed: {type(error).__name__}: {message}", CptuneWarning,
                              stacklevel=1)
            else:
                append_result(plan.path, row)
                rows.append(row)
            bar.update(1)
    return rows, failures

