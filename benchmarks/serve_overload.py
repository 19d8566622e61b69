"""`cptune serve` overloaded, beside long requests, and under a soak of mixed valid and invalid traffic.

    OMP_NUM_THREADS=1 python benchmarks/serve_overload.py overload   # ~3 min: 4x what it scores, for 60 s
    OMP_NUM_THREADS=1 python benchmarks/serve_overload.py hol        # ~4 min: a short request beside long ones
    OMP_NUM_THREADS=1 python benchmarks/serve_overload.py soak       # 10 min of mixed traffic
    ... --serve-args="--max-queue 128"    # options for the server; --server-src DIR runs another checkout's

Each mode starts one `cptune serve` child process on 127.0.0.1 (nothing else is contacted) over the
classifier that `serve_load.py` uses (OUTPUT/classifier, trained there first if absent: the embedded
SmolLM2-135M, 4 rotten_tomatoes shots), and drives it with an asyncio client from this process (standard
library only, one connection per request, every loop bounded in count and time):

- ``overload``: the server's capacity is measured first (``--max-batch`` closed-loop clients sending
  one-text requests for ``--calibrate-s``); then requests are sent open-loop at ``--factor`` times that
  rate for ``--duration`` seconds, whatever the answers, and every answer is awaited. Counted: answered
  (200), refused at once (503, queue full), timed out (503, past ``--timeout-s``), errors (anything
  else, a dropped connection included); latencies of each; the server's resident memory (VmRSS of
  /proc/PID/status, sampled every ``SAMPLE_S``) idle after a warm-up and at its peak during the flood.
- ``hol`` (``--timeout-s 600`` unless given: :data:`HOL_TIMEOUT_S`): p50/p99 of one-text requests sent back
  to back by one client, alone, beside a client
  sending 4,000-character texts back to back, and beside one sending 64-text requests back to back; then
  the throughput the options give: 4,000-character texts sent back to back by one client (texts per
  second), and ``--max-batch`` closed-loop clients sending one-text requests (requests per second).
- ``soak``: ``--clients`` closed-loop clients for ``--duration`` seconds (600 by default), each request
  drawn (seeded) from valid ones and ten kinds of invalid ones, on a server with ``--api-key``; every
  answer's status is checked against the one documented for its kind, and memory is sampled throughout.

The results go to standard output and to OUTPUT/serve_MODE.json (the server's log to OUTPUT/serve_MODE.log).
"""

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from serve_load import ROOT, TEXTS, TRAIN, Child, machine

LOOPBACK = "127.0.0.1"
SAMPLE_S = 0.1  # how often the server's RSS is read
CLIENT_SLACK_S = 30.0  # a client waits this much longer than the server's time limit before it gives up
LONG_CHARS = 4000  # the long text of the head-of-line cell (cptune serve's --max-chars)
LONG_TEXTS = 64  # texts of the long request of the head-of-line cell
IDLE_S = 2.0
# hol's server time limit unless --serve-args sets one: the cells measure the order of scoring, and with the
# default 60 s the server refuses a request queued behind more than 30 s of work, which a 64-text request is
# on a loaded 2-core CPU (its one-text client would be told 503, not made to wait).
HOL_TIMEOUT_S = 600
SOAK_KEY = "soak-key"
OK_STATUSES = {200, 400, 401, 413, 503}


# -- an HTTP client on asyncio streams ----------------------------------------------------------------

