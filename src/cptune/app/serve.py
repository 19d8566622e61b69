"""``cptune serve CLASSIFIER``: a saved classifier behind HTTP (FastAPI + uvicorn), its context encoded once.

The learned context is the same for every request, so its keys and values are computed once at
start-up (:class:`cptune.scoring.ContextScorer`; with calibration, the content-free scores too) and a
request pays only for its own tokens. Concurrent requests are batched by one worker task: it tokenizes
the requests that arrived and scores up to ``max_batch`` texts and ``max_batch_tokens`` query tokens in
one call in a thread (the event loop keeps accepting and answering), taking chunks of the requests in
turn (:class:`Scheduler`), and a text longer than ``max_batch_tokens`` a piece at a time (its tokens run
after the context's cache and its earlier pieces': :meth:`cptune.scoring.ContextScorer.prefill`), so
neither a long request nor a long text holds up the others. The texts received and not
yet answered are bounded (``max_queue``; and no more than half of ``timeout_s`` of work at the
worker's recent speed: beyond either, 503 with ``Retry-After`` at once) and so is each request's time
(``timeout_s``: then 503); ``--api-key`` makes every endpoint but ``/health`` and the page
require a key (401 otherwise).

Endpoints: ``POST /predict`` (``{"texts": [...]}`` -> ``{"predictions": [{"label": ..., "probabilities":
{label: p}}]}``, equal to ``CPTClassifier.predict_proba``), ``GET /health``, ``GET /info`` and a page at
``/`` (plain HTML and JavaScript, package data). Errors are JSON ``{"detail": "one line"}``: 400 for a
body that is not JSON or not ``{"texts": [string, ...]}``, 401 for a missing key, 413 for a limit (texts
per request, characters per text, the model's positions), 500 when the model fails (the traceback goes
to the server's log, never into the body), 503 for a full queue, a passed time limit or shutdown.
SIGTERM: the server stops accepting connections, answers every request it has received, and exits with
status 0. docs/serve.md has the usage.

Only the standard library is imported here at the top (``cptune --help`` stays fast); fastapi, uvicorn
and torch are imported when the server starts.
"""

import argparse
import asyncio
import contextlib
import dataclasses
import hmac
import importlib.resources
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cptune import __version__

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 32  # texts scored in one call of the worker
DEFAULT_MAX_WAIT_MS = 5.0  # how long the worker waits for more requests once it has one
DEFAULT_MAX_TEXTS = 256  # texts in one request
DEFAULT_MAX_CHARS = 4000  # characters in one text
# Query tokens scored in one call of the worker (the context is shared), by the model's device type when
# --max-batch-tokens is not given. On a CPU a call's time grows with its tokens, and a short request waits
# for the call in progress and then rides in the next: 256 cut a one-text request's p99 beside 4,000-character
# texts from 6.1 s (1024) to 3.8 s for 5% less throughput of one-text requests (docs/serve.md, 2-core CPU; 512
# gained nothing). Elsewhere (a GPU) the budget stays 1024: not measured there, where batching pays more.
DEFAULT_MAX_BATCH_TOKENS = {"cpu": 256}
ACCELERATOR_MAX_BATCH_TOKENS = 1024
DEFAULT_MAX_QUEUE = 1024  # texts received and not yet answered; beyond it: 503 at once
DEFAULT_TIMEOUT_S = 60.0  # a request not answered by then gets 503
MAX_TIMEOUT_S = 3600.0
RETRY_AFTER_MIN_S = 1  # the smallest Retry-After: HTTP counts it in whole seconds
RATE_SMOOTHING = 0.2  # weight of the latest batch in the running estimate of seconds per character
# The work of a text, for the estimate of how long the queue takes: its characters (what is known before
# tokenizing; a model's cost grows with the tokens, about in step) plus this many for the template's
# tokens around it (~10 tokens). Texts alone would misjudge a queue of short texts after a 4000-character one.
TEXT_OVERHEAD_CHARS = 40
# Refuse at once a request that would wait behind texts taking more than this part of --timeout-s (at
# the running estimate): a request admitted at the edge must still be answered in time, and the
# estimate is an average.
SHED_FRACTION = 0.5
API_KEY_ENV = "CPTUNE_API_KEY"
LOOPBACK_NAMES = ("localhost",)
JSON_BYTES_PER_CHAR = 12  # the most one character can take in a JSON string (a surrogate pair as \uXXXX\uXXXX)
BODY_OVERHEAD_BYTES = 4096  # braces, the key, commas and whitespace around the texts
SERVE_EXTRA = "pip install 'cptune[serve]'"
PAGE = "static/index.html"  # package data of cptune.app

logger = logging.getLogger(__name__)


