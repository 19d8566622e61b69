"""The request scheduling of `cptune serve`, in process and without a model: which texts each model call
scores (Scheduler, pure and deterministic), the worker that admits requests and runs the calls (Batcher, over
fake prepare and score functions) and the limits' checks. tests/test_serve.py runs them with the real scorer
and in a server process.

Every loop is bounded in count and time."""

import asyncio
import gc
import math
import re
import threading
import time
import weakref

import pytest

from cptune.app import batching
from cptune.app.batching import Chunk


def test_scheduler_interleaves_chunks_of_a_long_request_with_later_requests():
    """Pure and deterministic: which texts each model call scores. A request that arrives while a long one
    is being scored is in the very next batch, ahead of the long one, not behind its other chunks."""
    sched = batching.Scheduler(max_texts=4, max_tokens=100)
    sched.add("long", [10] * 10)
    assert sched.next_batch() == [Chunk("long", 0, 4)]  # one chunk, at most 4 texts
    sched.add("short", [10])  # arrives while that chunk runs
    assert sched.next_batch() == [Chunk("short", 0, 1), Chunk("long", 4, 7)]  # first in turn; "long" fills the rest
    sched.add("next", [10, 10])
    assert sched.next_batch() == [Chunk("next", 0, 2), Chunk("long", 7, 9)]  # "long" was in the last batch: behind
    assert sched.next_batch() == [Chunk("long", 9, 10)] and sched.next_batch() == [] and len(sched) == 0


def test_scheduler_batches_by_tokens_and_cuts_a_text_over_the_budget_in_pieces():
    sched = batching.Scheduler(max_texts=32, max_tokens=100)
    sched.add("a", [60, 60, 30])
    sched.add("huge", [250])
    sched.add("b", [5, 5])
    # Whole texts first (60 + 60 > 100: "a" gives one), then the piece of "huge" in the room left
    assert sched.next_batch() == [Chunk("a", 0, 1), Chunk("huge", 0, 1, (0, 30)), Chunk("b", 0, 2)]
    assert sched.next_batch() == [Chunk("a", 1, 3), Chunk("huge", 0, 1, (30, 40))]
    assert sched.next_batch() == [Chunk("huge", 0, 1, (40, 140))]  # alone: a whole call's piece
    assert sched.next_batch() == [Chunk("huge", 0, 1, (140, 240))]
    assert sched.next_batch() == [Chunk("huge", 0, 1, (240, 250))] and sched.next_batch() == [] and not sched
    sched.add("x", [1] * 3)
    sched.add("y", [1] * 3)
    sched.drop("x")  # answered with an error, or given up by its client
    assert sched.keys() == ["y"] and sched.next_batch() == [Chunk("y", 0, 3)]
    with pytest.raises(ValueError, match="at least one text"):
        sched.add("empty", [])


def test_scheduler_gives_a_short_request_the_next_call_beside_a_text_in_pieces():
    """A one-text request waits for at most the call being scored: the next call holds it and the long
    text's next piece in the room left; the long text's pieces follow one another in order."""
    sched = batching.Scheduler(max_texts=8, max_tokens=100)
    sched.add("long", [10, 330, 10])
    assert sched.next_batch() == [Chunk("long", 0, 1), Chunk("long", 1, 2, (0, 90))]  # then nothing more from it
    sched.add("short", [7])
    assert sched.next_batch() == [Chunk("short", 0, 1), Chunk("long", 1, 2, (90, 183))]
    sched.add("short2", [7])
    sched.add("short3", [95])
    # 7 + 95 is more than the 75 whole texts may take while a piece waits: "short3" goes in the next call
    assert sched.next_batch() == [Chunk("short2", 0, 1), Chunk("long", 1, 2, (183, 276))]
    assert sched.next_batch() == [Chunk("short3", 0, 1), Chunk("long", 1, 2, (276, 281))]
    # the last piece, then the request's next text in the same call: it does not depend on the pieces
    assert sched.next_batch() == [Chunk("long", 1, 2, (281, 330)), Chunk("long", 2, 3)]
    assert sched.next_batch() == [] and not sched


def test_scheduler_cuts_at_most_max_in_pieces_texts_at_a_time_and_puts_whole_texts_first():
    sched = batching.Scheduler(max_texts=8, max_tokens=100, max_in_pieces=2)
    for key in "abc":
        sched.add(key, [250, 5])
    assert sched.next_batch() == [Chunk("a", 0, 1, (0, 100))]
    assert sched.next_batch() == [Chunk("b", 0, 1, (0, 100))]
    # "c" is first in turn, but its long text would be a third in pieces: it waits, and so does its short one
    assert sched.next_batch() == [Chunk("a", 0, 1, (100, 200))]
    sched.add("d", [5])  # behind "b" in turn, but a whole text: in the next call, beside the piece
    assert sched.next_batch() == [Chunk("b", 0, 1, (100, 195)), Chunk("d", 0, 1)]
    sched.drop("a")  # given up with a text in pieces: no longer counted
    assert sched.next_batch() == [Chunk("c", 0, 1, (0, 100))]
    assert sched.keys() == ["c", "b"]


