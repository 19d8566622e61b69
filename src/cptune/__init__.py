"""cptune: Context-aware Prompt Tuning for few-shot classification with any Hugging Face causal LM."""

from cptune.app.classifier import CPTClassifier
from cptune.cpt.config import CPTConfig
from cptune.cpt.embedding import CPTEmbedding
from cptune.cpt.model import CPTModel, get_cpt_model
from cptune.cpt.roles import TokenRole
from cptune.methods import MethodSettings
from cptune.recipe import CPTRecipe, fit_cpt
from cptune.text.context import Context, build_context, render_queries
from cptune.text.template import Template
from cptune.training import TrainSettings, train

__version__ = "0.1.0"

__all__ = [
    "CPTClassifier",
    "CPTConfig",
    "CPTRecipe",
    "CPTEmbedding",
    "CPTModel",
    "MethodSettings",
    "Context",
    "Template",
    "TokenRole",
    "TrainSettings",
    "build_context",
    "fit_cpt",
    "get_cpt_model",
    "render_queries",
    "train",
    "__version__",
]