async def post(port: int, body: bytes, headers: dict | None = None, timeout: float = 120.0) -> dict:
    """One ``POST /predict`` on a new connection: ``{"status", "seconds", "body", "retry_after"}``; status 0
    when the connection failed or the client's timeout passed (``error`` says which)."""
    start = time.perf_counter()
    head = "".join(f"{k}: {v}\r\n" for k, v in {"Content-Type": "application/json", **(headers or {})}.items())
    request = (f"POST /predict HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n{head}Content-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode("latin-1") + body
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(request)
            await writer.drain()
            raw = await reader.read()  # Connection: close: the server closes after its answer
    except (OSError, TimeoutError) as err:
        return {"status": 0, "seconds": time.perf_counter() - start, "error": type(err).__name__}
    finally:
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - start
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return {"status": 0, "seconds": seconds, "error": f"no status line: {raw[:80]!r}"}
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    fields = {k.lower(): v for k, v in fields.items()}
    return {"status": status, "seconds": seconds, "body": payload, "retry_after": fields.get("retry-after")}


def texts_body(texts: list[str]) -> bytes:
    return json.dumps({"texts": texts}).encode()


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by rank (the largest value at or below it); nan for none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(values: list[float], q: float) -> str:
    value = percentile(values, q)
    return "-" if math.isnan(value) else f"{1000 * value:.0f}"


class Memory:
    """The server's VmRSS (MiB), sampled in the background while ``run`` is active."""

    def __init__(self, pid: int):
        self.path = Path(f"/proc/{pid}/status")
        self.samples: list[tuple[float, float]] = []

    def read(self) -> float:
        for line in self.path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS in {self.path}")

    async def run(self, stop: asyncio.Event) -> None:
        start = time.perf_counter()
        while not stop.is_set():
            self.samples.append((time.perf_counter() - start, self.read()))
            await asyncio.sleep(SAMPLE_S)

    async def idle(self) -> float:
        """The median RSS over IDLE_S with no request in flight."""
        values = []
        for _ in range(int(IDLE_S / SAMPLE_S)):
            values.append(self.read())
            await asyncio.sleep(SAMPLE_S)
        return statistics.median(values)


# -- the modes ----------------------------------------------------------------------------------------

async def warm_up(port: int, texts: list[str], max_batch: int) -> None:
    """A few answers, then one call of ``max_batch`` concurrent requests, so idle RSS includes a batch."""
    for text in texts[:3]:
        answer = await post(port, texts_body([text]))
        if answer["status"] != 200:
            raise RuntimeError(f"warm-up answered {answer}")
    await asyncio.gather(*[post(port, texts_body([t])) for t in texts[:max_batch]])


async def capacity(port: int, texts: list[str], clients: int, seconds: float) -> float:
    """Answered one-text requests per second with ``clients`` closed-loop clients."""
    end = time.perf_counter() + seconds
    counter = {"next": 0, "answered": 0}

    async def client():
        while time.perf_counter() < end:
            i = counter["next"]
            counter["next"] += 1
            if (await post(port, texts_body([texts[i % len(texts)]])))["status"] == 200:
                counter["answered"] += 1

    start = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(clients)])
    return counter["answered"] / (time.perf_counter() - start)


def classify_503(answer: dict) -> str:
    detail = json.loads(answer["body"]).get("detail", "")
    return "timed out" if detail.startswith("not answered within") else "refused" if "busy" in detail else "error"


async def overload(child: Child, args, texts: list[str], timeout_s: float) -> dict:
    memory = Memory(child.proc.pid)
    await warm_up(child.port, texts, args.max_batch)
    idle = await memory.idle()
    rate = await capacity(child.port, texts, args.max_batch, args.calibrate_s)
    offered = args.factor * rate
    stop = asyncio.Event()
    sampler = asyncio.create_task(memory.run(stop))
    total = int(offered * args.duration)
    start = time.perf_counter()

    async def one(i: int) -> dict:
        await asyncio.sleep(max(0.0, start + i / offered - time.perf_counter()))
        return await post(child.port, texts_body([texts[i % len(texts)]]), timeout=timeout_s + CLIENT_SLACK_S)

    answers = await asyncio.gather(*[one(i) for i in range(total)])
    stop.set()
    await sampler
    outcome: dict[str, list[float]] = {"answered": [], "refused": [], "timed out": [], "error": []}
    for answer in answers:
        kind = ("answered" if answer["status"] == 200 else classify_503(answer) if answer["status"] == 503
                else "error")
        outcome[kind].append(answer["seconds"])
    after = await post(child.port, texts_body([texts[0]]))
    peak = max(rss for _, rss in memory.samples)
    return {"capacity_per_s": rate, "offered_per_s": offered, "sent": total, "idle_rss_mib": idle,
            "peak_rss_mib": peak, "answered_after": after["status"],
            "seconds": time.perf_counter() - start,
            "outcomes": {k: {"count": len(v), "p50_ms": ms(v, 0.5), "p99_ms": ms(v, 0.99), "max_ms": ms(v, 1.0)}
                         for k, v in outcome.items()},
            "retry_after": sorted({a["retry_after"] for a in answers if a.get("retry_after")}, key=int)[:10]}


