"""Load test of `cptune serve` against a server that answers one request at a time without the cached context.

    OMP_NUM_THREADS=1 python benchmarks/serve_load.py            # about 8 minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python benchmarks/serve_load.py --duration 5 --concurrency 1 8   # a quick look

Three servers, each a child process on 127.0.0.1 (nothing else is contacted), run the same classifier:

- ``serve``: ``cptune serve CLASSIFIER`` as shipped (context encoded once; concurrent requests batched up
  to ``--max-batch 32`` texts or ``--max-wait-ms 5``);
- ``serve, --max-batch 1``: the cached context without batching, to separate the two effects;
- ``baseline``: this script's ``--baseline-server``, a standard-library ``http.server`` that handles one
  request at a time and calls ``CPTClassifier.predict_proba([text])`` for it, which encodes the context
  again on every call (``cptune.scoring.score_texts``); what one would write without ``cptune serve``.

For each server and each concurrency C, C client threads send one-text requests (rotten_tomatoes texts,
the same sequence for every server) back to back, each on a new connection. The measured window opens
once every client has had an answer (a closed loop's queue is full by then: C x the service time for the
baseline) and lasts ``--duration`` seconds and until the clients have had 3 answers each on average
(batched answers come in bursts of up to C), at most 60 s or ``--max-requests`` answers. Requests per
second counts the answers in the window, and p50/p99 are over their latencies (connect to last byte;
with fewer than 100 answers p99 is about the slowest). Every answer is checked (status 200, one
prediction), and the three servers' probabilities for one text must agree. The table goes to standard
output and, with the raw numbers, to OUTPUT/serve_load.md and OUTPUT/serve_load.json.

The classifier: ``--classifier FOLDER``, else OUTPUT/classifier, trained there first if absent (the
embedded SmolLM2-135M, 4 rotten_tomatoes shots, 10 steps: speed does not depend on how well it learned).
Only the standard library is imported here unless ``--baseline-server`` runs, so the load generator
takes little CPU from the servers.
"""

import argparse
import http.client
import http.server
import json
import os
import platform
import re
import selectors
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
STARTUP_S = 300  # a server imports torch and loads (converts, the first time) the embedded model
REQUEST_TIMEOUT_S = 120
WARMUP_S = 1.0  # at least; and until every client has had an answer (a closed loop's steady state)
WARMUP_MAX_S = 90.0
ROUNDS = 3  # the window lasts until every client has had this many answers on average, ...
MAX_WINDOW_S = 60.0  # ... or this long: batched answers come in bursts of C, and a window of one burst misleads
TEXTS = 512  # rotten_tomatoes texts, cycled
TRAIN = ["train", "--data", "rotten_tomatoes", "--shots", "4", "--steps", "10",
         "--template", "Review: {x}\\nSentiment: {y}"]


# -- the baseline server (runs in its own process) ------------------------------------------------

