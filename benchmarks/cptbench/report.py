"""The benchmark's report: ``performance.md`` (markdown tables, goals, reading of the misses) and the plot."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from cptbench.numbers import (
    best_ratio,
    classify_flops,
    classify_row,
    duplicated_flops,
    faster_peft,
    goal_rows,
    grid_axes,
    machine_peak,
    median_time,
    paired_ratio,
    peak_rss,
    train_row,
    useful_flops,
)
from cptbench.plot import plot_figure
from cptbench.settings import CLASSIFY_IMPLS, PEAK_SIZE, TRAIN_IMPLS
from cptune.cpt.saving import write_text_atomic


def _spread(times: list[float]) -> str:
    return f"{min(times):.2f}-{max(times):.2f}"


def _render_training(results: dict) -> list[str]:
    shots, batches = grid_axes(results)
    out = ["## Training step (forward + backward + AdamW)", "",
           "Seconds are medians over the rounds; speedups are medians of the per-round paired ratios, and in",
           "parentheses the ratio of the fastest rounds (contention only ever adds time, so the minimum is the",
           "other robust estimate on a busy machine).", "",
           "| shots (ctx tokens) | batch | query tokens | cptune s | PEFT s | PEFT no-cache s | speedup vs PEFT | "
           "vs no-cache | cptune RSS GB | PEFT RSS GB | no-cache RSS GB | other CPU, median (max) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in shots:
        for b in batches:
            if (c := train_row(results, s, b)) is None:
                continue
            lengths = c["query_lengths"]
            foreign = [f for impl in TRAIN_IMPLS for f in c["impls"][impl]["foreign"]]
            span = f"{min(lengths)}-{max(lengths)} (pad to {c['padded_length']})" if b > 1 else str(lengths[0])
            out.append(f"| {s} ({c['context_tokens']}) | {b} | {span} | "
                       + " | ".join(f"{median_time(c, i):.2f}" for i in TRAIN_IMPLS)
                       + f" | {paired_ratio(c, 'peft'):.2f}x ({best_ratio(c, 'peft'):.2f}x) | "
                       f"{paired_ratio(c, 'peft-nocache'):.2f}x ({best_ratio(c, 'peft-nocache'):.2f}x) | "
                       + " | ".join(f"{peak_rss(results, i, s, b):.2f}" for i in TRAIN_IMPLS)
                       + f" | {statistics.median(foreign):.2f} ({max(foreign):.2f}) |")
    out += ["", "Spread (min-max over rounds) and median phases forward / backward / optimizer+projection, s:", "",
            "| shots | batch | cptune | PEFT | PEFT no-cache |", "|---|---|---|---|---|"]
    for s in shots:
        for b in batches:
            if (c := train_row(results, s, b)) is not None:
                cells = []
                for impl in TRAIN_IMPLS:
                    x = c["impls"][impl]
                    phases = [statistics.median(p[k] for p in x["phases"]) for k in range(3)]
                    cells.append(f"{_spread(x['times'])}; {phases[0]:.2f} / {phases[1]:.2f} / {phases[2]:.3f}")
                out.append(f"| {s} | {b} | " + " | ".join(cells) + " |")
    return out


def _render_flops(results: dict) -> list[str]:
    peak = machine_peak(results)
    out = ["## FLOPs and achieved rate", "",
           "*Executed* FLOPs are counted on each implementation's warm-up step with",
           "`torch.utils.flop_counter.FlopCounterMode`: every matmul, forward and backward, as it really ran",
           "(padding included), plus CPU flash attention, which the counter does not know; we register its",
           "formula (4·b·h·Lq·Lk·hd forward, only the causal triangle when the kernel runs with `is_causal`;",
           "backward 2x forward). *Useful* FLOPs are the least a CPT step needs, the same for every",
           "implementation:", "",
           "    useful = 2·F + 3·A      backward of a frozen model = input gradients only: 1x forward for the",
           "                            matmuls; attention backward = 2x forward (dQ, dK, dV, dP)",
           "    F = 2·P·(N + Σ l_i) + 2·d·V·(M_ctx + B)                 forward matmuls",
           "    A = 4·L·H·hd·[N(N+1)/2 + Σ_i (l_i·N + l_i(l_i+1)/2)]    forward attention, causal pairs", "",
           "P = 106.2 M non-embedding matmul parameters (q, k, v, o, gate, up, down in 30 layers); N context",
           "tokens; l_i the real query lengths; d = 576; V = 49,152 (tied vocabulary projection); M_ctx context",
           "label tokens; B queries, one label token each; L = 30, H·hd = 576. Not counted: norms, rotary",
           "embeddings, softmax, SiLU, the loss, the embedding lookup, AdamW (elementwise; see the profile for",
           "their time). `PEFT layout` is the same formula for B rows of N + T_pad tokens with logits at every",
           "position and dense masked attention; it matches PEFT's counted figure. (The usual 3x-forward rule",
           "for training counts weight gradients, which a frozen model never computes; it would inflate every",
           "rate below by ~1.5x.)", "",
           "| shots | batch | impl | executed GFLOP | useful GFLOP | PEFT layout GFLOP | executed GFLOP/s | "
           "% of peak | useful % of peak |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in results["train"]:
        useful = useful_flops(c["dims"], c["context_tokens"], c["context_labels"], c["query_lengths"])
        dup = duplicated_flops(c["dims"], c["context_tokens"], c["padded_length"], c["batch"])
        for impl in TRAIN_IMPLS:
            t, executed = median_time(c, impl), c["impls"][impl]["executed_flops"]
            out.append(f"| {c['shots']} | {c['batch']} | {impl} | {executed / 1e9:.0f} | {useful / 1e9:.0f} | "
                       f"{dup / 1e9:.0f} | {executed / t / 1e9:.0f} | {100 * executed / t / peak:.0f}% | "
                       f"{100 * useful / t / peak:.0f}% |")
    return out


def _render_classify(results: dict) -> list[str]:
    n = results["classify"][0]["examples"]
    out = ["## Classification throughput", "",
           f"{n} test examples, batch 8, score = first label token's log-probability at the answer position.",
           "The three run in one process, batch by batch in rotating order. cptune: the context's KV cache is",
           "encoded once (its time included) and reused for every batch (`cptune.scoring.label_log_likelihoods`,",
           "what `score_texts` runs); PEFT: its forward on each batch, the context re-encoded in every row, logits",
           "read at N + len - 1; floor: the same queries without a context. Tokenisation is excluded for all three.",
           "`score_texts` is then timed as one call (cptune and floor) and gives the same scores. Both",
           "implementations hold the same fixed nonzero delta (inside the projection balls).", "",
           "| shots (ctx tokens) | cptune ex/s | PEFT ex/s | floor ex/s | cptune s/ex | PEFT s/ex | floor s/ex | "
           "speedup vs PEFT | cptune / floor time | `score_texts` one call, s/ex (cptune, floor) | other CPU, "
           "median (max) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(results["classify"], key=lambda c: c["shots"]):
        x = c["impls"]
        sec = {i: x[i]["seconds"] / c["examples"] for i in CLASSIFY_IMPLS}
        foreign = [f for i in CLASSIFY_IMPLS for f in x[i]["foreign"]]
        out.append(f"| {c['shots']} ({c['context_tokens']}) | "
                   + " | ".join(f"{x[i]['examples_per_s']:.2f}" for i in CLASSIFY_IMPLS) + " | "
                   + " | ".join(f"{sec[i]:.3f}" for i in CLASSIFY_IMPLS)
                   + f" | {sec['peft'] / sec['cptune']:.2f}x | {sec['cptune'] / sec['floor']:.2f}x | "
                   f"{x['cptune']['score_texts_s'] / c['examples']:.3f}, "
                   f"{x['floor']['score_texts_s'] / c['examples']:.3f}"
                   f" | {statistics.median(foreign):.2f} ({max(foreign):.2f}) |")
    return out


def _render_bounds(results: dict) -> list[str]:
    """Each speedup split into a FLOP ratio and an efficiency ratio; memory above the loaded model."""
    shots, batches = grid_axes(results)
    out = ["## What bounds the figures", "",
           "A speedup is (PEFT's executed FLOPs / cptune's) x (cptune's FLOP/s / PEFT's): the first factor is",
           "what the layout saves, the second how well the smaller pieces of work run. The FLOP ratio is the",
           "speedup cptune would reach at PEFT's efficiency.", "",
           "| shots | batch | vs | speedup (medians) | FLOP ratio | efficiency ratio | cptune % of peak | "
           "PEFT % of peak |",
           "|---|---|---|---|---|---|---|---|"]
    peak = machine_peak(results)
    for s in shots:
        for b in batches:
            if (c := train_row(results, s, b)) is None:
                continue
            ours = c["impls"]["cptune"]["executed_flops"] / median_time(c, "cptune")
            for impl in TRAIN_IMPLS[1:]:
                theirs = c["impls"][impl]["executed_flops"] / median_time(c, impl)
                ratio = c["impls"][impl]["executed_flops"] / c["impls"]["cptune"]["executed_flops"]
                slower = median_time(c, impl) / median_time(c, "cptune")
                out.append(f"| {s} | {b} | {impl} | {slower:.2f}x | {ratio:.2f} | "
                           f"{ours / theirs:.2f} | {100 * ours / peak:.0f}% | {100 * theirs / peak:.0f}% |")
    out += ["", "Classification, forward FLOPs over the whole test set by the formula above (right padding to the",
            "longest query of each batch, dense masked attention):", "",
            "| shots | cptune GFLOP | PEFT GFLOP | floor GFLOP | PEFT / cptune FLOPs | measured speedup | "
            "cptune / floor FLOPs | measured cptune / floor time |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(results["classify"], key=lambda c: c["shots"]):
        if "query_lengths" not in c:
            continue
        f = classify_flops(c["dims"], c["context_tokens"], c["query_lengths"], c["batch"])
        t = {i: c["impls"][i]["seconds"] for i in CLASSIFY_IMPLS}
        out.append(f"| {c['shots']} | {f['cptune'] / 1e9:.0f} | {f['peft'] / 1e9:.0f} | {f['floor'] / 1e9:.0f} | "
                   f"{f['peft'] / f['cptune']:.2f} | {t['peft'] / t['cptune']:.2f}x | {f['cptune'] / f['floor']:.2f} | "
                   f"{t['cptune'] / t['floor']:.2f}x |")
    big = max(batches)
    out += ["", f"Peak RSS at batch {big}: after loading the model (before any step) each process already held the",
            "amount in the first column; the goal compares absolute peaks, so that baseline is a floor no layout",
            "can go under.", "", "| shots | impl | after load GB | peak GB | peak - after load GB |",
            "|---|---|---|---|---|"]
    for s in shots:
        for impl in TRAIN_IMPLS:
            r = next((r for r in results["rss"] if (r["impl"], r["shots"], r["batch"]) == (impl, s, big)), None)
            if r:
                out.append(f"| {s} | {impl} | {r['rss_setup_gb']:.2f} | {r['peak_rss_gb']:.2f} | "
                           f"{r['peak_rss_gb'] - r['rss_setup_gb']:.2f} |")
    return out


def _render_agreement(results: dict) -> list[str]:
    out = ["## Agreement with PEFT", "",
           "Training: the same 8 queries and the same fixed nonzero delta, float32, real model; `auto` is the path",
           "timed above, `never` (PEFT's layout run by cptune) is a control for float32 summation-order noise.",
           "Classification: cptune's cached scores vs PEFT's on every test example.", "",
           "| shots | batch | PEFT loss | auto: loss rel. err | auto: grad rel. err | never: loss rel. err | "
           "never: grad rel. err | prediction disagreements | max abs score diff | score_texts vs batches |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for a in results["agree"]:
        dis = diff = same = "n/a"
        if (c := classify_row(results, a["shots"])) is not None:
            ours, peft = c["impls"]["cptune"], c["impls"]["peft"]
            wrong = sum(x != y for x, y in zip(ours["predictions"], peft["predictions"], strict=True))
            dis = f"{wrong} / {c['examples']}"
            diff = f"{float((torch.tensor(ours['scores']) - torch.tensor(peft['scores'])).abs().max()):.1e}"
            same = f"{ours['score_texts_max_diff']:.1e}"
        out.append(f"| {a['shots']} | {a['batch']} | {a['peft_loss']:.5f} | {a['auto']['loss_rel_err']:.1e} | "
                   f"{a['auto']['grad_rel_err']:.1e} | {a['never']['loss_rel_err']:.1e} | "
                   f"{a['never']['grad_rel_err']:.1e} | {dis} | {diff} | {same} |")
    return out


def _op_share(prof_side: dict, *names: str) -> float:
    return sum(o["share"] for o in prof_side["ops"] if any(n in o["op"] for n in names))


def _kind_rates(prof_side: dict, timing: dict) -> str:
    """'impl: matmul x% of time at y GFLOP/s, attention ...' from a profile and the counted FLOPs by op."""
    by_op = timing.get("flops_by_op", {})
    kinds = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm"), "flash attention": ("flash_attention",)}
    parts = []
    for kind, names in kinds.items():
        ms = sum(o["self_ms"] for o in prof_side["ops"] if any(n in o["op"] for n in names))
        flops = sum(n for op, n in by_op.items() if any(k in op.replace("aten.", "aten::", 1) for k in names))
        rate = f" at {flops / (ms / 1e3) / 1e9:.0f} GFLOP/s" if flops and ms else ""
        parts.append(f"{kind} {100 * ms / prof_side['total_ms']:.0f}% of the time{rate}")
    return f"{timing['impl']} " + ", ".join(parts)


def _render_misses(results: dict) -> list[str]:
    """For every missed goal: what bounds it, from this run's FLOP counts, timings and profiles."""
    missed = [(g, v) for g, v, verdict in goal_rows(results) if verdict == "missed"]
    out = ["## Reading the misses", ""]
    if not missed:
        return out + ["None: every goal was met in this run."]
    peak, prof = machine_peak(results), results.get("profile") or {}
    _, batches = grid_axes(results)
    for goal, value in missed:
        shots = int(goal.split(" shots")[0].split()[-1])
        if goal.startswith(f"training step, batch {max(batches)}"):
            c = train_row(results, shots, max(batches))
            p = faster_peft(c)
            ex_c, ex_p = c["impls"]["cptune"]["executed_flops"], c["impls"][p]["executed_flops"]
            eff_c, eff_p = ex_c / median_time(c, "cptune") / peak, ex_p / median_time(c, p) / peak
            target = float(goal.split(">= ")[1].split("x")[0])
            useful = useful_flops(c["dims"], c["context_tokens"], c["context_labels"], c["query_lengths"])
            text = (f"- **{goal}: {value}.** The layout cuts the executed FLOPs {ex_p / ex_c:.2f}x "
                    f"({ex_p / 1e9:.0f} -> {ex_c / 1e9:.0f} GFLOP), but cptune's step runs at {100 * eff_c:.0f}% of "
                    f"the matmul peak against PEFT's {100 * eff_p:.0f}% (efficiency ratio {eff_c / eff_p:.2f}; "
                    f"{target:g}x needs {target / (ex_p / ex_c):.2f}). cptune executes "
                    f"{100 * (ex_c / useful - 1):.0f}% more than the useful {useful / 1e9:.0f} GFLOP (queries padded "
                    "within its length buckets; masked attention computed densely).")
            side = prof.get("impls", {})
            if prof.get("shots") == shots and prof.get("batch") == max(batches) and "cptune" in side:
                text += " Achieved rates by kind of work (profile time, this run's FLOP counts): " + "; ".join(
                    _kind_rates(side[impl], c["impls"][impl]) for impl in ("cptune", "peft") if impl in side) + "."
            out.append(text)
        elif goal.startswith("training step, batch 1"):
            c = train_row(results, shots, 1)
            out.append(f"- **{goal}: {value}.** At batch 1 cptune runs PEFT's layout (executed "
                       f"{c['impls']['cptune']['executed_flops'] / 1e9:.0f} vs "
                       f"{c['impls']['peft']['executed_flops'] / 1e9:.0f} GFLOP); spreads "
                       + ", ".join(f"{i} {_spread(c['impls'][i]['times'])} s" for i in TRAIN_IMPLS) + ".")
        elif goal.startswith("peak RSS"):
            out.append(f"- **{goal}: {value}.** See the peak RSS table above: the loaded model is a floor for both.")
        elif goal.startswith("classification") and "queries alone" in goal:
            c = classify_row(results, shots)
            f = classify_flops(c["dims"], c["context_tokens"], c["query_lengths"], c["batch"])
            text = (f"- **{goal}: {value}.** FLOPs alone bound it at {f['cptune'] / f['floor']:.2f}x: the "
                    f"{c['context_tokens']}-token context is encoded once and every query token attends to "
                    f"{c['context_tokens']} more keys. The rest is work that the FLOP count does not see")
            cls = prof.get("classify", {}).get("impls", {})
            if prof.get("shots") == shots and "cptune" in cls and "floor" in cls:
                mine, floor = cls["cptune"], cls["floor"]
                text += (f"; in the scoring profile, copies (`aten::cat`, `aten::copy_`) take "
                         f"{100 * _op_share(mine, 'aten::cat', 'aten::copy_'):.0f}% of cptune's time against "
                         f"{100 * _op_share(floor, 'aten::cat', 'aten::copy_'):.0f}% of the floor's (each batch "
                         "concatenates the expanded context keys/values into a new cache, per layer) and flash "
                         f"attention {100 * _op_share(mine, 'flash_attention'):.0f}% against "
                         f"{100 * _op_share(floor, 'flash_attention'):.0f}%")
            out.append(text + ".")
        elif goal.startswith("classification"):
            c = classify_row(results, shots)
            f = classify_flops(c["dims"], c["context_tokens"], c["query_lengths"], c["batch"])
            out.append(f"- **{goal}: {value}.** The FLOP ratio is {f['peft'] / f['cptune']:.2f}x.")
    return out


