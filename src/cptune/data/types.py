"""The data types every source shares: :class:`Example`, :class:`Dataset`, the text rules, the per-dataset
defaults and the accepted file formats.

Text normalisation, applied to every source: runs of whitespace (newlines included) become one space and
the ends are stripped, so a text never breaks the one-demonstration-per-line context layout.

Truncation rule (:func:`truncate_text`, ``MAX_CHARS`` = 400 characters for the built-ins and the four named hub
datasets; off for every other source, which is the user's own data, unless ``max_chars`` is given): a normalised
text longer than the limit keeps its longest prefix of whole sentences that fits, if that prefix holds at least
half the limit; otherwise it is cut at the last space within the limit (at the limit itself when the first word
is longer). A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) before a
space.

Labels keep their type (:data:`Label`): a string label is normalised like a text; an integral float becomes an int;
NumPy scalars become Python ones; a blank string, ``None`` or NaN means "unlabelled".
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

MAX_CHARS = 400
"""Character limit of built-in and named hub texts (see the truncation rule in the module docstring)."""

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


Label = str | int | float | bool
"""A class label: a string, an integer, a boolean or a float that is not integral (an integral float such as ``1.0``
becomes the int ``1`` when a source is read). Labels keep the type the source gives them."""

SOURCE_KINDS = ("builtin", "file", "hub", "folder", "disk", "datasets", "dataframe", "python")
"""What ``Dataset.provenance["source"]`` records: a built-in, a local data file, a hub id, a local dataset folder
read by ``datasets.load_dataset``, a ``save_to_disk`` folder, a ``datasets`` object, a pandas DataFrame, or Python
lists."""


def label_sort_key(label: Label) -> tuple:
    """Sort labels of mixed types without comparing across types: booleans, then numbers by value, then text."""
    if isinstance(label, bool):
        return (0, int(label), "")
    if isinstance(label, (int, float)):
        return (1, label, "")
    return (2, 0, str(label))


@dataclass(frozen=True)
class Example:
    """One labelled text.

    Attributes:
        text: The input text.
        label: The class label, as the source gives it (see :data:`Label`).
    """

    text: str
    label: Label


@dataclass
class Dataset:
    """A labelled text classification dataset.

    Attributes:
        name: Dataset name.
        examples: All examples, in file order.
        labels: The class labels: in the source's own order where it has one (ordinal sentiment, a
            ``ClassLabel``'s names, a categorical column's categories), else sorted by :func:`label_sort_key`.
        provenance: Where the data came from: ``source`` (one of :data:`SOURCE_KINDS`), package, version,
            file (relative to site-packages or the download directory), sha256, ``stand_in_for``, how the
            texts were derived and ``examples_sha256``.
    """

    name: str
    examples: list[Example]
    labels: list[Label]
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise ValueError(f"labels {self.labels!r} must be at least two distinct class labels")
        unknown = sorted({ex.label for ex in self.examples} - set(self.labels), key=label_sort_key)
        if unknown:
            raise ValueError(f"example labels {unknown!r} are not in the dataset labels {self.labels!r}")

    def label_counts(self) -> dict[Label, int]:
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
    """Fingerprint a derived dataset: sha256 of its ``text<TAB>label<LF>`` lines (label as ``str(label)``), in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(f"{ex.text}\t{ex.label}\n".encode())
    return digest.hexdigest()


FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".parquet")
"""Local data file extensions that :func:`load_file` reads."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """An error's message on one line, at most ``limit`` characters (its type name when it has no message)."""
    return " ".join(str(err).split())[:limit] or type(err).__name__


def formats() -> str:
    """The accepted data-file extensions in words: ``.csv, .tsv, .jsonl or .parquet``."""
    return ", ".join(FILE_FORMATS[:-1]) + " or " + FILE_FORMATS[-1]


class MissingColumnError(ValueError):
    """A text or label column that a data file (or one of its rows) does not have. The message says how to
    choose another: by the Python argument (``text_column=``); :meth:`message` names a command line's flag."""

    def __init__(self, role: str, column: str, where: str, present: Sequence[str], kind: str = "columns"):
        """``role``: ``"text"`` or ``"label"``; ``where``: ``"in 'data.csv'"``, ``"on line 3 of data.jsonl"``;
        ``present``: the names there; ``kind``: what they are (``"columns"``, ``"fields"``)."""
        self.role, self.column, self.where, self.present, self.kind = role, column, where, list(present), kind
        super().__init__(self.message(f"{role}_column="))

    def message(self, option: str) -> str:
        """The one-line error, naming ``option`` (``"text_column="``, ``"--text-column"``) as the way to choose."""
        present = ", ".join(repr(c) for c in self.present) or "none"
        return (f"{self.role} column {self.column!r} not found {self.where}; {self.kind} present: {present} "
                f"(choose it with {option})")


class ColumnClashError(ValueError):
    """An input column that has the name of a column an annotation adds. The message says how to choose other
    names: by the Python argument (``prefix=``); :meth:`message` names a command line's flag."""

    def __init__(self, where: object, column: str):
        """``where``: the input (a path of a file or folder); ``column``: its column that an added one would replace."""
        self.where, self.column = str(where), column
        super().__init__(self.message("prefix="))

    def message(self, option: str) -> str:
        """The one-line error, naming ``option`` (``"prefix="``, ``"--prefix"``) as the way to rename."""
        example = "prefix='cptune_'" if option.endswith("=") else f"{option} cptune_"
        return (f"{self.where} already has a column {self.column!r}, a name the annotation adds; pass another "
                f"{option} for the added columns (e.g. {example} gives 'cptune_{self.column}')")
