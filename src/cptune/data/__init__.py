"""Labelled text datasets: the types, text rules, the dataset registry and seeded, class-balanced sampling.

Three kinds of source, all returning a :class:`Dataset` with its provenance:

* **Built-ins** (offline; the loaders live in :mod:`cptune.data.builtin`): ``rotten_tomatoes``, ``subj``,
  ``movie_sentiment_5``, ``bbc_news`` and ``reuters_r8``. They read files shipped inside registry
  packages at run time and are *stand-ins* for the paper's benchmarks (SST-2/MR, SUBJ, SST-5,
  AG News/DBpedia), which are not available offline; every report should say so.
* **Local files** (:func:`load_file`, in :mod:`cptune.data.files`): ``.csv``, ``.tsv``, ``.jsonl`` (one
  JSON object per line) and ``.parquet`` (needs ``pyarrow``, which cptune does not install).
* **Hub names** for online users (``glue/sst2``, ``ag_news``, ``trec``, ``dbpedia_14``; loader in
  :mod:`cptune.data.hub`): loaded with the ``datasets`` library when it is installed; :func:`hub_layout`
  gives each one's columns and label names, so a local file written in the same layout loads identically
  through :func:`load_file`.

The package, by layer: ``types`` (:class:`Example`, :class:`Dataset`, the text rules, the per-dataset
defaults, the file formats) <- ``builtin``, ``files`` (:func:`load_file`, :func:`records_to_dataset`) and
``hub`` (:data:`HUB_DATASETS`, :func:`hub_layout`) <- this module (the registry and sampling), which
re-exports their public names.

Text normalisation and truncation (:mod:`cptune.data.types`) apply to every source.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

from cptune.data import builtin
from cptune.data.builtin import (
    load_bbc_news,
    load_movie_sentiment_5,
    load_reuters_r8,
    load_rotten_tomatoes,
    load_subj,
)
from cptune.data.files import Records, load_file, records_to_dataset
from cptune.data.hub import HUB_DATASETS, hub_layout, load_hub
from cptune.data.types import (
    DATASET_DEFAULTS,
    FILE_FORMATS,
    MAX_CHARS,
    Dataset,
    Example,
    examples_sha256,
    formats,
    normalize_text,
    truncate_text,
)

BUILTIN_NAMES = ("rotten_tomatoes", "subj", "movie_sentiment_5", "bbc_news", "reuters_r8")
"""Names of the offline built-in datasets (loaders in :mod:`cptune.data.builtin`)."""

__all__ = [
    "BUILTIN_NAMES",
    "DATASET_DEFAULTS",
    "FILE_FORMATS",
    "HUB_DATASETS",
    "MAX_CHARS",
    "Dataset",
    "Example",
    "Records",
    "examples_sha256",
    "hub_layout",
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


def load_dataset(name_or_path: str | Path, text_column: str | None = None, label_column: str | None = None) -> Dataset:
    """Load a dataset by built-in name, hub name or local file path.

    An existing file is loaded with :func:`load_file`; otherwise a built-in name, then a hub name; a name
    that looks like a path (a data-file extension or a slash that is not a hub name) is loaded as a file.

    Args:
        name_or_path: A built-in name (see :data:`BUILTIN_NAMES`), a hub name (see :data:`HUB_DATASETS`) or
            a path to a .csv, .tsv, .jsonl or .parquet file.
        text_column: Text column of a file (default ``"text"``) or hub dataset (default: its own); not
            accepted for built-ins.
        label_column: Label column, likewise (default ``"label"`` for files).

    Returns:
        The dataset.

    Raises:
        FileNotFoundError: If a path-like name does not exist.
        ValueError: If the name is unknown, columns are given for a built-in, or loading fails (see
            :func:`load_file`).
    """
    key = str(name_or_path)
    path = Path(key)
    if path.is_file():
        return load_file(path, text_column or "text", label_column or "label")
    if key in BUILTIN_NAMES:
        if text_column is not None or label_column is not None:
            raise ValueError(
                f"built-in dataset {key!r} has fixed columns; text_column/label_column apply to files and hub datasets"
            )
        return builtin.LOADERS[key]()
    if key in HUB_DATASETS:
        return load_hub(key, text_column, label_column)
    if path.suffix.lower() in FILE_FORMATS or "/" in key or "\\" in key:
        return load_file(path, text_column or "text", label_column or "label")
    raise ValueError(
        f"unknown dataset {key!r}; known datasets: {', '.join(BUILTIN_NAMES)}; "
        f"hub datasets (need `pip install datasets` and network): {', '.join(HUB_DATASETS)}; "
        f"or a path to a {formats()} file"
    )


def _has_datasets() -> bool:
    try:
        return importlib.util.find_spec("datasets") is not None
    except ValueError:  # a module object without __spec__ already in sys.modules
        return True


def list_datasets(include_hub: bool = True) -> list[dict]:
    """Describe the built-in (and hub) datasets, for ``cptune datasets``.

    Loads every built-in to count it (about a second in all); one whose package is missing is listed with
    ``size`` None, ``available`` False and the install hint as ``note``.

    Args:
        include_hub: Also list the hub names (``size`` None; ``available`` says whether ``datasets`` is
            installed).

    Returns:
        One dict per dataset: ``name``, ``source`` (``"builtin"`` or ``"hub"``), ``classes`` (class names),
        ``num_classes``, ``size`` (examples), ``stand_in_for``, ``licence``, ``available``, ``note``,
        ``template`` and ``label_words``.
    """
    rows = []
    for name in BUILTIN_NAMES:
        template, words = DATASET_DEFAULTS[name]
        info = builtin.BUILTIN_INFO[name]
        row = {"name": name, "source": "builtin", "classes": list(words), "size": None, "available": False}
        try:
            dataset = load_dataset(name)
        except (FileNotFoundError, ValueError) as err:
            row["note"] = str(err)
        else:
            row.update(classes=list(dataset.labels), size=len(dataset.examples), available=True, note="")
        row.update(
            num_classes=len(row["classes"]),
            stand_in_for=info["stand_in_for"],
            licence=info["licence"],
            template=template,
            label_words=dict(words),
        )
        rows.append(row)
    if include_hub:
        has_datasets = _has_datasets()
        for name, spec in HUB_DATASETS.items():
            template, words = DATASET_DEFAULTS[name]
            rows.append(
                {
                    "name": name,
                    "source": "hub",
                    "classes": list(spec.label_names),
                    "num_classes": len(spec.label_names),
                    "size": None,
                    "stand_in_for": None,
                    "licence": f"see the dataset card of {spec.repo}",
                    "available": has_datasets,
                    "note": "" if has_datasets else "needs `pip install datasets` and network access",
                    "template": template,
                    "label_words": dict(words),
                }
            )
    return rows


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
