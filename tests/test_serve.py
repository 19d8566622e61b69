"""`cptune serve`: the context-once scorer against score_texts, the batcher over it, and a real server process on
loopback answered over real HTTP (concurrent requests equal to predict_proba, every error status, SIGTERM
under load), and its page driven in headless Chromium where Debian's package is installed.

Every loop is bounded in count and time; nothing leaves 127.0.0.1."""

import asyncio
import base64
import http.client
import json
import math
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cptune
from cptune import CPTClassifier, TrainSettings
from cptune.app import batching, serve
from cptune.app.cli import main
from cptune.scoring import ContextScorer, score_texts
from tiny import tiny_model, tiny_tokenizer

LOOPBACK = "127.0.0.1"
STARTUP_S = 120  # a server process imports torch and loads the model; the CPU may be shared
REQUEST_S = 60
ARTIFACTS = Path(__file__).parent / "artifacts"  # gitignored; the browser test's screenshot
LABELS = {0: "negative", 1: "very positive"}  # integer labels (JSON numbers), a two-token label word
TRAIN = [(f"a {w} film, take {i}", int(k % 2 == 0)) for i in range(2)
         for k, w in enumerate(["fun", "dull", "great", "bad", "joy", "bore", "gripping", "long"])]
TEXTS = ["a fun film", "so dull, so long", "great", "the plot is thin", "wonderful actors", "", "terrible, bad",
         "a gripping and moving story", "far too long and dull", "the best movie of the year"]
LIMITS = ["--max-texts", "8", "--max-chars", "1500"]
TOO_MANY_POSITIONS = "中" * 1000  # 1000 characters (within --max-chars) but 3000 tokens: the tiny Llama has 2048
KEY = "k3y-for-tests"
KEYED_LIMITS = ["--max-texts", "64", "--max-chars", "1500", "--max-batch", "4", "--max-batch-tokens", "256"]
# A worker that waits up to 30 s for 8 texts before scoring: requests stay queued until a test fills the batch.
BUSY_LIMITS = ["--max-texts", "8", "--max-batch", "8", "--max-queue", "8", "--max-wait-ms", "30000", "--timeout-s", "2"]


# -- the scorer and the batcher, in process --------------------------------------------------------
# (the Scheduler and the Batcher over fake model calls: tests/test_batching.py)

@pytest.mark.parametrize("calibrate", [False, True])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_context_scorer_equals_score_texts(calibrate, length_normalize):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    template = cptune.Template("input: {x} output: {y}")
    words = {"neg": "negative", "pos": "very positive", "mid": "neutral"}
    demonstration = tok("input: a waste of time output: negative\n")["input_ids"]
    context = model.get_input_embeddings()(torch.tensor([demonstration]))  # (1, N, d)
    scorer = ContextScorer(model, tok, template, words, context, batch_size=3,
                           length_normalize=length_normalize, calibrate=calibrate)
    for texts in (TEXTS, TEXTS[:1]):  # batches of other sizes, the same scores
        expected = score_texts(model, tok, template, words, texts, context, batch_size=8,
                               length_normalize=length_normalize, calibrate=calibrate)
        assert torch.allclose(scorer.scores(scorer.query_ids(texts)), expected, atol=1e-5, rtol=0)
    assert scorer.context_tokens == context.shape[1]
    zero_shot = ContextScorer(model, tok, template, words, None, calibrate=calibrate)
    assert torch.allclose(zero_shot.scores(zero_shot.query_ids(TEXTS)),
                          score_texts(model, tok, template, words, TEXTS, None, calibrate=calibrate), atol=1e-5)


def test_a_long_text_in_pieces_through_the_batcher_equals_predict_proba(classifier, expected):
    """The real scorer: texts longer than --max-batch-tokens (scored in pieces, two at a time, beside whole
    texts) get predict_proba's probabilities."""
    served = serve.load_served(str(classifier))
    requests = [["a gripping and moving story " * 6, "great"], ["a fun film"], ["so dull " * 12, "the plot is thin"]]
    budget = 16
    assert max(len(ids) for ids in served.scorer.query_ids([t for r in requests for t in r])) > 3 * budget

    async def scenario():
        batcher = batching.Batcher(served.prepare, served.score, batching.Limits(max_batch=3, max_batch_tokens=budget))
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(texts) for texts in requests))
        await batcher.close()
        return answers, batcher.batches

    answers, batches = asyncio.run(scenario())
    for rows, texts in zip(answers, requests, strict=True):
        check_predictions({"predictions": rows}, texts, expected)
    total = sum(len(ids) for ids in served.scorer.query_ids([t for r in requests for t in r]))
    assert batches >= math.ceil(total / budget)  # every call within the budget


