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
from typing import Any

from cptune.cpt.roles import TokenRole

INPUT_FIELD = "x"
LABEL_FIELD = "y"
CODE_PUNCTUATION = "_-.:#/"
"""Characters that join the letters and digits of a code-like label (``LABEL_0``, ``class-2``, ``v1.0``)."""
EXAMPLE_WORDS = ("negative", "positive")
"""The words an error message shows for a two-class task (a placeholder ``WORD`` for more classes)."""
EXAMPLE_LABELS_SHOWN = 4
"""Labels an error message spells out before ``...``."""


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


def label_word_problem(word: str) -> str | None:
    """Why a label written as itself is no word a language model can answer with, or None if it is one.

    The rule: a label word needs a letter (``0``, ``1``, ``-3``, ``4.5`` have none), and must not be
    a code, i.e. a single run of letters, digits and ``_-.:#/`` that holds a digit (``LABEL_0``,
    ``class1``, ``c-2``, ``id42``). Words with a letter and no digit (``positive``, ``neg``, ``A``,
    ``Sci/Tech``) and several words (``4 stars``) pass. It applies only to labels that would be
    written as themselves; label words given explicitly are used as given.
    """
    text = str(word).strip()
    if not any(c.isalpha() for c in text):
        return "has no letter"
    if any(c.isdigit() for c in text) and all(c.isalnum() or c in CODE_PUNCTUATION for c in text):
        return "is a code, a digit among letters in one token"
    return None


def words_needed_error(labels: Sequence, option: str) -> ValueError | None:
    """The error to raise when ``labels``, written as themselves, are not all words
    (:func:`label_word_problem`), else None.

    Args:
        labels: every label of the data, in order.
        option: where the user gives label words: a command-line flag (``"--label-words"``: the
            example reads ``--label-words 0=negative,1=positive``) or a Python argument
            (``"labels="``: ``labels={0: 'negative', 1: 'positive'}``).

    Returns:
        A one-line ``ValueError`` naming the labels that are not words, the rule and how to give words.
    """
    bad = [label for label in labels if label_word_problem(str(label)) is not None]
    if not bad:
        return None
    more = len(labels) > EXAMPLE_LABELS_SHOWN
    words = EXAMPLE_WORDS if len(labels) == len(EXAMPLE_WORDS) else ["WORD"] * len(labels)
    pairs = list(zip(labels, words, strict=True))[:EXAMPLE_LABELS_SHOWN]
    if option.startswith("--"):
        example = f"{option} " + ",".join(f"{label}={word}" for label, word in pairs) + (",..." if more else "")
    else:
        example = option + "{" + ", ".join(f"{label!r}: {word!r}" for label, word in pairs) + (", ...}" if more
                                                                                                 else "}")
    shown = ", ".join(repr(label) for label in bad[:EXAMPLE_LABELS_SHOWN])
    shown += ", ..." if len(bad) > EXAMPLE_LABELS_SHOWN else ""
    subject = f"labels {shown} are not words" if len(bad) > 1 else f"label {shown} is not a word"
    return ValueError(
        f"{subject} the model can answer with: {bad[0]!r} {label_word_problem(str(bad[0]))} (a label word needs a "
        f"letter and is no code like LABEL_0); give one word per label, e.g. {example}"
    )


def check_distinct_words(label_words: Mapping[Any, str]) -> None:
    """Refuse one word given to two labels (the tokens of distinct words are compared by :func:`label_token_ids`).

    Raises:
        ValueError: naming the repeated word.
    """
    words = list(label_words.values())
    dupes = sorted({w for w in words if words.count(w) > 1})
    if dupes:
        raise ValueError(f"label words must differ; {dupes[0]!r} is used for more than one label")


def label_token_ids(template: Template, tokenizer, label_words: Mapping[str, str]) -> dict[str, list[int]]:
    """Token ids of each label word exactly as it appears after the output template.

    Raises:
        ValueError: for duplicate words, a word that tokenizes to nothing, or two labels whose
            token sequences are identical.
    """
    check_distinct_words(label_words)
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