# -- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """How requests are batched, what one request may hold, and how much work the server takes on.

    Args:
        max_batch: texts scored together in one call of the model.
        max_wait_ms: how long the worker waits for more requests once it holds one.
        max_texts: texts in one request (more: 413).
        max_chars: characters in one text (more: 413).
        max_batch_tokens: query tokens scored together in one call of the model (the context is shared
            and not counted); a single text longer than this is scored in pieces over several calls
            (``cptune serve`` without ``--max-batch-tokens``: :func:`default_batch_tokens` of the model's device).
        max_queue: texts received and not yet answered; a request that would go beyond is answered 503
            at once (with ``Retry-After``). At least ``max_texts``, so that every valid request can fit.
        timeout_s: seconds from a request's arrival to its answer; later: 503 (with ``Retry-After``).
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_texts: int = DEFAULT_MAX_TEXTS
    max_chars: int = DEFAULT_MAX_CHARS
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS["cpu"]
    max_queue: int = DEFAULT_MAX_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_texts", "max_chars", "max_batch_tokens", "max_queue"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be an integer >= 1")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"--max-wait-ms={self.max_wait_ms!r} must be from 0 to 60000")
        if self.max_queue < self.max_texts:
            raise ValueError(f"--max-queue={self.max_queue} must be >= --max-texts={self.max_texts} (a request of "
                             "--max-texts texts must fit in the queue)")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"--timeout-s={self.timeout_s!r} must be > 0 and <= {MAX_TIMEOUT_S:g}")

    @property
    def max_body_bytes(self) -> int:
        """The largest body a request within the limits can have."""
        return self.max_texts * (self.max_chars * JSON_BYTES_PER_CHAR + 8) + BODY_OVERHEAD_BYTES

    def as_dict(self) -> dict:
        """The limits as ``/info`` shows them."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def default_batch_tokens(device_type: str) -> int:
    """``--max-batch-tokens`` when it is not given, for a model on a device of this type (``"cpu"``,
    ``"cuda"``, ...): :data:`DEFAULT_MAX_BATCH_TOKENS`, else :data:`ACCELERATOR_MAX_BATCH_TOKENS`."""
    return DEFAULT_MAX_BATCH_TOKENS.get(device_type, ACCELERATOR_MAX_BATCH_TOKENS)


class RequestError(Exception):
    """A request answered with an HTTP error status and a one-line message.

    Args:
        status: the HTTP status.
        message: one line for ``{"detail": ...}``.
        retry_after: seconds for the ``Retry-After`` header (a 503 that a later try may pass); ``None``: none.
    """

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (what a 500 answer says)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def parse_texts(body: bytes, limits: Limits) -> list[str]:
    """The texts of a ``/predict`` body, checked against the limits.

    Raises:
        RequestError: 400 for a body that is not JSON or not ``{"texts": [string, ...]}``, 413 for too
            many texts or a text too long.
    """
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, f"the body is not JSON ({one_line(err)})") from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise RequestError(400, f'the body must be a JSON object {{"texts": [string, ...]}}; got {_shape(payload)}')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise RequestError(400, f'"texts" must be a list of strings; got {_shape(texts)}')
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise RequestError(400, f'"texts" must be a list of strings; item {bad} is {_shape(texts[bad])}')
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; the limit is {limits.max_texts} (--max-texts)")
    long = next((i for i, text in enumerate(texts) if len(text) > limits.max_chars), None)
    if long is not None:
        raise RequestError(413, f"text {long} has {len(texts[long])} characters; the limit is {limits.max_chars} "
                                "(--max-chars)")
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON allows "\ud800" alone; no tokenizer takes it
            raise RequestError(400, f"text {i} is not valid Unicode: a lone surrogate {text[err.start]!a} at "
                                    f"character {err.start}") from None
    return texts


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:5]}" if value else "an empty object"
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__)


# -- the model side: built once, called from the worker thread ----------------------------------

@dataclass(eq=False)
class Piece:
    """Tokens ``start .. end - 1`` of one query too long for a model call, run after its earlier pieces.

    Attributes:
        ids: the whole query's token ids.
        start: the first token of this piece (0 for the first piece).
        end: past its last token; the last piece ends at ``len(ids)`` and gives the query's answer row.
        state: what the scoring side keeps between pieces (:meth:`ServedClassifier.score`: the
            context's cache grown by the tokens before ``start``); ``None`` before the first piece.
    """

    ids: Sequence[int]
    start: int
    end: int
    state: Any = None


class ServedClassifier:
    """A loaded classifier's scoring with everything per-classifier done once (the context's cache,
    the label ids, the content-free scores), answering batches of requests.

    Args:
        clf: a :class:`cptune.CPTClassifier` loaded by ``CPTClassifier.load`` (its template fixed), running
            on ``base_model``.
        base_model: the causal LM the classifier runs on.
        tokenizer: its tokenizer.
        model_name: the base model's name, for ``/info``.
    """

    def __init__(self, clf, base_model, tokenizer, model_name: str) -> None:
        import torch

        from cptune.scoring import ContextScorer

        self.classes = list(clf.classes_)
        self.device_type = base_model.device.type  # "cpu", "cuda", ...: the default --max-batch-tokens
        template = clf.template_  # the fitted template (for template="auto", the one chosen)
        words = {str(label): word for label, word in clf.label_words_.items()}  # as the text layer keys them
        with torch.no_grad():
            context = clf.cpt_model_.context_embeddings()  # (1, N, d)
        self.scorer = ContextScorer(base_model, tokenizer, template, words, context, batch_size=clf.batch_size,
                                    length_normalize=clf.length_normalize, calibrate=clf.calibrate,
                                    label_bias=clf.applied_label_bias())
        self.info = {
            "model": model_name,
            "labels": [{"label": label, "word": clf.label_words_[label]} for label in self.classes],
            "template": template.format,
            "context_tokens": self.scorer.context_tokens,
            "calibrate": clf.calibrate,
            "length_normalize": clf.length_normalize,
            "placement": clf.placement_,
            # what the folder served holds of the training data, as its card says: "context only" or "kept"
            "training_data": clf.data_held(clf.holds_training_data_),
            "cptune_version": __version__,
        }

    def predictions(self, scores) -> list[dict]:
        """``/predict``'s answer rows from ``(n, C)`` label scores (softmax, as ``predict_proba``)."""
        import torch

        rows = torch.softmax(scores, dim=-1).cpu().tolist()
        return [{"label": self.classes[max(range(len(row)), key=row.__getitem__)],
                 "probabilities": {str(c): p for c, p in zip(self.classes, row, strict=True)}} for row in rows]

    def prepare(self, requests: Sequence[Sequence[str]]) -> list[list[list[int]] | RequestError]:
        """Each request's query token ids, or its error: 413 for a text longer than the model's positions
        after the context (the message gives the token counts), 500 for the tokenizer failing."""
        prepared: list[Any] = []
        for texts in requests:
            try:
                ids = self.scorer.query_ids(texts)
            except Exception as err:  # noqa: BLE001 - the tokenizer failed on this request only
                prepared.append(self._failure(err))
                continue
            try:
                self.scorer.check_lengths(ids)
            except ValueError as err:
                prepared.append(RequestError(413, str(err)))  # names the text, its tokens and the model's positions
                continue
            prepared.append(ids)
        return prepared

    def score(self, chunks: Sequence[Sequence[Sequence[int]] | Piece]) -> list[list[dict] | RequestError]:
        """Answer rows for each chunk of prepared queries (from :meth:`prepare`), or its error; all the
        chunks in one call. A :class:`Piece` of a long query runs after its earlier pieces and answers
        ``[]`` (its cache kept in ``piece.state`` for the next piece), or, the last piece, the query's row.
        If the call fails, each chunk is scored alone, so one failing chunk does not fail the others (and
        a piece's state changes only when it was scored)."""
        try:
            results, states = self._score_together(chunks)
        except Exception as err:  # noqa: BLE001 - find which chunk fails, answer the others
            if len(chunks) == 1:
                return [self._failure(err)]
            return [self.score([chunk])[0] for chunk in chunks]
        for chunk, state in zip(chunks, states, strict=True):
            if isinstance(chunk, Piece):
                chunk.state = state
        return results

    def _score_together(self, chunks) -> tuple[list[list[dict]], list]:
        """Each chunk's rows and each piece's next state (``None`` for whole texts and last pieces): the
        whole texts in one scoring call, each piece after its own cache."""
        whole = [ids for chunk in chunks if not isinstance(chunk, Piece) for ids in chunk]
        rows = iter(self.predictions(self.scorer.scores(whole)) if whole else [])
        results, states = [], []
        for chunk in chunks:
            if not isinstance(chunk, Piece):
                results.append([next(rows) for _ in chunk])
                states.append(None)
                continue
            part = chunk.state if chunk.state is not None else self.scorer.begin(chunk.ids)
            if part.done != chunk.start:
                raise ValueError(f"a piece from token {chunk.start} after {part.done} tokens were run")
            if chunk.end == len(chunk.ids):
                results.append(self.predictions(self.scorer.finish(part)))
                states.append(None)
            else:
                results.append([])
                states.append(self.scorer.prefill(part, chunk.end))
        return results, states

    def answer(self, requests: Sequence[Sequence[str]]) -> list[list[dict] | RequestError]:
        """Answer rows for each request, or its error: :meth:`prepare`, then one :meth:`score` call for the
        requests that could be prepared (what the server does, without its chunking)."""
        prepared = self.prepare(requests)
        ready = [i for i, ids in enumerate(prepared) if not isinstance(ids, RequestError)]
        for i, result in zip(ready, self.score([prepared[i] for i in ready]) if ready else [], strict=True):
            prepared[i] = result
        return prepared

    @staticmethod
    def _failure(err: Exception) -> RequestError:
        logger.error("the model failed on a request", exc_info=err)  # the traceback for the server's log
        return RequestError(500, f"the model failed on this request: {one_line(err)}")


