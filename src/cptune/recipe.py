"""The CPT recipe: labelled examples -> context -> CPT model -> trained adapter, wired once.

Two settings objects describe a CPT run: :class:`cptune.CPTConfig` the adapter (PEFT's fields,
built from the context) and :class:`cptune.TrainSettings` the optimisation loop. A
:class:`CPTRecipe` holds what a run chooses of both: the projection radii and the loss decay
(which become CPTConfig fields) and the TrainSettings. :func:`cpt_model_for` and :func:`fit_cpt`
turn a recipe into a model and a trained model; :class:`cptune.CPTClassifier` (and through it the
demo and ``cptune train``) and the compare grid's ``cpt`` method all go through them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cptune.cpt.config import CPTConfig
from cptune.cpt.model import CPTModel, get_cpt_model
from cptune.text.context import Context, build_context, render_queries
from cptune.text.template import Template
from cptune.training import TrainResult, TrainSettings, train


def default_train_settings() -> TrainSettings:
    """40 AdamW steps, batch 4, lr 1e-3, linear decay: the main job's setting (see docs/results.md)."""
    return TrainSettings(steps=40, batch_size=4, lr=1e-3)


@dataclass(frozen=True)
class CPTRecipe:
    """How to build and train a CPT adapter (defaults: the authors' SST-2 demo; lr raised for 40 steps).

    Args:
        eps_input: projection radius epsilon of input-text tokens (authors: 0.2).
        eps_format: projection radius epsilon of template tokens (authors: 0.1).
        decay: loss decay factor gamma in (0, 1] (authors: 0.95); 1.0 weighs every label equally.
        loss_type: ``"decay"`` or ``"none"``.
        train: the optimisation loop (:func:`default_train_settings`).

    Raises:
        ValueError: a value :class:`CPTConfig` refuses, named.
    """

    eps_input: float = 0.2
    eps_format: float = 0.1
    decay: float = 0.95
    loss_type: str = "decay"
    train: TrainSettings = field(default_factory=default_train_settings)

    def __post_init__(self) -> None:
        CPTConfig(**self.config_fields())  # check the values before any model is loaded

    def config_fields(self) -> dict:
        """The :class:`CPTConfig` fields this recipe sets."""
        return {
            "opt_weighted_loss_type": self.loss_type,
            "opt_loss_decay_factor": self.decay,
            "opt_projection_epsilon": self.eps_input,
            "opt_projection_format_epsilon": self.eps_format,
        }

    def adapter_fields(self) -> dict:
        """The adapter part as plain values (a saved classifier's ``"cpt"`` entry)."""
        return {k: v for k, v in asdict(self).items() if k != "train"}


def cpt_model_for(base_model, context: Context, recipe: CPTRecipe, model_name: str | None = None) -> CPTModel:
    """A fresh CPT model (zero correction) on ``context`` with ``recipe``'s radii and loss."""
    config = context.to_config(tokenizer_name_or_path=model_name, **recipe.config_fields())
    return get_cpt_model(base_model, config)


def fit_cpt(
    base_model,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    template: Template,
    label_words: Mapping[str, str],
    recipe: CPTRecipe,
    model_name: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[CPTModel, TrainResult]:
    """The examples become the context's demonstrations and, each one, a training query (as the
    paper does with few examples); CPT trains the context with ``recipe.train``.

    Returns:
        The trained model and the training result (losses per step).
    """
    context = build_context(examples, template, tokenizer, label_words)
    model = cpt_model_for(base_model, context, recipe, model_name)
    queries = render_queries(examples, template, tokenizer, label_words)
    result = train(model, queries, recipe.train, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                   resume=resume, progress=progress, callback=callback)
    return model, result
