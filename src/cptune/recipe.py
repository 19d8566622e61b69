"""The CPT recipe: labelled examples -> context -> CPT model -> trained adapter, wired once.

Two settings objects describe a CPT run: :class:`cptune.CPTConfig` the adapter (PEFT's fields,
built from the context) and :class:`cptune.TrainSettings` the optimisation loop. A
:class:`CPTRecipe` holds what a run chooses of both: the projection radii and the loss decay
(which become CPTConfig fields) and the TrainSettings. :func:`cpt_model_for` and :func:`fit_cpt`
turn a recipe into a model and a trained model; :class:`cptune.CPTClassifier` (and through it the
demo and ``cptune train``) and the compare grid's ``cpt`` method all go through them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cptune.cpt.config import CPTConfig
from cptune.cpt.embedding import embedding_row_norms
from cptune.cpt.engine import max_positions
from cptune.cpt.model import CPTModel, get_cpt_model
from cptune.cpt.projection import (
    ABSOLUTE,
    RADIUS_MODES,
    REFERENCE_EMBEDDING_SCALE,
    RELATIVE,
    embedding_scale,
    relative_epsilon,
)
from cptune.reporting import notice, plural
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
        radius: ``"absolute"`` (default; PEFT's and the paper's radius ``eps * sqrt(d / 2048)``) or
            ``"relative"``: that radius times the model's embedding scale over SmolLM2-135M's
            (:func:`cptune.cpt.projection.relative_epsilon`), so the same epsilons move a model with
            larger embeddings (Gemma: about nine times) as far, relatively. Equal on SmolLM2-135M. Not
            the default: no dev study has yet shown it helps (benchmarks/grids/README.md).

    Raises:
        ValueError: a value :class:`CPTConfig` refuses, or an unknown radius mode, named.
    """

    eps_input: float = 0.2
    eps_format: float = 0.1
    decay: float = 0.95
    loss_type: str = "decay"
    train: TrainSettings = field(default_factory=default_train_settings)
    radius: str = ABSOLUTE

    def __post_init__(self) -> None:
        if self.radius not in RADIUS_MODES:
            raise ValueError(f"radius={self.radius!r} must be one of: {', '.join(RADIUS_MODES)}")
        CPTConfig(**self.config_fields(REFERENCE_EMBEDDING_SCALE))  # check the values before any model is loaded

    def config_fields(self, scale: float | None = None) -> dict:
        """The :class:`CPTConfig` fields this recipe sets.

        Args:
            scale: the model's embedding scale (:func:`model_embedding_scale`); read only with
                ``radius="relative"``, where the epsilons written are ``eps * scale / s_ref``
                (:func:`cptune.cpt.projection.relative_epsilon`), the values PEFT's formula turns into
                the relative radius.

        Raises:
            ValueError: ``radius="relative"`` and no scale.
        """
        eps_input, eps_format = self.eps_input, self.eps_format
        if self.radius == RELATIVE:
            if scale is None:
                raise ValueError("radius='relative' needs the model's embedding scale (model_embedding_scale)")
            eps_input, eps_format = relative_epsilon(eps_input, scale), relative_epsilon(eps_format, scale)
        return {
            "opt_weighted_loss_type": self.loss_type,
            "opt_loss_decay_factor": self.decay,
            "opt_projection_epsilon": eps_input,
            "opt_projection_format_epsilon": eps_format,
        }

    def adapter_fields(self) -> dict:
        """The adapter part as plain values (a saved classifier's ``"cpt"`` entry)."""
        return {k: v for k, v in asdict(self).items() if k != "train"}


def model_embedding_scale(base_model) -> float:
    """The embedding scale of ``base_model``: the median L2 norm of its input-embedding rows as the
    embedding module outputs them (:func:`cptune.cpt.projection.embedding_scale`)."""
    return embedding_scale(embedding_row_norms(base_model.get_input_embeddings()))


def cpt_model_for(base_model, context: Context, recipe: CPTRecipe, model_name: str | None = None) -> CPTModel:
    """A fresh CPT model (zero correction) on ``context`` with ``recipe``'s radii and loss.

    With ``recipe.radius == "relative"`` the config records the epsilons scaled to the model
    (:meth:`CPTRecipe.config_fields`), so the saved adapter holds the absolute radius PEFT applies.
    """
    scale = model_embedding_scale(base_model) if recipe.radius == RELATIVE else None
    values = recipe.config_fields(scale)
    if scale is not None:
        notice("relative radius: embedding scale %.4g (SmolLM2-135M: %.4g), epsilons %g/%g -> %.4g/%.4g "
               "(input/template)", scale, REFERENCE_EMBEDDING_SCALE, recipe.eps_input, recipe.eps_format,
               values["opt_projection_epsilon"], values["opt_projection_format_epsilon"])
    config = context.to_config(tokenizer_name_or_path=model_name, **values)
    return get_cpt_model(base_model, config)