def _profile_table(impls: dict) -> list[str]:
    ops = list(dict.fromkeys(o["op"] for x in impls.values() for o in x["ops"]))
    by_op = {impl: {o["op"]: o for o in x["ops"]} for impl, x in impls.items()}
    out = ["| op | " + " | ".join(f"{i} calls | {i} self ms | {i} share" for i in impls) + " |",
           "|---|" + "---|---|---|" * len(impls)]
    for op in ops:
        cells = []
        for impl in impls:
            o = by_op[impl].get(op)
            cells.append(f"{o['calls']} | {o['self_ms']:.0f} | {100 * o['share']:.1f}%" if o else "- | - | -")
        out.append(f"| `{op}` | " + " | ".join(cells) + " |")
    return out


def _walls(impls: dict) -> str:
    return ", ".join(f"{i} {x['wall_s']:.2f} s (other CPU {x['foreign_cores']:.2f})" for i, x in impls.items())


def _render_profile(prof: dict) -> list[str]:
    out = [f"## Profiles ({prof['shots']} shots)", "",
           "`torch.profiler` (CPU), self time per op, each side's most expensive ops.", "",
           f"One training step at batch {prof['batch']}; wall time under the profiler: {_walls(prof['impls'])}.", ""]
    out += _profile_table(prof["impls"])
    if cls := prof.get("classify"):
        out += ["", f"Label scoring of {cls['examples']} test examples, batch 8, with the cached context (cptune) and",
                f"without a context (floor); wall time under the profiler: {_walls(cls['impls'])}.", ""]
        out += _profile_table(cls["impls"])
    return out


