"""The label balance of a fitted classifier, and the guard against a collapse onto one label.

A CPT context can give one label to nearly every text (docs/results.md: 284-299 of 300 SUBJ test
texts ``subjective`` in 3 of 5 four-shot cells). :func:`check_balance` scores the inputs a fit may
look at (labelled rows outside the context, else the training rows themselves and domain-context
inputs, :func:`domain_texts`; the content-free inputs; unlabeled texts the user gives), compares the
most-predicted label's share with the share that label has in the labelled data
(:func:`collapsed_label`, limit :func:`collapse_limit`) and, on a collapse, removes the label bias
measured on those same inputs (batch calibration, :func:`cptune.scoring.label_bias`), then measures
again.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from cptune.scoring import CONTENT_FREE_TEXTS, ContextScorer, label_bias, remove_label_bias

COLLAPSE_FACTOR = 2.0
"""A label predicted more than this many times as often as it is labelled has taken over (with more
than two balanced classes: more than twice the balanced share)."""


def collapse_limit(share: float, strict: bool = False) -> float:
    """The largest share of predictions a label may take before it counts as a collapse.

    ``limit(s) = min(COLLAPSE_FACTOR * s, (1 + s) / 2)`` for a label with share ``s`` of the
    labelled rows: halfway from ``s`` to all texts, and never more than twice ``s``. Balanced two
    classes: 0.75; three: 2/3; C >= 3 balanced classes: 2/C (the goals of issue 24).

    ``strict``: ``limit(limit(s))``, for inputs that are mostly domain-context random words, weaker
    evidence than real texts (balanced two classes: 0.875; five: 0.7).
    """
    limit = min(COLLAPSE_FACTOR * share, (1.0 + share) / 2.0)
    return collapse_limit(limit) if strict else limit


def label_shares(labels: Sequence[int], num_labels: int) -> list[float]:
    """The share of each label index ``0 .. num_labels - 1`` among ``labels`` (all zero for none)."""
    counts = [0] * num_labels
    for label in labels:
        counts[label] += 1
    return [count / max(len(labels), 1) for count in counts]


def collapsed_label(predicted: Sequence[int], reference_shares: Sequence[float], strict: bool = False) -> int | None:
    """The most-predicted label index when its share exceeds :func:`collapse_limit` (``strict`` as
    there) of its share in ``reference_shares`` (the labelled data's), else ``None`` (also for no
    prediction)."""
    if not predicted:
        return None
    shares = label_shares(predicted, len(reference_shares))
    top = max(range(len(shares)), key=shares.__getitem__)
    return top if shares[top] > collapse_limit(reference_shares[top], strict) else None


SHARE_NOTE_TEXTS = 20
"""The fewest texts a labelling run must have classified before :func:`share_note` reads their shares."""


def share_note(counts: Sequence[int], classes: Sequence[Any], reference_shares: Sequence[float] | None) -> str | None:
    """The line to show after labelling texts when one label took more of them than its collapse limit.

    A fit's guard sees only the inputs it has; the texts a user labels are the first real evidence of a
    collapse that it missed (docs/results.md, "issue 24: the final grid"). ``counts``: texts given each
    label, in ``classes`` order; ``reference_shares``: each label's share of the labelled rows (the
    balance record's), ``None`` when unknown (balanced classes assumed). ``None`` (no line) with fewer than
    :data:`SHARE_NOTE_TEXTS` texts or no label past its limit.
    """
    total = sum(counts)
    if total < SHARE_NOTE_TEXTS or not counts:
        return None
    reference = list(reference_shares) if reference_shares is not None else [1 / len(counts)] * len(counts)
    top = max(range(len(counts)), key=counts.__getitem__)
    share = counts[top] / total
    if share <= collapse_limit(reference[top]):
        return None
    return (f"{classes[top]!r} was given to {share:.0%} of these {total} texts, against its {reference[top]:.0%} "
            f"of the labelled rows; unless the texts are mostly {classes[top]!r}, the classifier leans on one "
            "label: check it with `cptune eval` on labelled texts like these")


def strict_inputs(inputs: Mapping[str, Sequence[str]]) -> bool:
    """Whether a check of ``inputs`` uses the strict limit: it has domain-context inputs (so no
    held-out labelled rows; :func:`balance_inputs`)."""
    return bool(inputs.get(DOMAIN))


BIAS_SCALES = tuple(i / 20 for i in range(1, 21))
"""The shares of the measured label bias a correction may remove, tried smallest first."""

HELD_OUT = "held-out labelled rows"
TRAINING_ROWS = "training rows (in the context: optimistic)"
DOMAIN = "domain-context"
DOMAIN_TEXTS = 20
"""Domain-context inputs a balance check adds when every labelled row is in the context."""


def domain_texts(texts: Sequence[str], count: int = DOMAIN_TEXTS, seed: int = 0) -> list[str]:
    """``count`` domain-context inputs (Fei et al. 2023): random words of ``texts``, each input as
    many words as the texts' mean length.

    Words are drawn with replacement from every word occurrence of ``texts`` (so frequent words come
    often), with ``random.Random(seed)``: the same texts and seed give the same inputs. Scored after a
    context, they carry the domain's words without a label's meaning, so what the context predicts
    for them is its label bias in this domain. Empty for texts without words.
    """
    words = [word for text in texts for word in text.split()]
    if not words or count <= 0:
        return []
    length = max(1, round(len(words) / len(texts)))
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=length)) for _ in range(count)]


def balance_inputs(
    examples: Sequence[tuple[str, Any]], context: Sequence[tuple[str, Any]], unlabeled: Sequence[str] = (),
    seed: int = 0,
) -> tuple[dict[str, list[str]], list[tuple[str, Any]]]:
    """The inputs a balance check scores, and the labelled rows among them.

    Args:
        examples: every labelled ``(text, label)`` row of the fit.
        context: the rows of ``examples`` (the same objects) that are the context's demonstrations.
        unlabeled: texts without labels the user gave.
        seed: the seed of the domain-context inputs.

    Returns:
        ``({kind: texts}, labelled)``: the labelled rows outside the context (:data:`HELD_OUT`) or, with
        none, every row (:data:`TRAINING_ROWS`: optimistic, they are in the context) and
        :data:`DOMAIN_TEXTS` domain-context inputs made from the labelled and unlabeled texts
        (:func:`domain_texts`), then the content-free inputs and the unlabeled texts; ``labelled`` is
        the first group's ``(text, label)`` rows.
    """
    in_context = {id(row) for row in context}
    held_out = [row for row in examples if id(row) not in in_context]
    labelled = held_out if held_out else list(examples)
    inputs = {HELD_OUT if held_out else TRAINING_ROWS: [text for text, _ in labelled]}
    if not held_out:  # rows the context holds look balanced to it: add inputs it has not seen
        inputs[DOMAIN] = domain_texts([text for text, _ in examples] + list(unlabeled), seed=seed)
    inputs |= {"content-free": list(CONTENT_FREE_TEXTS), "unlabeled": list(unlabeled)}
    return inputs, labelled


@dataclass(frozen=True)
class BalanceCheck:
    """What :func:`check_balance` measured (saved with a classifier as ``"balance"``).

    Args:
        inputs: how many inputs of each kind were scored (``{kind: count}``).
        reference_shares: each label's share of the labelled rows.
        shares: each label's share of the predictions on the inputs, as fitted.
        corrected_shares: the same after removing :attr:`bias`; ``None`` when nothing was removed.
        bias: the ``(C,)`` label bias removed: ``scale`` times :func:`cptune.scoring.label_bias` of the
            inputs' scores; ``None`` when the fit was not collapsed.
        strict: whether the strict limit decided the collapse (:func:`strict_inputs`).
        scale: the share of the inputs' label bias removed (:data:`BIAS_SCALES`); ``None`` with no correction.
    """

    inputs: dict[str, int]
    reference_shares: list[float]
    shares: list[float]
    corrected_shares: list[float] | None = None
    bias: list[float] | None = None
    strict: bool = False
    scale: float | None = None

    @property
    def still_collapsed(self) -> bool:
        """Whether the predictions still collapse onto one label: after the correction, past the
        ordinary limit (its target); without one, past the limit that decided (never, by construction)."""
        final, strict = (self.corrected_shares, False) if self.corrected_shares is not None else (self.shares,
                                                                                                   self.strict)
        top = max(range(len(final)), key=final.__getitem__)
        return final[top] > collapse_limit(self.reference_shares[top], strict)

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self, classes: Sequence) -> str:
        """One line: the most-predicted label's share against its limit, and what was done."""
        top = max(range(len(self.shares)), key=self.shares.__getitem__)
        scored = ", ".join(f"{count} {kind}" for kind, count in self.inputs.items() if count)
        line = (f"balance: {classes[top]!r} predicted for {self.shares[top]:.0%} of {sum(self.inputs.values())} "
                f"inputs ({scored}); limit {collapse_limit(self.reference_shares[top], self.strict):.0%} from its "
                f"{self.reference_shares[top]:.0%} of the labelled rows"
                + (" (strict: random-word inputs)" if self.strict else ""))
        if self.corrected_shares is None:
            return line + "; no correction"
        after = max(range(len(self.corrected_shares)), key=self.corrected_shares.__getitem__)
        part = "" if self.scale is None else f"{self.scale:.0%} of "
        return (line + f"; removed {part}the label bias (batch calibration, Zhou et al. 2024): now "
                f"{classes[after]!r} {self.corrected_shares[after]:.0%}")


