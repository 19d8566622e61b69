"""Labelled examples -> token ids and roles: the template (``template``) and the context and queries (``context``).

The names below load on first use (PEP 562): ``cptune.text.template`` imports without torch, so the command
line checks a template before torch loads.
"""

from __future__ import annotations

import importlib

_PUBLIC = {  # name -> the module that defines it
    "Context": "cptune.text.context",
    "Template": "cptune.text.template",
    "build_context": "cptune.text.context",
    "render_queries": "cptune.text.context",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'cptune.text' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
