"""Labelled text datasets: the types, text rules, the dataset registry and seeded, class-balanced sampling.

Three kinds of source, all returning a :class:`Dataset` with its provenance:

* **Built-ins** (offline; the loaders live in :mod:`cptune.builtin_data`): ``rotten_tomatoes``, ``subj``,
  ``movie_sentiment_5``, ``bbc_news`` and ``reuters_r8``. They read files shipped inside registry
  packages at run time and are *stand-ins* for the paper's benchmarks (SST-2/MR, SUBJ, SST-5,
  AG News/DBpedia), which are not available offline; every report should say so.
* **Local files** (:func:`load_file`, in :mod:`cptune.data_files`): ``.csv``, ``.tsv``, ``.jsonl`` (one
  JSON object per line) and ``.parquet`` (needs ``pyarrow``, which cptune does not install).
* **Hub names** for online users (``glue/sst2``, ``ag_news``, ``trec``, ``dbpedia_14``; loader in
  :mod:`cptune.data_hub`): loaded with the ``datasets`` library when it is installed; :func:`hub_layout`
  gives each one's columns and label names, so a local file written in the same layout loads identically
  through :func:`load_file`.

:func:`load_file`, :func:`records_to_dataset`, :data:`FILE_FORMATS`, ``Records`` and :func:`hub_layout` live
in those two modules and stay importable from here (lazily, as they import this module).

Text normalisation, applied to every source: runs of whitespace (newlines included) become one space and
the ends are stripped, so a text never breaks the one-demonstration-per-line context layout.

Truncation rule (:func:`truncate_text`, ``MAX_CHARS`` = 400 characters for built-in and hub datasets; off
for local files unless ``max_chars`` is given): a normalised text longer than the limit keeps its longest
prefix of whole sentences that fits, if that prefix holds at least half the limit; otherwise it is cut at
the last space within the limit (at the limit itself when the first word is longer). A sentence ends at
``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) before a space.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MAX_CHARS = 400
"""Character limit of built-in and hub texts (see the truncation rule in the module docstring)."""

_TEMPLATE = "input: {x} output: {y}"

DATASET_DEFAULTS: dict[str, tuple[str, dict[str, str]]] = {
    "rotten_tomatoes": (_TEMPLATE, {"negative": "negative", "positive": "positive"}),
    "subj": (_TEMPLATE, {"objective": "objective", "subjective": "subjective"}),
    "movie_sentiment_5": (
        _TEMPLATE,
        {"terrible": "terrible", "bad": "bad", "neutral": "neutral", "good": "good", "great": "great"},
    ),
    "bbc_news": (
        _TEMPLATE,
        {w: w for w in ("business", "entertainment", "politics", "sport", "tech")},
    ),
    "reuters_r8": (
        _TEMPLATE,
        {
            "acq": "acquisition",
            "crude": "oil",
            "earn": "earnings",
            "grain": "grain",
            "interest": "interest",
            "money-fx": "currency",
            "ship": "shipping",
            "trade": "trade",
        },
    ),
    "glue/sst2": (_TEMPLATE, {"negative": "negative", "positive": "positive"}),
    "ag_news": (_TEMPLATE, {"World": "world", "Sports": "sports", "Business": "business", "Sci/Tech": "technology"}),
    "trec": (
        _TEMPLATE,
        {
            "ABBR": "abbreviation",
            "ENTY": "entity",
            "DESC": "description",
            "HUM": "person",
            "LOC": "location",
            "NUM": "number",
        },
    ),
    "dbpedia_14": (
        _TEMPLATE,
        {
            "Company": "company",
            "EducationalInstitution": "school",
            "Artist": "artist",
            "Athlete": "athlete",
            "OfficeHolder": "politician",
            "MeanOfTransportation": "transport",
            "Building": "building",
            "NaturalPlace": "nature",
            "Village": "village",
            "Animal": "animal",
            "Plant": "plant",
            "Album": "album",
            "Film": "film",
            "WrittenWork": "book",
        },
    ),
}
"""Default ``(template, {label: label word})`` per built-in and hub dataset, labels in dataset order.