def check_balance(
    scorer: ContextScorer, inputs: Mapping[str, Sequence[str]], reference_shares: Sequence[float]
) -> BalanceCheck:
    """Score ``inputs`` after the scorer's context and, on a collapse, remove their label bias, as
    little of it as ends the collapse.

    A collapse is a label past :func:`collapse_limit` of the inputs (past the strict limit when they
    include domain-context random words, :func:`strict_inputs`). The bias removed is the least of
    :data:`BIAS_SCALES` times the inputs' mean label log-probability (:func:`cptune.scoring.label_bias`)
    that brings them within the ordinary limit (all of it if none does): the smallest change that
    ends what was seen, since the inputs' bias is only an estimate of the texts' (docs/results.md,
    "issue 24: collapse guard").

    Args:
        scorer: the fitted context's scorer, without a label bias of its own.
        inputs: ``{kind: texts}`` (for the report), all scored together; the bias, when one is
            removed, is their mean label log-probability.
        reference_shares: each label's share of the labelled rows, in the scorer's label order.

    Returns:
        The check; its :attr:`BalanceCheck.bias` is what predictions should remove (``None``: nothing).

    Raises:
        ValueError: no input at all.
    """
    texts = [text for group in inputs.values() for text in group]
    if not texts:
        raise ValueError("check_balance needs at least one input text")
    scores = scorer.scores(scorer.query_ids(texts))  # (n, C)
    num_labels = scores.shape[1]
    counts = {kind: len(group) for kind, group in inputs.items()}
    predicted = scores.argmax(dim=-1).tolist()
    shares, strict = label_shares(predicted, num_labels), strict_inputs(inputs)
    if collapsed_label(predicted, reference_shares, strict) is None:
        return BalanceCheck(counts, list(reference_shares), shares, strict=strict)
    scale, bias = smallest_correction(scores, reference_shares)
    corrected = remove_label_bias(scores, bias).argmax(dim=-1).tolist()
    return BalanceCheck(counts, list(reference_shares), shares, label_shares(corrected, num_labels), bias.tolist(),
                        strict, scale)


def smallest_correction(scores: torch.Tensor, reference_shares: Sequence[float]) -> tuple[float, torch.Tensor]:
    """The least of :data:`BIAS_SCALES` times the label bias of ``scores`` (``(n, C)``) whose removal
    leaves no label of the batch past :func:`collapse_limit`, and that bias (``(C,)``); the whole
    bias when no scale is enough."""
    full = label_bias(scores)  # (C,)
    for scale in BIAS_SCALES:
        if collapsed_label(remove_label_bias(scores, scale * full).argmax(dim=-1).tolist(), reference_shares) is None:
            return scale, scale * full
    return 1.0, full
