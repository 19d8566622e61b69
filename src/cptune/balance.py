"""The label balance of a fitted classifier, and the guard against a collapse onto one label.

A CPT context can give one label to nearly every text (docs/results.md: 284-299 of 300 SUBJ test
texts ``subjective`` in 3 of 5 four-shot cells). :func:`check_balance` scores the inputs a fit may
look at (labelled rows outside the context, else the training rows themselves; the content-free
inputs; unlabeled texts the user gives), compares the most-predicted label's share with the share
that label has in the labelled data (:func:`collapsed_label`, limit :func:`collapse_limit`) and,
on a collapse, removes the label bias measured on those same inputs (batch calibration,
:func:`cptune.scoring.label_bias`), then measures again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cptune.scoring import CONTENT_FREE_TEXTS, ContextScorer, label_bias, remove_label_bias

COLLAPSE_FACTOR = 2.0
"""A label predicted more than this many times as often as it is labelled has taken over (with more
than two balanced classes: more than twice the balanced share)."""


def collapse_limit(share: float) -> float:
    """The largest share of predictions a label may take before it counts as a collapse.

    ``limit(s) = min(COLLAPSE_FACTOR * s, (1 + s) / 2)`` for a label with share ``s`` of the
    labelled rows: halfway from ``s`` to all texts, and never more than twice ``s``. Balanced two
    classes: 0.75; three: 2/3; C >= 3 balanced classes: 2/C (the goals of issue 24).
    """
    return min(COLLAPSE_FACTOR * share, (1.0 + share) / 2.0)


def label_shares(labels: Sequence[int], num_labels: int) -> list[float]:
    """The share of each label index ``0 .. num_labels - 1`` among ``labels`` (all zero for none)."""
    counts = [0] * num_labels
    for label in labels:
        counts[label] += 1
    return [count / max(len(labels), 1) for count in counts]


def collapsed_label(predicted: Sequence[int], reference_shares: Sequence[float]) -> int | None:
    """The most-predicted label index when its share exceeds :func:`collapse_limit` of its share in
    ``reference_shares`` (the labelled data's), else ``None`` (also for no prediction)."""
    if not predicted:
        return None
    shares = label_shares(predicted, len(reference_shares))
    top = max(range(len(shares)), key=shares.__getitem__)
    return top if shares[top] > collapse_limit(reference_shares[top]) else None


HELD_OUT = "held-out labelled rows"
TRAINING_ROWS = "training rows (in the context: optimistic)"


def balance_inputs(
    examples: Sequence[tuple[str, Any]], context: Sequence[tuple[str, Any]], unlabeled: Sequence[str] = ()
) -> tuple[dict[str, list[str]], list[tuple[str, Any]]]:
    """The inputs a balance check scores, and the labelled rows among them.

    Args:
        examples: every labelled ``(text, label)`` row of the fit.
        context: the rows of ``examples`` (the same objects) that are the context's demonstrations.
        unlabeled: texts without labels the user gave.

    Returns:
        ``({kind: texts}, labelled)``: the labelled rows outside the context (:data:`HELD_OUT`) or, with
        none, every row (:data:`TRAINING_ROWS`: optimistic, they are in the context), then the
        content-free inputs and the unlabeled texts; ``labelled`` is the first group's ``(text, label)`` rows.
    """
    in_context = {id(row) for row in context}
    held_out = [row for row in examples if id(row) not in in_context]
    labelled = held_out if held_out else list(examples)
    inputs = {HELD_OUT if held_out else TRAINING_ROWS: [text for text, _ in labelled],
              "content-free": list(CONTENT_FREE_TEXTS), "unlabeled": list(unlabeled)}
    return inputs, labelled


@dataclass(frozen=True)
class BalanceCheck:
    """What :func:`check_balance` measured (saved with a classifier as ``"balance"``).

    Args:
        inputs: how many inputs of each kind were scored (``{kind: count}``).
        reference_shares: each label's share of the labelled rows.
        shares: each label's share of the predictions on the inputs, as fitted.
        corrected_shares: the same after removing :attr:`bias`; ``None`` when nothing was removed.
        bias: the ``(C,)`` label bias removed (:func:`cptune.scoring.label_bias` of the inputs'
            scores); ``None`` when the fit was not collapsed.
    """

    inputs: dict[str, int]
    reference_shares: list[float]
    shares: list[float]
    corrected_shares: list[float] | None = None
    bias: list[float] | None = None

    @property
    def still_collapsed(self) -> bool:
        """Whether the predictions (after the correction, if any) still collapse onto one label."""
        final = self.corrected_shares if self.corrected_shares is not None else self.shares
        top = max(range(len(final)), key=final.__getitem__)
        return final[top] > collapse_limit(self.reference_shares[top])

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self, classes: Sequence) -> str:
        """One line: the most-predicted label's share against its limit, and what was done."""
        top = max(range(len(self.shares)), key=self.shares.__getitem__)
        scored = ", ".join(f"{count} {kind}" for kind, count in self.inputs.items() if count)
        line = (f"balance: {classes[top]!r} predicted for {self.shares[top]:.0%} of {sum(self.inputs.values())} "
                f"inputs ({scored}); limit {collapse_limit(self.reference_shares[top]):.0%} from its "
                f"{self.reference_shares[top]:.0%} of the labelled rows")
        if self.corrected_shares is None:
            return line + "; no correction"
        after = max(range(len(self.corrected_shares)), key=self.corrected_shares.__getitem__)
        return (line + f"; removed the label bias (batch calibration, Zhou et al. 2024): now {classes[after]!r} "
                f"{self.corrected_shares[after]:.0%}")


def check_balance(
    scorer: ContextScorer, inputs: Mapping[str, Sequence[str]], reference_shares: Sequence[float]
) -> BalanceCheck:
    """Score ``inputs`` after the scorer's context and, on a collapse, remove their label bias.

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
    shares = label_shares(predicted, num_labels)
    if collapsed_label(predicted, reference_shares) is None:
        return BalanceCheck(counts, list(reference_shares), shares)
    bias = label_bias(scores)  # (C,)
    corrected = remove_label_bias(scores, bias).argmax(dim=-1).tolist()
    return BalanceCheck(counts, list(reference_shares), shares, label_shares(corrected, num_labels), bias.tolist())