# -- batching ------------------------------------------------------------------------------------

MAX_TEXTS_IN_PIECES = 2
"""Texts scored in pieces at once (:class:`Scheduler`). Each holds a cache of the context and its tokens
so far between calls, so this bounds that memory; two let two long requests progress side by side
(a third long text waits for one of them to end; short texts never wait for it)."""


PIECE_SHARE = 0.25
"""The part of a call's token budget (and one of its texts) kept for a text in pieces while whole texts
wait (:class:`Scheduler`): texts that fit a call go first, so a short request waits for one call at most,
and long texts still progress under any load of short ones."""


class Chunk(NamedTuple):
    """What one request gives a model call: its texts ``start .. end - 1`` whole, or, for a text longer
    than a call's token budget, its tokens ``tokens[0] .. tokens[1] - 1`` (``end == start + 1``); the
    piece that ends at the text's last token gives its answer row."""

    key: Hashable
    start: int
    end: int
    tokens: tuple[int, int] | None = None


@dataclass
class _Progress:
    lengths: list[int]  # tokens of each text of one request
    done: int = 0  # texts handed to a batch whole (their last piece included)
    cut: int = 0  # tokens of text `done` handed to a batch in pieces so far (0: none)


class Scheduler:
    """Which texts the next model call scores: requests split into chunks that interleave (pure; no I/O).

    A batch holds at most ``max_texts`` texts and ``max_tokens`` query tokens. It is filled from the
    requests in turn: the requests in the previous batch go behind every other (in their order), those
    that arrived meanwhile included, and each request gives its next texts while they fit. A text longer
    than ``max_tokens`` is cut in pieces: a batch takes its next piece, as many tokens as the batch has room
    for, and nothing more from its request (the next piece runs after this one). Texts that fit a call go
    first: while a piece waits, the whole texts in turn fill the batch up to all but one text and
    :data:`PIECE_SHARE` of the tokens, then the requests in turn give pieces (and whole texts) in the room
    left. At most ``max_in_pieces`` texts are in pieces at a time; a request whose next text would be one
    more waits. So a request that arrives while a long one is scored, or while a long text is, is in the
    very next batch (unless the requests ahead of it in turn fill that batch), rather than behind the long
    request's remaining chunks or the long text's remaining pieces.

    Args:
        max_texts: texts per batch (a piece counts as a text).
        max_tokens: query tokens per batch.
        max_in_pieces: texts cut in pieces and not finished at any time.
    """

    def __init__(self, max_texts: int, max_tokens: int, max_in_pieces: int = MAX_TEXTS_IN_PIECES) -> None:
        self.max_texts, self.max_tokens, self.max_in_pieces = max_texts, max_tokens, max_in_pieces
        self._active: dict[Hashable, _Progress] = {}  # in turn order (dicts keep insertion order)
        self._last_keys: list[Hashable] = []  # the requests in the previous batch, in its order

    def __len__(self) -> int:
        return len(self._active)

    def keys(self) -> list[Hashable]:
        """The requests that still have texts to score, in turn order."""
        return list(self._active)

    def add(self, key: Hashable, lengths: Sequence[int]) -> None:
        """A request whose texts have these token counts (at least one text), behind every active one."""
        if not lengths:
            raise ValueError("a request to schedule needs at least one text")
        self._active[key] = _Progress(list(lengths))

    def drop(self, key: Hashable) -> None:
        """Forget a request (answered with an error, or given up by its client), its text in pieces too."""
        self._active.pop(key, None)

    def next_batch(self) -> list[Chunk]:
        """The next batch as chunks of the requests' texts, in turn order; each request's chunks follow
        one another across batches. Empty when nothing is left."""
        for key in self._last_keys:  # their turn is over: behind every request that was not in the batch
            if key in self._active:
                self._active[key] = self._active.pop(key)
        in_pieces = sum(1 for progress in self._active.values() if progress.cut)
        pieces_wait = any(self._piece_next(progress, in_pieces) for progress in self._active.values())
        taken: dict[Hashable, list[Chunk]] = {}
        filled = [0, 0]  # texts, tokens
        # Whole texts first, leaving a share of the tokens and one text for pieces; then everything, in turn.
        passes = [(self.max_texts - 1, self.max_tokens - math.ceil(PIECE_SHARE * self.max_tokens), False)]
        passes = (passes if pieces_wait else []) + [(self.max_texts, self.max_tokens, True)]
        for max_texts, max_tokens, with_pieces in passes:
            for key, progress in self._active.items():
                if filled[0] >= max_texts or filled[1] >= max_tokens:
                    break
                given = self._take(key, progress, taken.setdefault(key, []), filled, max_texts, max_tokens,
                                   in_pieces if with_pieces else None)
                in_pieces = in_pieces if given is None else given
        batch = [chunk for key in self._active for chunk in _joined(taken.get(key, []))]
        for key in list(taken):
            if self._active[key].done == len(self._active[key].lengths):
                del self._active[key]
        self._last_keys = list(dict.fromkeys(chunk.key for chunk in batch))
        return batch

    def _piece_next(self, progress: _Progress, in_pieces: int) -> bool:
        """Whether the request's next unit is a piece that may run now."""
        if progress.done == len(progress.lengths):
            return False
        return bool(progress.cut) or (progress.lengths[progress.done] > self.max_tokens
                                      and in_pieces < self.max_in_pieces)

    def _take(self, key: Hashable, progress: _Progress, chunks: list[Chunk], filled: list[int], max_texts: int,
              max_tokens: int, in_pieces: int | None) -> int | None:
        """Add to ``chunks`` what one request gives a batch holding ``filled`` texts and tokens (updated),
        up to ``max_texts`` and ``max_tokens``: whole texts, and a piece unless ``in_pieces`` (the texts in
        pieces, returned updated) is ``None``. A request gives nothing after a piece but its last."""
        if chunks and chunks[-1].tokens is not None and chunks[-1].tokens[1] < progress.lengths[chunks[-1].start]:
            return in_pieces  # its next piece runs after the one taken
        start = progress.done
        while progress.done < len(progress.lengths) and filled[0] < max_texts:
            length, room = progress.lengths[progress.done], max_tokens - filled[1]
            if length <= self.max_tokens and not progress.cut:  # a text that fits a call is never cut
                if length > room:
                    break  # it waits for a later batch; a later request's may still fit
                filled[0], filled[1], progress.done = filled[0] + 1, filled[1] + length, progress.done + 1
                continue
            if in_pieces is None or room == 0 or not self._piece_next(progress, in_pieces):
                break
            if progress.done > start:
                chunks.append(Chunk(key, start, progress.done))
            end = min(length, progress.cut + room)
            chunks.append(Chunk(key, progress.done, progress.done + 1, (progress.cut, end)))
            filled[0], filled[1] = filled[0] + 1, filled[1] + end - progress.cut
            if end < length:  # the next piece runs after this one: nothing more from this request now
                in_pieces += not progress.cut
                progress.cut = end
                return in_pieces
            in_pieces -= 1
            progress.cut, progress.done = 0, progress.done + 1
            start = progress.done
        if progress.done > start:
            chunks.append(Chunk(key, start, progress.done))
        return in_pieces