# -- a trained classifier and a server process -----------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tiny_dir, tmp_path_factory):
    """A tiny classifier with calibration and length normalisation on (the server must reproduce both)."""
    folder = tmp_path_factory.mktemp("serve") / "clf"
    clf = CPTClassifier(model=str(tiny_dir), template="input: {x} output: {y}", labels=LABELS, context_size=4,
                        calibrate=True, length_normalize=True, train=TrainSettings(steps=2, lr=0.01, batch_size=4))
    clf.fit([t for t, _ in TRAIN], [y for _, y in TRAIN]).save(folder)
    return folder


@pytest.fixture(scope="module")
def expected(classifier):
    """``texts -> (n, C) probabilities`` of the classifier loaded in this process."""
    clf = CPTClassifier.load(classifier)
    cache = {}

    def probabilities(texts):
        missing = [t for t in dict.fromkeys(texts) if t not in cache]
        if missing:
            cache.update(zip(missing, clf.predict_proba(missing).tolist(), strict=True))
        return [cache[t] for t in texts]

    probabilities.classes = clf.classes_
    return probabilities


class Server:
    """``python -m cptune serve FOLDER --port 0 ...`` as a child process, on loopback; :meth:`wait_ready`
    before use (several start at once: their imports overlap)."""

    def __init__(self, folder, *options, env=None):
        self.log = tempfile.TemporaryFile(mode="w+")
        inherited = {k: v for k, v in os.environ.items() if k != serve.API_KEY_ENV}  # a key only where given
        env = {**inherited, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "cptune", "serve", str(folder), "--host", LOOPBACK,
                                      "--port", "0", *options], stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env)
        self.url = self.port = None

    def wait_ready(self):
        if self.port is not None:
            return self
        deadline = time.monotonic() + STARTUP_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline and self.proc.poll() is None:
                if sel.select(timeout=0.5):
                    line = self.proc.stdout.readline()
                    found = re.fullmatch(r"cptune: serving .+ on (http://127\.0\.0\.1:(\d+))\n", line)
                    if found:
                        self.url, self.port = found[1], int(found[2])
                        return self
        self.stop()
        raise AssertionError(f"the server did not start (exit {self.proc.returncode}): {self.stderr()[-2000:]}")

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def request(port, method, path, body=None, timeout=REQUEST_S, headers=None, with_headers=False):
    """``(status, parsed JSON or text)``, and the response's headers ``with_headers``; http.client so that no
    proxy setting can send it elsewhere."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"} if data else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        raw = response.read().decode()
        is_json = response.getheader("content-type", "").startswith("application/json")
        answer = response.status, json.loads(raw) if is_json else raw
        return (*answer, dict(response.getheaders())) if with_headers else answer
    finally:
        conn.close()


def check_predictions(answer, texts, expected, atol=1e-5):
    want = expected(texts)
    assert len(answer["predictions"]) == len(texts)
    for got, probs in zip(answer["predictions"], want, strict=True):
        assert list(got["probabilities"]) == [str(c) for c in expected.classes]
        assert list(got["probabilities"].values()) == pytest.approx(probs, abs=atol)
        best = max(range(len(probs)), key=probs.__getitem__)
        if max(probs) - sorted(probs)[-2] > 1e-4:  # a clear winner: the same label, its JSON type kept
            assert got["label"] == expected.classes[best] and type(got["label"]) is type(expected.classes[best])


@pytest.fixture(scope="module")
def servers(classifier):
    """Server processes started together: one for most tests, one for the SIGTERM test to stop, one with an
    API key (and small batches, for the head-of-line and hostile-input tests), one with a tiny queue whose
    worker waits long for a batch to fill (the overload tests)."""
    started = {"main": Server(classifier, *LIMITS, "--max-wait-ms", "100"),
               "to_stop": Server(classifier, "--max-batch", "8"),
               "keyed": Server(classifier, *KEYED_LIMITS, env={serve.API_KEY_ENV: KEY}),
               "busy": Server(classifier, *BUSY_LIMITS)}
    try:
        yield started
    finally:
        for running in started.values():
            running.stop()
    assert started["main"].proc.returncode == 0, started["main"].stderr()[-2000:]


@pytest.fixture(scope="module")
def server(servers):
    return servers["main"].wait_ready()


def test_concurrent_requests_equal_predict_proba(server, expected):
    before = request(server.port, "GET", "/health")[1]
    batches = [TEXTS[i % 7 : i % 7 + 1 + i % 3] for i in range(16)]  # 1 to 3 texts each
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda texts: request(server.port, "POST", "/predict", {"texts": texts}), batches))
    for (status, answer), texts in zip(answers, batches, strict=True):
        assert status == 200, answer
        check_predictions(answer, texts, expected)
    after = request(server.port, "GET", "/health")[1]
    assert after["requests"] - before["requests"] == 16 and after["in_flight"] == 0
    assert after["batches"] - before["batches"] < 16  # concurrent requests shared model calls


def test_health_info_and_page(server, classifier):
    assert request(server.port, "GET", "/health")[0] == 200
    status, info = request(server.port, "GET", "/info")
    saved = json.loads((classifier / "cptune_classifier.json").read_text())
    assert status == 200 and info["labels"] == [{"label": 0, "word": "negative"}, {"label": 1, "word": "very positive"}]
    assert info["template"] == saved["template"]["format"] and info["calibrate"] and info["length_normalize"]
    assert info["context_tokens"] > 0 and info["placement"] == "cpu, float32" and info["cptune_version"]
    assert info["training_data"] == {"training_data": saved["training_data"], "examples": len(saved["examples"]),
                                     "training_size": saved["training_size"]}
    assert info["limits"] == {"max_batch": 32, "max_wait_ms": 100.0, "max_texts": 8, "max_chars": 1500,
                              "max_batch_tokens": 256, "max_queue": batching.DEFAULT_MAX_QUEUE,
                              "timeout_s": batching.DEFAULT_TIMEOUT_S}
    status, page = request(server.port, "GET", "/")
    assert status == 200 and "<textarea" in page and "<script>" in page
    assert not re.search(r"(src|href)=\"?(https?:)?//", page)  # nothing loaded from elsewhere


def test_the_token_budget_by_default_follows_the_device():
    # measured on a CPU (docs/serve.md's head-of-line table); a GPU keeps the budget it had
    assert batching.default_batch_tokens("cpu") == 256 == batching.Limits().max_batch_tokens
    assert batching.default_batch_tokens("cuda") == batching.default_batch_tokens("mps") == 1024
    from cptune.app.cli import build_parser

    assert build_parser().parse_args(["serve", "folder"]).max_batch_tokens is None  # chosen once the model loads


def test_empty_request_is_answered_without_the_model(server):
    assert request(server.port, "POST", "/predict", {"texts": []}) == (200, {"predictions": []})


@pytest.mark.parametrize("body, status, message", [
    ({"texts": ["a"] * 9}, 413, "9 texts in one request; the limit is 8 (--max-texts)"),
    ({"texts": ["ok", "x" * 1501]}, 413, "text 1 has 1501 characters; the limit is 1500 (--max-chars)"),
    ({"texts": [TOO_MANY_POSITIONS]}, 413, "more than the model's 2048"),
    (b'{"texts": ["unclosed', 400, "the body is not JSON"),
    (b"\xff\xfe\x00", 400, "the body is not JSON"),
    ({"text": ["a"]}, 400, 'the body must be a JSON object {"texts": [string, ...]}'),
    ({"texts": "a"}, 400, '"texts" must be a list of strings; got a string'),
    ({"texts": ["a", 3]}, 400, '"texts" must be a list of strings; item 1 is a number'),
    ([1, 2], 400, "got a list"),
    (b'{"texts": ["ok", "a lone surrogate \\ud800"]}', 400, "text 1 is not valid Unicode: a lone surrogate '\\ud800'"),
])
def test_errors_are_one_line_json(server, expected, body, status, message):
    got, answer = request(server.port, "POST", "/predict", body)
    assert got == status and message in answer["detail"], answer
    assert "\n" not in answer["detail"] and "Traceback" not in answer["detail"]
    ok, answer = request(server.port, "POST", "/predict", {"texts": ["still serving"]})  # nothing broke
    assert ok == 200
    check_predictions(answer, ["still serving"], expected)


def test_one_failing_request_leaves_the_others_in_its_batch_answered(classifier, expected, monkeypatch):
    served = serve.load_served(str(classifier))
    good, long, broken = ["a fun film", "great"], [TOO_MANY_POSITIONS], ["a lone surrogate \ud800"]
    rows, too_long, failed = served.answer([good, long, broken])
    check_predictions({"predictions": rows}, good, expected)
    assert (too_long.status, failed.status) == (413, 500)
    real = served.scorer.scores
    poisoned = served.scorer.query_ids(["poison"])[0]

    def scores(ids):  # a model that fails on one text: the batch fails, then each request alone
        if poisoned in ids:
            raise RuntimeError("CUDA error: an illegal memory access\nmore lines")
        return real(ids)

    monkeypatch.setattr(served.scorer, "scores", scores)
    first, bad, last = served.answer([good, ["x", "poison"], ["great"]])
    check_predictions({"predictions": first}, good, expected)
    check_predictions({"predictions": last}, ["great"], expected)
    assert bad.status == 500 and bad.message == "the model failed on this request: RuntimeError: CUDA error: an " \
                                                "illegal memory access"


# -- overload: a bounded queue, a time limit ----------------------------------------------------------

@pytest.fixture(scope="module")
def busy(servers):
    return servers["busy"].wait_ready()


def wait_for_health(port, condition, seconds=30):
    """/health once ``condition(health)`` holds (polled; the bound only ends a test that would hang)."""
    deadline = time.monotonic() + seconds
    health = request(port, "GET", "/health")[1]
    while not condition(health) and time.monotonic() < deadline:
        time.sleep(0.02)
        health = request(port, "GET", "/health")[1]
    assert condition(health), health
    return health


def test_a_full_queue_is_refused_at_once_with_retry_after(busy, expected):
    """--max-queue 8: a request of 7 texts waits for the batch to fill (--max-batch 8); one of 2 more would
    pass the bound and is refused with 503 and Retry-After, without being queued; one of 1 fits, fills the
    batch, and both queued requests are answered right."""
    with ThreadPoolExecutor(2) as pool:
        seven = pool.submit(request, busy.port, "POST", "/predict", {"texts": TEXTS[:7]})
        wait_for_health(busy.port, lambda h: h["queued_texts"] == 7)
        status, answer, headers = request(busy.port, "POST", "/predict", {"texts": TEXTS[:2]}, with_headers=True)
        assert status == 503 and "7 texts are queued and --max-queue is 8" in answer["detail"], answer
        assert int(headers["retry-after"]) >= 1
        health = request(busy.port, "GET", "/health")[1]
        assert health["queued_texts"] == 7 and health["refused"] == 1 and not seven.done()
        status, answer = request(busy.port, "POST", "/predict", {"texts": TEXTS[7:8]})
        assert status == 200
        check_predictions(answer, TEXTS[7:8], expected)
        status, answer = seven.result(timeout=REQUEST_S)
        assert status == 200
        check_predictions(answer, TEXTS[:7], expected)
    assert request(busy.port, "GET", "/health")[1]["queued_texts"] == 0


def test_a_request_past_its_time_limit_gets_503_and_leaves_the_queue(busy, expected):
    """--timeout-s 2: a lone text waits for a batch that does not fill (--max-wait-ms 30000) and is answered
    503 with Retry-After once its time is up; its text leaves the queue, and a full batch is answered."""
    status, answer, headers = request(busy.port, "POST", "/predict", {"texts": ["left waiting"]}, with_headers=True)
    assert status == 503 and answer["detail"].startswith("not answered within --timeout-s=2 s"), answer
    assert int(headers["retry-after"]) >= 1
    assert request(busy.port, "GET", "/health")[1]["queued_texts"] == 0
    status, answer = request(busy.port, "POST", "/predict", {"texts": TEXTS[:8]})
    assert status == 200
    check_predictions(answer, TEXTS[:8], expected)


# -- an API key --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed(servers):
    return servers["keyed"].wait_ready()


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": f"Bearer {KEY}x"}, 401),
    ({"Authorization": f"Basic {KEY}"}, 401),
    ({"X-API-Key": KEY[:-1]}, 401),
    ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"Authorization": f"bearer  {KEY} "}, 200),
    ({"X-API-Key": KEY}, 200),
])
def test_the_key_is_required_on_every_endpoint_but_health_and_the_page(keyed, expected, headers, status):
    got, answer = request(keyed.port, "POST", "/predict", {"texts": ["a fun film"]}, headers=headers)
    assert got == status, answer
    if status == 401:
        assert "needs an API key" in answer["detail"] and KEY not in answer["detail"]
    else:
        check_predictions(answer, ["a fun film"], expected)
    assert request(keyed.port, "GET", "/info", headers=headers)[0] == status
    assert request(keyed.port, "GET", "/health")[0] == 200  # for load balancers: no key
    status, page = request(keyed.port, "GET", "/")  # the page holds no data: it asks for the key
    assert status == 200 and 'id="key"' in page and "Authorization" in page


def test_the_key_comes_from_the_option_or_the_environment_and_exposure_warns(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(serve.API_KEY_ENV, raising=False)
    assert serve.api_key_from(None) is None and serve.api_key_from("abc") == "abc"
    monkeypatch.setenv(serve.API_KEY_ENV, "from-env")
    assert serve.api_key_from(None) == "from-env" and serve.api_key_from("abc") == "abc"
    with pytest.raises(ValueError, match="--api-key='' must not be empty"):
        serve.api_key_from("")
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.5"):
        assert serve.exposure_warning(host, None) is None
    assert serve.exposure_warning("0.0.0.0", "k") is None
    line = serve.exposure_warning("0.0.0.0", None)
    assert line.startswith("cptune: warning: listening on 0.0.0.0 without an API key") and "\n" not in line
    # The command: the socket is bound (never listening: the folder holds no classifier), the warning printed
    # before the model would load, then the one-line error.
    monkeypatch.delenv(serve.API_KEY_ENV)
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0] == serve.exposure_warning("0.0.0.0", None), err
    assert "no cptune_classifier.json in" in err[1], err
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0", "--port", "0", "--api-key", "k"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    # A folder that does not exist is refused before the socket, the web stack and torch (in about a second).
    assert main(["serve", str(tmp_path / "none"), "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0], err


# -- head-of-line blocking ---------------------------------------------------------------------------

def letters(count, shift=0):
    """Letters the tiny tokenizer has no merges for: about one token a character."""
    return "".join(chr(ord("a") + (shift + 7 * j) % 26) for j in range(count))


def short_beside(port, long):
    """Send ``long`` (one request), then, once two model calls of it are done, a one-text request: the
    answers, and whether the long request was still in flight when the short one was answered."""
    auth = {"X-API-Key": KEY}
    before = request(port, "GET", "/health")[1]["batches"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(request, port, "POST", "/predict", {"texts": long}, headers=auth)
        wait_for_health(port, lambda h: h["batches"] >= before + 2 and h["in_flight"] == 1)
        short = request(port, "POST", "/predict", {"texts": ["a fun film"]}, headers=auth)
        still_in_flight = not pending.done() and request(port, "GET", "/health")[1]["in_flight"] == 1
        answer = pending.result(timeout=REQUEST_S)
    return short, answer, still_in_flight, request(port, "GET", "/health")[1]["batches"] - before


@pytest.mark.parametrize("texts, characters", [(16, 300), (1, 1400)], ids=["16-texts", "one-text"])
def test_a_short_request_is_answered_between_the_pieces_of_a_long_one(keyed, classifier, expected, texts, characters):
    """--max-batch 4 --max-batch-tokens 256: every long text (about 300 or 1,400 tokens) is cut in pieces of
    at most 256 tokens, each call full; a one-text request sent once the long request's scoring has begun is
    answered while it is still in flight (ordering, not time: without pieces it would wait for a whole text,
    or, with one text, be answered after the long one), and every answer is predict_proba's."""
    long = [letters(characters, i) for i in range(texts)]
    (status, answer), (long_status, long_answer), still_in_flight, calls = short_beside(keyed.port, long)
    assert status == 200 and long_status == 200 and still_in_flight
    check_predictions(answer, ["a fun film"], expected)
    check_predictions(long_answer, long, expected)
    scorer = serve.load_served(str(classifier)).scorer
    tokens = [len(ids) for ids in scorer.query_ids([*long, "a fun film"])]
    assert min(tokens[:-1]) > 256  # every long text in pieces
    assert calls == math.ceil(sum(tokens) / 256)  # the short text rode in a call with a piece; every call full