def render_report(results: dict) -> str:
    m = results["machine"]
    threads = results["train"][0]["threads"]
    out = [
        "# Performance: cptune vs PEFT's CPT", "",
        "Generated by `benchmarks/bench.py` (the code: `benchmarks/cptbench/`) from one run, measured with:", "",
        f"    {results['command']}", "",
        "Rerun it, rewriting this file and `performance.png`, with `python benchmarks/bench.py`",
        "(`--help` lists the options; `--report-only runs/bench/results.json` re-renders saved results).", "",
        "Model: the embedded SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, vocabulary 49,152), float32.",
        "Data: Rotten Tomatoes snippets (a stand-in for SST-2/MR; seeded splits, seed 0), template",
        "`input: {x} output: {y}`, labels `negative`/`positive`, loss decay 0.95.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GiB RAM; torch {m['torch']} with "
        f"{threads} threads (its default, left as is), transformers {m['transformers']}, peft {m['peft']}, "
        f"Python {m['python']}; cptune {m['cptune']} at `{m['git']}`; {m['date']}; the run took "
        f"{results.get('wall_s', 0) / 60:.0f} min.",
        f"fp32 matmul peak ({PEAK_SIZE}x{PEAK_SIZE} @ {PEAK_SIZE}x{PEAK_SIZE}, best of 7), start and end of the run: "
        + ", ".join(f"{p['best_flops'] / 1e9:.0f}" for p in results["peak"])
        + f" GFLOP/s; the higher, {machine_peak(results) / 1e9:.0f}, is used below.", "",
        "## How it is measured", "",
        "- Training time: for each (shots, batch), one process holds all three implementations and runs one",
        f"  untimed warm-up step each (which also counts FLOPs), then {results['steps']} rounds of one step each,",
        "  in rotating order (A B C, B C A, C A B, ...). `cptune` is the `auto` path (context encoded once per",
        "  batch when batch > 1; PEFT's layout at batch 1); PEFT runs with its default (`use_cache` on) and",
        "  with `use_cache=False`. A step is forward + backward + AdamW on the delta (+ cptune's projection;",
        "  PEFT projects inside its next forward). Queries: the first B of 8 held-out training examples,",
        "  right-padded to the longest in the batch (PEFT's input contract).",
        "- Peak RSS: a fresh process per (implementation, configuration): load, one training step, then",
        "  `getrusage(RUSAGE_SELF).ru_maxrss`, absolute, model included (nothing subtracted).",
        "- The machine is shared, and other processes (test runs) used CPU now and then. Paired rounds are",
        "  the defense: a burst hits all implementations of a round alike. Before each round the benchmark also",
        f"  waits up to {results['quiet_wait']:g} s for other processes to go quiet, and it records the cores",
        "  they kept busy during each timed step (`other CPU`: 0 = quiet, 2 = both cores; from /proc/stat minus",
        "  our own CPU time). Rounds with high `other CPU` are slower for every implementation; read ratios",
        "  rather than absolute seconds there.", "",
        "## Goals (issue 4)", "",
        "Ratios are against the faster (for memory: the smaller) of the two PEFT variants.", "",
        "| goal | measured | verdict |", "|---|---|---|",
    ]
    out += [f"| {g} | {v} | **{verdict}** |" for g, v, verdict in goal_rows(results)]
    out += [""] + _render_training(results) + [""] + _render_flops(results)
    if results["classify"]:
        out += [""] + _render_classify(results)
    out += [""] + _render_agreement(results) + [""] + _render_bounds(results) + [""] + _render_misses(results)
    if prof := results.get("profile"):
        out += [""] + _render_profile(prof)
    out += ["", "![step time vs batch, classification throughput](performance.png)", ""]
    return "\n".join(out)


def write_report(results: dict, out_dir: Path) -> None:
    """Write ``performance.md`` and ``performance.png`` into ``out_dir``."""
    plot_figure(results, out_dir / "performance.png")
    write_text_atomic(out_dir / "performance.md", render_report(results))
