"""``cptune serve CLASSIFIER``: a saved classifier behind HTTP (FastAPI + uvicorn), its context encoded once.

The learned context is the same for every request, so its keys and values are computed once at
start-up (:class:`cptune.scoring.ContextScorer`; with calibration, the content-free scores too) and a
request pays only for its own tokens. Concurrent requests are batched: one worker task takes queued
requests until ``max_batch`` texts or ``max_wait_ms`` milliseconds, scores them in one call in a
thread (the event loop keeps accepting and answering), and answers each request.

Endpoints: ``POST /predict`` (``{"texts": [...]}`` -> ``{"predictions": [{"label": ..., "probabilities":
{label: p}}]}``, equal to ``CPTClassifier.predict_proba``), ``GET /health``, ``GET /info`` and a page at
``/`` (plain HTML and JavaScript, package data). Errors are JSON ``{"detail": "one line"}``: 400 for a
body that is not JSON or not ``{"texts": [string, ...]}``, 413 for a limit (texts per request,
characters per text, the model's positions), 500 when the model fails (the traceback goes to the
server's log, never into the body). SIGTERM: the server stops accepting connections, answers every
request it has received, and exits with status 0. docs/serve.md has the usage.

Only the standard library is imported here at the top (``cptune --help`` stays fast); fastapi, uvicorn
and torch are imported when the server starts.
"""

import argparse
import asyncio
import contextlib
import importlib.resources
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cptune import __version__

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MAX_BATCH = 32  # texts scored in one call of the worker
DEFAULT_MAX_WAIT_MS = 5.0  # how long the worker waits for more requests once it has one
DEFAULT_MAX_TEXTS = 256  # texts in one request
DEFAULT_MAX_CHARS = 4000  # characters in one text
JSON_BYTES_PER_CHAR = 12  # the most one character can take in a JSON string (a surrogate pair as \uXXXX\uXXXX)
BODY_OVERHEAD_BYTES = 4096  # braces, the key, commas and whitespace around the texts
SERVE_EXTRA = "pip install 'cptune[serve]'"
PAGE = "static/index.html"  # package data of cptune.app

logger = logging.getLogger(__name__)


# -- settings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """How requests are batched and what one request may hold.

    Args:
        max_batch: texts scored together in one call of the model (a request with more is scored alone).
        max_wait_ms: how long the worker waits for more requests once it holds one.
        max_texts: texts in one request (more: 413).
        max_chars: characters in one text (more: 413).
    """

    max_batch: int = DEFAULT_MAX_BATCH
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    max_texts: int = DEFAULT_MAX_TEXTS
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_texts", "max_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value!r} must be an integer >= 1")
        if not 0 <= self.max_wait_ms <= 60_000:
            raise ValueError(f"--max-wait-ms={self.max_wait_ms!r} must be from 0 to 60000")

    @property
    def max_body_bytes(self) -> int:
        """The largest body a request within the limits can have."""
        return self.max_texts * (self.max_chars * JSON_BYTES_PER_CHAR + 8) + BODY_OVERHEAD_BYTES


class RequestError(Exception):
    """A request answered with an HTTP error status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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
    return texts


def _shape(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:5]}" if value else "an empty object"
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), "null" if value is None else type(value).__name__)


# -- the model side: built once, called from the worker thread ----------------------------------

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
        template = clf.template_  # the fitted template (for template="auto", the one chosen)
        words = {str(label): word for label, word in clf.label_words_.items()}  # as the text layer keys them
        with torch.no_grad():
            context = clf.cpt_model_.context_embeddings()  # (1, N, d)
        self.scorer = ContextScorer(base_model, tokenizer, template, words, context, batch_size=clf.batch_size,
                                    length_normalize=clf.length_normalize, calibrate=clf.calibrate)
        self.info = {
            "model": model_name,
            "labels": [{"label": label, "word": clf.label_words_[label]} for label in self.classes],
            "template": template.format,
            "context_tokens": self.scorer.context_tokens,
            "calibrate": clf.calibrate,
            "length_normalize": clf.length_normalize,
            "placement": clf.placement_,
            "cptune_version": __version__,
        }

    def predictions(self, scores) -> list[dict]:
        """``/predict``'s answer rows from ``(n, C)`` label scores (softmax, as ``predict_proba``)."""
        import torch

        rows = torch.softmax(scores, dim=-1).cpu().tolist()
        return [{"label": self.classes[max(range(len(row)), key=row.__getitem__)],
                 "probabilities": {str(c): p for c, p in zip(self.classes, row, strict=True)}} for row in rows]

    def answer(self, requests: Sequence[Sequence[str]]) -> list[list[dict] | RequestError]:
        """Answer rows for each request, or its error; the whole batch in one scoring call.

        A request that cannot be prepared (a text longer than the model's positions: 413; the
        tokenizer failing: 500) is answered alone. If the batch's scoring fails, each request is scored
        alone, so one failing request does not fail the others batched with it.
        """
        results: list[Any] = [None] * len(requests)
        prepared: dict[int, list[list[int]]] = {}
        for i, texts in enumerate(requests):
            try:
                ids = self.scorer.query_ids(texts)
            except Exception as err:  # noqa: BLE001 - the tokenizer failed on this request only
                results[i] = self._failure(err)
                continue
            try:
                self.scorer.check_lengths(ids)
            except ValueError as err:
                results[i] = RequestError(413, str(err))  # names the text, its tokens and the model's positions
                continue
            prepared[i] = ids
        if prepared:
            flat = [ids for i in prepared for ids in prepared[i]]
            try:
                rows = self.predictions(self.scorer.scores(flat))
            except Exception as err:  # noqa: BLE001 - find which request fails, answer the others
                if len(prepared) == 1:
                    results[next(iter(prepared))] = self._failure(err)
                    return results
                for i in prepared:
                    results[i] = self.answer([requests[i]])[0]
                return results
            start = 0
            for i, ids in prepared.items():
                results[i] = rows[start : start + len(ids)]
                start += len(ids)
        return results

    @staticmethod
    def _failure(err: Exception) -> RequestError:
        logger.error("the model failed on a request", exc_info=err)  # the traceback for the server's log
        return RequestError(500, f"the model failed on this request: {one_line(err)}")


