"""Throughput of cptune on Ray against one process (issue 23): `predict --file` and a 16-cell `compare` grid.

    OMP_NUM_THREADS=1 python benchmarks/ray_scaling.py --output runs/ray-scaling   # the full run (<= ~12 min)
    OMP_NUM_THREADS=1 python benchmarks/ray_scaling.py --quick --output runs/ray-quick   # tiny sizes, a smoke test

Predict: ``--texts`` rotten_tomatoes texts (default 2,000) in a CSV, annotated by the embedded SmolLM2-135M
classifier (``--classifier FOLDER``, else OUTPUT/classifier, trained there first: 4 shots, 10 steps; speed does
not depend on how well it learned) three ways: one process (``annotate_file``) with torch's 2 threads, one
process with 1 thread, and ``annotate_file_ray`` on a local cluster with ``--workers`` (2) one-thread actors.
Rows per second count the rows over the wall time of the call (for Ray: from the call to the renamed output,
actors' start-up and model loading included; the cluster itself is started before the clock). The Ray output
must equal the single-process one (same cells; probabilities within 1e-6 plus the 6-decimal rounding).

Grid: 16 cheap cells (rotten_tomatoes, 2 and 4 shots, seeds 0-3, zero-shot and icl; ``--test-size`` texts
each) run serially (``run_grid``, one process, torch's threads) and on Ray with 2 one-CPU cells at a time
(``run_grid_ray``); cells per second, and the rows must be equal, timing fields aside.

Writes OUTPUT/ray_scaling.md (the table) and OUTPUT/ray_scaling.json (the raw numbers, the machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TRAIN = ["train", "--data", "rotten_tomatoes", "--shots", "4", "--steps", "10",
         "--template", "Review: {x}\\nSentiment: {y}"]
GRID = {"datasets": ["rotten_tomatoes"], "shots": [2, 4], "seeds": [0, 1, 2, 3], "methods": ["zero-shot", "icl"]}
TIMING_FIELDS = ("fit_seconds", "score_seconds")
SINGLE_THREADS = (2, 1)  # the single process with torch's 2 threads on this 2-core machine, then with 1
TOLERANCE = 1e-6 + 1e-6  # the issue's 1e-6, plus one step of the text formats' 6-decimal rounding


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.SubprocessError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"), "load_average": os.getloadavg()[0]}


def same_annotation(a: Path, b: Path) -> bool:
    with open(a, encoding="utf-8", newline="") as fa, open(b, encoding="utf-8", newline="") as fb:
        rows_a, rows_b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    if len(rows_a) != len(rows_b):
        return False
    for ra, rb in zip(rows_a, rows_b, strict=True):
        if list(ra) != list(rb):
            return False
        for column in ra:
            if column.startswith("p_") and ra[column] and rb[column]:
                if abs(float(ra[column]) - float(rb[column])) > TOLERANCE:
                    return False
            elif ra[column] != rb[column]:
                return False
    return True


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def predict_part(args, folder: Path, out: Path) -> list[dict]:
    import torch

    from cptune import CPTClassifier
    from cptune.app.annotate import annotate_file
    from cptune.app.onray import annotate_file_ray
    from cptune.data import load_dataset

    texts = [ex.text for ex in load_dataset("rotten_tomatoes").examples]
    texts = (texts * (args.texts // len(texts) + 1))[: args.texts]
    source = out / "texts.csv"
    with open(source, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "text"])
        writer.writerows([[i, t] for i, t in enumerate(texts)])
    results = []
    default_threads = torch.get_num_threads()
    for threads in SINGLE_THREADS:  # set here: OMP_NUM_THREADS=1 would otherwise make both runs 1 thread
        torch.set_num_threads(threads)
        clf = CPTClassifier.load(folder)
        target = out / f"single-{threads}.csv"
        target.unlink(missing_ok=True)
        seconds = timed(lambda: annotate_file(clf, source, target, progress=False))  # noqa: B023
        results.append({"job": "predict", "how": f"one process, {threads} thread(s)", "rows": len(texts),
                        "seconds": seconds, "per_second": len(texts) / seconds})
    torch.set_num_threads(default_threads)
    target = out / "ray.csv"
    target.unlink(missing_ok=True)
    seconds = timed(lambda: annotate_file_ray(folder, source, target, workers=args.workers, threads=1,
                                              progress=False))
    results.append({"job": "predict", "how": f"Ray, {args.workers} one-thread workers", "rows": len(texts),
                    "seconds": seconds, "per_second": len(texts) / seconds,
                    "equal_to_single_process": same_annotation(target, out / f"single-{SINGLE_THREADS[0]}.csv")})
    return results


def grid_part(args, out: Path) -> list[dict]:
    from cptune.app.compare import make_grid, run_grid
    from cptune.app.onray import run_grid_ray

    cells = make_grid(GRID["datasets"], GRID["shots"], GRID["seeds"], GRID["methods"])
    if args.quick:
        cells = cells[:4]
    results, rows = [], {}
    for how, run in (("serial, one process", lambda o: run_grid(cells, o, test_size=args.test_size, progress=False)),
                     (f"Ray, {args.workers} one-CPU cells at a time",
                      lambda o: run_grid_ray(cells, o, test_size=args.test_size, progress=False, cpus_per_cell=1)[0])):
        folder = out / ("grid-serial" if how.startswith("serial") else "grid-ray")
        (folder / "results.jsonl").unlink(missing_ok=True)
        start = time.perf_counter()
        got = run(folder)
        seconds = time.perf_counter() - start
        rows[how] = {(r["dataset"], r["shots"], r["seed"], r["method"]):
                     {k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in got}
        results.append({"job": "grid", "how": how, "cells": len(cells), "seconds": seconds,
                        "per_second": len(cells) / seconds})
    first, second = rows.values()
    results[-1]["equal_to_serial"] = first == second
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("runs/ray-scaling"))
    parser.add_argument("--classifier", type=Path, default=None)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=40, help="test texts per grid cell (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: 64 texts, 4 cells of 8 test texts")
    args = parser.parse_args(argv)
    if args.quick:
        args.texts, args.test_size = 64, 8
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    folder = args.classifier or out / "classifier"
    if not (folder / "cptune_classifier.json").is_file():
        subprocess.run([sys.executable, "-m", "cptune", *TRAIN, "--output", str(folder)], check=True)

    import ray

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    where = machine()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)  # before the clocks start
    try:
        results = predict_part(args, folder, out) + grid_part(args, out)
    finally:
        ray.shutdown()
    base = {job: next(r["per_second"] for r in results if r["job"] == job) for job in ("predict", "grid")}
    lines = [f"{started}; {where['cpus']} CPUs ({where['cpu']}), Python {where['python']}, OMP_NUM_THREADS="
             f"{where['omp_num_threads']}, load average {where['load_average']:.1f} at the start"
             f"{'; --quick' if args.quick else ''}", "",
             "| job | how | size | seconds | per second | vs the first row | same result |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        same = r.get("equal_to_single_process", r.get("equal_to_serial", ""))
        size = f"{r['rows']} rows" if r["job"] == "predict" else f"{r['cells']} cells"
        lines.append(f"| {r['job']} | {r['how']} | {size} | {r['seconds']:.1f} | {r['per_second']:.2f} | "
                     f"{r['per_second'] / base[r['job']]:.2f}x | {same} |")
    table = "\n".join(lines)
    print(table)
    (out / "ray_scaling.md").write_text(table + "\n", encoding="utf-8")
    (out / "ray_scaling.json").write_text(json.dumps({"started": started, "machine": where, "args": vars(args) | {
        "output": str(out), "classifier": str(folder)}, "results": results}, indent=1, default=str), encoding="utf-8")
    ok = all(r.get("equal_to_single_process", True) and r.get("equal_to_serial", True) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
