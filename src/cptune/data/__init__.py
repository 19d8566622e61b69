"""Labelled text datasets from any source: the types, text rules, the dataset registry and seeded,
class-balanced sampling.

:func:`load_dataset` reads every source into a :class:`Dataset` (examples, labels, provenance):

* **Built-ins** (offline; :mod:`cptune.data.builtin`): ``rotten_tomatoes``, ``subj``, ``movie_sentiment_5``,
  ``bbc_news`` and ``reuters_r8``. They read files shipped inside registry packages at run time and are
  *stand-ins* for the paper's benchmarks (SST-2/MR, SUBJ, SST-5, AG News/DBpedia), which are not available
  offline; every report should say so. :func:`list_datasets` describes them without loading any.
* **Local files** (:func:`load_file`, :mod:`cptune.data.files`): ``.csv``, ``.tsv``, ``.jsonl`` (one JSON object
  per line) and ``.parquet``, read through :mod:`cptune.data.tables` (on ``pyarrow``).
* **Hub datasets** (:mod:`cptune.data.hub`, with the optional ``datasets`` library): any hub id ``owner/name``
  (``SetFit/sst2``), loaded by ``datasets.load_dataset`` with its cache and offline mode; ``config`` picks a
  configuration. The four named ones (:data:`HUB_DATASETS`: ``glue/sst2``, ``ag_news``, ``trec``,
  ``dbpedia_14``) keep their columns and label names (:func:`hub_layout`).
* **Folders**: one written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data
  files laid out like a hub dataset repository (both through ``datasets``).
* **Python objects**: a ``datasets.Dataset`` or ``datasets.DatasetDict``, a pandas DataFrame
  (:mod:`cptune.data.objects`), a list of ``(text, label)`` pairs, a ``(texts, labels)`` tuple of two lists,
  or a list of dicts.

Columns default to ``text`` and ``label`` (a named hub dataset: its own); ``text_column`` / ``label_column``
choose others. Splits: a source with named splits (a hub id, a ``DatasetDict``, a ``save_to_disk`` folder of
one) gives the split ``split`` names, else ``default_split`` if it has that split, else a ``ValueError``
listing its splits; splits are never pooled. A source without splits refuses ``split`` and ignores
``default_split``. Labels keep their type (:data:`Label`: str, int, bool or float); a ``ClassLabel``'s
integer labels become its names. ``Dataset.provenance["source"]`` records the kind of source
(:data:`SOURCE_KINDS`). ``datasets`` and ``pandas`` are imported only when such a source is given.

The package, by layer: ``types`` (:class:`Example`, :class:`Dataset`, the text rules, the per-dataset
defaults, the file formats) <- ``tables`` (the reader and writer of data files) <- ``files`` (:func:`load_file`,
:func:`records_to_dataset`) <- ``builtin``,
``hub`` (everything ``datasets`` reads), ``objects`` (lists, DataFrames) <- ``catalog``
(:func:`list_datasets`) <- this module (:func:`load_dataset` and sampling), which re-exports their public
names.

Text normalisation and truncation (:mod:`cptune.data.types`) apply to every source.
"""

from __future__ import annotations

import os
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptune.data import builtin
from cptune.data.builtin import (
    BUILTIN_NAMES,
    load_bbc_news,
    load_movie_sentiment_5,
    load_reuters_r8,
    load_rotten_tomatoes,
    load_subj,
)
from cptune.data.catalog import BUILTIN_CATALOG, list_datasets
from cptune.data.files import Records, load_file, records_to_dataset
from cptune.data.hub import HUB_DATASETS, from_datasets, hub_layout, is_saved_folder, load_hub, load_saved
from cptune.data.objects import PAIRS_SHAPES, from_dataframe, from_python, is_dataframe
from cptune.data.types import (
    DATASET_DEFAULTS,
    FILE_FORMATS,
    MAX_CHARS,
    SOURCE_KINDS,
    ColumnClashError,
    Dataset,
    Example,
    Label,
    MissingColumnError,
    examples_sha256,
    formats,
    label_sort_key,
    normalize_text,
    truncate_text,
)

__all__ = [
    "BUILTIN_CATALOG",
    "BUILTIN_NAMES",
    "DATASET_DEFAULTS",
    "FILE_FORMATS",
    "HUB_DATASETS",
    "MAX_CHARS",
    "SOURCE_KINDS",
    "ColumnClashError",
    "Dataset",
    "Example",
    "Label",
    "MissingColumnError",
    "Records",
    "check_source",
    "examples_sha256",
    "from_dataframe",
    "from_datasets",
    "from_python",
    "hub_layout",
    "label_sort_key",
    "list_datasets",
    "load_bbc_news",
    "load_dataset",
    "load_file",
    "load_movie_sentiment_5",
    "load_reuters_r8",
    "load_rotten_tomatoes",
    "load_subj",
    "normalize_text",
    "records_to_dataset",
    "sample_splits",
    "truncate_text",
]