Every label word is one common English word that is a single token (with its leading space) for the
embedded SmolLM2 tokenizer; ``tests/test_data.py`` checks this on the real tokenizer.
"""


@dataclass(frozen=True)
class _HubSpec:
    repo: str
    config: str | None
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    stand_in_for: str


HUB_DATASETS: dict[str, _HubSpec] = {
    "glue/sst2": _HubSpec("nyu-mll/glue", "sst2", "sentence", "label", ("negative", "positive"), "SST-2"),
    "ag_news": _HubSpec(
        "fancyzhx/ag_news", None, "text", "label", ("World", "Sports", "Business", "Sci/Tech"), "AG News"
    ),
    "trec": _HubSpec(
        "CogComp/trec", None, "text", "coarse_label", ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), "TREC"
    ),
    "dbpedia_14": _HubSpec(
        "fancyzhx/dbpedia_14", None, "content", "label", tuple(DATASET_DEFAULTS["dbpedia_14"][1]), "DBpedia-14"
    ),
}
"""Hub dataset names accepted by :func:`load_dataset` (online, with the ``datasets`` library)."""

BUILTIN_NAMES = ("rotten_tomatoes", "subj", "movie_sentiment_5", "bbc_news", "reuters_r8")
"""Names of the offline built-in datasets (loaders in :mod:`cptune.builtin_data`)."""


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
        labels: The class names: sorted, or in the source's own order where it has one (ordinal sentiment,
            a hub dataset's label names).
        provenance: Where the data came from: package, version, file (relative to site-packages or the
            download directory), sha256, ``stand_in_for`` and how the texts were derived.
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


def normalize_text(text: str) -> str:
    """Collapse every run of whitespace (newlines included) into one space and strip the ends."""
    return " ".join(text.split())


_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?= )")


def truncate_text(text: str, max_chars: int = MAX_CHARS) -> str:
    """Normalise a text and shorten it to at most ``max_chars`` characters by the module's stated rule.

    Args:
        text: Any text.
        max_chars: The limit, at least 1.

    Returns:
        The normalised text, unchanged if it fits; else whole leading sentences if they fill at least half
        the limit, else the text cut at its last space within the limit (or at the limit).

    Raises:
        ValueError: If ``max_chars`` is not a positive integer.
    """
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r} must be a positive integer")
    text = normalize_text(text)
    if len(text) <= max_chars:
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, max_chars + 1) if m.end() <= max_chars]
    if ends and ends[-1] * 2 >= max_chars:
        return text[: ends[-1]]
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[:cut] if cut > 0 else text[:max_chars]


def examples_sha256(examples: Iterable[Example]) -> str:
    """Fingerprint a derived dataset: sha256 of its ``text<TAB>label<LF>`` lines, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.text}\t{ex.label}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Registry


def _builtin():
    # Imported lazily: cptune.builtin_data imports this module.
    return importlib.import_module("cptune.builtin_data")


# Names that moved to the source modules; those import this module, so they are re-exported lazily.
_MOVED = {name: "cptune.data_files" for name in ("FILE_FORMATS", "Records", "load_file", "records_to_dataset")}
_MOVED["hub_layout"] = "cptune.data_hub"


def __getattr__(name: str):
    # Keeps ``from cptune.data import load_file`` (and the other _MOVED names) and
    # ``from cptune.data import load_rotten_tomatoes`` (and the other built-in loaders) working.
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    if name.startswith("load_") and name[5:] in BUILTIN_NAMES:
        return getattr(_builtin(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from cptune.data_files import FILE_FORMATS, _formats, load_file  # lazily: it imports this module
    from cptune.data_hub import _load_hub

    key = str(name_or_path)
    path = Path(key)
    if path.is_file():
        return load_file(path, text_column or "text", label_column or "label")
    if key in BUILTIN_NAMES:
        if text_column is not None or label_column is not None:
            raise ValueError(
                f"built-in dataset {key!r} has fixed columns; text_column/label_column apply to files and hub datasets"
            )
        return _builtin().LOADERS[key]()
    if key in HUB_DATASETS:
        return _load_hub(key, text_column, label_column)
    if path.suffix.lower() in FILE_FORMATS or "/" in key or "\\" in key:
        return load_file(path, text_column or "text", label_column or "label")
    raise ValueError(
        f"unknown dataset {key!r}; known datasets: {', '.join(BUILTIN_NAMES)}; "
        f"hub datasets (need `pip install datasets` and network): {', '.join(HUB_DATASETS)}; "
        f"or a path to a {_formats()} file"
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
    builtin = _builtin()
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