def balanced_order(examples: Sequence[Any], seed: int) -> list:
    """Every example, in rounds of one per class: each class's examples shuffled with
    ``random.Random(seed)``, each round in a seeded random class order; a class that runs out leaves
    its turn to the others. Any prefix is as balanced as the counts allow and never sorted by class.

    Args:
        examples: ``(text, label)`` pairs or objects with ``.text`` and ``.label``.
        seed: the seed of the order.
    """
    rng = random.Random(seed)
    pools: dict[Hashable, list] = {}
    for ex in examples:
        pools.setdefault(ex.label if hasattr(ex, "label") else ex[1], []).append(ex)
    for pool in pools.values():
        rng.shuffle(pool)
    order: list = []
    while any(pools.values()):
        labels = [label for label in pools if pools[label]]
        rng.shuffle(labels)
        order.extend(pools[label].pop() for label in labels)
    return order


def context_examples(examples: Sequence[Any], size: int | None, seed: int) -> list:
    """The demonstrations of a ``size``-shot context drawn from labelled ``examples``.

    ``None`` (or a size equal to the number of examples) keeps every example, in the given order.
    Otherwise the first ``size`` of :func:`balanced_order` (balanced as far as the counts allow,
    never sorted by class).

    Args:
        examples: ``(text, label)`` pairs or objects with ``.text`` and ``.label``.
        size: demonstrations wanted, at least 1 and at most ``len(examples)``; ``None``: all.
        seed: the seed of the draw.

    Raises:
        ValueError: a size below 1 or above the number of examples.
    """
    examples = list(examples)
    if size is None or size == len(examples):
        return examples
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= len(examples):
        raise ValueError(f"context_size={size!r} must be an integer from 1 to the number of labelled examples "
                         f"({len(examples)}), or None for all of them")
    return balanced_order(examples, seed)[:size]


class ContextTooLongError(ValueError):
    """A context that, followed by the longest training query, needs more positions than the model has; its
    message names the Python argument, :meth:`message` another option (the command line's flag)."""

    def __init__(self, shots: int, context_tokens: int, longest_query: int, limit: int):
        self.shots, self.context_tokens, self.longest_query, self.limit = shots, context_tokens, longest_query, limit
        super().__init__(self.message("context_size="))

    def message(self, option: str) -> str:
        """The one-line error, naming ``option`` (``"context_size="`` or ``"--context-size"``) as the way out."""
        needed = self.context_tokens + self.longest_query
        return (f"the context of {plural(self.shots, 'demonstration')} is {self.context_tokens} tokens; with the "
                f"longest training query ({self.longest_query} tokens) it needs {needed} positions, more than the "
                f"model's {self.limit}; use a smaller context size ({option}) or shorter texts")


def check_context_fits(model_config, context: Context, queries: Mapping[str, Any], shots: int) -> None:
    """Refuse a context that, followed by the longest training query, needs more positions than the model
    (its config: :func:`cptune.cpt.engine.max_positions`) has.

    Raises:
        ContextTooLongError: naming the context's tokens, the longest query's and the model's limit.
    """
    limit = max_positions(model_config)
    longest = int(queries["attention_mask"].sum(dim=1).max())
    if limit is not None and len(context) + longest > limit:
        raise ContextTooLongError(shots, len(context), longest, limit)


def context_and_queries(
    model_config,
    tokenizer,
    examples: Sequence[tuple[str, Any]],
    template: Template,
    label_words: Mapping[str, str],
    context_size: int | None,
    seed: int,
) -> tuple[list, Context, dict]:
    """The demonstrations (:func:`context_examples`), their context and every example as a training query,
    checked to fit the model's positions; a tokenizer and the model's config suffice (no weights), so a
    command can check before it loads the model.

    Raises:
        ValueError: a bad ``context_size``.
        ContextTooLongError: see :func:`check_context_fits`.
    """
    demonstrations = context_examples(examples, context_size, seed)
    context = build_context(demonstrations, template, tokenizer, label_words)
    queries = render_queries(examples, template, tokenizer, label_words)
    check_context_fits(model_config, context, queries, len(demonstrations))
    return demonstrations, context, queries


def fit_cpt(
    base_model,
    tokenizer,
    examples: Sequence[tuple[str, Any]],
    template: Template,
    label_words: Mapping[str, str],
    recipe: CPTRecipe,
    model_name: str | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    context_size: int | None = None,
) -> tuple[CPTModel, TrainResult]:
    """Build the context from the examples and train CPT with ``recipe.train``, every example a
    training query (as the paper does).

    With ``context_size`` None every example is also a demonstration (the few-shot setting);
    with ``k``, :func:`context_examples` draws k balanced demonstrations (seeded by
    ``recipe.train.seed``) and all the examples, those k included, are the training queries.

    Returns:
        The trained model and the training result (losses per step).

    Raises:
        ValueError: a bad ``context_size``, or a context that does not fit the model's positions
            (:class:`ContextTooLongError`, :func:`check_context_fits`).
    """
    demonstrations, context, queries = context_and_queries(base_model.config, tokenizer, examples, template,
                                                           label_words, context_size, recipe.train.seed)
    notice("context: %s, %d tokens; %s", plural(len(demonstrations), "demonstration"), len(context),
           plural(len(examples), "training query", "training queries"))
    model = cpt_model_for(base_model, context, recipe, model_name)
    result = train(model, queries, recipe.train, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                   resume=resume, progress=progress, callback=callback)
    return model, result