def baseline_server(folder: str, port: int) -> None:
    """``POST /predict`` answered by ``clf.predict_proba`` one request at a time (context encoded each time)."""
    from cptune import CPTClassifier

    clf = CPTClassifier.load(folder)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
            rows = clf.predict_proba(texts).tolist()
            body = json.dumps({"predictions": [
                {"label": clf.classes_[max(range(len(row)), key=row.__getitem__)],
                 "probabilities": {str(c): p for c, p in zip(clf.classes_, row, strict=True)}} for row in rows]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):  # no line per request
            pass

    class Server(http.server.HTTPServer):  # one request at a time: no threading mix-in
        request_queue_size = 256  # 32 clients connecting at once wait in the backlog, not in SYN retries

    with Server((LOOPBACK, port), Handler) as server:
        print(f"baseline: serving {folder} on http://{LOOPBACK}:{server.server_address[1]}", flush=True)
        server.serve_forever()


# -- the load generator ---------------------------------------------------------------------------

class Child:
    """A server process; ``url`` once it printed its ready line."""

    def __init__(self, command: list[str], log: Path):
        self.log = log.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT)
        deadline = time.monotonic() + STARTUP_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline and self.proc.poll() is None:
                if sel.select(timeout=1):
                    found = re.search(r" on http://127\.0\.0\.1:(\d+)$", self.proc.stdout.readline().strip())
                    if found:
                        self.port = int(found[1])
                        return
        self.stop()
        raise RuntimeError(f"{' '.join(command)} did not start; see {log}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        return self.proc.returncode


def predict(port: int, text: str) -> tuple[float, dict]:
    """One request on a new connection: (seconds, answer)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", "/predict", body=json.dumps({"texts": [text]}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    seconds = time.perf_counter() - start
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {body[:200]!r}")
    answer = json.loads(body)
    if len(answer["predictions"]) != 1:
        raise RuntimeError(f"expected one prediction, got {answer}")
    return seconds, answer


def load(port: int, texts: list[str], concurrency: int, duration: float, max_requests: int) -> dict:
    """C threads sending requests back to back; the answers received in a window count (whenever their
    request was sent), and their latencies make the percentiles. The window opens once every client has had
    an answer (the queue a closed loop builds is full by then), after WARMUP_S at least, and lasts
    ``duration`` seconds and until ROUNDS x C answers (at most MAX_WINDOW_S, at most ``max_requests``).
    """
    lock = threading.Lock()
    state = {"next": 0, "stop": False}
    done: list[tuple[float, float]] = []  # (answered at, seconds) of every request
    answered: set[int] = set()  # clients that have had an answer

    def client(k: int) -> None:
        while True:
            with lock:
                if state["stop"]:
                    return
                i = state["next"]
                state["next"] += 1
            seconds, _ = predict(port, texts[i % len(texts)])
            with lock:
                done.append((time.perf_counter(), seconds))
                answered.add(k)

    with ThreadPoolExecutor(concurrency) as pool:
        clients = [pool.submit(client, k) for k in range(concurrency)]
        warm = time.perf_counter()
        time.sleep(WARMUP_S)
        while len(answered) < concurrency and time.perf_counter() - warm < WARMUP_MAX_S:
            time.sleep(0.05)
        started = time.perf_counter()
        end = started + duration
        while not any(c.done() for c in clients):
            now = time.perf_counter()
            with lock:
                count = sum(t >= started for t, _ in done[-max(max_requests, ROUNDS * concurrency):])
            if (count >= max_requests or now - started >= MAX_WINDOW_S
                    or (now >= end and count >= ROUNDS * concurrency)):
                end = now
                break
            time.sleep(0.05)
        end = min(end, time.perf_counter())
        with lock:
            state["stop"] = True  # no new requests; those in flight finish (bounded by their timeout)
        for c in clients:
            c.result(timeout=REQUEST_TIMEOUT_S + 10)  # raises a client's error
    ordered = sorted(seconds for t, seconds in done if started <= t <= end)
    elapsed = end - started
    return {
        "concurrency": concurrency,
        "requests": len(ordered),
        "seconds": round(elapsed, 3),
        "warmup_s": round(started - warm, 3),
        "requests_per_s": len(ordered) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan"),
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = re.search(r"Model name:\s*(.+)", lscpu)[1].strip()
    except (OSError, subprocess.SubprocessError, TypeError):
        pass
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, load average {load_avg:.1f} at the start")


def table(results: list[dict]) -> str:
    base = {r["concurrency"]: r["requests_per_s"] for r in results if r["server"] == "baseline"}
    lines = ["| server | concurrency | requests | requests/s | vs baseline | p50 ms | p99 ms |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["requests_per_s"] / base[r["concurrency"]] if base.get(r["concurrency"]) else float("nan")
        lines.append(f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.1f} | "
                     f"{ratio:.2f}x | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifier", default=None, help="a saved classifier (default: OUTPUT/classifier, "
                                                           "trained there if absent)")
    parser.add_argument("--output", default=str(ROOT / "runs" / "serve-bench"), help="folder for the results")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per cell (default: 10)")
    parser.add_argument("--max-requests", type=int, default=5000, help="measured requests per cell at most")
    parser.add_argument("--baseline-server", default=None, metavar="CLASSIFIER", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        baseline_server(args.baseline_server, args.port)
        return 0

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started_at, where = datetime.now(UTC), machine()
    folder = Path(args.classifier) if args.classifier else out / "classifier"
    if not (folder / "cptune_classifier.json").is_file():
        print(f"training a classifier into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "cptune", *TRAIN, "--output", str(folder)], check=True, cwd=ROOT,
                       timeout=1800)
    sys.path.insert(0, str(ROOT / "src"))  # a checkout without `pip install -e .`
    from cptune.data import load_dataset  # the data layer only: no torch in this process

    texts = [ex.text for ex in load_dataset("rotten_tomatoes").examples[:TEXTS]]
    servers = [
        ("serve", "serve", [sys.executable, "-m", "cptune", "serve", str(folder), "--port", "0"]),
        ("serve, --max-batch 1", "serve-unbatched", [sys.executable, "-m", "cptune", "serve", str(folder),
                                                     "--port", "0", "--max-batch", "1"]),
        ("baseline", "baseline", [sys.executable, __file__, "--baseline-server", str(folder)]),
    ]
    results, first_answers = [], {}
    for name, slug, command in servers:
        print(f"{name}: starting", flush=True)
        child = Child(command, out / f"{slug}.log")
        try:
            first_answers[name] = predict(child.port, texts[0])[1]["predictions"][0]["probabilities"]
            for c in args.concurrency:
                row = {"server": name, **load(child.port, texts, c, args.duration, args.max_requests)}
                print(f"  concurrency {c}: {row['requests']} requests, {row['requests_per_s']:.1f}/s, "
                      f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms", flush=True)
                results.append(row)
        finally:
            status = child.stop()
        if name.startswith("serve") and status != 0:
            raise RuntimeError(f"{name} exited with {status} after SIGTERM (expected 0)")
    reference = first_answers["baseline"]
    for name, probabilities in first_answers.items():  # the same classifier behind every server
        gap = max(abs(probabilities[k] - reference[k]) for k in reference)
        if gap > 1e-4:
            raise RuntimeError(f"{name} answers {probabilities}, the baseline {reference}")
    report = (f"{started_at:%Y-%m-%d %H:%M} UTC; {where}; classifier {folder}; {len(texts)} rotten_tomatoes "
              f"texts, one per request; each cell measured once every client has had an answer, for "
              f"{args.duration:g} s and {ROUNDS} answers per client (at most {MAX_WINDOW_S:g} s); load average "
              f"{os.getloadavg()[0]:.1f} at the end\n\n"
              f"{table(results)}\n")
    print()
    print(report)
    (out / "serve_load.md").write_text(report)
    (out / "serve_load.json").write_text(json.dumps({"started": started_at.isoformat(), "machine": where,
                                                     "classifier": str(folder), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