def _joined(chunks: list[Chunk]) -> list[Chunk]:
    """One request's chunks of a batch with neighbouring runs of whole texts made one."""
    joined: list[Chunk] = []
    for chunk in chunks:
        if joined and chunk.tokens is None and joined[-1].tokens is None and joined[-1].end == chunk.start:
            joined[-1] = joined[-1]._replace(end=chunk.end)
        else:
            joined.append(chunk)
    return joined


def work_chars(texts: Sequence[str]) -> int:
    """The work of these texts for the queue's time estimate: characters plus ``TEXT_OVERHEAD_CHARS`` each."""
    return sum(len(text) + TEXT_OVERHEAD_CHARS for text in texts)


@dataclass(eq=False)  # a scheduler key: hashed by identity
class _Pending:
    texts: list[str]
    future: asyncio.Future
    ids: list[list[int]] | None = None  # query token ids, once prepared
    rows: list = field(default_factory=list)  # answer rows of the chunks scored so far, in order
    state: Any = None  # between the pieces of its text being scored in pieces: Piece.state

    def scored(self, chunk: Chunk) -> list[list[int]] | Piece:
        """What ``score`` gets for the chunk: its texts' ids, or a :class:`Piece` (a text's first piece starts
        afresh: the request's previous text in pieces may end in the same call)."""
        if chunk.tokens is None:
            return self.ids[chunk.start : chunk.end]
        first, end = chunk.tokens
        return Piece(self.ids[chunk.start], first, end, state=self.state if first else None)

    def work(self, chunk: Chunk) -> float:
        """The chunk's share of :func:`work_chars`: a piece counts its text's work pro rata of its tokens."""
        if chunk.tokens is None:
            return work_chars(self.texts[chunk.start : chunk.end])
        first, end = chunk.tokens
        return work_chars(self.texts[chunk.start : chunk.end]) * (end - first) / len(self.ids[chunk.start])