# -- hostile input -----------------------------------------------------------------------------------

HOSTILE_EXAMPLES = 200
ANSWERS = {200, 400, 401, 413, 503}  # what docs/serve.md promises /predict answers (500: only a failing model)
FRAMING = {"content-length", "transfer-encoding", "host", "connection", "expect", "authorization", "x-api-key"}
KEYED_MAX_BODY = batching.Limits(max_texts=64, max_chars=1500).max_body_bytes
header_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_"), min_size=1, max_size=20).filter(
    lambda name: name not in FRAMING)
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=12)
valid_texts = st.lists(st.text(max_size=60), max_size=6)  # short: within the tiny model's positions


@st.composite
def hostile_requests(draw):
    """(headers, body, chunked, valid texts or None): what a careless or hostile client might send."""
    kind = draw(st.sampled_from(["valid", "json", "bytes", "huge", "many", "surrogate", "deep", "long"]))
    texts = None
    if kind == "valid":
        texts = draw(valid_texts)
        encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]))  # json.loads detects these
        body = json.dumps({"texts": texts}, ensure_ascii=draw(st.booleans())).encode(encoding)
    elif kind == "json":
        body = json.dumps(draw(json_values)).encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=512))
    elif kind == "huge":  # around the body limit: 413 beyond it, however the bytes look
        size = draw(st.sampled_from([KEYED_MAX_BODY - 64, KEYED_MAX_BODY + 1, 2 * KEYED_MAX_BODY]))
        body = draw(st.sampled_from([b"x", b"[", b'{"texts": ["'])) + b"a" * size
    elif kind == "many":
        body = json.dumps({"texts": ["a"] * draw(st.integers(65, 300))}).encode()
    elif kind == "surrogate":
        body = b'{"texts": ["fine", "' + draw(st.sampled_from([b"\\ud800", b"\\udfff x", b"\\ud83d"])) + b'"]}'
    elif kind == "deep":
        depth = draw(st.integers(100, 100_000))
        body = b"[" * depth + b"]" * depth
    else:  # texts over --max-chars, or characters of many tokens each (past the model's positions)
        body = json.dumps({"texts": [draw(st.sampled_from(["x" * 1501, "中" * 1000, "😀" * 700]))]}).encode()
    headers = draw(st.dictionaries(header_names, header_values, max_size=4))
    content_type = draw(st.none() | st.sampled_from(["application/json", "text/plain", "application/json; "
                        "charset=latin-1", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"])
                        | header_values)
    if content_type is not None:
        headers["content-type"] = content_type
    encoding = draw(st.none() | st.sampled_from(["gzip", "br", "deflate", "identity", "x-unknown"]))
    if encoding is not None:
        headers["content-encoding"] = encoding
    auth = draw(st.sampled_from(["bearer", "x-api-key", "none", "wrong", "empty"]))
    if auth == "bearer":
        headers["authorization"] = f"Bearer {KEY}"
    elif auth == "x-api-key":
        headers["x-api-key"] = KEY
    elif auth == "wrong":
        headers[draw(st.sampled_from(["authorization", "x-api-key"]))] = draw(header_values)
    elif auth == "empty":
        headers["authorization"] = "Bearer "
    keyed_right = auth in ("bearer", "x-api-key")
    return headers, body, draw(st.booleans()), texts if keyed_right else None, keyed_right


def send_raw(port, headers, body, chunked):
    """POST /predict with exactly these headers, the body sent whole or in chunks; (status, headers, raw)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_S)
    try:
        conn.putrequest("POST", "/predict", skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value.encode("latin-1"))
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            step = max(1, len(body) // 3)
            for start in range(0, len(body), step):
                piece = body[start : start + step]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def test_hostile_requests_get_only_documented_answers_and_the_server_keeps_serving(keyed, expected):
    """Arbitrary bodies, headers, content types and encodings, sizes around the limits, keys right and
    wrong: every answer is 200, 400, 401, 413 or 503 with a one-line JSON message (200: one prediction per
    text sent), and a correct request is answered right after each."""
    statuses = []

    @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(hostile_requests())
    def one(case):
        headers, body, chunked, texts, keyed_right = case
        status, content_type, raw = send_raw(keyed.port, headers, body, chunked)
        statuses.append(status)
        assert status in ANSWERS and content_type.startswith("application/json"), (status, raw[:300])
        answer = json.loads(raw)
        if not keyed_right:
            assert status == 401, answer
        if texts is not None:  # a valid request with the key: answered
            assert status == 200 and len(answer["predictions"]) == len(texts), answer
        if status != 200:
            assert set(answer) == {"detail"} and "\n" not in answer["detail"] and "Traceback" not in answer["detail"]
        good, answer = request(keyed.port, "POST", "/predict", {"texts": ["still serving"]}, headers={"X-API-Key": KEY})
        assert good == 200 and len(answer["predictions"]) == 1

    one()
    assert {200, 400, 401, 413} <= set(statuses), sorted(set(statuses))  # every kind of answer was exercised
    status, answer = request(keyed.port, "POST", "/predict", {"texts": TEXTS}, headers={"X-API-Key": KEY})
    assert status == 200
    check_predictions(answer, TEXTS, expected)


# -- SIGTERM under load ----------------------------------------------------------------------------

def test_sigterm_answers_every_received_request_then_exits_0(servers, expected):
    """Requests the server has received (counted by /health) when SIGTERM comes are all answered, correctly;
    requests sent after it are answered or refused, never wrong; the process exits 0 within a bound."""
    server = servers["to_stop"].wait_ready()
    try:
        texts = [f"{TEXTS[i]} " + " ".join(TEXTS * 2) for i in range(8)]  # ~100 tokens each: ~0.1 s a request
        n = 8
        pool = ThreadPoolExecutor(n + 4)
        first = [pool.submit(request, server.port, "POST", "/predict", {"texts": texts}) for _ in range(n)]
        deadline = time.monotonic() + 30
        health = request(server.port, "GET", "/health")[1]
        while health["requests"] < n and time.monotonic() < deadline:
            time.sleep(0.02)
            health = request(server.port, "GET", "/health")[1]
        assert health["requests"] == n and health["in_flight"] >= 2, health  # a meaningful test: work in flight
        server.proc.send_signal(signal.SIGTERM)
        late = [pool.submit(request, server.port, "POST", "/predict", {"texts": texts[:1]}, 30) for _ in range(4)]
        for future in first:  # received before SIGTERM: every one answered, and right
            status, answer = future.result(timeout=REQUEST_S)
            assert status == 200, answer
            check_predictions(answer, texts, expected)
        for future in late:  # sent after: answered right, or refused / closed before an answer; never wrong
            try:
                status, answer = future.result(timeout=REQUEST_S)
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                continue
            assert status == 200, answer
            check_predictions(answer, texts[:1], expected)
        assert server.proc.wait(timeout=30) == 0, server.stderr()[-2000:]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, server.port), timeout=5).close()
        log = server.stderr()
        assert "cptune: stopped" in log and "Traceback" not in log, log[-2000:]
        pool.shutdown(wait=True, cancel_futures=True)
    finally:
        server.stop()


# -- the command line ------------------------------------------------------------------------------

def test_serve_help_and_option_mistakes(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "cptune", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--max-wait-ms" in out.stdout and "--calibrate" in out.stdout
    for args, message in [(["--max-batch", "0"], "--max-batch=0 must be an integer >= 1"),
                          (["--port", "70000"], "--port=70000 must be from 0 to 65535"),
                          ([], f"classifier folder {tmp_path / 'none'} does not exist")]:
        assert main(["serve", str(tmp_path / "none"), "--port", "0", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_busy_port_and_a_missing_extra_are_one_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path), "--port", str(port)]) == 1
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    assert main(["serve", str(tmp_path)]) == 2  # a missing extra is a usage mistake (README)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs fastapi" in err[0] and "pip install 'cptune[serve]'" in err[0]


# -- the page in headless Chromium -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """The smallest Chrome DevTools protocol client: one page target over a WebSocket (RFC 6455, standard
    library only; text frames, no extensions)."""

    def __init__(self, ws_url: str, timeout: float):
        url = urllib.parse.urlsplit(ws_url)
        assert url.hostname == LOOPBACK, ws_url
        self.sock = socket.create_connection((url.hostname, url.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            head += self.sock.recv(4096)
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        assert head.split(b"\r\n")[0].split(b" ")[1] == b"101", head
        self.last_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _message(self) -> dict:
        parts = []
        while True:
            b0, b1 = self._read(2)
            size = b1 & 0x7F
            if size == 126:
                size = int.from_bytes(self._read(2), "big")
            elif size == 127:
                size = int.from_bytes(self._read(8), "big")
            payload = self._read(size)  # frames from the server are not masked
            if b0 & 0x0F == 8:
                raise ConnectionError("DevTools closed the WebSocket")
            if b0 & 0x0F in (0, 1, 2):
                parts.append(payload)
                if b0 & 0x80:
                    return json.loads(b"".join(parts))

    def call(self, method: str, **params):
        self.last_id += 1
        data = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        size = len(data)
        header = bytes([0x81]) + (bytes([0x80 | size]) if size < 126 else
                                  bytes([0x80 | 126]) + size.to_bytes(2, "big") if size < 65536 else
                                  bytes([0x80 | 127]) + size.to_bytes(8, "big"))
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        for _ in range(10_000):  # events come in between; the answer carries our id
            message = self._message()
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
        raise AssertionError(f"no answer to {method}")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(server, expected, tmp_path):
    text = "a gripping and moving story"
    profile = tmp_path / "profile"
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run", "--no-default-browser-check",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--metrics-recording-only",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no name resolves but loopback
         "--proxy-server=127.0.0.1:9",  # and anything not on loopback goes to a closed local port
         "--window-size=900,700", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.is_file() and active.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        targets = request(port, "GET", "/json/list")[1]
        pages = [t for t in (json.loads(targets) if isinstance(targets, str) else targets) if t["type"] == "page"]
        page = DevTools(pages[0]["webSocketDebuggerUrl"], timeout=30)
        page.call("Page.enable")
        page.call("Page.navigate", url=server.url + "/")
        page.wait_for("document.readyState === 'complete' && "
                      "document.getElementById('about').textContent.includes('very positive')", 30)
        page.evaluate("document.getElementById('texts').focus()")
        page.call("Input.insertText", text=text)  # typed, as an input method would
        box = page.evaluate("(() => { const r = document.getElementById('classify').getBoundingClientRect();"
                            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):  # a real click on the button
            page.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)
        shown = page.wait_for("(() => { const r = document.querySelector('#results .result'); return r && "
                              "[r.querySelector('.text').textContent, r.querySelector('.label').textContent, "
                              "[...r.querySelectorAll('.p')].map(p => p.textContent)]; })()", 30)
        probs = expected([text])[0]
        best = max(range(len(probs)), key=probs.__getitem__)
        assert shown[0] == text
        assert shown[1] in [f"{c} ({LABELS[c]})" for c in expected.classes]
        if max(probs) - min(probs) > 1e-4:  # a clear winner (two classes): the label predict_proba gives
            assert shown[1] == f"{expected.classes[best]} ({LABELS[expected.classes[best]]})"
        assert [float(p) for p in shown[2]] == pytest.approx(probs, abs=1e-3)  # shown with 3 decimals
        assert page.evaluate("document.getElementById('error').textContent") == ""
        shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
        assert shot.startswith(b"\x89PNG")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "serve_page.png").write_bytes(shot)
        print(f"screenshot: {ARTIFACTS / 'serve_page.png'}")
    finally:
        browser.terminate()
        try:
            browser.wait(timeout=20)
        except subprocess.TimeoutExpired:
            browser.kill()
            browser.wait(timeout=10)
