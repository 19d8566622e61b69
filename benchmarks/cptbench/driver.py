"""Driver side of the benchmark: spawn the workers, keep every result, save them as JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from cptbench.numbers import classify_row, train_row
from cptbench.settings import GIB, RSS_BATCHES, TRAIN_IMPLS
from cptbench.workers import rotate
from cptune.cpt.saving import write_text_atomic

BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench.py"
"""The script the workers run as (``benchmarks/bench.py``)."""


def _spawn(log, *worker_args: str) -> dict:
    cmd = [sys.executable, str(BENCH_SCRIPT), "--worker", *worker_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(worker_args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"  {' '.join(worker_args):<58} {time.perf_counter() - t0:6.1f} s")
    return json.loads(lines[-1])


def _machine() -> dict:
    import peft
    import transformers

    import cptune

    cpu, mem = "unknown", float("nan")
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) * 1024 / GIB
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(cptune.__file__).parent, timeout=10).stdout.strip() or "n/a"
    except OSError:
        commit = "n/a"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cptune": cptune.__version__, "git": commit, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def run_benchmark(steps: int, shots: list[int], batches: list[int], test_size: int, quiet_wait: float,
                  json_path: Path, log, resume: bool = False) -> dict:
    """Run every worker; the raw results are saved to ``json_path`` after each one.

    With ``resume``, results already in ``json_path`` (same settings) are kept and their workers skipped.
    """
    results = {"machine": _machine(), "steps": steps, "quiet_wait": quiet_wait, "test_size": test_size,
               "command": "", "peak": [], "train": [], "rss": [], "classify": [], "agree": [], "profile": None}
    if resume and json_path.is_file():
        saved = json.loads(json_path.read_text())
        if (saved.get("steps"), saved.get("quiet_wait"), saved.get("test_size", test_size)) != (
                steps, quiet_wait, test_size):
            raise ValueError(f"cannot resume {json_path}: it was measured with other settings")
        results.update({k: saved[k] for k in ("peak", "train", "rss", "classify", "agree", "profile")})
        log(f"resuming {json_path}")
    wait = str(quiet_wait)

    def save():
        write_text_atomic(json_path, json.dumps(results, indent=1))

    def rss(impl: str, s: int, b: int) -> None:
        if not any((r["impl"], r["shots"], r["batch"]) == (impl, s, b) for r in results["rss"]):
            results["rss"].append(_spawn(log, "train-rss", "--impl", impl, "--shots", str(s), "--batches", str(b)))
            save()

    log("matmul peak")
    results["peak"].append(_spawn(log, "peak"))
    log(f"training: warm-up + {steps} rounds of A B C steps per configuration; then peak RSS, one process each")
    for i, (s, b) in enumerate((s, b) for s in shots for b in batches):
        if train_row(results, s, b) is None:
            results["train"].append(_spawn(log, "train-time", "--shots", str(s), "--batches", str(b), "--steps",
                                           str(steps), "--quiet-wait", wait))
            save()
        for impl in rotate(TRAIN_IMPLS, i):
            rss(impl, s, b)
    log(f"cptune's memory above the loaded model: batch {', '.join(map(str, RSS_BATCHES))}, one process each")
    for s in shots:
        for b in RSS_BATCHES:
            rss("cptune", s, b)
    log(f"classification: {test_size} test examples, batch 8, implementations alternated batch by batch")
    for s in shots:
        if classify_row(results, s) is None:
            results["classify"].append(_spawn(log, "classify", "--shots", str(s), "--batches", "8", "--test-size",
                                              str(test_size), "--quiet-wait", wait))
            save()
    log("agreement and profile")
    for s in shots:
        if not any(a["shots"] == s for a in results["agree"]):
            results["agree"].append(_spawn(log, "agree", "--shots", str(s), "--batches", str(max(batches))))
            save()
    if results["profile"] is None:
        results["profile"] = _spawn(log, "profile", "--shots", str(max(shots)), "--batches", str(max(batches)))
    results["peak"].append(_spawn(log, "peak"))
    save()
    return results