class Batcher:
    """One worker task that takes requests, tokenizes them, and scores chunks of them (:class:`Scheduler`)
    in a thread, one call at a time; admission (``max_queue``) happens at :meth:`submit`.

    Args:
        prepare: requests (lists of texts) -> each one's query token ids or its exception (called in a
            thread, by the worker only).
        score: chunks (lists of token ids, or a :class:`Piece` of a text longer than ``max_batch_tokens``)
            -> each one's answer rows (``[]`` for a piece but the last, whose ``state`` it sets) or its
            exception (likewise).
        limits: ``max_batch``, ``max_batch_tokens``, ``max_wait_ms`` and ``max_queue`` are used here.
    """

    def __init__(self, prepare: Callable[[list[list[str]]], list], score: Callable[[list[list[list[int]]]], list],
                 limits: Limits) -> None:
        self.prepare, self.score, self.limits = prepare, score, limits
        self.received = 0  # requests submitted so far
        self.in_flight = 0  # requests submitted and not yet answered
        self.queued_texts = 0  # their texts: what max_queue bounds
        self.queued_chars = 0  # their work: characters plus TEXT_OVERHEAD_CHARS a text
        self.refused = 0  # requests answered 503 because the queue was full
        self.batches = 0  # calls of score so far
        self.seconds_per_char: float | None = None  # a running estimate over the worker's calls
        self._inbox: asyncio.Queue[_Pending | None] = asyncio.Queue()  # unbounded: submit bounds what enters
        self._scheduler = Scheduler(limits.max_batch, limits.max_batch_tokens)
        self._worker: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    def retry_after(self) -> int:
        """Seconds until the texts queued now are likely answered (at least 1), for ``Retry-After``."""
        return max(RETRY_AFTER_MIN_S, math.ceil(self.queued_seconds()))

    def queued_seconds(self) -> float:
        """How long the texts queued now would take at the running estimate (0 before any call)."""
        return self.queued_chars * (self.seconds_per_char or 0.0)

    def check_room(self, texts: int = 1) -> None:
        """Refuse at once a request of ``texts`` texts that the queue cannot take.

        Raises:
            RequestError: 503 with ``Retry-After`` when the server is shutting down, when the texts
                received and not yet answered would exceed ``max_queue``, or when those queued would take
                more than ``SHED_FRACTION`` of ``timeout_s`` at the running estimate of seconds per character
                (a request that would likely time out is refused now rather than then).
        """
        if self._closing or self._worker is None or self._worker.done():
            raise RequestError(503, "the server is shutting down", retry_after=RETRY_AFTER_MIN_S)
        if self.queued_texts + texts > self.limits.max_queue:
            self.refused += 1
            raise RequestError(503, f"the server is busy: {self.queued_texts} texts are queued and --max-queue is "
                                    f"{self.limits.max_queue}; retry later", retry_after=self.retry_after())
        ahead = self.queued_seconds()  # nothing queued: always admitted
        if ahead > SHED_FRACTION * self.limits.timeout_s:
            self.refused += 1
            raise RequestError(503, f"the server is busy: the {self.queued_texts} texts queued would take about "
                                    f"{ahead:.0f} s, more than half of --timeout-s={self.limits.timeout_s:g}; retry "
                                    "later", retry_after=self.retry_after())

    async def submit(self, texts: list[str]) -> Any:
        """The answer rows for these texts (the exception of ``prepare`` or ``score`` raised).

        Raises:
            RequestError: from :meth:`check_room`.
        """
        self.check_room(len(texts))
        future = asyncio.get_running_loop().create_future()
        self.received += 1
        self.in_flight += 1
        self.queued_texts += len(texts)
        work = work_chars(texts)
        self.queued_chars += work
        try:
            self._inbox.put_nowait(_Pending(texts, future))
            return await future  # cancelled (a time limit) cancels the future: the worker drops it
        finally:
            self.in_flight -= 1
            self.queued_texts -= len(texts)
            self.queued_chars -= work

    async def close(self) -> None:
        """Answer everything already submitted, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._inbox.put_nowait(None)  # after every request submitted so far
        await self._worker

    async def _work(self) -> None:
        closing = False
        while True:
            arrivals: list[_Pending] = []
            if not self._scheduler and not closing:  # idle: wait for a request, then briefly for more
                closing = await self._wait_for_requests(arrivals)
            while not closing:  # whatever else has arrived, without waiting
                try:
                    item = self._inbox.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if item is None:
                    closing = True
                else:
                    arrivals.append(item)
            await self._admit([p for p in arrivals if not p.future.done()])
            for key in self._scheduler.keys():
                if key.future.done():  # its client's time limit passed: score no more of it
                    self._drop(key)
            batch = self._scheduler.next_batch()
            if batch:
                await self._score(batch)
            elif closing:
                return

    async def _wait_for_requests(self, arrivals: list[_Pending]) -> bool:
        """Wait for one request, then up to ``max_wait_ms`` for more until they hold ``max_batch`` texts.
        Returns whether the close marker came."""
        item = await self._inbox.get()
        if item is None:
            return True
        arrivals.append(item)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.max_wait_ms / 1000
        while sum(len(p.texts) for p in arrivals if not p.future.done()) < self.limits.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):
                    item = await self._inbox.get()  # asyncio.Queue keeps the item if this is cancelled
            except TimeoutError:
                return False
            if item is None:
                return True
            arrivals.append(item)
        return False

    async def _admit(self, arrivals: list[_Pending]) -> None:
        """Tokenize new requests (in the thread the model runs in) and schedule them; errors answered."""
        if not arrivals:
            return
        try:
            prepared = await asyncio.to_thread(self.prepare, [p.texts for p in arrivals])
        except Exception as err:  # noqa: BLE001 - prepare isolates requests itself; this is the last resort
            prepared = [err] * len(arrivals)
        for pending, ids in zip(arrivals, prepared, strict=True):
            if pending.future.done():
                continue
            if isinstance(ids, BaseException):
                pending.future.set_exception(ids)
            else:
                pending.ids = ids
                self._scheduler.add(pending, [len(x) for x in ids])

    async def _score(self, batch: list[Chunk]) -> None:
        """One call of ``score`` on the batch's chunks; a request is answered once all its chunks are."""
        self.batches += 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        work = [chunk.key.scored(chunk) for chunk in batch]
        try:
            results = await asyncio.to_thread(self.score, work)
        except Exception as err:  # noqa: BLE001 - score isolates chunks itself; this is the last resort
            results = [err] * len(batch)
        latest = (loop.time() - started) / sum(chunk.key.work(chunk) for chunk in batch)
        self.seconds_per_char = latest if self.seconds_per_char is None else (
            RATE_SMOOTHING * latest + (1 - RATE_SMOOTHING) * self.seconds_per_char)
        for chunk, done, result in zip(batch, work, results, strict=True):
            pending = chunk.key
            if pending.future.done():  # given up meanwhile
                self._drop(pending)
            elif isinstance(result, BaseException):
                self._drop(pending)  # its other chunks are not scored
                pending.future.set_exception(result)
            else:
                if isinstance(done, Piece):  # the cache for its next piece; none after the last (in batch order)
                    pending.state = done.state if done.end < len(done.ids) else None
                pending.rows.extend(result)
                if len(pending.rows) == len(pending.texts):
                    pending.future.set_result(pending.rows)

    def _drop(self, pending: _Pending) -> None:
        """Score no more of a request; the cache of its text in pieces goes with it."""
        self._scheduler.drop(pending)
        pending.state = None


