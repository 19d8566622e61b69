"""Choosing the template and label words from the labelled examples alone (``template="auto"``).

A small model's accuracy depends on how the text is written more than on the method: on SmolLM2-135M
and Rotten Tomatoes, ``Review: {x}\\nSentiment: {y}`` lifted zero-shot accuracy from 0.54 to 0.76
(docs/results.md). :func:`choose_template` tries every :data:`TEMPLATE_CATALOGUE` entry with each
label-word candidate (the words given, their lower-case and capitalised forms; the label names when
no words are given) and keeps the best by **two-fold cross-validated label log-likelihood** on the
labelled examples: the examples (a balanced, seeded subset of at most :data:`MAX_EXAMPLES`) are split
into two halves, each half becomes an ICL context for the other half's texts, and a candidate's score
is the mean log-probability of the true label among the labels (a softmax over their full-sequence
log-likelihoods). No test data is involved; the choice depends on the examples, the seed and the
budget only. Ties keep the earlier candidate, so the generic template wins when nothing is better.

The cost is bounded by ``budget``, in forward passes of the base model: candidates are scored in
catalogue order while their cost fits (each costs two context encodings plus the held-out queries,
8 per forward). With 8 examples and the default budget every candidate of a two-class task is
scored: on SmolLM2-135M on a 2-core CPU that is about 80 forward passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cptune import reporting
from cptune.balance import balance_inputs, collapsed_label, label_shares, strict_inputs
from cptune.recipe import CPTRecipe, balanced_order, context_examples, fit_cpt
from cptune.scoring import ContextScorer, score_texts
from cptune.text.context import build_context
from cptune.text.template import Template

AUTO = "auto"
"""The template value that asks for :func:`choose_template`."""

MAX_EXAMPLES = 16
"""Labelled examples the choice looks at (a balanced, seeded subset when there are more)."""

DEFAULT_BUDGET = 400
"""Forward passes the choice may spend (see the module docstring)."""

QUERIES_PER_FORWARD = 8

FINALIST_STEPS = 10
"""CPT steps each finalist of :func:`choose_finalist` trains before it is judged (a quarter of the
default 40: enough to show a context that CPT drives onto one label)."""

TEMPLATE_CATALOGUE: tuple[tuple[str, Template], ...] = (
    ("general", Template("input: {x} output: {y}")),
    ("general", Template("Text: {x}\nLabel: {y}", example_separator="\n\n")),
    ("general", Template("{x}\nAnswer: {y}", example_separator="\n\n")),
    ("sentiment", Template("Review: {x}\nSentiment: {y}", example_separator="\n\n")),
    ("sentiment", Template("{x}\nThe sentiment of this text is {y}", example_separator="\n\n")),
    ("topic", Template("Article: {x}\nTopic: {y}", example_separator="\n\n")),
    ("topic", Template("{x}\nThis text is about {y}", example_separator="\n\n")),
    ("subjectivity", Template("Sentence: {x}\nObjective or subjective: {y}", example_separator="\n\n")),
    ("question type", Template("Question: {x}\nAnswer type: {y}", example_separator="\n\n")),
)
"""The templates ``"auto"`` chooses from: general ones first (they win ties), then one or two per kind
of task (sentiment, topic, subjectivity, question type)."""


@dataclass
class TemplateChoice:
    """What :func:`choose_template` chose, and why.

    Attributes:
        template: the chosen template.
        label_words: the chosen ``{label: word}``.
        scores: one entry per candidate scored, in order: ``format``, ``words``, ``log_prob`` (mean
            held-out log-probability of the true label), ``accuracy`` (held-out), or ``skipped`` with
            the reason.
        examples: labelled examples the choice looked at.
        forward_passes: forward passes spent.
        seconds: wall time spent.
        finalists: what :func:`choose_finalist` measured of each finalist, in ICL order (empty
            when it did not run): ``format``, ``words``, ``log_prob``, ``collapsed``, ``top_share``,
            ``nll``, ``inputs``, ``seconds``.
        candidates: the scored candidates as ``(log_prob, template, words)``, in catalogue order
            (not saved: what :func:`choose_finalist` picks its finalists from).
    """

    template: Template
    label_words: dict[Any, str]
    scores: list[dict] = field(default_factory=list)
    examples: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    finalists: list[dict] = field(default_factory=list)
    candidates: list[tuple[float, Template, dict]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        """One line: the choice, its score, the runner-up and the cost."""
        scored = sorted((s for s in self.scores if "log_prob" in s), key=lambda s: -s["log_prob"])
        best = next((s for s in scored if s["format"] == self.template.format and s["words"] == self.words_text()),
                    None)
        runner = next((s for s in scored if s is not best), None)
        text = f"template {self.template.format!r} with words {self.words_text()}"
        if best is not None:
            text += f" (held-out log-prob {best['log_prob']:.3f}, accuracy {best['accuracy']:.2f}"
            if runner is None:
                text += ")"
            else:  # the same format with other words (their case) is told apart by its words
                words = f" with words {runner['words']}" if runner["format"] == self.template.format else ""
                text += f"; next {runner['format']!r}{words} {runner['log_prob']:.3f})"
        text = (f"{text}: {len(scored)} candidates on {self.examples} labelled examples, "
                f"{self.forward_passes} forward passes, {self.seconds:.1f} s")
        if self.finalists:
            won = next(f for f in self.finalists if f["format"] == self.template.format
                       and f["words"] == self.words_text())
            text += (f"; of {len(self.finalists)} finalists after {won['steps']} CPT steps each, the one "
                     f"{'collapsed' if won['collapsed'] else 'not collapsed'} with the lowest label NLL "
                     f"{won['nll']:.3f} ({next(iter(won['inputs']))})")
        return text

    def words_text(self) -> dict[str, str]:
        return {str(k): v for k, v in self.label_words.items()}

    def to_json(self) -> dict:
        """The record saved with a classifier and written into result rows."""
        return {"format": self.template.format, "example_separator": self.template.example_separator,
                "words": self.words_text(), "scores": self.scores, "examples": self.examples,
                "forward_passes": self.forward_passes, "seconds": round(self.seconds, 2),
                **({"finalists": self.finalists} if self.finalists else {})}


def word_candidates(label_words: Mapping[Any, str]) -> list[dict[Any, str]]:
    """The words given, then their lower-case and their capitalised forms (each once, in that order)."""
    out: list[dict[Any, str]] = []
    for change in (str, str.lower, str.capitalize):
        words = {label: change(word) for label, word in label_words.items()}
        if words not in out:
            out.append(words)
    return out


def halves(examples: list, seed: int) -> tuple[list, list]:
    """Two halves of the first :data:`MAX_EXAMPLES` of the balanced, seeded order: each class's examples
    go to the halves in turn (a class with an odd count gives its extra one to alternate halves), so
    each half holds every class that has two examples, in mixed order."""
    ordered = balanced_order(examples, seed)[:MAX_EXAMPLES]
    first_seen: dict[Any, int] = {}
    out: tuple[list, list] = ([], [])
    for text, label in ordered:
        turn = first_seen.setdefault(label, len(first_seen))  # classes start on alternate halves
        out[turn % 2].append((text, label))
        first_seen[label] = turn + 1
    return out


def _cost(context_size: int, queries: int) -> int:
    return 1 + math.ceil(queries / QUERIES_PER_FORWARD) if context_size else 0


@torch.no_grad()
def _held_out(base_model, tokenizer, template: Template, words: dict[Any, str], context: list, queries: list,
              labels: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of every label for ``queries`` after an ICL context of ``context``, and the gold index."""
    keyed = {str(label): word for label, word in words.items()}
    ctx = build_context(context, template, tokenizer, keyed)
    table = base_model.get_input_embeddings()
    embeds = table(ctx.token_ids.unsqueeze(0).to(table.weight.device))  # (1, N, d)
    scores = score_texts(base_model, tokenizer, template, keyed, [t for t, _ in queries], embeds,
                         batch_size=QUERIES_PER_FORWARD)
    gold = torch.tensor([labels.index(label) for _, label in queries])
    return torch.log_softmax(scores.float().cpu(), dim=-1), gold


