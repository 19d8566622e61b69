"""Hub datasets for online users (``glue/sst2``, ``ag_news``, ``trec``, ``dbpedia_14``).

The names and layouts live in :data:`HUB_DATASETS`; :func:`cptune.data.load_dataset` loads one
here with the ``datasets`` library when it is installed, truncated to :data:`cptune.data.MAX_CHARS`.
:func:`hub_layout` gives each one's columns and label names, so a local file written in the same layout loads
identically through :func:`cptune.data.files.load_file`.

Every public name here is also importable from :mod:`cptune.data`.
"""

from __future__ import annotations

from dataclasses import dataclass

from cptune.data.files import Records, records_to_dataset
from cptune.data.types import DATASET_DEFAULTS, MAX_CHARS, Dataset, formats, one_line


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
"""Hub dataset names accepted by :func:`load_dataset` (online, with the ``datasets`` library)."""


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


def load_hub(name: str, text_column: str | None, label_column: str | None) -> Dataset:
    """Load hub dataset ``name`` with the ``datasets`` library (see :func:`cptune.data.load_dataset`)."""
    spec = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"hub dataset {name!r} needs the `datasets` library and network access; run `pip install datasets` "
            f"or pass a local {formats()} file"
        ) from None
    try:
        loaded = datasets.load_dataset(spec.repo, spec.config)
    except Exception as err:  # network, hub and format errors all mean "could not load it"
        raise ValueError(f"could not load hub dataset {name!r} ({spec.repo}): {one_line(err)}") from None
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