# -- the HTTP application ------------------------------------------------------------------------

def require_serving_packages() -> None:
    """Import fastapi and uvicorn, or say in one line how to install them.

    Raises:
        ModuleNotFoundError: naming the missing package and ``pip install 'cptune[serve]'``.
    """
    for name in ("fastapi", "uvicorn"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            raise ModuleNotFoundError(f"cptune serve needs {name}, which is not installed: {SERVE_EXTRA}",
                                      name=name) from None


def page_html() -> str:
    """The page served at ``/`` (package data)."""
    return importlib.resources.files("cptune.app").joinpath(PAGE).read_text(encoding="utf-8")


def create_app(served: ServedClassifier, limits: Limits, api_key: str | None = None):
    """The FastAPI application over ``served``; its lifespan runs the batching worker and drains it.

    Args:
        served: the loaded classifier.
        limits: the server's limits.
        api_key: when given, every endpoint but ``/health`` and the page at ``/`` answers 401 unless the
            request carries it (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``).
    """
    require_serving_packages()
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.requests import ClientDisconnect

    batcher = Batcher(served.prepare, served.score, limits)
    page = page_html()
    expected_key = None if api_key is None else api_key.encode("utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.close()  # uvicorn has answered every request by now; this stops the worker

    app = FastAPI(title="cptune", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages load scripts from a CDN
    app.state.batcher = batcher

    def error(err: RequestError) -> JSONResponse:
        headers = {} if err.retry_after is None else {"Retry-After": str(err.retry_after)}
        return JSONResponse({"detail": err.message}, status_code=err.status, headers=headers)

    def require_key(request: Request) -> None:
        if expected_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key", "")
        # Starlette decodes header bytes as latin-1: encoding back gives the bytes the client sent
        if not hmac.compare_digest(given.encode("latin-1"), expected_key):
            raise HTTPException(401, "this server needs an API key: send it as 'Authorization: Bearer KEY' or "
                                     "'X-API-Key: KEY'" + (" (the one sent is not it)" if given else ""),
                                headers={"WWW-Authenticate": "Bearer"})

    keyed = [Depends(require_key)]

    @app.get("/", response_class=HTMLResponse)
    async def index():  # the page holds no data; it asks for the key and sends it with its requests
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "requests": batcher.received, "in_flight": batcher.in_flight,
                "queued_texts": batcher.queued_texts, "refused": batcher.refused, "batches": batcher.batches}

    @app.get("/info", dependencies=keyed)
    async def info():
        return {**served.info, "limits": limits.as_dict()}

    @app.post("/predict", dependencies=keyed)
    async def predict(request: Request):
        try:
            async with asyncio.timeout(limits.timeout_s):  # from the request's arrival to its answer
                batcher.check_room()  # a full queue refuses before reading the body
                body = bytearray()
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limits.max_body_bytes:
                        raise RequestError(413, f"the body has more than {limits.max_body_bytes} bytes, more than "
                                                f"{limits.max_texts} texts of {limits.max_chars} characters can "
                                                "take (--max-texts, --max-chars)")
                texts = parse_texts(bytes(body), limits)
                rows = await batcher.submit(texts) if texts else []
        except RequestError as err:
            return error(err)
        except ClientDisconnect:  # nobody reads this answer; without it, a traceback in the log
            return error(RequestError(400, "the client closed the connection before the body ended"))
        except TimeoutError:
            return error(RequestError(503, f"not answered within --timeout-s={limits.timeout_s:g} s (the server "
                                           "is busy); retry later", retry_after=batcher.retry_after()))
        return JSONResponse({"predictions": rows})

    return app


# -- the command ---------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``serve`` (the classifier folder and the server's options) on ``cptune``'s subparsers.

    The caller adds the options that load the model (``--model``, ``--device``, ``--dtype``,
    ``--device-map``, ``--batch-size``, ``--calibrate``), as for ``cptune predict``.
    """
    p = subparsers.add_parser(
        "serve", help="an HTTP JSON service (and a page) over a saved classifier; its context encoded once",
        description="Serve a saved classifier over HTTP: POST /predict {\"texts\": [...]}, GET /health, "
                    "GET /info, a page at /. Concurrent requests are batched. docs/serve.md has the details.")
    p.add_argument("classifier", help="folder written by `cptune train`, `cptune demo` (OUTPUT/classifier) or "
                                      "CPTClassifier.save; or a hub repo id written by push_to_hub")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="port to listen on; 0 picks a free one (printed) (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                   help="texts of concurrent requests scored together (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=DEFAULT_MAX_WAIT_MS,
                   help="how long to wait for more requests to batch with one (default: %(default)s)")
    p.add_argument("--max-texts", type=int, default=DEFAULT_MAX_TEXTS,
                   help="texts in one request; more are answered 413 (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                   help="characters in one text; more are answered 413 (default: %(default)s)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="query tokens scored together; longer requests are scored in chunks, and longer texts in "
                        "pieces, that interleave with other requests (default: {cpu} on a CPU, "
                        "{other} on a GPU)".format(cpu=DEFAULT_MAX_BATCH_TOKENS["cpu"],
                                                     other=ACCELERATOR_MAX_BATCH_TOKENS))
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="texts received and not yet answered; a request beyond is answered 503 with Retry-After "
                        "at once (default: %(default)s)")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds from a request's arrival to its answer; later: 503 with Retry-After "
                        "(default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require this key on every endpoint but /health and the page (401 otherwise), sent as "
                        f"'Authorization: Bearer KEY' or 'X-API-Key: KEY'; or set {API_KEY_ENV} (which, unlike "
                        "an option, other users of the machine cannot see in the process list)")
    return p


def check_port(port: int) -> None:
    """Raises ValueError for a port outside 0..65535."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port} must be from 0 to 65535 (0: any free port)")


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not listening yet: uvicorn starts listening once the model is loaded).

    Raises:
        ValueError: a port outside 0..65535 or a host that does not resolve.
        OSError: the address cannot be bound (in use, not this machine's), naming it.
    """
    check_port(port)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ValueError(f"--host={host!r} does not resolve ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def api_key_from(option: str | None) -> str | None:
    """The key to require: ``--api-key``, else ``$CPTUNE_API_KEY`` when set and not empty, else ``None``.

    Raises:
        ValueError: an empty ``--api-key``.
    """
    if option is not None:
        if not option:
            raise ValueError("--api-key='' must not be empty (leave it out to serve without a key)")
        return option
    return os.environ.get(API_KEY_ENV) or None


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a server reachable beyond this machine without a key (``None`` if it is not)."""
    if api_key is not None:
        return None
    try:
        local = ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:  # a name, not an address
        local = host.lower() in LOOPBACK_NAMES
    if local:
        return None
    return (f"cptune: warning: listening on {host} without an API key: anyone who can reach this address can use "
            f"the classifier (set --api-key or {API_KEY_ENV})")


def load_served(folder: str, model: str | None = None, device: str = "auto", dtype: str = "auto",
                device_map: str | None = None, batch_size: int = 8, calibrate: bool | None = None) -> ServedClassifier:
    """Load a saved classifier and prepare it for serving (the model once; the context encoded once).

    Args:
        folder: the classifier's folder, or a hub repo id that ``CPTClassifier.push_to_hub`` wrote (an
            existing folder wins; :func:`cptune.cpt.hub.resolve_folder`).
        model, device, dtype, device_map, batch_size: as for ``CPTClassifier.load``.
        calibrate: ``None`` keeps the classifier's own setting.

    Raises:
        FileNotFoundError: no such folder or repo, or no ``cptune_classifier.json`` in it.
        ValueError: a bad option value or a damaged save.
    """
    from cptune.app.classifier import CLASSIFIER_FILE, CPTClassifier
    from cptune.cpt.files import read_json_object
    from cptune.cpt.hub import resolve_folder
    from cptune.models import load_model

    path = resolve_folder(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"classifier folder {folder} does not exist" if not path.exists()
                                else f"{folder} is a file, not a classifier folder")
    if batch_size < 1:
        raise ValueError(f"--batch-size={batch_size} must be >= 1")
    name = model or read_json_object(path, CLASSIFIER_FILE, "a classifier folder (cptune train --output)")["model"]
    base, tokenizer = load_model(name, dtype=dtype, device=device, device_map=device_map)
    clf = CPTClassifier.load(path, model=(base, tokenizer), batch_size=batch_size)
    if calibrate is not None:
        clf.calibrate = calibrate
    return ServedClassifier(clf, base, tokenizer, name)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def check_options(args: argparse.Namespace) -> tuple[Limits, str | None]:
    """The server's limits and API key from its options, each value checked (the port's range too).

    Raises:
        ValueError: naming the option and what it accepts.
    """
    limits = Limits(args.max_batch, args.max_wait_ms, args.max_texts, args.max_chars,
                    max_batch_tokens=args.max_batch_tokens or Limits.max_batch_tokens, max_queue=args.max_queue,
                    timeout_s=args.timeout_s)
    check_port(args.port)
    return limits, api_key_from(args.api_key)


def run(args: argparse.Namespace) -> int:
    """Run ``cptune serve`` until SIGTERM or Ctrl-C; 0 after a graceful stop."""
    limits, api_key = check_options(args)  # every value checked before the model loads
    require_serving_packages()
    import uvicorn

    sock = listening_socket(args.host, args.port)  # a busy port fails before the model loads
    try:
        warning = exposure_warning(sock.getsockname()[0], api_key)
        if warning:
            print(warning, file=sys.stderr, flush=True)
        _quiet_transformers()
        served = load_served(args.classifier, args.model, args.device, args.dtype, args.device_map,
                             args.batch_size, args.calibrate)
        if args.max_batch_tokens is None:
            limits = dataclasses.replace(limits, max_batch_tokens=default_batch_tokens(served.device_type))
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        config = uvicorn.Config(create_app(served, limits, api_key), http="h11", loop="asyncio", lifespan="on",
                                log_level="warning", timeout_graceful_shutdown=None)
        # uvicorn raises the signal again once it has shut down gracefully; handled here, a SIGTERM
        # ends the process with status 0 (not killed by the signal) after every request is answered.
        previous = signal.signal(signal.SIGTERM, _stopped)
        try:
            asyncio.run(_serve(uvicorn.Server(config), sock, f"cptune: serving {args.classifier} on {url}"))
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    print("cptune: stopped", file=sys.stderr, flush=True)
    return 0


def _stopped(signum, frame) -> None:
    """SIGTERM after uvicorn's graceful shutdown: nothing left to do."""


async def _serve(server, sock: socket.socket, ready: str) -> None:
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():  # started: uvicorn is listening
        await asyncio.sleep(0.02)
    if server.started:
        print(ready, flush=True)
    await serving
