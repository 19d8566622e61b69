"""Hub datasets for online users (``glue/sst2``, ``ag_news``, ``trec``, ``dbpedia_14``).

The names and layouts live in :data:`cptune.data.HUB_DATASETS`; :func:`cptune.data.load_dataset` loads one
here with the ``datasets`` library when it is installed, truncated to :data:`cptune.data.MAX_CHARS`.
:func:`hub_layout` gives each one's columns and label names, so a local file written in the same layout loads
identically through :func:`cptune.data_files.load_file`.

Every public name here is also importable from :mod:`cptune.data`.
"""

from __future__ import annotations

from cptune.data import HUB_DATASETS, MAX_CHARS, Dataset
from cptune.data_files import Records, _formats, _one_line, records_to_dataset


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