# -- batching ------------------------------------------------------------------------------------

@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future


class Batcher:
    """One worker task that batches concurrent requests and runs ``answer`` on each batch in a thread.

    Args:
        answer: requests (lists of texts) -> one result or exception per request; called in a thread,
            one call at a time.
        max_batch: texts per call; requests are taken whole, in arrival order, while they fit (a
            request larger than ``max_batch`` is a batch of its own).
        max_wait_s: how long to wait for more requests once one is held.
    """

    def __init__(self, answer: Callable[[list[list[str]]], list], max_batch: int, max_wait_s: float) -> None:
        self.answer, self.max_batch, self.max_wait_s = answer, max_batch, max_wait_s
        self.received = 0  # requests submitted so far
        self.in_flight = 0  # requests submitted and not yet answered
        self.batches = 0  # calls of answer so far
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._held: _Pending | None = None  # taken from the queue but not fitting the last batch
        self._worker: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def submit(self, texts: list[str]) -> Any:
        """The result of ``answer`` for these texts (its exception raised)."""
        if self._closing or self._worker is None or self._worker.done():
            raise RequestError(503, "the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self.received += 1
        self.in_flight += 1
        try:
            self._queue.put_nowait(_Pending(texts, future))
            return await future
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        """Answer everything already submitted, then stop the worker."""
        if self._worker is None:
            return
        self._closing = True
        self._queue.put_nowait(None)  # after every request submitted so far
        await self._worker

    async def _work(self) -> None:
        while True:
            batch, stop = await self._collect()
            if batch:
                self.batches += 1
                try:
                    results = await asyncio.to_thread(self.answer, [p.texts for p in batch])
                except Exception as err:  # noqa: BLE001 - answer isolates requests itself; this is the last resort
                    results = [err] * len(batch)
                for pending, result in zip(batch, results, strict=True):
                    if pending.future.done():  # the request was cancelled meanwhile
                        continue
                    if isinstance(result, BaseException):
                        pending.future.set_exception(result)
                    else:
                        pending.future.set_result(result)
            if stop:
                return

    async def _collect(self) -> tuple[list[_Pending], bool]:
        """Requests for one call: the first waited for, then more until ``max_batch`` texts or ``max_wait_s``.
        Returns them and whether the close marker was reached."""
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        if first is None:
            return [], True
        batch, count = [first], len(first.texts)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while count < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        item = await self._queue.get()  # asyncio.Queue keeps the item if this is cancelled
                except TimeoutError:
                    break
            if item is None:
                return batch, True
            if count + len(item.texts) > self.max_batch:
                self._held = item
                break
            batch.append(item)
            count += len(item.texts)
        return batch, False


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


def create_app(served: ServedClassifier, limits: Limits):
    """The FastAPI application over ``served``; its lifespan runs the batching worker and drains it."""
    require_serving_packages()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    batcher = Batcher(served.answer, limits.max_batch, limits.max_wait_ms / 1000)
    page = page_html()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.close()  # uvicorn has answered every request by now; this stops the worker

    app = FastAPI(title="cptune", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)  # the docs pages load scripts from a CDN
    app.state.batcher = batcher

    def error(err: RequestError) -> JSONResponse:
        return JSONResponse({"detail": err.message}, status_code=err.status)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "requests": batcher.received, "in_flight": batcher.in_flight,
                "batches": batcher.batches}

    @app.get("/info")
    async def info():
        return {**served.info, "limits": {"max_batch": limits.max_batch, "max_wait_ms": limits.max_wait_ms,
                                          "max_texts": limits.max_texts, "max_chars": limits.max_chars}}

    @app.post("/predict")
    async def predict(request: Request):
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                return error(RequestError(413, f"the body has more than {limits.max_body_bytes} bytes, more than "
                                               f"{limits.max_texts} texts of {limits.max_chars} characters can take "
                                               "(--max-texts, --max-chars)"))
        try:
            texts = parse_texts(bytes(body), limits)
            rows = await batcher.submit(texts) if texts else []
        except RequestError as err:
            return error(err)
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
    return p


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (not listening yet: uvicorn starts listening once the model is loaded).

    Raises:
        ValueError: a port outside 0..65535 or a host that does not resolve.
        OSError: the address cannot be bound (in use, not this machine's), naming it.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port} must be from 0 to 65535 (0: any free port)")
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


def run(args: argparse.Namespace) -> int:
    """Run ``cptune serve`` until SIGTERM or Ctrl-C; 0 after a graceful stop."""
    limits = Limits(args.max_batch, args.max_wait_ms, args.max_texts, args.max_chars)
    require_serving_packages()
    import uvicorn

    sock = listening_socket(args.host, args.port)  # a busy port fails before the model loads
    try:
        _quiet_transformers()
        served = load_served(args.classifier, args.model, args.device, args.dtype, args.device_map,
                             args.batch_size, args.calibrate)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        config = uvicorn.Config(create_app(served, limits), http="h11", loop="asyncio", lifespan="on",
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
