"""How ``cptune serve`` schedules its model calls and admits requests (standard library only).

:class:`Limits` holds the server's limits (what one request may hold, how many texts and query tokens one
model call scores, how much work the server takes on). :class:`Scheduler` decides which texts each model
call scores: the requests' texts in chunks that interleave, and a text longer than a call's token budget
in pieces (:class:`Piece`) that run one after another; it is pure and deterministic (no I/O).
:class:`Batcher` is the one worker task that takes requests, has the scheduler fill each call and runs
the calls in a thread; it admits a request only while the queue has room (``max_queue``, and no more
than :data:`SHED_FRACTION` of ``timeout_s`` of work at its recent speed) and refuses it otherwise with a
:class:`RequestError` (503 with ``Retry-After``). What a call runs (the tokenizer, the model) comes in as
two functions, :class:`cptune.app.serve.ServedClassifier`'s ``prepare`` and ``score``; this module
imports nothing from :mod:`cptune.app.serve`, which imports it.

Only the standard library is imported here (``cptune --help`` builds ``serve``'s options from these
defaults and stays fast).
"""

import asyncio
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

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
JSON_BYTES_PER_CHAR = 12  # the most one character can take in a JSON string (a surrogate pair as \uXXXX\uXXXX)
BODY_OVERHEAD_BYTES = 4096  # braces, the key, commas and whitespace around the texts


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


# -- batching ------------------------------------------------------------------------------------

@dataclass(eq=False)
class Piece:
    """Tokens ``start .. end - 1`` of one query too long for a model call, run after its earlier pieces.

    Attributes:
        ids: the whole query's token ids.
        start: the first token of this piece (0 for the first piece).
        end: past its last token; the last piece ends at ``len(ids)`` and gives the query's answer row.
        state: what the scoring side keeps between pieces (:meth:`cptune.app.serve.ServedClassifier.score`: the
            context's cache grown by the tokens before ``start``); ``None`` before the first piece.
    """

    ids: Sequence[int]
    start: int
    end: int
    state: Any = None


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
