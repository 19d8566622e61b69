"""Choosing how far to train from the labelled rows outside the context (``CPTClassifier(choose_steps=True)``).

With N labelled rows and a k-row context (k < N), every row is a training query, and the schedule's
length (40 steps by default) is a guess made on other data: on Gemma 3 270M, Rotten Tomatoes at 8
shots reached 0.840 dev accuracy after 10 steps and 0.807 after 40 (benchmarks/grids/issue24/radius).
:func:`choose_steps` asks the rows outside the context instead, by two-fold cross-validation:

1. The context's demonstrations stay the fit's (:func:`cptune.recipe.context_examples`); the rows
   outside it are dealt into :data:`FOLDS` folds, each label's rows in turn (so each fold is as
   balanced as the labelled data).
2. For each fold, CPT trains on the same context with every other row as a query (the
   demonstrations and the other folds), for the whole schedule; the fold's rows are scored, as the
   classifier will score them, before the first step and at each of :data:`STEP_FRACTIONS` of the
   schedule (``0``: the ICL context, untouched).
3. The chosen number of steps has the best held-out accuracy pooled over the folds (ties: the lower
   mean negative log-probability of the true label, then the earlier step). The fit then trains on
   every row for that many steps of the same schedule (``TrainSettings(steps=s, schedule_steps=S)``:
   exactly a full run's first s steps), so the learning rate each step sees is the one measured.

The cost is :data:`FOLDS` extra trainings of the whole schedule (each on fewer queries) and the
held-out scoring. Nothing is chosen with fewer than :data:`MIN_HELD_OUT` rows outside the context:
the schedule's full length is kept and :attr:`StepsChoice.reason` says why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from cptune import reporting
from cptune.recipe import CPTRecipe, context_examples, cpt_model_for
from cptune.scoring import ContextScorer
from cptune.text.context import build_context, render_queries
from cptune.text.template import Template
from cptune.training import TrainSettings, train

FOLDS = 2
"""Folds the rows outside the context are dealt into."""

MIN_HELD_OUT = 8
"""Rows outside the context needed to choose (four per fold): with fewer, one row moves the held-out
accuracy by more than an eighth and the full schedule is kept."""

STEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Where in the schedule the held-out rows are scored: before the first step (ICL), each quarter."""


@dataclass
class StepsChoice:
    """What :func:`choose_steps` measured and chose.

    Attributes:
        steps: the steps chosen (from 0, the context untouched, to :attr:`schedule_steps`).
        schedule_steps: the schedule's full length.
        held_out: rows outside the context that were scored (0 when nothing was chosen).
        candidates: one entry per step scored: ``steps``, ``accuracy`` and ``nll`` (mean negative
            log-probability of the true label), pooled over the folds.
        reason: why nothing was chosen (``None`` when something was).
        seconds: wall time spent.
    """

    steps: int
    schedule_steps: int
    held_out: int = 0
    candidates: list[dict] = field(default_factory=list)
    reason: str | None = None
    seconds: float = 0.0

    def settings(self, train: TrainSettings) -> TrainSettings:
        """``train`` stopped after the chosen steps of its schedule (unchanged when it runs the whole)."""
        if self.steps == self.schedule_steps:
            return train
        return replace(train, steps=self.steps, epochs=None, schedule_steps=self.schedule_steps)

    def summary(self) -> str:
        """One line: the choice, its held-out accuracy against the full schedule's, and the cost."""
        if self.reason is not None:
            return f"{reporting.plural(self.steps, 'CPT step')} ({self.reason})"
        chosen = next(c for c in self.candidates if c["steps"] == self.steps)
        full = next(c for c in self.candidates if c["steps"] == self.schedule_steps)
        return (f"{self.steps} of {reporting.plural(self.schedule_steps, 'CPT step')} by {FOLDS}-fold "
                f"cross-validation on {reporting.plural(self.held_out, 'row')} outside the context (held-out "
                f"accuracy {chosen['accuracy']:.3f}, {full['accuracy']:.3f} after all {self.schedule_steps}; "
                f"{self.seconds:.1f} s)")

    def to_json(self) -> dict:
        """The record saved with a classifier."""
        return asdict(self) | {"seconds": round(self.seconds, 2)}


