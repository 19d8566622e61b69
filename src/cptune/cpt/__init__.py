"""Context-aware Prompt Tuning as a PEFT-shaped package; imports nothing else from cptune.

Layers, each importing only the ones above it: ``roles`` (token roles, PEFT's packed codes) <- ``config``
(CPTConfig) <- ``projection`` and ``loss`` (pure functions) <- ``embedding`` (CPTEmbedding) <- ``engine``
(one context, many queries: the key/value cache) and ``saving`` (atomic writes, the manifest) <- ``files``
(adapter folders: PEFT's format plus resume state) and ``hub`` (repo ids to cached folders, uploads, the model
card; only huggingface_hub and the standard library) <- ``model`` (CPTModel, get_cpt_model, load_adapter).

The names below load on first use (PEP 562), as ``cptune``'s do: ``saving`` and ``hub`` import without
torch, so the command line checks output folders and repo ids before torch loads.
"""

from __future__ import annotations

import importlib

_PUBLIC = {  # name -> the module that defines it
    "CPTConfig": "cptune.cpt.config",
    "CPTEmbedding": "cptune.cpt.embedding",
    "CPTModel": "cptune.cpt.model",
    "CPTOutput": "cptune.cpt.model",
    "TokenRole": "cptune.cpt.roles",
    "get_cpt_model": "cptune.cpt.model",
    "load_adapter": "cptune.cpt.model",
    "read_config": "cptune.cpt.files",
    "read_training_state": "cptune.cpt.files",
    "save_adapter": "cptune.cpt.files",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cptune.cpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