def test_scheduler_of_one_text_a_call_takes_pieces_and_texts_in_turn():
    sched = batching.Scheduler(max_texts=1, max_tokens=100)
    sched.add("long", [250])
    sched.add("s1", [5])
    sched.add("s2", [5])
    batches = [sched.next_batch() for _ in range(6)]
    assert batches == [[Chunk("long", 0, 1, (0, 100))], [Chunk("s1", 0, 1)], [Chunk("s2", 0, 1)],
                       [Chunk("long", 0, 1, (100, 200))], [Chunk("long", 0, 1, (200, 250))], []]


def test_batcher_chunks_requests_bounds_the_queue_and_drains_on_close():
    calls = []

    def prepare(requests):
        return [[[len(t) if t != "fail" else -1] for t in texts] if texts[0] != "untokenizable"
                else batching.RequestError(413, "too long") for texts in requests]

    def score(chunks):
        calls.append([len(chunk) for chunk in chunks])
        time.sleep(0.05)  # the model's time: requests keep arriving meanwhile
        return [[ids[0] * 10 for ids in chunk] if chunk[0] != [-1] else ValueError("no") for chunk in chunks]

    async def scenario():
        limits = batching.Limits(max_batch=8, max_wait_ms=200, max_texts=20, max_queue=40, timeout_s=10)
        batcher = batching.Batcher(prepare, score, limits)
        batcher.start()
        sizes = [3, 3, 3, 20, 1, 2]
        tasks = [asyncio.create_task(batcher.submit(["x" * (i + 1)] * n)) for i, n in enumerate(sizes)]
        failing = asyncio.create_task(batcher.submit(["fail"]))  # scored to an error
        refused = asyncio.create_task(batcher.submit(["untokenizable"]))
        await asyncio.sleep(0)  # every request queued: 34 texts
        assert batcher.queued_texts == 34
        with pytest.raises(batching.RequestError) as full:  # 34 + 7 > 40: at once, not queued
            await batcher.submit(["y"] * 7)
        assert full.value.status == 503 and full.value.retry_after >= 1 and batcher.refused == 1
        work = 3 * 1 + 3 * 2 + 3 * 3 + 20 * 4 + 5 + 2 * 6 + 4 + 13 + 34 * batching.TEXT_OVERHEAD_CHARS
        assert batcher.queued_chars == work
        batcher.seconds_per_char = 2**-7  # as if measured (exact in binary): the 34 texts queued take ~12 s > 10 / 2
        with pytest.raises(batching.RequestError, match="the 34 texts queued would take about 12 s") as slow:
            await batcher.submit(["y"])
        assert slow.value.status == 503 and slow.value.retry_after == math.ceil(work * 2**-7) == 12
        assert batcher.refused == 2
        batcher.seconds_per_char = 2**-9  # ~3 s: there is room
        batcher.check_room(1)
        await batcher.close()  # answers everything submitted before it
        with pytest.raises(batching.RequestError, match="shutting down"):  # closed: refused
            await batcher.submit(["late"])
        with pytest.raises(ValueError, match="no"):
            await failing
        with pytest.raises(batching.RequestError, match="too long"):
            await refused
        return [t.result() for t in tasks], batcher

    results, batcher = asyncio.run(scenario())
    assert results[0] == [10] * 3 and results[3] == [40] * 20 and results[5] == [60, 60]
    # Requests in turn, each giving its next texts while they fit, those of the last call behind the others;
    # the 20-text one in chunks (8, 3, 8, 1) that alternate with the others: the requests behind it go first
    # in the third call, not after it.
    assert calls == [[3, 3, 2], [8], [1, 2, 1, 1, 3], [8], [1]], calls
    assert batcher.batches == 5 and batcher.in_flight == 0 and batcher.queued_texts == 0 and batcher.received == 8