async def hol_cell(port: int, texts: list[str], long: list[str] | None, duration: float,
                   short_too: bool = True) -> dict:
    """One client sending one-text requests back to back (unless ``short_too`` is False), and (unless ``long``
    is None) another sending ``long`` back to back, for ``duration`` seconds: the latencies of both, and the
    load average of the machine (1 minute) at the end."""
    end = time.perf_counter() + duration
    short: list[float] = []
    longs: list[float] = []

    async def short_client():
        i = 0
        while short_too and time.perf_counter() < end:
            answer = await post(port, texts_body([texts[100 + i % 100]]))
            if answer["status"] != 200:
                raise RuntimeError(f"a short request was answered {answer}")
            short.append(answer["seconds"])
            i += 1

    async def long_client():
        while long is not None and time.perf_counter() < end:
            answer = await post(port, texts_body(long))
            if answer["status"] != 200:
                raise RuntimeError(f"a long request was answered {answer['status']}: {answer.get('body')!r:.200}")
            longs.append(answer["seconds"])

    await asyncio.gather(short_client(), long_client())
    return {"short_requests": len(short), "short_p50_ms": ms(short, 0.5), "short_p99_ms": ms(short, 0.99),
            "short_max_ms": ms(short, 1.0), "long_requests": len(longs), "long_p50_ms": ms(longs, 0.5),
            "long_per_s": len(longs) / duration, "load_average": os.getloadavg()[0]}


async def hol(child: Child, args, texts: list[str]) -> dict:
    """The head-of-line cells, then what the options cost in throughput: ``4000-character texts alone`` (one
    client sending them back to back: long texts per second) and ``max_batch`` closed-loop clients sending
    one-text requests (requests per second)."""
    await warm_up(child.port, texts, args.max_batch)
    long_text = [" ".join(texts)[:LONG_CHARS]]
    cells = {"alone": None, f"beside {LONG_CHARS}-character texts": long_text,
             f"beside {LONG_TEXTS}-text requests": texts[:LONG_TEXTS]}
    results = {}
    for name, long in cells.items():
        results[name] = await hol_cell(child.port, texts, long, args.duration)
        print(f"  {name}: {results[name]}", flush=True)
    name = f"{LONG_CHARS}-character texts alone"
    results[name] = await hol_cell(child.port, texts, long_text, args.duration, short_too=False)
    print(f"  {name}: {results[name]}", flush=True)
    name = f"{args.max_batch} closed-loop clients"
    results[name] = {"requests_per_s": await capacity(child.port, texts, args.max_batch, args.duration),
                     "load_average": os.getloadavg()[0]}
    print(f"  {name}: {results[name]}", flush=True)
    return results


def soak_requests(texts: list[str], max_body: int) -> list[tuple[str, bytes, dict, set[int]]]:
    """(kind, body, headers, the statuses docs/serve.md documents for it) to draw from."""
    key = {"Authorization": f"Bearer {SOAK_KEY}"}
    return [
        ("valid", b"", key, {200}),  # body filled in per request
        ("no key", texts_body(texts[:1]), {}, {401}),
        ("wrong key", texts_body(texts[:1]), {"X-API-Key": "not-the-key"}, {401}),
        ("not JSON", b'{"texts": ["unclosed', key, {400}),
        ("bytes", bytes(range(256)) * 4, key, {400}),
        ("wrong shape", b'{"text": "a"}', key, {400}),
        ("not strings", b'{"texts": [1, null, {}]}', key, {400}),
        ("lone surrogate", b'{"texts": ["\\ud800"]}', key, {400}),
        ("too many texts", texts_body(["a"] * 300), key, {413}),
        ("text too long", texts_body(["x" * 4001]), key, {413}),
        ("body too large", b"[" + b"a" * (max_body + 10), key, {413}),
    ]


async def soak(child: Child, args, texts: list[str]) -> dict:
    memory = Memory(child.proc.pid)
    await warm_up_keyed(child.port, texts, args.max_batch)
    idle = await memory.idle()
    rng = random.Random(0)
    kinds = soak_requests(texts, max_body=256 * (4000 * 12 + 8) + 4096)  # the default limits' largest body
    counts: dict[str, dict[str, int]] = {kind: {} for kind, *_ in kinds}
    unexpected: list[str] = []
    end = time.perf_counter() + args.duration
    stop = asyncio.Event()
    sampler = asyncio.create_task(memory.run(stop))

    async def client(k: int):
        while time.perf_counter() < end:
            kind, body, headers, allowed = kinds[0] if rng.random() < 0.5 else rng.choice(kinds[1:])
            if kind == "valid":
                body = texts_body(rng.sample(texts, rng.randint(1, 4)))
            answer = await post(child.port, body, headers)
            status = answer["status"]
            counts[kind][str(status)] = counts[kind].get(str(status), 0) + 1
            one_line = status == 200 or _one_line_json(answer.get("body", b""))
            if status not in allowed or not one_line:
                unexpected.append(f"{kind}: {status} {answer.get('body', answer.get('error'))!r:.200}")

    await asyncio.gather(*[client(k) for k in range(args.clients)])
    stop.set()
    await sampler
    rss = [value for _, value in memory.samples]
    minute = int(60 / SAMPLE_S)
    return {"idle_rss_mib": idle, "peak_rss_mib": max(rss), "first_minute_peak_mib": max(rss[:minute]),
            "last_minute_peak_mib": max(rss[-minute:]), "requests": sum(sum(c.values()) for c in counts.values()),
            "counts": counts, "unexpected": unexpected[:20], "unexpected_count": len(unexpected)}


