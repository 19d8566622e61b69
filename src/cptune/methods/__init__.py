"""Few-shot classification methods behind one interface: same data, same training queries, same scoring.

Six methods over a frozen causal LM (:data:`METHODS`, the default grid of ``cptune compare``) and two
over a sentence encoder (:data:`ENCODER_METHODS`, the ``setfit`` extra), each built by
:func:`make_method` and used as::

    method = make_method("cpt", base_model, tokenizer, template, label_words, MethodSettings())
    info = method.fit(shots)          # FitInfo: per-step training losses, seconds, trainable parameters
    scores = method.scores(texts)     # (n, C) label log-likelihoods, columns in label_words order

- ``zero-shot``: the query alone.
- ``icl``: the K demonstrations (rendered with the template) before the query; no training.
- ``cpt``: Context-aware Prompt Tuning, :mod:`cptune`'s own model and training loop.
- ``pt``: PEFT prompt tuning: a trained soft prompt before the query.
- ``ipt``: instruction prompt tuning: a trained soft prompt followed by the demonstrations.
- ``lora``: PEFT LoRA on a copy of the model; the query alone.
- ``setfit``: SetFit (Tunstall et al. 2022) on all-MiniLM-L6-v2; ignores the causal LM.
- ``embedding-lr``: logistic regression on all-MiniLM-L6-v2 embeddings; ignores the causal LM.

True few-shot: only the K labelled shots exist, so every trained method uses the shots themselves as
its training queries, rendered with the same template and label words. Every method scores through
:func:`cptune.scoring.score_texts` (full label sequence log-likelihood after the method's context),
so scoring is identical across the six; the encoder methods score with their classifier head
(log-probabilities over the labels; :mod:`cptune.methods.encoder`). The base model passed in is never
modified: not its weights, ``requires_grad`` flags, train/eval mode or the global random state.

The package, by layer: ``base`` (settings, the protocol, :class:`BaseMethod`, training helpers) <- ``icl``
(``zero-shot``, ``icl``), ``cpt``, ``peft`` (the PEFT baselines ``pt``, ``ipt``, ``lora``) and ``encoder``
(``setfit``, ``embedding-lr``) <- this module (:data:`METHODS`, :data:`ENCODER_METHODS`, :func:`make_method`).
"""

from __future__ import annotations

from collections.abc import Mapping

from cptune.methods.base import (
    IGNORE_INDEX,
    BaseMethod,
    FitInfo,
    Method,
    MethodSettings,
    frozen,
    label_batch,
    model_device,
    optimize,
)
from cptune.methods.cpt import CPT
from cptune.methods.encoder import EmbeddingLR, EncoderMethod, SetFit
from cptune.methods.icl import ICL, ZeroShot
from cptune.methods.peft import InstructionPromptTuning, LoRA, PromptTuning
from cptune.text.template import Template

METHODS = ("zero-shot", "icl", "cpt", "pt", "ipt", "lora")
"""The methods over a frozen causal LM; the default grid of ``cptune compare``."""
ENCODER_METHODS = ("setfit", "embedding-lr")
"""The sentence-encoder methods (the ``setfit`` extra); they ignore the causal LM, template and label-word text."""
ALL_METHODS = METHODS + ENCODER_METHODS
"""Names accepted by :func:`make_method`."""


def make_method(
    name: str,
    base_model,
    tokenizer,
    template: Template,
    label_words: Mapping[str, str],
    settings: MethodSettings | None = None,
) -> Method:
    """Build one of the :data:`ALL_METHODS` (the encoder methods ignore the causal LM and template).

    Args:
        name: one of :data:`ALL_METHODS`.
        base_model: a Hugging Face causal LM; never modified (``lora`` and the prompt-tuning methods
            train a deep copy).
        tokenizer: its tokenizer.
        template: how demonstrations and queries are written.
        label_words: label -> label word; its order is the column order of the scores.
        settings: the settings (``None``: :class:`MethodSettings` defaults).

    Returns:
        The method, unfitted (``zero-shot`` can score right away).

    Raises:
        ValueError: for an unknown name, bad settings or bad label words.
    """
    if name not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(ALL_METHODS)}")
    settings = MethodSettings() if settings is None else settings
    if not isinstance(settings, MethodSettings):
        raise ValueError(f"settings must be a MethodSettings; got {type(settings).__name__}")
    return _CLASSES[name](base_model, tokenizer, template, label_words, settings)


def settings_read(name: str) -> tuple[str, ...]:
    """The :class:`MethodSettings` fields that can change method ``name``'s scores, besides ``seed``
    (``cptune compare`` resumes a cell only when these match).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ALL_METHODS:
        raise ValueError(f"unknown method {name!r}; accepted: {', '.join(ALL_METHODS)}")
    return _CLASSES[name].settings_read


_CLASSES = {"zero-shot": ZeroShot, "icl": ICL, "cpt": CPT, "pt": PromptTuning, "ipt": InstructionPromptTuning,
            "lora": LoRA, "setfit": SetFit, "embedding-lr": EmbeddingLR}


__all__ = [
    "ALL_METHODS",
    "CPT",
    "ENCODER_METHODS",
    "ICL",
    "IGNORE_INDEX",
    "METHODS",
    "BaseMethod",
    "EmbeddingLR",
    "EncoderMethod",
    "FitInfo",
    "InstructionPromptTuning",
    "LoRA",
    "Method",
    "MethodSettings",
    "PromptTuning",
    "SetFit",
    "ZeroShot",
    "frozen",
    "label_batch",
    "make_method",
    "model_device",
    "optimize",
    "settings_read",
]
