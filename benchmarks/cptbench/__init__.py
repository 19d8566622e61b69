"""Benchmark: cptune's context-once CPT against PEFT 0.21.2's duplicated context, on the embedded SmolLM2.

One run measures, side by side: training step time (forward + backward + AdamW) and peak RSS at
several batch sizes and context lengths; cptune's memory above the loaded model at batch 1, 8 and
32, fitted as a + b*context + c*query tokens + e*batch*context; test-set classification throughput;
executed and useful FLOPs per step against the machine's measured fp32 matmul peak; loss, gradient
and prediction agreement; the goals of issue 13 against all of these. It writes
``docs/performance.md`` and ``docs/performance.png``.

Every measurement runs in a fresh subprocess (``--worker ...``) that prints one JSON line. Step
times come from one process per configuration that alternates the implementations step by step
(A B C, B C A, ...), so drifts in machine load hit all of them; each peak RSS comes from its own
process (one implementation, one configuration). The CPU time other processes used during every
timed step is recorded. PEFT is needed (``pip install 'cptune[test]'``).

    python benchmarks/bench.py            # full run (~22 min on 2 quiet cores)
    python benchmarks/bench.py --quick    # smoke run, writes to runs/bench-quick/

The package, by responsibility: ``settings`` (the fixed settings), ``meters`` (RSS, other processes'
CPU, the quiet gate, the FLOP counter), ``workers`` (the measurements, run by ``--worker``), ``driver``
(spawning the workers, saving the results), ``numbers`` (FLOP formulas, goals), ``report`` and
``plot`` (markdown and figure), ``cli`` (entry points ``main``, ``add_arguments``, ``run``).
"""

from cptbench.cli import add_arguments, main, run
from cptbench.driver import run_benchmark
from cptbench.numbers import classify_flops, duplicated_flops, useful_flops
from cptbench.report import render_report, write_report
from cptbench.settings import (
    BATCH1_NOISE,
    CLASSIFY_IMPLS,
    CPT_FIELDS,
    GIB,
    LABEL_WORDS,
    LR,
    NUM_TRAIN_QUERIES,
    PEAK_SIZE,
    QUIET_WAIT,
    RSS_BATCHES,
    SEED,
    TEMPLATE_TEXT,
    TEST_SIZE,
    TRAIN_IMPLS,
)
from cptbench.workers import (
    run_worker,
    worker_agree,
    worker_classify,
    worker_peak,
    worker_profile,
    worker_train_rss,
    worker_train_time,
)

__all__ = [
    "BATCH1_NOISE", "CLASSIFY_IMPLS", "CPT_FIELDS", "GIB", "LABEL_WORDS", "LR", "NUM_TRAIN_QUERIES", "PEAK_SIZE",
    "QUIET_WAIT", "RSS_BATCHES", "SEED", "TEMPLATE_TEXT", "TEST_SIZE", "TRAIN_IMPLS", "add_arguments", "classify_flops",
    "duplicated_flops", "main", "render_report", "run", "run_benchmark", "run_worker", "useful_flops",
    "worker_agree", "worker_classify", "worker_peak", "worker_profile", "worker_train_rss", "worker_train_time",
    "write_report",
]
