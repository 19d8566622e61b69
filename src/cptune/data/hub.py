"""Sources read with the ``datasets`` library: hub ids, local dataset folders, ``save_to_disk`` folders and
``datasets.Dataset`` / ``datasets.DatasetDict`` objects.

``datasets`` is optional: it is imported only when such a source is given, and a missing one is a ``ValueError``
that says ``pip install datasets``. A hub id is loaded with ``datasets.load_dataset(id, config, split=...)``, so the
library's cache (``HF_DATASETS_CACHE``) and offline mode (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``) apply as
they do for any ``datasets`` user: offline, a dataset loads only if it is already in that cache.

Splits: a source with named splits (a hub id, a ``DatasetDict``, a ``save_to_disk`` folder of one) gives the split
``split`` names (for a hub id also a ``datasets`` split expression such as ``train[:1000]``); without ``split``, the
``default_split`` if the source has it; otherwise a ``ValueError`` lists the splits. Splits are never pooled.

Labels: a ``ClassLabel`` column's integer labels become its names (a negative one, the hub's "unlabelled", is
skipped) and the dataset's labels follow the ``ClassLabel`` order; any other label column keeps its values' types.

The four named hub datasets (:data:`HUB_DATASETS`: ``glue/sst2``, ``ag_news``, ``trec``, ``dbpedia_14``) keep their
repository, config, columns and label names, and their texts are truncated to :data:`cptune.data.MAX_CHARS` as the
built-ins' are; any other hub id defaults to the columns ``text`` and ``label`` and is not truncated.
:func:`hub_layout` gives a named dataset's columns and label names, so a local file in the same layout loads
identically through :func:`cptune.data.files.load_file`.

Every public name here is also importable from :mod:`cptune.data`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from cptune.data.files import Records, records_to_dataset
from cptune.data.types import DATASET_DEFAULTS, MAX_CHARS, Dataset, Label, formats, one_line


@dataclass(frozen=True)
class HubSpec:
    """Where a hub dataset lives and how it is laid out."""

    repo: str
    config: str | None
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    stand_in_for: str


HUB_DATASETS: dict[str, HubSpec] = {
    "glue/sst2": HubSpec("nyu-mll/glue", "sst2", "sentence", "label", ("negative", "positive"), "SST-2"),
    "ag_news": HubSpec(
        "fancyzhx/ag_news", None, "text", "label", ("World", "Sports", "Business", "Sci/Tech"), "AG News"
    ),
    "trec": HubSpec(
        "CogComp/trec", None, "text", "coarse_label", ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), "TREC"
    ),
    "dbpedia_14": HubSpec(
        "fancyzhx/dbpedia_14", None, "content", "label", tuple(DATASET_DEFAULTS["dbpedia_14"][1]), "DBpedia-14"
    ),
}
"""Named hub datasets: :func:`cptune.data.load_dataset` knows their repository, config, columns and label names."""

OFFLINE_VARIABLES = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
"""Environment variables that put ``datasets`` in offline mode."""

_TRUE = {"1", "ON", "YES", "TRUE"}
_SAVED_DATASET = ("dataset_info.json", "state.json")
_SAVED_DATASET_DICT = "dataset_dict.json"


def hub_layout(name: str) -> tuple[str, str, tuple[str, ...]]:
    """Return a named hub dataset's ``(text_column, label_column, label_names)``.

    A local file in this layout (integer labels indexing ``label_names``) loads like the hub dataset with
    ``load_file(path, text_column, label_column, label_names=label_names)``.

    Args:
        name: A named hub dataset (``glue/sst2``, ``ag_news``, ``trec`` or ``dbpedia_14``).

    Returns:
        The text column, the label column and the class names in index order.

    Raises:
        ValueError: If the name is not a named hub dataset.
    """
    if name not in HUB_DATASETS:
        raise ValueError(f"unknown hub dataset {name!r}; known hub datasets: {', '.join(HUB_DATASETS)}")
    spec = HUB_DATASETS[name]
    return spec.text_column, spec.label_column, spec.label_names


def import_datasets(what: str) -> ModuleType:
    """Import the optional ``datasets`` library, or raise a ``ValueError`` saying that ``what`` needs it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{what} needs the `datasets` library, which is not installed; run `pip install datasets` "
            f"or pass a local {formats()} file"
        ) from None
    return datasets


