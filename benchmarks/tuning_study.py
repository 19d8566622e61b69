"""The tuning study of docs/results.md: one change at a time to CPT's settings, template or label words.

Each variant is one ``cptune compare`` run (its own output folder, so resuming never mixes settings)
on one dataset and shot count, 5 seeds, 100 test examples: the same cells (splits) as
``benchmarks/results_grid.sh``, whose results (``--baseline``, default ``runs/compare``) are the
"defaults" row. Variants run ``--jobs`` at a time, one thread each; rerunning resumes. The table
(CPT accuracy, raw and calibrated, mean +- std over the seeds; zero-shot and ICL where the variant
changes what they see) is printed and written to ``OUT/tuning.md``.

    python benchmarks/tuning_study.py --dataset rotten_tomatoes --shots 4
    python benchmarks/tuning_study.py --report-only --dataset rotten_tomatoes --shots 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cptune.app.compare import read_results
from cptune.cpt.saving import write_text_atomic
from cptune.data import DATASET_DEFAULTS

SEEDS = ["0", "1", "2", "3", "4"]


def variants(dataset: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, methods, extra compare arguments) of every variant (the defaults come from the grid)."""
    cpt = ["cpt"]
    out = [
        ("lr 1e-4", cpt, ["--set", "cpt_lr=1e-4"]),
        ("lr 3e-3", cpt, ["--set", "cpt_lr=3e-3"]),
        ("template Review/Sentiment", ["zero-shot", "icl", "cpt"], ["--template", "Review: {x}\\nSentiment: {y}"]),
        ("eps 1.0 / 0.5", cpt, ["--set", "eps_input=1", "--set", "eps_format=0.5"]),
        ("no loss decay (1.0)", cpt, ["--set", "decay=1"]),
    ]
    return out


def folder(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_variant(args, name: str, methods: list[str], extra: list[str]) -> str:
    out = Path(args.out) / folder(name)
    command = [sys.executable, "-m", "cptune", "compare", "--dataset", args.dataset, "--shots", str(args.shots),
               "--seeds", *SEEDS, "--test-size", "100", "--methods", *methods, *extra, "--output", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return f"{'done' if code == 0 else f'FAILED ({code}, see {out}.log)'}: {name}"


def _stat(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def report(args) -> str:
    fmt, words = DATASET_DEFAULTS[args.dataset]
    lines = [f"Dataset `{args.dataset}`, {args.shots} shots, seeds {', '.join(SEEDS)}, 100 test examples; "
             f"default template `{fmt}`, label words {', '.join(words.values())}. Accuracy mean ± std over the "
             "seeds; *cal.*: with contextual calibration.", "",
             "| variant | CPT | CPT cal. | ICL | ICL cal. | zero-shot | zero-shot cal. | CPT seeds |",
             "|---|---|---|---|---|---|---|---|"]
    baseline = Path(args.baseline)
    grid = [r for path in [baseline / "results.jsonl", *sorted(baseline.glob("parts/*/results.jsonl"))]
            for r in read_results(path)[0] if r["dataset"] == args.dataset and r["shots"] == args.shots]
    grid = list({(r["seed"], r["method"]): r for r in grid}.values())  # parts and their merge hold the same cells
    for name, _, extra in [("defaults, from the grid", None, []), *variants(args.dataset)]:
        rows = grid if _ is None else read_results(Path(args.out) / folder(name) / "results.jsonl")[0]
        cells = []
        for method in ("cpt", "icl", "zero-shot"):
            mine = [r for r in rows if r["method"] == method]
            cells += [_stat([r["accuracy"] for r in mine]), _stat([r["calibrated"]["accuracy"] for r in mine])]
        seeds = sorted(r["seed"] for r in rows if r["method"] == "cpt")
        lines.append(f"| {name} (`{' '.join(extra) or 'defaults'}`) | " + " | ".join(cells)
                     + f" | {len(seeds)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="rotten_tomatoes", choices=sorted(DATASET_DEFAULTS))
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=2, help="variants run at a time (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder (default: runs/tuning/DATASET-SHOTS)")
    parser.add_argument("--baseline", default="runs/compare", help="the grid's folder (default: %(default)s)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out or f"runs/tuning/{args.dataset}-{args.shots}"
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for line in pool.map(lambda v: run_variant(args, *v), variants(args.dataset)):
                print(line, flush=True)
    table = report(args)
    write_text_atomic(Path(args.out) / "tuning.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
