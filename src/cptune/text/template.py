"""Templates and verbalizers: render one labelled example into token ids and roles (pure).

A template is one format string with an ``{x}`` (input text) and a ``{y}`` (label word) field::

    Template("input: {x} output: {y}", example_separator="\\n")

renders a demonstration as ``[input template][input text][output template][label][separator]``
with the roles of :class:`~cptune.cpt.roles.TokenRole`. Each part is tokenized on its own, so roles are
exact and a label's tokens are the same in the context and in a query. Whitespace that ends a
template part is moved to the front of the next part (``"input:" + " some text"``), which is how
BPE tokenizers with leading-space tokens (GPT-2, SmolLM2, Qwen) split the running text.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cptune.cpt.roles import TokenRole

INPUT_FIELD = "x"
LABEL_FIELD = "y"


@dataclass(frozen=True)
class Template:
    """How a demonstration or query is written.

    Args:
        format: text with exactly one ``{x}`` followed (later) by exactly one ``{y}``; use ``{{`` and
            ``}}`` for literal braces.
        example_separator: text after each demonstration's label (role: separator).
        max_text_tokens: if set, an input text longer than this many tokens keeps its first
            ``max_text_tokens`` tokens (the stated truncation rule).
    """

    format: str = "input: {x} output: {y}"
    example_separator: str = "\n"
    max_text_tokens: int | None = None

    def __post_init__(self) -> None:
        fields = [f for _, f, _, _ in string.Formatter().parse(self.format) if f is not None]
        if fields.count(INPUT_FIELD) != 1 or fields.count(LABEL_FIELD) != 1 or len(fields) != 2:
            raise ValueError(
                f"template {self.format!r} must hold exactly one {{x}} (input) and one {{y}} (label) field; "
                f"found {fields or 'none'}"
            )
        if fields.index(INPUT_FIELD) > fields.index(LABEL_FIELD):
            raise ValueError(f"template {self.format!r} puts {{y}} before {{x}}; the label must come last")
        if self.max_text_tokens is not None and self.max_text_tokens < 1:
            raise ValueError(f"max_text_tokens={self.max_text_tokens} must be >= 1 or None")

    def parts(self) -> tuple[str, str, str]:
        """``(before {x}, between {x} and {y}, after {y})`` with ``{{``/``}}`` unescaped."""
        literals = [lit for lit, _, _, _ in string.Formatter().parse(self.format)]
        # parse yields (literal, field) pairs; a trailing literal comes with field None.
        before, between = literals[0], literals[1]
        after = literals[2] if len(literals) > 2 else ""
        return before, between, after


def _split_trailing_space(text: str) -> tuple[str, str]:
    stripped = text.rstrip(" ")
    return stripped, text[len(stripped):]


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_token_ids(template: Template, tokenizer, label_words: Mapping[str, str]) -> dict[str, list[int]]:
    """Token ids of each label word exactly as it appears after the output template.

    Raises:
        ValueError: for duplicate words, a word that tokenizes to nothing, or two labels whose
            token sequences are identical.
    """
    words = list(label_words.values())
    dupes = sorted({w for w in words if words.count(w) > 1})
    if dupes:
        raise ValueError(f"label words must differ; {dupes[0]!r} is used for more than one label")
    _, between, _ = template.parts()
    _, space = _split_trailing_space(between)
    out: dict[str, list[int]] = {}
    seen: dict[tuple[int, ...], str] = {}
    for label, word in label_words.items():
        ids = _encode(tokenizer, space + word)
        if not ids or not str(word).strip():
            raise ValueError(f"label word {word!r} (label {label!r}) tokenizes to nothing; choose a non-empty word")
        if tuple(ids) in seen:
            raise ValueError(f"label words {seen[tuple(ids)]!r} and {word!r} tokenize to the same ids {ids}")
        seen[tuple(ids)] = word
        out[label] = ids
    return out


def render_example(
    template: Template,
    tokenizer,
    text: str,
    label_ids: Sequence[int] | None,
    with_separator: bool,
) -> tuple[list[int], list[int]]:
    """Token ids and roles of one example.

    Args:
        template: the template.
        tokenizer: a Hugging Face tokenizer.
        text: the input text.
        label_ids: the label's token ids (from :func:`label_token_ids`), or ``None`` to stop after
            the output template (a query to be scored).
        with_separator: append ``template.example_separator`` (demonstrations) or not (queries).

    Returns:
        ``(ids, roles)``, two equal-length lists.
    """
    before, between, after = template.parts()
    before, space_x = _split_trailing_space(before)
    between, _ = _split_trailing_space(between)  # its trailing space travels with the label ids
    text_ids = _encode(tokenizer, space_x + str(text))
    if template.max_text_tokens is not None:
        text_ids = text_ids[: template.max_text_tokens]
    pieces: list[tuple[list[int], TokenRole]] = [
        (_encode(tokenizer, before), TokenRole.INPUT_TEMPLATE),
        (text_ids, TokenRole.INPUT_TEXT),
        (_encode(tokenizer, between), TokenRole.OUTPUT_TEMPLATE),
    ]
    if label_ids is not None:
        pieces.append((list(label_ids), TokenRole.LABEL))
        if with_separator:
            pieces.append((_encode(tokenizer, after + template.example_separator), TokenRole.SEPARATOR))
    ids: list[int] = []
    roles: list[int] = []
    for piece_ids, role in pieces:
        ids.extend(piece_ids)
        roles.extend([int(role)] * len(piece_ids))
    return ids, roles