def deal_folds(rows: Sequence[tuple[str, Any]], folds: int, seed: int) -> list[list[tuple[str, Any]]]:
    """``rows`` dealt into ``folds`` folds: each label's rows, shuffled with ``seed``, go to the folds in
    turn, each label starting one fold after the previous label, so every fold is as balanced as the
    counts allow and no fold is short of more than one row.

    Raises:
        ValueError: ``folds`` below 2.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ValueError(f"folds={folds!r} must be an integer >= 2")
    generator = torch.Generator().manual_seed(seed)
    by_label: dict[Any, list[tuple[str, Any]]] = {}
    for row in rows:
        by_label.setdefault(row[1], []).append(row)
    out: list[list[tuple[str, Any]]] = [[] for _ in range(folds)]
    turn = 0
    for group in by_label.values():
        for index in torch.randperm(len(group), generator=generator).tolist():
            out[turn % folds].append(group[index])
            turn += 1
    return out


def step_candidates(schedule_steps: int) -> list[int]:
    """The steps scored: :data:`STEP_FRACTIONS` of the schedule, rounded, each once, in order."""
    return sorted({round(fraction * schedule_steps) for fraction in STEP_FRACTIONS})


def choose_steps(
    base_model,
    tokenizer,
    examples: Sequence[tuple[str, Any]],
    template: Template,
    label_words: Mapping[str, str],
    recipe: CPTRecipe,
    context_size: int | None,
    length_normalize: bool = False,
    calibrate: bool = False,
    batch_size: int = 8,
) -> StepsChoice:
    """How many of ``recipe.train``'s steps the fit should train (see the module docstring).

    Args:
        base_model, tokenizer: the frozen causal LM and its tokenizer.
        examples: every labelled ``(text, label)`` row of the fit.
        template: the fit's template.
        label_words: the fit's ``{str(label): word}``, in label order.
        recipe: the fit's recipe (its schedule is the one cut).
        context_size: the fit's context size (``None``: every row is a demonstration, nothing is
            held out and the full schedule is kept).
        length_normalize, calibrate: scored as the classifier will score.
        batch_size: held-out texts per forward.

    Returns:
        The :class:`StepsChoice`.
    """
    start = time.perf_counter()
    examples = list(examples)
    schedule = recipe.train.total_steps(len(examples))
    if recipe.train.schedule_steps is not None:
        return StepsChoice(schedule, schedule, reason="as given: the settings already stop early in their schedule")
    demonstrations = context_examples(examples, context_size, recipe.train.seed)
    taken = {id(row) for row in demonstrations}  # the same objects context_examples returns
    rest = [row for row in examples if id(row) not in taken]
    if len(rest) < MIN_HELD_OUT:
        return StepsChoice(schedule, schedule, reason=(
            f"the full schedule: {reporting.plural(len(rest), 'row')} outside the context, "
            f"cross-validation needs {MIN_HELD_OUT}"))
    keyed = {str(label): word for label, word in label_words.items()}
    labels = list(keyed)
    candidates = step_candidates(schedule)
    full = replace(recipe, train=replace(recipe.train, steps=schedule, epochs=None, schedule_steps=None))
    context = build_context(demonstrations, template, tokenizer, keyed)
    folds = deal_folds(rest, FOLDS, recipe.train.seed)
    scored: dict[int, list[torch.Tensor]] = {step: [] for step in candidates}  # step -> per fold (n, C)
    gold: list[int] = []
    with reporting.progress(FOLDS * schedule, "choose steps", unit="step") as bar:
        for index, held in enumerate(folds):
            train_rows = demonstrations + [row for other, fold in enumerate(folds) if other != index for row in fold]
            queries = render_queries(train_rows, template, tokenizer, keyed)
            model = cpt_model_for(base_model, context, full)
            texts = [text for text, _ in held]
            gold += [labels.index(str(label)) for _, label in held]

            def score(step: int, _loss: float = 0.0, model=model, texts=texts) -> None:
                bar.update(1 if step else 0)
                if step in scored:
                    with torch.no_grad():
                        scorer = ContextScorer(base_model, tokenizer, template, keyed,
                                               model.context_embeddings().detach(), batch_size=batch_size,
                                               length_normalize=length_normalize, calibrate=calibrate)
                        scored[step].append(torch.log_softmax(scorer.scores(scorer.query_ids(texts)).float().cpu(),
                                                              dim=-1))

            score(0)
            train(model, queries, full.train, progress=False, callback=score)
    target = torch.tensor(gold)
    table = []
    for step in candidates:
        log_probs = torch.cat(scored[step])  # (held-out rows, C), the folds in order
        table.append({"steps": step,
                      "accuracy": round(float((log_probs.argmax(dim=-1) == target).float().mean()), 4),
                      "nll": round(float(-log_probs.gather(1, target[:, None]).mean()), 4)})
    best = max(table, key=lambda c: (c["accuracy"], -c["nll"], -c["steps"]))
    return StepsChoice(best["steps"], schedule, len(rest), table, seconds=time.perf_counter() - start)
