"""The texts a classifier was trained on, kept as salted hashes: enough to recognise one, not to read it.

A saved classifier holds only its context's examples (see :meth:`cptune.CPTClassifier.save`), but
``cptune eval`` must still leave every training text out of a test set. :class:`TrainedTexts` keeps, for
each distinct training text, ``sha256(salt + normalize_text(text))`` (hex), where ``salt`` is 16 random
bytes drawn once per fitted classifier and ``normalize_text`` collapses every run of whitespace into one
space and strips the ends (:func:`cptune.data.types.normalize_text`, the normalisation every data file
and built-in dataset already applies to its rows, so for rows read by cptune it is the exact-text match
``eval`` always made). The hashes are stored sorted, so they do not give the training order away.

What a hash does not protect: anyone who holds the file and a candidate text can check whether it was a
training text (that is what ``eval`` does), so a short or guessable text (a one-word review) can be
confirmed by guessing. It does not give any text back, and the salt keeps the hashes of one classifier
from matching those of another.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cptune.data.types import normalize_text

HASH_NAME = "sha256"
SALT_BYTES = 16
NORMALIZATION = "whitespace runs collapsed to one space, ends stripped"
"""How a text is normalised before it is hashed, as written into the saved record."""
CONTEXT_ONLY = "context only"
KEPT = "kept"
TRAINING_DATA = (CONTEXT_ONLY, KEPT)
"""What a saved classifier's ``examples`` holds (``cptune_classifier.json``'s ``training_data``): the
context's examples alone (the default), or every training row (``save(keep_training_data=True)``).
An older save, without the field, holds every row."""
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TrainedTexts:
    """Salted SHA-256 hashes of training texts; ``text in trained`` tells whether ``text`` was one.

    Attributes:
        salt: the salt, as hex (``SALT_BYTES`` random bytes).
        hashes: ``sha256(salt bytes + UTF-8 of the normalised text)``, hex, one per distinct text.
    """

    salt: str
    hashes: frozenset[str]

    @classmethod
    def of(cls, texts: Iterable[str], salt: str | None = None) -> TrainedTexts:
        """The hashes of ``texts`` under ``salt`` (default: a fresh random one)."""
        salt = secrets.token_hex(SALT_BYTES) if salt is None else salt
        empty = cls(salt, frozenset())
        return cls(salt, frozenset(empty.digest(text) for text in texts))

    def digest(self, text: str) -> str:
        """The hex hash of ``text`` under this salt."""
        return hashlib.sha256(bytes.fromhex(self.salt) + normalize_text(text).encode("utf-8")).hexdigest()

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.digest(text) in self.hashes

    def __len__(self) -> int:
        return len(self.hashes)

    def to_json(self) -> dict:
        """The record saved in ``cptune_classifier.json`` (``trained_texts``)."""
        return {"hash": HASH_NAME, "salt": self.salt, "normalization": NORMALIZATION,
                "hashes": sorted(self.hashes)}

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> TrainedTexts:
        """Read :meth:`to_json`'s record back.

        Raises:
            ValueError: a record of another hash or normalisation, a salt that is not hex, or a hash that
                is not 64 hex digits.
        """
        if not isinstance(record, Mapping) or record.get("hash") != HASH_NAME \
                or record.get("normalization") != NORMALIZATION:
            raise ValueError(f"trained_texts must be a {HASH_NAME} record with normalization {NORMALIZATION!r}; "
                             f"got {_head(record)}")
        salt, hashes = record.get("salt"), record.get("hashes")
        try:
            bytes.fromhex(salt)
        except (TypeError, ValueError):
            raise ValueError(f"trained_texts salt {salt!r} is not hex") from None
        if not isinstance(hashes, list) or not all(isinstance(h, str) and _HEX_DIGEST.fullmatch(h) for h in hashes):
            raise ValueError(f"trained_texts hashes must be a list of 64-digit lower-case hex strings; got "
                             f"{_head(hashes)}")
        return cls(salt, frozenset(hashes))


def _head(value: Any, limit: int = 80) -> str:
    """A value in an error message, cut to ``limit`` characters."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."