# ---------------------------------------------------------------------------------------------------------
# Registry

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def load_dataset(
    source: Any,
    *,
    split: str | None = None,
    config: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    default_split: str | None = None,
) -> Dataset:
    """Load a labelled dataset from any source (see the module docstring).

    A name is resolved in this order: an existing file (:func:`load_file`); an existing folder (a
    ``save_to_disk`` folder, else a dataset repository folder read by ``datasets``); a built-in name; a named
    hub dataset; a name with a data-file extension or that looks like a path (a missing file); a hub id
    ``owner/name``. A bare unknown name is an error (hub ids need their owner).

    Args:
        source: A built-in name (:data:`BUILTIN_NAMES`), a hub id (``owner/name``, or one of
            :data:`HUB_DATASETS`), a path to a .csv, .tsv, .jsonl or .parquet file or to a folder, a
            ``datasets.Dataset`` / ``datasets.DatasetDict``, a pandas DataFrame, a list of ``(text, label)``
            pairs, a ``(texts, labels)`` tuple of two lists, a list of dicts, or a :class:`Dataset` (returned
            as is).
        split: The split of a source with named splits (a hub id also takes a ``datasets`` split expression
            such as ``train[:1000]``); refused for a source without splits.
        config: The configuration (subset) of a hub dataset or dataset folder; refused for other sources.
        text_column: The text column or field (default ``"text"``; a named hub dataset: its own); refused for
            built-ins and ``(text, label)`` pairs.
        label_column: The label column, likewise (default ``"label"``).
        default_split: The split to use when ``split`` is None and the source has that split (a CLI passes
            ``"train"`` to train, ``"test"`` to evaluate); ignored by sources without splits.

    Returns:
        The dataset; ``provenance["source"]`` is one of :data:`SOURCE_KINDS`.

    Raises:
        FileNotFoundError: If a path-like name does not exist, or a built-in's package is not installed.
        ValueError: If the source is unknown or of an unsupported type, an option does not apply to it, no
            split is chosen, ``datasets``/``pandas`` is needed and missing, or loading fails (see
            :func:`load_file`, :func:`cptune.data.hub.load_hub`, :func:`records_to_dataset`).
    """
    columns = {"text_column": text_column, "label_column": label_column}
    if isinstance(source, Dataset):
        _refuse("a cptune Dataset", split=split, config=config, **columns)
        return source
    if isinstance(source, (str, os.PathLike)):
        return _load_named(os.fspath(source), split, config, text_column, label_column, default_split)
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(
        source, (datasets.Dataset, datasets.DatasetDict, datasets.IterableDataset, datasets.IterableDatasetDict)
    ):
        _refuse(f"the datasets.{type(source).__name__}", config=config)
        return from_datasets(source, split=split, default_split=default_split, **columns)
    if is_dataframe(source):
        _refuse("the DataFrame", split=split, config=config)
        return from_dataframe(source, **columns)
    if isinstance(source, (list, tuple)):
        _refuse("a Python list", split=split, config=config)
        return from_python(source, **columns)
    raise ValueError(
        f"cannot load a {type(source).__name__} as a dataset; pass a name, a path, a datasets.Dataset or "
        f"DatasetDict, a pandas DataFrame, or {PAIRS_SHAPES}"
    )


def _refuse(what: str, **options: str | None) -> None:
    """Raise a ValueError naming the first given option that ``what`` does not take."""
    for option, value in options.items():
        if value is None:
            continue
        if option == "split":
            raise ValueError(
                f"{what} has no splits; split={value!r} applies to hub datasets, DatasetDicts and save_to_disk "
                "folders of a DatasetDict"
            )
        if option == "config":
            raise ValueError(f"{what} has no configs; config={value!r} applies to hub datasets and dataset folders")
        raise ValueError(
            f"{what} has fixed columns; {option}={value!r} applies to files, hub datasets, DataFrames and dicts"
        )


