"""cptune: Context-aware Prompt Tuning for few-shot classification with any Hugging Face causal LM."""

from cptune.classifier import CPTClassifier, CPTSettings
from cptune.config import CPTConfig
from cptune.context import Context, build_context, render_queries
from cptune.embedding import CPTEmbedding
from cptune.model import CPTModel, get_cpt_model
from cptune.roles import TokenRole
from cptune.template import Template
from cptune.training import TrainSettings, train

__version__ = "0.1.0"

__all__ = [
    "CPTClassifier",
    "CPTConfig",
    "CPTSettings",
    "CPTEmbedding",
    "CPTModel",
    "Context",
    "Template",
    "TokenRole",
    "TrainSettings",
    "build_context",
    "get_cpt_model",
    "render_queries",
    "train",
    "__version__",
]
