"""cptune: Context-aware Prompt Tuning for few-shot classification with any Hugging Face causal LM.

The public names below load on first use (PEP 562), so ``import cptune`` and the ``cptune`` command
start without importing torch and transformers (seconds of CPU time); ``from cptune import
CPTClassifier`` imports them then.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_PUBLIC = {  # name -> the module that defines it
    "CPTClassifier": "cptune.app.classifier",
    "CPTConfig": "cptune.cpt.config",
    "CPTEmbedding": "cptune.cpt.embedding",
    "CPTModel": "cptune.cpt.model",
    "get_cpt_model": "cptune.cpt.model",
    "TokenRole": "cptune.cpt.roles",
    "MethodSettings": "cptune.methods",
    "CPTRecipe": "cptune.recipe",
    "fit_cpt": "cptune.recipe",
    "Context": "cptune.text.context",
    "build_context": "cptune.text.context",
    "render_queries": "cptune.text.context",
    "Template": "cptune.text.template",
    "TrainSettings": "cptune.training",
    "train": "cptune.training",
    "load_model": "cptune.models",
    "load_dataset": "cptune.data",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cptune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
