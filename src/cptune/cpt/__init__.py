"""Context-aware Prompt Tuning as a PEFT-shaped package; imports nothing else from cptune.

Layers, each importing only the ones above it: ``roles`` (token roles, PEFT's packed codes) <- ``config``
(CPTConfig) <- ``projection`` and ``loss`` (pure functions) <- ``embedding`` (CPTEmbedding) <- ``engine``
(one context, many queries: the key/value cache) and ``saving`` (atomic writes, the manifest) <- ``files``
(adapter folders: PEFT's format plus resume state) and ``hub`` (repo ids to cached folders, uploads, the model
card; only huggingface_hub and the standard library) <- ``model`` (CPTModel, get_cpt_model, load_adapter).
"""

from cptune.cpt.config import CPTConfig
from cptune.cpt.embedding import CPTEmbedding
from cptune.cpt.files import read_config, read_training_state, save_adapter
from cptune.cpt.model import CPTModel, CPTOutput, get_cpt_model, load_adapter
from cptune.cpt.roles import TokenRole

__all__ = [
    "CPTConfig",
    "CPTEmbedding",
    "CPTModel",
    "CPTOutput",
    "TokenRole",
    "get_cpt_model",
    "load_adapter",
    "read_config",
    "read_training_state",
    "save_adapter",
]