async def warm_up_keyed(port: int, texts: list[str], max_batch: int) -> None:
    key = {"X-API-Key": SOAK_KEY}
    answers = await asyncio.gather(*[post(port, texts_body([t]), key) for t in texts[:max_batch]])
    if any(a["status"] != 200 for a in answers):
        raise RuntimeError(f"warm-up answered {[a['status'] for a in answers]}")


def _one_line_json(body: bytes) -> bool:
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(detail, str) and "\n" not in detail


# -- the command --------------------------------------------------------------------------------------

def option(args_list: list[str], name: str, default: str) -> str:
    return args_list[args_list.index(name) + 1] if name in args_list else default


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["overload", "hol", "soak"])
    parser.add_argument("--classifier", default=None, help="a saved classifier (default: OUTPUT/classifier)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "serve-bench"), help="folder for the results")
    parser.add_argument("--serve-args", default="", help="options for cptune serve, e.g. \"--max-queue 128\"")
    parser.add_argument("--server-src", default=None, help="run the server from this src/ folder (another checkout)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of load (default: overload 60, hol 45 per cell, soak 600)")
    parser.add_argument("--factor", type=float, default=4.0, help="overload: offered rate / capacity (default: 4)")
    parser.add_argument("--calibrate-s", type=float, default=20.0, help="overload: seconds to measure capacity")
    parser.add_argument("--clients", type=int, default=4, help="soak: concurrent clients (default: 4)")
    args = parser.parse_args(argv)
    args.duration = args.duration or {"overload": 60.0, "hol": 45.0, "soak": 600.0}[args.mode]

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started_at, where, load_start = datetime.now(UTC), machine(), os.getloadavg()[0]
    folder = Path(args.classifier) if args.classifier else out / "classifier"
    if not (folder / "cptune_classifier.json").is_file():
        print(f"training a classifier into {folder}", flush=True)
        import subprocess

        subprocess.run([sys.executable, "-m", "cptune", *TRAIN, "--output", str(folder)], check=True, cwd=ROOT,
                       timeout=1800)
    sys.path.insert(0, str(ROOT / "src"))  # a checkout without `pip install -e .`
    from cptune.data import load_dataset  # the data layer only: no torch in this process

    texts = [ex.text for ex in load_dataset("rotten_tomatoes").examples[:TEXTS]]
    serve_args = shlex.split(args.serve_args) + (["--api-key", SOAK_KEY] if args.mode == "soak" else [])
    if args.mode == "hol" and "--timeout-s" not in serve_args:  # the cells measure order, not admission
        serve_args += ["--timeout-s", str(HOL_TIMEOUT_S)]
    args.max_batch = int(option(serve_args, "--max-batch", "32"))
    timeout_s = float(option(serve_args, "--timeout-s", "60"))
    if args.server_src:
        os.environ["PYTHONPATH"] = str(Path(args.server_src).resolve())
    command = [sys.executable, "-m", "cptune", "serve", str(folder), "--port", "0", *serve_args]
    print(f"{args.mode}: starting {' '.join(command)}", flush=True)
    child = Child(command, out / f"serve_{args.mode}.log")
    try:
        if args.mode == "overload":
            result = asyncio.run(overload(child, args, texts, timeout_s))
        elif args.mode == "hol":
            result = asyncio.run(hol(child, args, texts))
        else:
            result = asyncio.run(soak(child, args, texts))
    finally:
        status = child.stop()
    result.update({"exit_status_after_sigterm": status, "started": started_at.isoformat(), "machine": where,
                   "classifier": str(folder), "serve_args": serve_args, "server_src": args.server_src,
                   "duration_s": args.duration, "load_average_start": load_start,
                   "load_average_end": os.getloadavg()[0]})
    text = json.dumps(result, indent=1)
    print(text)
    (out / f"serve_{args.mode}.json").write_text(text)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
