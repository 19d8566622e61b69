"""Entry points of the benchmark: its options, ``run`` (benchmark, report or one worker) and ``main``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cptbench.driver import run_benchmark
from cptbench.numbers import goal_rows
from cptbench.report import write_report
from cptbench.settings import QUIET_WAIT, TEST_SIZE, TRAIN_IMPLS
from cptbench.workers import run_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``benchmarks/bench.py``."""
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per training configuration "
                        "(default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 shots, batch 1 and 8, 40 test "
                        "examples, 2 rounds; writes to runs/bench-quick unless --out-dir is given")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="context sizes (default 4 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="training batch sizes (default 1 4 8)")
    parser.add_argument("--test-size", type=int, default=None, help=f"test examples to classify (default {TEST_SIZE})")
    parser.add_argument("--quiet-wait", type=float, default=QUIET_WAIT, help="longest wait, in seconds, for other "
                        "processes to go quiet before each measured round (default %(default)s; 0 disables)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where performance.md/.png go (default docs)")
    parser.add_argument("--json", type=Path, default=None, help="raw results (default runs/bench/results.json)")
    parser.add_argument("--resume", action="store_true", help="keep the results already in --json (same "
                        "settings) and measure only what is missing, e.g. after a worker was killed")
    parser.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                        help="re-render the report from saved raw results, without measuring")
    parser.add_argument("--worker", choices=("train-time", "train-rss", "classify", "agree", "profile", "peak"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=TRAIN_IMPLS, default="cptune", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or, with ``--worker``, one measurement) for parsed ``args``; return the exit status."""
    if args.worker:
        return run_worker(args)
    try:
        import peft  # noqa: F401
    except ImportError:
        print("the benchmark compares against PEFT: pip install 'cptune[test]' (peft==0.21.2)", file=sys.stderr)
        return 2
    out_dir = args.out_dir or Path("runs/bench-quick" if args.quick else "docs")
    if args.report_only:
        results = json.loads(args.report_only.read_text())
    else:
        steps = args.steps or (2 if args.quick else 5)
        shots = args.shots or ([4] if args.quick else [4, 8])
        batches = args.batches or ([1, 8] if args.quick else [1, 4, 8])
        test_size = args.test_size or (40 if args.quick else TEST_SIZE)
        json_path = args.json or Path("runs/bench-quick/results.json" if args.quick else "runs/bench/results.json")
        t0 = time.perf_counter()
        results = run_benchmark(steps, shots, batches, test_size, args.quiet_wait, json_path,
                                lambda line: print(line, flush=True), resume=args.resume)
        results["command"] = " ".join(["python benchmarks/bench.py", *sys.argv[1:]])
        results["wall_s"] = time.perf_counter() - t0
        json_path.write_text(json.dumps(results, indent=1))
        print(f"raw results: {json_path} ({results['wall_s'] / 60:.1f} min)")
    write_report(results, out_dir)
    print(f"report: {out_dir / 'performance.md'}, {out_dir / 'performance.png'}")
    for goal, value, verdict in goal_rows(results):
        print(f"  {verdict:>16}  {value:>8}  {goal}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``benchmarks/bench.py``."""
    import cptbench  # its docstring describes the benchmark

    parser = argparse.ArgumentParser(prog="bench", description=cptbench.__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