def is_saved_folder(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return all((path / name).is_file() for name in _SAVED_DATASET) or (path / _SAVED_DATASET_DICT).is_file()


def choose_split(available: Sequence[str], split: str | None, default_split: str | None, source: str) -> str:
    """Pick a split by name: ``split`` if given, else ``default_split`` if ``available`` has it.

    Raises:
        ValueError: If ``split`` is not available, or neither is given and available.
    """
    names = ", ".join(repr(s) for s in available) or "none"
    if split is not None:
        if split in available:
            return split
        raise ValueError(f"split {split!r} not found in {source}; available splits: {names}")
    if default_split is not None and default_split in available:
        return default_split
    default = f" (the default {default_split!r} is not among them)" if default_split is not None else ""
    raise ValueError(f"{source} has the splits {names}{default}; choose one with split= (--split)")


def load_hub(
    id_or_folder: str,
    *,
    split: str | None = None,
    config: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    default_split: str | None = None,
) -> Dataset:
    """Load a hub dataset, or a local folder laid out like a hub dataset repository, with ``datasets.load_dataset``.

    Args:
        id_or_folder: A named hub dataset (:data:`HUB_DATASETS`), any hub id ``owner/name``, or a local folder
            of data files that ``datasets.load_dataset`` reads.
        split: The split, or a ``datasets`` split expression (``train[:1000]``).
        config: The dataset's configuration (subset) name; a named hub dataset has its own.
        text_column: The text column (default: the named dataset's, else ``"text"``).
        label_column: The label column (default: the named dataset's, else ``"label"``).
        default_split: The split to use when ``split`` is None, if the dataset has it.

    Returns:
        The dataset, with provenance ``source`` ``"hub"`` (or ``"folder"``), the id, config and split.

    Raises:
        ValueError: If ``datasets`` is missing, the dataset cannot be loaded (offline and not cached, not on the
            hub, an unknown config or split), no split is chosen, or the columns or values are unusable.
    """
    spec = HUB_DATASETS.get(id_or_folder)
    folder = spec is None and Path(id_or_folder).is_dir()
    what = f"local dataset folder {id_or_folder!r}" if folder else f"hub dataset {id_or_folder!r}"
    if spec is not None and config is not None and config != spec.config:
        raise ValueError(
            f"hub dataset {id_or_folder!r} is {spec.repo} config {spec.config!r}; for config {config!r} "
            f"name the repository instead: {spec.repo!r}"
        )
    datasets = import_datasets(f"loading {what}")
    repo = spec.repo if spec is not None else id_or_folder
    config = spec.config if spec is not None else config
    try:
        loaded = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # network, cache, hub and format errors all mean "could not load it"
        message = _load_error(err, datasets, what, id_or_folder, config, split)
        if folder:
            message += "; a folder must be written by save_to_disk or hold data files laid out like a hub dataset"
        raise ValueError(message) from None
    if split is None:
        split = choose_split(list(loaded), None, default_split, what)
        loaded = loaded[split]
    provenance = {
        "source": "folder" if folder else "hub",
        "hub_id": None if folder else repo,
        "file": str(Path(id_or_folder).resolve()) if folder else None,
        "config": config,
        "split": split,
    }
    if spec is not None:
        text_column = text_column or spec.text_column
        label_column = label_column or spec.label_column
    return _to_dataset(
        loaded,
        datasets,
        name=id_or_folder if not folder else Path(id_or_folder).name,
        source=f"{what}{f' config {config!r}' if config else ''} split {split!r}",
        text_column=text_column or "text",
        label_column=label_column or "label",
        label_names=spec.label_names if spec is not None and label_column == spec.label_column else None,
        max_chars=MAX_CHARS if spec is not None else None,
        provenance=provenance,
    )


def _load_error(
    err: Exception, datasets: ModuleType, what: str, key: str, config: str | None, split: str | None
) -> str:
    config_part = f" config {config!r}" if config else ""
    split_part = f" split {split!r}" if split else ""
    # datasets >= 3 folds both variables into config.HF_HUB_OFFLINE; older versions name HF_DATASETS_OFFLINE.
    config_module = datasets.config
    offline = getattr(config_module, "HF_HUB_OFFLINE", False) or getattr(config_module, "HF_DATASETS_OFFLINE", False)
    if offline and isinstance(err, ConnectionError):
        variables = " and ".join(v for v in OFFLINE_VARIABLES if os.environ.get(v, "").upper() in _TRUE)
        cache = getattr(datasets.config, "HF_DATASETS_CACHE", "the datasets cache")
        return (
            f"{what}{config_part} is not in the local datasets cache ({cache}) and offline mode is on "
            f"({variables or 'HF_DATASETS_OFFLINE/HF_HUB_OFFLINE'} set); load it once online, or pass a built-in "
            f"name, a local {formats()} file or a folder written by save_to_disk (no local file or folder named "
            f"{key!r} exists)"
        )
    message = one_line(err, 400)
    hint = " (choose the config with config= or --config)" if "config" in message and config is None else ""
    return f"could not load {what}{config_part}{split_part}: {message}{hint}"


def load_saved(
    path: str | Path,
    *,
    split: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    default_split: str | None = None,
) -> Dataset:
    """Load a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``.

    Args:
        path: The folder.
        split: For a ``DatasetDict`` folder, the split; not accepted for a ``Dataset`` folder.
        text_column: The text column (default ``"text"``).
        label_column: The label column (default ``"label"``).
        default_split: The split to use when ``split`` is None, if the ``DatasetDict`` has it.

    Returns:
        The dataset, with provenance ``source`` ``"disk"``, the folder and the split.

    Raises:
        ValueError: If ``datasets`` is missing, the folder cannot be read, or as :func:`from_datasets`.
    """
    path = Path(path)
    datasets = import_datasets(f"reading the save_to_disk folder {str(path)!r}")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged or foreign folder: pyarrow, json and fsspec errors
        raise ValueError(f"cannot read the save_to_disk folder {str(path)!r}: {one_line(err)}") from None
    return from_datasets(
        loaded,
        split=split,
        text_column=text_column,
        label_column=label_column,
        default_split=default_split,
        name=path.name,
        source=f"save_to_disk folder {str(path)!r}",
        provenance={"source": "disk", "file": str(path.resolve())},
    )


def from_datasets(
    obj: Any,
    *,
    split: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    default_split: str | None = None,
    name: str | None = None,
    source: str | None = None,
    provenance: dict | None = None,
) -> Dataset:
    """Turn a ``datasets.Dataset`` or ``datasets.DatasetDict`` into a :class:`~cptune.data.Dataset`.

    Args:
        obj: The ``Dataset``, or the ``DatasetDict`` to take a split of.
        split: For a ``DatasetDict``, the split; not accepted for a ``Dataset``.
        text_column: The text column (default ``"text"``).
        label_column: The label column (default ``"label"``).
        default_split: The split to use when ``split`` is None, if the ``DatasetDict`` has it.
        name: Dataset name (default: the ``datasets`` info's name, else ``"dataset"``).
        source: What the object is, for messages.
        provenance: Provenance to start from (default ``{"source": "datasets"}``).

    Returns:
        The dataset.

    Raises:
        ValueError: If ``obj`` is a streaming dataset, ``split`` is given for a ``Dataset``, no split is chosen
            for a ``DatasetDict``, or the columns or values are unusable (see
            :func:`cptune.data.files.records_to_dataset`).
    """
    datasets = import_datasets("a datasets object")
    kind = type(obj).__name__
    source = source or f"the datasets.{kind}"
    if isinstance(obj, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise ValueError(f"{source} is a streaming dataset; load it without streaming=True (a datasets.Dataset)")
    chosen = None
    if isinstance(obj, datasets.DatasetDict):
        chosen = choose_split(list(obj), split, default_split, source)
        splits = {key: len(value) for key, value in obj.items()}
        obj = obj[chosen]
        source = f"{source} split {chosen!r}"
    elif split is not None:
        raise ValueError(
            f"{source} has no splits; split={split!r} applies to a DatasetDict, a hub dataset or a save_to_disk "
            "folder of a DatasetDict"
        )
    else:
        splits = None
    provenance = {"source": "datasets", **(provenance or {}), "split": chosen, "splits": splits}
    return _to_dataset(
        obj,
        datasets,
        name=name or obj.info.dataset_name or "dataset",
        source=source,
        text_column=text_column or "text",
        label_column=label_column or "label",
        label_names=None,
        max_chars=None,
        provenance=provenance,
    )


def _to_dataset(
    ds: Any,
    datasets: ModuleType,
    *,
    name: str,
    source: str,
    text_column: str,
    label_column: str,
    label_names: Sequence[Label] | None,
    max_chars: int | None,
    provenance: dict,
) -> Dataset:
    """A ``datasets.Dataset``'s two columns through :func:`records_to_dataset`; a ``ClassLabel`` names its labels."""
    feature = ds.features.get(label_column)
    if label_names is None and isinstance(feature, datasets.ClassLabel):
        label_names = feature.names

    def records() -> Records:
        columns = ds.with_format(None).select_columns(list(dict.fromkeys((text_column, label_column)))).to_dict()
        for index, (text, label) in enumerate(zip(columns[text_column], columns[label_column], strict=True)):
            yield f" row {index}", {text_column: text, label_column: label}

    provenance = {
        "source": None,
        "package": "datasets",
        "version": getattr(datasets, "__version__", None),
        "file": None,
        "sha256": None,
        "stand_in_for": None,
        **provenance,
        "num_rows": len(ds),
        "cache_files": [entry["filename"] for entry in ds.cache_files],
    }
    return records_to_dataset(
        records(),
        name=name,
        source=source,
        columns=list(ds.column_names),
        text_column=text_column,
        label_column=label_column,
        label_names=label_names,
        max_chars=max_chars,
        provenance=provenance,
    )
