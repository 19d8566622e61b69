"""``cptune serve CLASSIFIER``: a saved classifier behind HTTP (FastAPI + uvicorn), its context encoded once.

The learned context is the same for every request, so its keys and values are computed once at
start-up (:class:`cptune.scoring.ContextScorer`; with calibration, the content-free scores too) and a
request pays only for its own tokens. Concurrent requests are batched by one worker task that scores
chunks of them, and a text longer than ``max_batch_tokens`` a piece at a time (its tokens run after the
context's cache and its earlier pieces': :meth:`cptune.scoring.ContextScorer.prefill`), so neither a long
request nor a long text holds up the others; which texts each call scores, and which requests are
admitted (503 with ``Retry-After`` beyond the queue's bounds), is :mod:`cptune.app.batching`'s
(:class:`~cptune.app.batching.Scheduler`, :class:`~cptune.app.batching.Batcher`,
:class:`~cptune.app.batching.Limits`). This module holds the model side (:class:`ServedClassifier`), the
HTTP application and the command. Each request's time is bounded (``timeout_s``: then 503);
``--api-key`` makes every endpoint but ``/health`` and the page require a key (401 otherwise).

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
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from cptune import __version__
from cptune.app.batching import (
    ACCELERATOR_MAX_BATCH_TOKENS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_TEXTS,
    DEFAULT_MAX_WAIT_MS,
    DEFAULT_TIMEOUT_S,
    Batcher,
    Limits,
    Piece,
    RequestError,
    default_batch_tokens,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "CPTUNE_API_KEY"
LOOPBACK_NAMES = ("localhost",)
SERVE_EXTRA = "pip install 'cptune[serve]'"
PAGE = "static/index.html"  # package data of cptune.app

logger = logging.getLogger(__name__)


# -- the request body ---------------------------------------------------------------------------

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
