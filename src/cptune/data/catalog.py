"""What ``cptune datasets`` lists, answered without loading anything.

:data:`BUILTIN_CATALOG` holds each built-in's size, classes (in dataset order) with their counts, and
``examples_sha256``, precomputed from the pinned packages; ``tests/test_data.py`` loads every built-in and
checks the table against the real data exactly, so it cannot drift. :func:`list_datasets` reads the table and checks
only that each built-in's files are present (:func:`cptune.data.builtin.check_installed`: a few stat calls).

Every public name here is also importable from :mod:`cptune.data`.
"""

from __future__ import annotations

import importlib.util

from cptune.data import builtin
from cptune.data.builtin import BUILTIN_NAMES
from cptune.data.hub import HUB_DATASETS
from cptune.data.types import DATASET_DEFAULTS

BUILTIN_CATALOG: dict[str, dict] = {
    "rotten_tomatoes": {
        "size": 12752,
        "label_counts": {"negative": 5384, "positive": 7368},
        "examples_sha256": "0aefcc4077c07dddc7515ef29b37ef1b4d93a15f86bfbfbf5d829dc3ba4c50a1",
    },
    "subj": {
        "size": 18351,
        "label_counts": {"objective": 5599, "subjective": 12752},
        "examples_sha256": "1829ef6b9e65784b43369789178f32afc71951d5828b990a07b87dc6579f535c",
    },
    "movie_sentiment_5": {
        "size": 10603,
        "label_counts": {"terrible": 1057, "bad": 3764, "neutral": 1011, "good": 3768, "great": 1003},
        "examples_sha256": "d3e511c26952459aabbeaef29669ca30a80319a6ce1ed6e4a48b9a4e9d6a59e8",
    },
    "bbc_news": {
        "size": 2109,
        "label_counts": {"business": 503, "entertainment": 366, "politics": 400, "sport": 502, "tech": 338},
        "examples_sha256": "e8addab28c9223c5c1ed451999a21add56e99a2ffa0c19130e768b530deea8ec",
    },
    "reuters_r8": {
        "size": 7572,
        "label_counts": {
            "acq": 2278,
            "crude": 364,
            "earn": 3913,
            "grain": 51,
            "interest": 247,
            "money-fx": 274,
            "ship": 140,
            "trade": 305,
        },
        "examples_sha256": "21da444dc2318547ff09ddf519da6499277b3035e73e6c36dad046019abf5235",
    },
}
"""Each built-in's ``size``, ``label_counts`` (classes in dataset order) and ``examples_sha256``, as loaded from the
packages pinned in :mod:`cptune.data.builtin`."""


def _has_datasets() -> bool:
    try:
        return importlib.util.find_spec("datasets") is not None
    except ValueError:  # a module object without __spec__ already in sys.modules
        return True


def list_datasets(include_hub: bool = True) -> list[dict]:
    """Describe the built-in (and named hub) datasets, for ``cptune datasets``, without loading any.

    Sizes and classes come from :data:`BUILTIN_CATALOG`; a built-in whose files are missing is listed with ``size``
    None, ``available`` False and the install hint as ``note``.

    Args:
        include_hub: Also list the named hub datasets (``size`` None; ``available`` says whether ``datasets`` is
            installed). Any other hub id loads too; it is not listed.

    Returns:
        One dict per dataset: ``name``, ``source`` (``"builtin"`` or ``"hub"``), ``classes`` (class names),
        ``num_classes``, ``size`` (examples), ``examples_sha256`` (built-ins; else None), ``stand_in_for``,
        ``licence``, ``available``, ``note``, ``template`` and ``label_words``.
    """
    rows = []
    for name in BUILTIN_NAMES:
        template, words = DATASET_DEFAULTS[name]
        info, entry = builtin.BUILTIN_INFO[name], BUILTIN_CATALOG[name]
        try:
            builtin.check_installed(name)
        except FileNotFoundError as err:
            available, note = False, str(err)
        else:
            available, note = True, ""
        rows.append(
            {
                "name": name,
                "source": "builtin",
                "classes": list(entry["label_counts"]),
                "num_classes": len(entry["label_counts"]),
                "size": entry["size"] if available else None,
                "examples_sha256": entry["examples_sha256"],
                "stand_in_for": info["stand_in_for"],
                "licence": info["licence"],
                "available": available,
                "note": note,
                "template": template,
                "label_words": dict(words),
            }
        )
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
                    "examples_sha256": None,
                    "stand_in_for": None,
                    "licence": f"see the dataset card of {spec.repo}",
                    "available": has_datasets,
                    "note": "" if has_datasets else "needs `pip install datasets` and network access (or its cache)",
                    "template": template,
                    "label_words": dict(words),
                }
            )
    return rows