def _load_named(
    key: str,
    split: str | None,
    config: str | None,
    text_column: str | None,
    label_column: str | None,
    default_split: str | None,
) -> Dataset:
    path = Path(key)
    if path.is_file():
        _refuse(f"data file {key!r}", split=split, config=config)
        return load_file(path, text_column or "text", label_column or "label")
    if path.is_dir():
        if is_saved_folder(path):
            _refuse(f"save_to_disk folder {key!r}", config=config)
            return load_saved(
                path, split=split, text_column=text_column, label_column=label_column, default_split=default_split
            )
        return load_hub(key, split=split, config=config, text_column=text_column, label_column=label_column,
                        default_split=default_split)  # fmt: skip
    if key in BUILTIN_NAMES:
        _refuse(f"built-in dataset {key!r}", split=split, config=config, text_column=text_column,
                label_column=label_column)  # fmt: skip
        return builtin.LOADERS[key]()
    if _missing_kind(key) == "hub":
        return load_hub(key, split=split, config=config, text_column=text_column, label_column=label_column,
                        default_split=default_split)  # fmt: skip
    return load_file(path, text_column or "text", label_column or "label")  # raises FileNotFoundError


def _missing_kind(key: str) -> str:
    """What a name that is no local path and no built-in stands for: ``"hub"`` (a named hub dataset or a hub id
    ``owner/name``) or ``"file"`` (a name with a data file's extension or shaped like a path: a missing file).

    Raises:
        ValueError: a bare name that is neither (hub ids need their owner).
    """
    looks_like_path = Path(key).suffix.lower() in FILE_FORMATS or key.startswith((".", "/", "~")) or "\\" in key
    if key in HUB_DATASETS or (not looks_like_path and _HUB_ID.fullmatch(key)):
        return "hub"
    if looks_like_path or "/" in key:
        return "file"
    raise ValueError(
        f"unknown dataset {key!r}; accepted: a built-in ({', '.join(BUILTIN_NAMES)}), a named hub dataset "
        f"({', '.join(HUB_DATASETS)}) or any hub id owner/name (need `pip install datasets`, and network or "
        f"the datasets cache), a path to a {formats()} file, or a folder (save_to_disk or a dataset repository)"
    )


def check_source(source: str | os.PathLike) -> None:
    """Refuse, without reading anything, a name :func:`load_dataset` cannot resolve: a bare unknown name or a
    missing file. What is there (a file's columns, a hub dataset) is checked when it loads.

    Raises:
        FileNotFoundError: a path-like name that does not exist (load_dataset's error).
        ValueError: an unknown name (load_dataset's error).
    """
    key = os.fspath(source)
    if Path(key).exists() or key in BUILTIN_NAMES or _missing_kind(key) == "hub":
        return
    load_file(key)  # the path does not exist: load_file raises its FileNotFoundError before reading anything


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
        shots: Total number of demonstrations. When it is not a multiple of the number of classes C,
            every class gets ``shots // C`` and a seeded random choice of ``shots % C`` classes one
            more (2 shots of a 5-class task show 2 of the classes, as in true k-shot sampling).
        test_size: Total number of test examples, a multiple of the number of classes.
        seed: Random seed; the same seed gives the same splits.
        extra_train: Total number of extra labelled training queries, a multiple of the number of classes.

    Returns:
        ``(shots, extra_train, test)`` lists of examples.

    Raises:
        ValueError: If shots is negative, test_size or extra_train is not a non-negative multiple of
            the number of classes, or a class has
            too few distinct texts.
    """
    labels = dataset.labels
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ValueError(f"shots={shots!r} must be a non-negative integer")
    extra_size, test_per_class = (_per_class(n, what, len(labels))
                                  for n, what in ((extra_train, "extra_train"), (test_size, "test_size")))
    rng = random.Random(seed)
    base_shots, remainder = divmod(shots, len(labels))
    lucky = set(rng.sample(list(labels), remainder)) if remainder else set()  # no draw when balanced
    shot_counts = {label: base_shots + (label in lucky) for label in labels}
    pools: dict[str, list[Example]] = {label: [] for label in labels}
    for ex in dataset.examples:
        pools[ex.label].append(ex)
    used: set[str] = set()
    picked: dict[str, list[list[Example]]] = {}
    for label in labels:
        pool = pools[label]
        sizes = (shot_counts[label], extra_size, test_per_class)
        wanted = sum(sizes)
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
    for round_index in range(base_shots + (remainder > 0)):
        order = list(labels)
        rng.shuffle(order)
        demos.extend(picked[label][0][round_index] for label in order if shot_counts[label] > round_index)
    extra = _shuffled([ex for label in labels for ex in picked[label][1]], rng)
    test = _shuffled([ex for label in labels for ex in picked[label][2]], rng)
    return demos, extra, test


def _shuffled(items: Sequence[Example], rng: random.Random) -> list[Example]:
    out = list(items)
    rng.shuffle(out)
    return out
