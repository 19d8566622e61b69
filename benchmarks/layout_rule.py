"""The measurement behind the engine's layout rule (``cptune.cpt.engine.ONEPASS_PAYS``) on this machine.

    OMP_NUM_THREADS=1 python benchmarks/layout_rule.py --out docs/layout_rule_cpu.json
    OMP_NUM_THREADS=1 python benchmarks/layout_rule.py --compile --shots 4 --batches 8 --out docs/compile_cpu.json

One process holds one CPT model per query layout (``packed``, ``onepass``, ``padded``), all on the
same frozen model (the embedded SmolLM2-135M-Instruct, float32, CPU), the same context and training
queries as ``benchmarks/bench.py``, with the context shared at every batch size
(``prefix_sharing="always"``, so batch 1 compares the layouts too). Each configuration runs one
untimed warm-up step per layout, then ``--rounds`` rounds of one training step each (forward +
backward + AdamW + projection) in rotating order (A B C, B C A, ...): a burst of other load hits a
round's layouts alike. Reported: the median step per layout and the median of the per-round ratios
against ``packed`` (above 1: that layout is slower), and each one's untimed first step. With
``--compile`` the variants are ``packed`` and ``packed-compiled`` (``CPTModel.compile_``): the first
step then includes compiling. The JSON is rewritten after each configuration.
Keep it short: the 2-core machine is shared (the defaults take about 4 minutes at one thread).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import cptune  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cptbench.settings import CPT_FIELDS, LABEL_WORDS  # noqa: E402
from cptbench.workers import _setup, rotate  # noqa: E402

LAYOUTS = {"packed": ("packed", False), "onepass": ("onepass", False), "padded": ("padded", False)}
COMPILED = {"packed": ("packed", False), "packed-compiled": ("packed", True)}


def measure(shots: int, batch: int, rounds: int, variants: dict) -> dict:
    from cptune import get_cpt_model, render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    steps, times, first = {}, {name: [] for name in variants}, {}
    for name, (layout, compile_it) in variants.items():
        model = get_cpt_model(base, context.to_config(**CPT_FIELDS), prefix_sharing="always", query_layout=layout)
        model.compile_(compile_it)
        model.train()
        base.eval()
        optimizer = torch.optim.AdamW([model.prompt_encoder.delta], lr=1e-3)

        def step(model=model, optimizer=optimizer):
            loss = model(**queries, return_logits=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.project_()

        steps[name] = step
    for r in range(rounds + 1):  # round 0: warm-up, untimed
        for name in rotate(tuple(variants), r):
            t0 = time.perf_counter()
            steps[name]()
            if r:
                times[name].append(time.perf_counter() - t0)
            else:
                first[name] = round(time.perf_counter() - t0, 3)
    ratios = {name: statistics.median(a / b for a, b in zip(times[name], times["packed"], strict=True))
              for name in variants}
    return {"shots": shots, "batch": batch, "context_tokens": len(context),
            "query_tokens": int(queries["attention_mask"].sum()),
            "median_step_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()}, "first_step_s": first,
            "over_packed": {k: round(v, 3) for k, v in ratios.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up (default: 3)")
    parser.add_argument("--compile", action="store_true", help="packed eager against packed compiled instead")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (rewritten after each configuration)")
    args = parser.parse_args(argv)
    from cptune.cpt.engine import layout_report
    from cptune.cpt.saving import write_json_atomic

    start = time.perf_counter()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": []}
    for shots in args.shots:
        for batch in args.batches:
            row = measure(shots, batch, args.rounds, COMPILED if args.compile else LAYOUTS)
            result["rows"].append(row)
            result["elapsed_s"] = round(time.perf_counter() - start, 1)
            if args.out:
                write_json_atomic(args.out, result)
            print(json.dumps({k: row[k] for k in ("shots", "batch", "median_step_s", "over_packed")}), flush=True)
    base = _setup(args.shots[0])[0]
    result["layout_report"] = layout_report(base)
    if args.out:
        write_json_atomic(args.out, result)
    names = list(result["rows"][0]["median_step_s"])
    others = [n for n in names if n != "packed"]
    print("| shots (ctx tokens) | batch | " + " | ".join(f"{n} s" for n in names) + " | "
          + " | ".join(f"{n} / packed" for n in others) + " | first step s (" + ", ".join(names) + ") |")
    print("|---|---|" + "---|" * (len(names) + len(others) + 1))
    for row in result["rows"]:
        s, o, f = row["median_step_s"], row["over_packed"], row["first_step_s"]
        print(f"| {row['shots']} ({row['context_tokens']}) | {row['batch']} | "
              + " | ".join(f"{s[n]:.3f}" for n in names) + " | " + " | ".join(f"{o[n]:.2f}" for n in others)
              + " | " + ", ".join(f"{f[n]:.1f}" for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
