"""Peak memory and step time of CPT training on SmolLM2 as the context and the batch grow (CPU).

The two commands behind docs/scaling_memory.json and the table in docs/scaling.md (about 40 minutes
on a shared 2-core machine):

    python benchmarks/memory_scaling.py --threads 1 --steps 3 --steps-by-context 2048:2,4096:1,8000:1 \
        --checkpointing 512:8 --timeout 900
    python benchmarks/memory_scaling.py --threads 1 --contexts 6000,8000 --batches 4,8 --skip 6000:4,8000:8 \
        --steps 1 --checkpointing '' --timeout 900 --append

    python benchmarks/memory_scaling.py --contexts 512 --batches 1,8 --out /tmp/m.json   # a quick look
    python benchmarks/memory_scaling.py --help

Every configuration runs in a fresh Python process (``--worker``), so its peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``) is its own: model load, context, queries and the training steps.
Each worker trains SmolLM2-135M-Instruct (float32) with ``cptune.train`` for ``--steps`` optimizer
steps (the first one is a warm-up; the step time is the median of the others; with one step, that
step's time, warm-up included) and prints one JSON line after every step, so a worker stopped by
the timeout still reports what it measured. The context is the longest run of whole Rotten Tomatoes
demonstrations (seed 0) not above the asked size; the queries are 64 other examples (12-66 tokens).

The driver stops a worker that passes ``--timeout`` seconds, or whose resident memory passes
``--mem-cap-gib``, or when the machine's available memory falls under ``--min-available-gib`` (the
machine may be shared; the worker also volunteers as the OOM killer's first choice), and records why.
Results go to ``--out`` as JSON (machine, versions, one row per configuration), rewritten after
every configuration; ``--append`` adds to the rows already there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GIB = 2**30
DEFAULT_CONTEXTS = (512, 2048, 4096, 8000)
DEFAULT_BATCHES = (1, 8, 32)
TEMPLATE = "input: {x} output: {y}"
WORDS = {"negative": "negative", "positive": "positive"}
POOL_SHOTS = 320  # enough Rotten Tomatoes demonstrations for an 8000-token context
NUM_QUERIES = 64


# -- worker -----------------------------------------------------------------------------------------


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def _emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def worker(spec: dict) -> int:
    """Train one configuration and print a JSON line after setup and after every step."""
    try:  # the machine is shared: if memory runs out, this process is the one to go
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    import torch

    import cptune
    from cptune.data import load_dataset, sample_splits
    from cptune.models import load_model

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    t0 = time.perf_counter()
    base, tok = load_model(device="cpu", dtype="float32")  # a CPU measurement, GPU or not
    model_rss = _peak_rss_gib()
    template = cptune.Template(TEMPLATE)
    shots, extra, _ = sample_splits(load_dataset("rotten_tomatoes"), POOL_SHOTS, 0, seed=0, extra_train=NUM_QUERIES)
    # The longest prefix of the demonstrations whose context has at most `context` tokens.
    lo, hi = 1, len(shots)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(cptune.build_context(shots[:mid], template, tok, WORDS)) <= spec["context"]:
            lo = mid
        else:
            hi = mid - 1
    context = cptune.build_context(shots[:lo], template, tok, WORDS)
    queries = cptune.render_queries(extra, template, tok, WORDS)
    lengths = queries["attention_mask"].sum(dim=1)
    model = cptune.get_cpt_model(base, context.to_config())
    settings = cptune.TrainSettings(
        steps=spec["steps"],
        batch_size=spec["batch"],
        lr=1e-3,
        gradient_checkpointing=spec["gradient_checkpointing"],
    )
    row = {
        "context_tokens": len(context),
        "shots": lo,
        "batch": spec["batch"],
        "gradient_checkpointing": spec["gradient_checkpointing"],
        "query_tokens": {"min": int(lengths.min()), "mean": round(float(lengths.float().mean()), 1),
                         "max": int(lengths.max())},
        "torch_threads": torch.get_num_threads(),
        "model_loaded_rss_gib": round(model_rss, 3),
        "setup_rss_gib": round(_peak_rss_gib(), 3),
        "setup_seconds": round(time.perf_counter() - t0, 2),
        "steps_planned": spec["steps"],
        "step_seconds": [],
        "peak_rss_gib_after_step": [],
        "losses": [],
    }
    _emit(row)
    last = [time.perf_counter()]

    def tick(step: int, loss: float) -> None:
        now = time.perf_counter()
        row["step_seconds"].append(round(now - last[0], 3))
        row["peak_rss_gib_after_step"].append(round(_peak_rss_gib(), 3))
        row["losses"].append(round(loss, 5))
        last[0] = now
        _emit(row)
        last[0] = time.perf_counter()

    cptune.train(model, queries, settings, progress=False, callback=tick)
    return 0


# -- driver -----------------------------------------------------------------------------------------


def _meminfo() -> dict[str, float]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            if key in ("MemTotal", "MemAvailable"):
                out[key] = int(value.split()[0]) * 1024 / GIB
    except OSError:
        pass
    return out


def _proc_rss_gib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def machine() -> dict:
    import torch
    import transformers

    import cptune

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "cptune": cptune.__version__}
    try:
        import accelerate

        versions["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    mem = _meminfo()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_total_gib": round(mem.get("MemTotal", 0.0), 2),
        "ram_available_at_start_gib": round(mem.get("MemAvailable", 0.0), 2),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "versions": versions,
        "model": "SmolLM2-135M-Instruct (cptune's embedded default, float32)",
    }


def run_one(spec: dict, args) -> dict:
    """Run one configuration in a fresh process, watching its time and memory."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    start = time.perf_counter()
    errors = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: warnings can never block the worker
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True)
    rows: list[dict] = []

    def read_rows() -> None:  # the worker prints one JSON line per step; keep the latest
        for line in proc.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))

    reader = threading.Thread(target=read_rows, daemon=True)
    reader.start()
    seen_rss, stopped = 0.0, None
    while proc.poll() is None:
        rss = _proc_rss_gib(proc.pid)
        seen_rss = max(seen_rss, rss)
        available = _meminfo().get("MemAvailable", float("inf"))
        elapsed = time.perf_counter() - start
        if elapsed > args.timeout:
            stopped = f"timeout ({args.timeout:.0f} s)"
        elif rss > args.mem_cap_gib:
            stopped = f"memory cap: resident memory passed {args.mem_cap_gib} GiB"
        elif available < args.min_available_gib:
            stopped = (f"machine memory: available memory fell under {args.min_available_gib} GiB "
                       f"with the worker at {rss:.2f} GiB")
        if stopped:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    reader.join(timeout=10)
    last_row = rows[-1] if rows else None
    errors.seek(0)
    stderr = errors.read()
    errors.close()
    row = dict(last_row or {"context_target": spec["context"], "batch": spec["batch"],
                            "gradient_checkpointing": spec["gradient_checkpointing"]})
    row["context_target"] = spec["context"]
    row["wall_seconds"] = round(time.perf_counter() - start, 1)
    row["watched_max_rss_gib"] = round(seen_rss, 3)
    done = len(row.get("step_seconds", []))
    if stopped:
        row["status"] = f"stopped after {done} of {spec['steps']} steps: {stopped}"
    elif proc.returncode == 0 and done == spec["steps"]:
        row["status"] = "ok"
    elif proc.returncode == -signal.SIGKILL:
        row["status"] = f"killed (SIGKILL, most likely the OOM killer) after {done} of {spec['steps']} steps"
    else:
        tail = stderr.strip().splitlines()[-1:] or [""]
        row["status"] = f"failed (exit {proc.returncode}) after {done} of {spec['steps']} steps: {tail[0][:300]}"
    timed = row.get("step_seconds", [])[1:]
    row["median_step_seconds"] = round(statistics.median(timed), 2) if timed else None
    row["first_step_seconds"] = row["step_seconds"][0] if row.get("step_seconds") else None
    if done:
        row["peak_rss_gib"] = row["peak_rss_gib_after_step"][-1]
    return row


