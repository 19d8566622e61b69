"""Build a CPT context (token ids, roles, example index) and its queries from labelled examples."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cptune.cpt.config import CPTConfig
from cptune.cpt.roles import NO_EXAMPLE, TokenRole, to_peft_codes
from cptune.text.template import Template, label_token_ids, render_example


def _pairs(examples: Iterable[Any]) -> list[tuple[str, str]]:
    """Accept ``(text, label)`` pairs or objects with ``.text`` and ``.label``."""
    out = []
    for i, ex in enumerate(examples):
        if hasattr(ex, "text") and hasattr(ex, "label"):
            out.append((ex.text, ex.label))
        else:
            try:
                text, label = ex
            except (TypeError, ValueError):
                raise ValueError(f"example {i} is {ex!r}; expected a (text, label) pair") from None
            out.append((text, label))
        if not isinstance(out[-1][0], str):
            raise ValueError(f"example {i} has text {out[-1][0]!r}; texts must be strings")
    return out


def _label_words(labels: Iterable[str], label_words: Mapping[str, str] | None) -> dict[str, str]:
    if label_words is None:
        return {str(label): str(label) for label in dict.fromkeys(labels)}
    return {str(k): str(v) for k, v in label_words.items()}


@dataclass
class Context:
    """The demonstrations of a CPT adapter, one entry per token.

    Attributes:
        token_ids: ``(N,)`` int64 token ids.
        roles: ``(N,)`` int64 :class:`~cptune.cpt.roles.TokenRole`.
        example_index: ``(N,)`` int64 demonstration index (``-1`` for separators).
        label_ids: token ids of each label word, as placed after the output template.
    """

    token_ids: torch.Tensor
    roles: torch.Tensor
    example_index: torch.Tensor
    label_ids: dict[str, list[int]]

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    @property
    def type_codes(self) -> torch.Tensor:
        """``(N,)`` PEFT's packed type codes."""
        return to_peft_codes(self.roles, self.example_index)

    def to_config(self, **kwargs: Any) -> CPTConfig:
        """A :class:`CPTConfig` with this context; ``kwargs`` set the other fields (epsilons, loss)."""
        return CPTConfig(
            cpt_token_ids=self.token_ids.tolist(),
            cpt_mask=[1] * len(self),
            cpt_tokens_type_mask=self.type_codes.tolist(),
            **kwargs,
        )


def build_context(
    examples: Iterable[Any],
    template: Template,
    tokenizer,
    label_words: Mapping[str, str] | None = None,
) -> Context:
    """Render labelled demonstrations into a context.

    Args:
        examples: ``(text, label)`` pairs (or objects with ``text`` and ``label``), in context order.
        template: how each demonstration is written.
        tokenizer: a Hugging Face tokenizer. If it adds a BOS token by default, the context starts
            with one (role separator).
        label_words: label -> word written in the text; ``None`` writes the label itself.

    Returns:
        The :class:`Context`.

    Raises:
        ValueError: no examples, a label without a label word, or bad label words.
    """
    pairs = _pairs(examples)
    if not pairs:
        raise ValueError("build_context needs at least one (text, label) example")
    words = _label_words((label for _, label in pairs), label_words)
    label_ids = label_token_ids(template, tokenizer, words)
    ids: list[int] = []
    roles: list[int] = []
    index: list[int] = []
    bos = default_bos(tokenizer)
    if bos is not None:
        ids.append(bos)
        roles.append(int(TokenRole.SEPARATOR))
        index.append(NO_EXAMPLE)
    for k, (text, label) in enumerate(pairs):
        if str(label) not in label_ids:
            raise ValueError(f"label {label!r} has no label word; known labels: {sorted(label_ids)}")
        ex_ids, ex_roles = render_example(template, tokenizer, text, label_ids[str(label)], with_separator=True)
        ids.extend(ex_ids)
        roles.extend(ex_roles)
        index.extend(k if r != TokenRole.SEPARATOR else NO_EXAMPLE for r in ex_roles)
    return Context(
        token_ids=torch.tensor(ids, dtype=torch.long),
        roles=torch.tensor(roles, dtype=torch.long),
        example_index=torch.tensor(index, dtype=torch.long),
        label_ids=label_ids,
    )


def default_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer prepends one by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return bos if probe and probe[0] == bos else None


def render_queries(
    examples: Sequence[Any],
    template: Template,
    tokenizer,
    label_words: Mapping[str, str] | None = None,
    with_labels: bool = True,
) -> dict[str, torch.Tensor]:
    """Render queries as the right-padded batch of PEFT's CPT forward contract.

    Args:
        examples: ``(text, label)`` pairs; with ``with_labels=False`` plain texts are accepted too.
        template: the context's template (queries are written the same way, without separator).
        tokenizer: the context's tokenizer.
        label_words: the context's label words.
        with_labels: append each query's label tokens (training) or stop after the output
            template (scoring).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (the ids; the forward scores only label
        tokens) and ``input_type_mask`` (codes 0..4), each ``(B, T)`` int64.
    """
    if with_labels:
        pairs = _pairs(examples)
        words = _label_words((label for _, label in pairs), label_words)
        label_ids = label_token_ids(template, tokenizer, words)
    else:
        pairs = [(ex, None) if isinstance(ex, str) else _pairs([ex])[0] for ex in examples]
        label_ids = {}
    if not pairs:
        raise ValueError("render_queries needs at least one example")
    rows = []
    for text, label in pairs:
        if with_labels and str(label) not in label_ids:
            raise ValueError(f"label {label!r} has no label word; known labels: {sorted(label_ids)}")
        ids, roles = render_example(
            template, tokenizer, text, label_ids[str(label)] if with_labels else None, with_separator=False
        )
        rows.append((ids, roles))
    return pad_rows(rows, pad_id=_pad_id(tokenizer))


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def pad_rows(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(ids, type codes)`` rows into the forward-contract batch (padding: code 0, label -100)."""
    width = max(len(ids) for ids, _ in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    codes = torch.zeros((batch, width), dtype=torch.long)
    for i, (ids, roles) in enumerate(rows):
        n = len(ids)
        input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = torch.tensor(ids, dtype=torch.long)
        codes[i, :n] = torch.tensor(roles, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "input_type_mask": codes}