def test_batcher_scores_a_long_text_in_pieces_beside_short_requests():
    """A fake model that keeps a running sum between pieces: a long text's answer is the sum of all its tokens,
    each run once and in order; short requests are answered while it is in pieces; a failing piece answers its
    request with the error; a request given up mid-text has no more pieces scored and its state is let go."""
    calls, kept_states = [], []
    gates = {120: threading.Event(), 400: threading.Event()}

    class Kept:  # what the fake model keeps between pieces
        def __init__(self, total, done):
            self.total, self.done = total, done

    def prepare(requests):  # "L120": tokens 1..120; "X80": 79 ones then a token the model fails on
        return [[list(range(1, int(t[1:]) + 1)) if t[0] == "L" else [1] * (int(t[1:]) - 1) + [-1] if t[0] == "X"
                 else [len(t)] for t in texts] for texts in requests]

    def score(chunks):
        calls.append([(len(c.ids), c.start, c.end) if isinstance(c, batching.Piece) else len(c) for c in chunks])
        for size, gate in gates.items():  # the first call with a piece of that text waits for the test
            if any(isinstance(c, batching.Piece) and len(c.ids) == size and c.start == 0 for c in chunks):
                gate.wait(timeout=60)
        results = []
        for chunk in chunks:
            if not isinstance(chunk, batching.Piece):
                results.append([ids[0] for ids in chunk])
                continue
            kept = chunk.state or Kept(0, 0)
            tokens = chunk.ids[chunk.start : chunk.end]
            if kept.done != chunk.start or -1 in tokens:
                results.append(ValueError(f"piece {chunk.start}:{chunk.end} after {kept.done} tokens"))
            elif chunk.end == len(chunk.ids):
                results.append([kept.total + sum(tokens)])
            else:
                chunk.state = Kept(kept.total + sum(tokens), chunk.end)
                kept_states.append((len(chunk.ids), weakref.ref(chunk.state)))
                results.append([])
        return results

    async def until(condition):
        while not condition():
            await asyncio.sleep(0.005)

    async def scenario():
        batcher = batching.Batcher(prepare, score, batching.Limits(max_batch=8, max_batch_tokens=50, max_wait_ms=0))
        batcher.start()
        async with asyncio.timeout(60):  # ends a test that would hang; nothing is timed
            long = asyncio.create_task(batcher.submit(["L120", "abc", "L60"]))
            await until(lambda: calls)
            short = asyncio.create_task(batcher.submit(["ab"]))  # while the first piece is scored
            await asyncio.sleep(0)
            gates[120].set()
            short = await short
            assert not long.done()
            # the next one comes once the long request's last piece is being scored: one that came earlier would
            # take its turn before that piece (a request in a batch goes behind those that were not), and the
            # calls asserted below would depend on the machine's speed
            await until(lambda: len(calls) >= 4)
            given_up = asyncio.create_task(batcher.submit(["L400"]))
            await until(lambda: any(c[0] == 400 for call in calls for c in call if isinstance(c, tuple)))
            given_up.cancel()  # as its time limit does, while its first piece is scored
            await asyncio.sleep(0)
            scored = len(calls)
            gates[400].set()
            # the last piece holds the failing token; where it starts depends on what shares its calls (the
            # long request's last piece may still be queued), but it runs after every token before it
            with pytest.raises(ValueError, match=r"piece (\d+):80 after \1 tokens"):
                await batcher.submit(["X80"])
            gc.collect()
            assert [ref() for size, ref in kept_states if size in (400, 80)] == [None, None]  # while serving on
            result = await long
            await batcher.close()
        return short, result, scored, batcher

    short, long, scored, batcher = asyncio.run(scenario())
    assert short == [2] and long == [120 * 121 // 2, 3, 60 * 61 // 2]
    pieces = [c for call in calls for c in call if isinstance(c, tuple)]
    assert [c for c in pieces if c[0] == 120] == [(120, 0, 50), (120, 50, 99), (120, 99, 120)]
    # "ab" in the call after it came; the long request's next texts in the call of its last piece, the
    # next long one's first piece too (it starts afresh, not after the text that ended)
    assert calls[:4] == [[(120, 0, 50)], [1, (120, 50, 99)], [(120, 99, 120), 1, (60, 0, 28)], [(60, 28, 60)]]
    assert [c for call in calls for c in call if isinstance(c, tuple) and c[0] == 400] == [(400, 0, 50)]
    assert scored == 5
    assert all(ref() is None for _, ref in kept_states)  # no cache kept once the requests are answered or dropped
    assert batcher.batches == len(calls) and batcher.in_flight == 0 and batcher.queued_texts == 0


@pytest.mark.parametrize("option, message", [
    ({"max_queue": 10, "max_texts": 20}, "--max-queue=10 must be >= --max-texts=20"),
    ({"max_batch_tokens": 0}, "--max-batch-tokens=0 must be an integer >= 1"),
    ({"timeout_s": 0}, "--timeout-s=0 must be > 0"),
])
def test_limits_name_the_bad_option(option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        batching.Limits(**option)