def held_out_log_probs(base_model, tokenizer, template: Template, words: Mapping[Any, str],
                       parts: tuple[list, list]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-fold held-out label log-probabilities of one candidate: each of ``parts`` (the :func:`halves`)
    is the ICL context of the other's texts.

    Returns:
        ``(log_probs, gold)``: a ``(queries, labels)`` log-softmax over the labels of ``words`` (in their
        order) for the second half's texts then the first's, and each query's gold label index.

    Raises:
        ValueError: words that tokenize alike, or a context longer than the model takes.
    """
    labels = list(words)
    scored = [_held_out(base_model, tokenizer, template, dict(words), ctx, queries, labels)
              for ctx, queries in ((parts[0], parts[1]), (parts[1], parts[0])) if ctx and queries]
    return torch.cat([lp for lp, _ in scored]), torch.cat([g for _, g in scored])


def choose_template(
    base_model,
    tokenizer,
    examples: Sequence[tuple[str, Any]],
    label_words: Mapping[Any, str],
    seed: int = 0,
    budget: int = DEFAULT_BUDGET,
    catalogue: Sequence[tuple[str, Template]] = TEMPLATE_CATALOGUE,
) -> TemplateChoice:
    """The template and label words that predict the labelled examples best (see the module docstring).

    Args:
        base_model: the frozen causal LM.
        tokenizer: its tokenizer.
        examples: labelled ``(text, label)`` pairs: the only data the choice sees.
        label_words: ``{label: word}`` to start from (its case variants are candidates too).
        seed: the seed of the subset and of the halves.
        budget: forward passes the choice may spend; candidates beyond it are not scored.
        catalogue: ``(kind, Template)`` pairs to choose from.

    Returns:
        The :class:`TemplateChoice`. With fewer than two examples nothing can be held out: the
        first catalogue template and the given words, unscored.

    Raises:
        ValueError: a budget below 0 or an empty catalogue.
    """
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget={budget!r} must be a number of forward passes >= 0")
    if not catalogue:
        raise ValueError("the template catalogue is empty")
    start = time.perf_counter()
    examples = [(text, label) for text, label in examples]
    first = catalogue[0][1]
    if len(examples) < 2:
        return TemplateChoice(first, dict(label_words), examples=len(examples))
    half_a, half_b = halves(examples, seed)
    cost = _cost(len(half_a), len(half_b)) + _cost(len(half_b), len(half_a))
    spent = 0
    best: tuple[float, Template, dict] | None = None
    ranked: list[tuple[float, Template, dict]] = []  # the scored candidates, in catalogue order
    scores: list[dict] = []
    candidates = [(kind, template, words) for kind, template in catalogue for words in word_candidates(label_words)]
    with reporting.progress(len(candidates), "choose template", unit="candidate") as bar:
        for kind, template, words in candidates:
            entry = {"kind": kind, "format": template.format, "words": {str(k): v for k, v in words.items()}}
            scores.append(entry)
            if spent + cost > budget:  # (the bar jumps past the candidates left unscored)
                bar.update(1)
                entry["skipped"] = f"over the budget of {budget} forward passes"
                continue
            try:
                log_probs, gold = held_out_log_probs(base_model, tokenizer, template, words, (half_a, half_b))
            except ValueError as err:  # words that tokenize alike, a context longer than the model
                entry["skipped"] = str(err).splitlines()[0]
                continue
            finally:
                bar.update(1)
            spent += cost
            entry["log_prob"] = round(float(log_probs.gather(1, gold[:, None]).mean()), 4)
            entry["accuracy"] = round(float((log_probs.argmax(dim=1) == gold).float().mean()), 4)
            ranked.append((entry["log_prob"], template, dict(words)))
            if best is None or entry["log_prob"] > best[0]:
                best = ranked[-1]
    if best is None:  # nothing fitted the budget: the generic template, unscored
        return TemplateChoice(first, dict(label_words), scores, len(half_a) + len(half_b), spent,
                              time.perf_counter() - start)
    return TemplateChoice(best[1], dict(best[2]), scores, len(half_a) + len(half_b), spent,
                          time.perf_counter() - start, candidates=ranked)


def choose_finalist(
    base_model,
    tokenizer,
    examples: Sequence[tuple[str, Any]],
    choice: TemplateChoice,
    recipe: CPTRecipe,
    finalists: int,
    context_size: int | None = None,
    unlabeled: Sequence[str] = (),
    steps: int = FINALIST_STEPS,
    length_normalize: bool = False,
    calibrate: bool = False,
) -> TemplateChoice:
    """Choose among the best ``finalists`` candidates of ``choice`` by what a few CPT steps do with them.

    The ICL score of :func:`choose_template` does not see what CPT does to a candidate: a context
    that ICL predicts well can be trained onto one label. Each finalist (the best ``finalists`` by
    held-out ICL log-probability, ties in catalogue order) is trained for ``steps`` CPT steps with
    ``recipe`` on the fit's context demonstrations (:func:`cptune.recipe.context_examples`), those
    demonstrations its only training queries, so that the rows outside the context stay held out.
    Then the inputs of the balance guard (:func:`cptune.balance.balance_inputs`: the rows outside
    the context, else the training rows, which is optimistic; the content-free inputs; ``unlabeled``)
    are scored after its learned context, and the finalist is judged by, in this order:

    1. collapsed or not (:func:`cptune.balance.collapsed_label` of its predictions on those inputs
       against each label's share of ``examples``): a collapsed finalist loses to any other;
    2. the mean negative log-probability of the true label over the labelled rows among those inputs.

    Ties keep the better ICL score. With ``finalists`` below 2 or fewer than two scored candidates,
    ``choice`` is returned unchanged.

    Args:
        base_model, tokenizer: the frozen causal LM and its tokenizer.
        examples: every labelled ``(text, label)`` row of the fit.
        choice: :func:`choose_template`'s result on them.
        recipe: the fit's recipe; its ``train.steps`` is replaced by ``steps``.
        finalists: how many of the best candidates to train.
        context_size: the fit's context size (``None``: every row is a demonstration).
        unlabeled: texts without labels, scored with the others.
        steps: CPT steps per finalist.
        length_normalize, calibrate: scored as the classifier will score.

    Returns:
        ``choice`` with the winner's template and words, and :attr:`TemplateChoice.finalists`.

    Raises:
        ValueError: ``finalists`` or ``steps`` not an integer of at least 0 and 1.
    """
    if not isinstance(finalists, int) or isinstance(finalists, bool) or finalists < 0:
        raise ValueError(f"finalists={finalists!r} must be an integer >= 0 (0: the ICL choice alone)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    ranked = sorted(choice.candidates, key=lambda c: -c[0])[:finalists]  # sorted() is stable: ties keep order
    if finalists < 2 or len(ranked) < 2:
        return choice
    start = time.perf_counter()
    examples = list(examples)
    demonstrations = context_examples(examples, context_size, recipe.train.seed)
    short = replace(recipe, train=replace(recipe.train, steps=steps))
    records, best = [], None
    with reporting.progress(len(ranked), "finalists", unit="finalist") as bar:
        for log_prob, template, words in ranked:
            began = time.perf_counter()
            keyed = {str(label): word for label, word in words.items()}
            with reporting.quiet():  # one line for the whole step, not a context line per finalist
                model, _ = fit_cpt(base_model, tokenizer, demonstrations, template, keyed, short)
            inputs, labelled = balance_inputs(examples, demonstrations, unlabeled, seed=recipe.train.seed)
            labels = list(words)
            with torch.no_grad():
                scorer = ContextScorer(base_model, tokenizer, template, keyed, model.context_embeddings(),
                                       length_normalize=length_normalize, calibrate=calibrate)
            texts = [text for group in inputs.values() for text in group]
            scores = torch.log_softmax(scorer.scores(scorer.query_ids(texts)).float().cpu(), dim=-1)  # (n, C)
            gold = torch.tensor([labels.index(label) for _, label in labelled])  # the first len(labelled) texts
            nll = float(-scores[: len(labelled)].gather(1, gold[:, None]).mean())
            predicted = scores.argmax(dim=-1).tolist()
            reference = label_shares([labels.index(label) for _, label in examples], len(labels))
            collapsed = collapsed_label(predicted, reference, strict_inputs(inputs)) is not None
            records.append({"format": template.format, "words": keyed, "log_prob": log_prob, "steps": steps,
                            "collapsed": collapsed, "top_share": round(max(label_shares(predicted, len(labels))), 4),
                            "nll": round(nll, 4), "inputs": {kind: len(group) for kind, group in inputs.items()},
                            "seconds": round(time.perf_counter() - began, 1)})
            if best is None or (collapsed, nll) < best[0]:
                best = ((collapsed, nll), template, words)
            bar.update(1)
    return replace(choice, template=best[1], label_words=dict(best[2]), finalists=records,
                   seconds=choice.seconds + time.perf_counter() - start)
