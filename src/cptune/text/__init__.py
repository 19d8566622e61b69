"""Labelled examples -> token ids and roles: the template (``template``) and the context and queries (``context``)."""

from cptune.text.context import Context, build_context, render_queries
from cptune.text.template import Template

__all__ = ["Context", "Template", "build_context", "render_queries"]
