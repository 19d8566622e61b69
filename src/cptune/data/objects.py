"""Labelled datasets from Python objects: lists of ``(text, label)`` pairs, a ``(texts, labels)`` pair of lists,
lists of dicts and pandas DataFrames.

The shapes :func:`from_python` accepts:

* a list (or tuple) of ``(text, label)`` pairs, each a tuple or a list: ``[("great film", "pos"), ...]``;
* a ``(texts, labels)`` **tuple** of two equally long sequences that are not tuples (lists, NumPy arrays, pandas
  Series): ``(["great film", "dull"], ["pos", "neg"])``. A list of two lists is read as rows, not as columns;
* a list of dicts (rows), with ``text_column`` / ``label_column`` naming their fields (default ``text`` / ``label``).

:func:`from_dataframe` reads two columns of a pandas DataFrame; a categorical label column keeps its categories'
order. pandas is never imported here: a DataFrame is recognised only when pandas is already loaded.

Labels keep the values given (see :data:`cptune.data.types.Label`); texts are normalised, never truncated.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from cptune.data.files import Records, records_to_dataset
from cptune.data.types import Dataset

PAIRS_SHAPES = "a list of (text, label) pairs, a (texts, labels) tuple of two lists, or a list of dicts"
"""The Python shapes :func:`from_python` accepts, in words."""


def is_dataframe(obj: Any) -> bool:
    """Whether ``obj`` is a pandas DataFrame (without importing pandas)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(obj, pandas.DataFrame)


def _is_column(item: Any) -> bool:
    return not isinstance(item, (str, bytes, tuple, dict)) and hasattr(item, "__len__") and hasattr(item, "__iter__")


def from_python(
    obj: Sequence,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    name: str = "examples",
) -> Dataset:
    """Build a dataset from one of the Python shapes in the module docstring.

    Args:
        obj: The pairs, the ``(texts, labels)`` tuple or the list of dicts.
        text_column: For dicts, the field holding the text (default ``"text"``); not accepted for pairs.
        label_column: For dicts, the field holding the label (default ``"label"``); not accepted for pairs.
        name: Dataset name.

    Returns:
        The dataset, with provenance ``source`` ``"python"``.

    Raises:
        ValueError: If ``obj`` has none of the shapes, rows mix shapes, the two lists differ in length, columns are
            given for pairs, or the values are unusable (see :func:`cptune.data.files.records_to_dataset`).
    """
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"cannot read a {type(obj).__name__} as examples; pass {PAIRS_SHAPES}")
    if isinstance(obj, tuple) and len(obj) == 2 and all(_is_column(item) for item in obj):
        texts, labels = list(obj[0]), list(obj[1])
        if len(texts) != len(labels):
            raise ValueError(f"the (texts, labels) lists differ in length: {len(texts)} texts, {len(labels)} labels")
        shape, rows = "(texts, labels) lists", [(t, lab) for t, lab in zip(texts, labels, strict=True)]
    else:
        shape, rows = "list of dicts" if obj and isinstance(obj[0], dict) else "list of (text, label) pairs", obj
    source = f"the {shape}"
    if shape != "list of dicts" and (text_column is not None or label_column is not None):
        raise ValueError(f"{source} has no columns; text_column/label_column apply to dicts, DataFrames and files")
    text_column, label_column = text_column or "text", label_column or "label"

    def records() -> Records:
        for index, row in enumerate(rows):
            if shape == "list of dicts":
                if not isinstance(row, dict):
                    found = type(row).__name__
                    raise ValueError(f"{source}: row {index} is a {found}, not a dict; pass {PAIRS_SHAPES}")
                yield f" row {index}", row
            elif isinstance(row, (tuple, list)) and len(row) == 2:
                yield f" row {index}", {text_column: row[0], label_column: row[1]}
            else:
                found = f"{len(row)} items" if isinstance(row, (tuple, list)) else f"a {type(row).__name__}"
                raise ValueError(
                    f"{source}: row {index} holds {found}, not a (text, label) pair; pass {PAIRS_SHAPES} "
                    "(two parallel lists go in a tuple: (texts, labels))"
                )

    columns = list(rows[0]) if shape == "list of dicts" else [text_column, label_column]
    return records_to_dataset(
        records(),
        name=name,
        source=source,
        columns=columns,
        text_column=text_column,
        label_column=label_column,
        provenance={"source": "python", "shape": shape, "file": None, "sha256": None, "stand_in_for": None},
    )


def from_dataframe(
    frame: Any,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    name: str = "dataframe",
) -> Dataset:
    """Build a dataset from two columns of a pandas DataFrame.

    Missing values (``None``, NaN, ``pd.NA``) count as blank; a categorical label column gives the labels in its
    categories' order.

    Args:
        frame: The DataFrame.
        text_column: The text column (default ``"text"``).
        label_column: The label column (default ``"label"``).
        name: Dataset name.

    Returns:
        The dataset, with provenance ``source`` ``"dataframe"``.

    Raises:
        ValueError: If a column is missing or the values are unusable (see
            :func:`cptune.data.files.records_to_dataset`).
    """
    import pandas

    text_column, label_column = text_column or "text", label_column or "label"
    columns = list(frame.columns)
    label_names = None
    if label_column in columns and isinstance(frame[label_column].dtype, pandas.CategoricalDtype):
        label_names = frame[label_column].cat.categories.astype(object).tolist()

    def values(column: str) -> list:
        series = frame[column].astype(object)
        return series.where(frame[column].notna(), None).tolist()

    def records() -> Records:
        texts, labels = values(text_column), values(label_column)
        for index, (text, label) in enumerate(zip(texts, labels, strict=True)):
            yield f" row {index}", {text_column: text, label_column: label}

    return records_to_dataset(
        records(),
        name=name,
        source="the DataFrame",
        columns=columns,
        text_column=text_column,
        label_column=label_column,
        label_names=label_names,
        provenance={"source": "dataframe", "file": None, "sha256": None, "stand_in_for": None},
    )