def _step_cell(row: dict) -> str:
    """Median of the timed steps, or the single step's time (warm-up included) marked with '*'."""
    if row.get("median_step_seconds") is not None:
        return str(row["median_step_seconds"])
    if row.get("first_step_seconds") is not None:
        return f"{row['first_step_seconds']:.1f}*"
    return "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)),
                        help="context sizes in tokens (the longest whole-demonstration prefix not above each)")
    parser.add_argument("--batches", default=",".join(map(str, DEFAULT_BATCHES)))
    parser.add_argument("--skip", default="", help="CONTEXT:BATCH pairs not to run, e.g. 8000:32")
    parser.add_argument("--checkpointing", default="8000:8",
                        help="CONTEXT:BATCH pairs also run with gradient_checkpointing=True ('' for none)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the first is a warm-up")
    parser.add_argument("--steps-by-context", default="",
                        help="CONTEXT:STEPS pairs overriding --steps (e.g. 8000:1: one step, its peak memory "
                             "and its time, warm-up included)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker")
    parser.add_argument("--mem-cap-gib", type=float, default=22.0, help="stop a worker whose RSS passes this")
    parser.add_argument("--min-available-gib", type=float, default=0.75,
                        help="stop a worker when the machine's available memory falls under this")
    parser.add_argument("--out", default="docs/scaling_memory.json")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to those already in --out (its machine and settings are kept; "
                             "this run's command and settings are recorded under 'appended')")
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker))

    pairs = lambda text: [tuple(int(v) for v in p.split(":")) for p in text.split(",") if p.strip()]  # noqa: E731
    skip = set(pairs(args.skip))
    steps = dict(pairs(args.steps_by_context))
    specs = [
        {"context": c, "batch": b, "steps": steps.get(c, args.steps), "gradient_checkpointing": False,
         "threads": args.threads}
        for c in (int(v) for v in args.contexts.split(","))
        for b in (int(v) for v in args.batches.split(","))
        if (c, b) not in skip
    ]
    specs += [{"context": c, "batch": b, "steps": steps.get(c, args.steps), "gradient_checkpointing": True,
               "threads": args.threads} for c, b in pairs(args.checkpointing)]
    info = machine()
    print(json.dumps(info), flush=True)
    command = "python benchmarks/memory_scaling.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    settings = {"steps": args.steps, "steps_by_context": steps, "threads": args.threads,
                "timeout_s": args.timeout, "mem_cap_gib": args.mem_cap_gib,
                "min_available_gib": args.min_available_gib, "template": TEMPLATE, "dataset": "rotten_tomatoes",
                "lr": 1e-3, "skipped": [f"{c}:{b}" for c, b in sorted(skip)]}
    result = {"command": command, "machine": info, "settings": settings, "rows": []}
    if args.append and Path(args.out).is_file():
        result = json.loads(Path(args.out).read_text())
        result.setdefault("appended", []).append({"command": command, "machine": info, "settings": settings,
                                                  "first_row": len(result["rows"])})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        row = run_one(spec, args)
        result["rows"].append(row)
        print(json.dumps({k: row.get(k) for k in ("context_tokens", "batch", "gradient_checkpointing",
                                                  "peak_rss_gib", "median_step_seconds", "step_seconds",
                                                  "wall_seconds", "status")}), flush=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| context tokens | batch | checkpointing | peak RSS GiB | step s | status |\n|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row.get('context_tokens', row['context_target'])} | {row['batch']} | "
              f"{'yes' if row['gradient_checkpointing'] else 'no'} | {row.get('peak_rss_gib', '-')} | "
              f"{_step_cell(row)} | {row['status']} |")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
