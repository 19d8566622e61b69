"""The benchmark's report: ``performance.md`` (markdown tables, goals, reading of the misses) and the plot."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from cptbench.numbers import (
    GOAL_BATCH,
    best_ratio,
    classify_flops,
    classify_row,
    faster_peft,
    goal_rows,
    grid_axes,
    layout_flops,
    machine_peak,
    median_time,
    memory_fit,
    paired_ratio,
    peak_rss,
    prediction_disagreements,
    train_row,
    useful_flops,
)
from cptbench.plot import plot_figure
from cptbench.settings import (
    BATCH_CONTEXT_TOLERANCE,
    CLASSIFY_IMPLS,
    NUM_TRAIN_QUERIES,
    OLD_BATCH_CONTEXT_MIB,
    PEAK_SIZE,
    RSS_BATCHES,
    TRAIN_IMPLS,
)
from cptune.cpt.saving import write_text_atomic


def _layout(results: dict) -> str:
    """The query layout the workers recorded (``layout_report`` of the loaded model), or why there is none."""
    seen = list(dict.fromkeys(r["layout"] for part in ("train", "rss", "classify") for r in results[part]
                              if "layout" in r))
    return "; ".join(seen) if seen else "not recorded (results saved before the benchmark recorded it)"


def _is_packed(results: dict) -> bool:
    return _layout(results).startswith("packed")


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
           "formula (4·b·h·Lq·Lk·hd forward, only the causal triangle when the kernel runs with `is_causal`,",
           "every Lq x Lk pair when it gets a mask; backward 2x forward). With packed queries (cptune at",
           "batches above 1 in the `packed` layout) nothing is padded, but the S = Σ l_i query tokens attend densely",
           "to N + S keys under a mask that hides the other queries: the kernel computes all S·(N + S) pairs",
           "and that is what is counted. *Useful* FLOPs are the least a CPT step needs, the same for every",
           "implementation:", "",
           "    useful = 2·F + 3·A      backward of a frozen model = input gradients only: 1x forward for the",
           "                            matmuls; attention backward = 2x forward (dQ, dK, dV, dP)",
           "    F = 2·P·(N + Σ l_i) + 2·d·V·(M_ctx + B)                 forward matmuls",
           "    A = 4·L·H·hd·[N(N+1)/2 + Σ_i (l_i·N + l_i(l_i+1)/2)]    forward attention, causal pairs", "",
           "P = 106.2 M non-embedding matmul parameters (q, k, v, o, gate, up, down in 30 layers); N context",
           "tokens; l_i the real query lengths; d = 576; V = 49,152 (tied vocabulary projection); M_ctx context",
           "label tokens; B queries, one label token each; L = 30, H·hd = 576. Not counted: norms, rotary",
           "embeddings, softmax, SiLU, the loss, the embedding lookup, AdamW (elementwise; see the profile for",
           "their time). `layout formula` is the same arithmetic for the layout each implementation ran, a",
           "check that the counter sees what runs: PEFT's (and cptune's at batch 1) is B rows of N + T_pad",
           "tokens with logits at every position and dense masked attention (causal at batch 1); cptune's",
           "packed one is the useful formula with attention S·(N + S) in place of the queries' causal pairs",
           "and one more logit (the context's last position); `-` where there is none (padded layout). (The",
           "usual 3x-forward rule for training counts weight gradients, which a frozen model never computes;",
           "it would inflate every rate below by ~1.5x.)", "",
           "| shots | batch | impl | executed GFLOP | layout formula GFLOP | useful GFLOP | executed GFLOP/s | "
           "% of peak | useful % of peak |",
           "|---|---|---|---|---|---|---|---|---|"]
    for c in results["train"]:
        useful = useful_flops(c["dims"], c["context_tokens"], c["context_labels"], c["query_lengths"])
        for impl in TRAIN_IMPLS:
            t, executed = median_time(c, impl), c["impls"][impl]["executed_flops"]
            formula = layout_flops(c, impl)
            out.append(f"| {c['shots']} | {c['batch']} | {impl} | {executed / 1e9:.0f} | "
                       + (f"{formula / 1e9:.0f}" if formula is not None else "-") + f" | {useful / 1e9:.0f} | "
                       f"{executed / t / 1e9:.0f} | {100 * executed / t / peak:.0f}% | "
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
    packed = _is_packed(results)
    layout = ("cptune and floor: each batch's queries packed into one row, dense masked attention over S x (N + S)"
              if packed else "right padding to the longest query of each batch, dense masked attention")
    out += ["", "Classification, forward FLOPs over the whole test set by the formula above (PEFT: right padding",
            f"to the longest query of each batch, dense masked attention; {layout}):", "",
            "| shots | cptune GFLOP | PEFT GFLOP | floor GFLOP | PEFT / cptune FLOPs | measured speedup | "
            "cptune / floor FLOPs | measured cptune / floor time |", "|---|---|---|---|---|---|---|---|"]
    for c in sorted(results["classify"], key=lambda c: c["shots"]):
        if "query_lengths" not in c:
            continue
        f = classify_flops(c["dims"], c["context_tokens"], c["query_lengths"], c["batch"], packed)
        t = {i: c["impls"][i]["seconds"] for i in CLASSIFY_IMPLS}
        out.append(f"| {c['shots']} | {f['cptune'] / 1e9:.0f} | {f['peft'] / 1e9:.0f} | {f['floor'] / 1e9:.0f} | "
                   f"{f['peft'] / f['cptune']:.2f} | {t['peft'] / t['cptune']:.2f}x | {f['cptune'] / f['floor']:.2f} | "
                   f"{t['cptune'] / t['floor']:.2f}x |")
    big = max(batches)
    out += ["", f"Peak RSS at batch {big}, each implementation in its own process: the loaded model (RSS just before",
            "the step, every weight page resident) and the step's peak above it (see the memory section).", "",
            "| shots | impl | loaded model GB | peak GB | peak - loaded GB |", "|---|---|---|---|---|"]
    for s in shots:
        for impl in TRAIN_IMPLS:
            r = next((r for r in results["rss"] if (r["impl"], r["shots"], r["batch"]) == (impl, s, big)), None)
            if r:
                loaded = r["loaded_mib"] / 1024 if "loaded_mib" in r else r["rss_setup_gb"]
                peak = r["step_peak_mib"] / 1024 if "step_peak_mib" in r else r["peak_rss_gb"]
                out.append(f"| {s} | {impl} | {loaded:.2f} | {peak:.2f} | {peak - loaded:.2f} |")
    return out


def _render_memory(results: dict) -> list[str]:
    """cptune's peak memory above the loaded model and the least-squares fit of its terms."""
    limit = BATCH_CONTEXT_TOLERANCE * OLD_BATCH_CONTEXT_MIB
    out = ["## Memory above the loaded model (cptune)", "",
           f"One fresh process per point (batch {', '.join(map(str, RSS_BATCHES))}; batch 32 is measured for memory "
           "only): load, build the",
           "wrapper and AdamW, touch every weight page, read the RSS (`VmRSS`: the loaded model), restart the",
           "peak mark (`/proc/self/clear_refs`), run one training step, read the peak (`VmHWM`). Extra = peak -",
           "loaded. Fitted by least squares over these points:", "",
           "    extra_MiB = a + b·N + c·S + e·B·N      N context tokens, S total query tokens, B batch", "",
           "`e` is the batch x context term (the padded layout's copies of the context's keys and values per",
           f"row cost about {OLD_BATCH_CONTEXT_MIB} MiB per context token per row). The goal counts it absent when "
           f"e <= {limit:.4f} MiB",
           f"({100 * BATCH_CONTEXT_TOLERANCE:.0f}% of that; one-sided: a negative e is no growth with batch x "
           "context). The text below gives",
           "e's standard error from the fit's residuals (the RSS noise) and e·B·N at the largest point against",
           "that point's extra.",
           "At batch 1 cptune runs PEFT's layout (one row, context + query, logits at every position), the",
           "other points the shared-context engine.", ""]
    fit = memory_fit(results)
    points = fit["points"] if fit else [r for r in results["rss"] if r["impl"] == "cptune" and "extra_mib" in r]
    if not points:
        return out + ["Not measured in this run (results saved before the benchmark measured it)."]
    fitted = fit["fitted"] if fit else [float("nan")] * len(points)
    out += ["| shots | N | batch | S | loaded MiB | peak MiB | extra MiB | fit MiB | residual MiB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p, f in zip(points, fitted, strict=True):
        out.append(f"| {p['shots']} | {p['context_tokens']} | {p['batch']} | {p['query_tokens']} | "
                   f"{p['loaded_mib']:.0f} | {p['step_peak_mib']:.0f} | {p['extra_mib']:.0f} | {f:.0f} | "
                   f"{p['extra_mib'] - f:+.0f} |")
    if fit is None:
        return out + ["", "The fit needs two context sizes and two batches; this run has too few points."]
    big = fit["largest"]
    out += ["", f"a = {fit['a']:.0f} MiB, b = {fit['b']:.3f} MiB per context token, c = {fit['c']:.3f} MiB per query "
            f"token, e = {fit['e']:.4f} ± {fit['e_se']:.4f} (standard error) MiB per context token per row; "
            f"RMS residual {fit['rms']:.0f} MiB over "
            f"{len(points)} points. e·B·N at B = {big['batch']}, N = {big['context_tokens']}: "
            f"{fit['e_term_mib']:+.0f} MiB, against that point's extra {big['extra_mib']:.0f} MiB "
            f"(the old layout's term there: {OLD_BATCH_CONTEXT_MIB * big['batch'] * big['context_tokens']:.0f} MiB)."]
    return out


def _render_agreement(results: dict) -> list[str]:
    out = ["## Agreement with PEFT", "",
           "Training: the same queries (the batch column) and the same fixed nonzero delta, float32, real model;",
           "`auto` is the path",
           "timed above, `never` (PEFT's layout run by cptune) is a control for float32 summation-order noise.",
           "Classification: cptune's cached scores vs PEFT's on every test example.", "",
           "| shots | batch | PEFT loss | auto: loss rel. err | auto: grad rel. err | never: loss rel. err | "
           "never: grad rel. err | prediction disagreements | max abs score diff | score_texts vs batches |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for a in results["agree"]:
        dis = diff = same = "n/a"
        if (c := classify_row(results, a["shots"])) is not None:
            ours, peft = c["impls"]["cptune"], c["impls"]["peft"]
            dis = f"{prediction_disagreements(c)} / {c['examples']}"
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


def _goal_shots(goal: str) -> int:
    return int(goal.split(" shots")[0].split()[-1])


def _miss_training(results: dict, goal: str, value: str) -> str:
    c = train_row(results, _goal_shots(goal), GOAL_BATCH)
    p, peak, prof = faster_peft(c), machine_peak(results), results.get("profile") or {}
    ex_c, ex_p = c["impls"]["cptune"]["executed_flops"], c["impls"][p]["executed_flops"]
    eff_c, eff_p = ex_c / median_time(c, "cptune") / peak, ex_p / median_time(c, p) / peak
    useful = useful_flops(c["dims"], c["context_tokens"], c["context_labels"], c["query_lengths"])
    extra = ("no padding; the packed queries' attention computed densely over S x (N + S)" if
             c.get("layout", "").startswith("packed") else "queries padded within their length buckets; masked "
             "attention computed densely")
    text = f"- **{goal}: {value}.** "
    if goal.startswith("training step"):
        target = float(goal.split(">= ")[1].split("x")[0])
        text += (f"The layout cuts the executed FLOPs {ex_p / ex_c:.2f}x ({ex_p / 1e9:.0f} -> {ex_c / 1e9:.0f} "
                 f"GFLOP), and cptune's step runs at {100 * eff_c:.0f}% of the matmul peak against PEFT's "
                 f"{100 * eff_p:.0f}% (efficiency ratio {eff_c / eff_p:.2f}; {target:g}x needs "
                 f"{target / (ex_p / ex_c):.2f} at this FLOP ratio). ")
    else:
        text += (f"The step runs its executed {ex_c / 1e9:.0f} GFLOP at {100 * eff_c:.0f}% of the peak; the useful "
                 f"share is that times useful / executed = {useful / ex_c:.2f}. ")
    text += f"cptune executes {100 * (ex_c / useful - 1):.0f}% more than the useful {useful / 1e9:.0f} GFLOP ({extra})."
    side = prof.get("impls", {})
    if prof.get("shots") == c["shots"] and prof.get("batch") == GOAL_BATCH and "cptune" in side:
        text += " Achieved rates by kind of work (profile time, this run's FLOP counts): " + "; ".join(
            _kind_rates(side[impl], c["impls"][impl]) for impl in ("cptune", "peft") if impl in side) + "."
    return text


def _miss_memory(results: dict, goal: str, value: str) -> str:
    fit = memory_fit(results)
    big = fit["largest"]
    return (f"- **{goal}: {value}.** At B = {big['batch']}, N = {big['context_tokens']} the fitted term is "
            f"{fit['e_term_mib']:+.0f} MiB of that point's {big['extra_mib']:.0f} MiB (RMS residual of the fit "
            f"{fit['rms']:.0f} MiB; see the memory section for every point). At batch 1 cptune runs PEFT's layout, "
            "whose context cost per token differs from the engine's; a fit term of either sign absorbs that "
            "difference as well as any real batch x context memory.")


def _miss_classify(results: dict, goal: str, value: str) -> str:
    shots, prof = _goal_shots(goal), results.get("profile") or {}
    c = classify_row(results, shots)
    f = classify_flops(c["dims"], c["context_tokens"], c["query_lengths"], c["batch"], _is_packed(results))
    text = (f"- **{goal}: {value}.** FLOPs alone bound it at {f['cptune'] / f['floor']:.2f}x: the "
            f"{c['context_tokens']}-token context is encoded once and every query token attends to "
            f"{c['context_tokens']} more keys. The rest is work that the FLOP count does not see")
    cls = prof.get("classify", {}).get("impls", {})
    if prof.get("shots") == shots and "cptune" in cls and "floor" in cls:
        mine, floor = cls["cptune"], cls["floor"]
        text += (f"; in the scoring profile, copies (`aten::cat`, `aten::copy_`) take "
                 f"{100 * _op_share(mine, 'aten::cat', 'aten::copy_'):.0f}% of cptune's time against "
                 f"{100 * _op_share(floor, 'aten::cat', 'aten::copy_'):.0f}% of the floor's (each batch appends its "
                 "keys/values to a copy of the context's cache, per layer) and flash attention "
                 f"{100 * _op_share(mine, 'flash_attention'):.0f}% against "
                 f"{100 * _op_share(floor, 'flash_attention'):.0f}%")
    return text + "."


def _miss_agreement(results: dict, goal: str, value: str) -> str:
    shots = _goal_shots(goal)
    if goal.startswith("predictions"):
        c = classify_row(results, shots)
        ours, peft = c["impls"]["cptune"], c["impls"]["peft"]
        margins = [abs(row[0] - row[1]) for row, x, y in zip(peft["scores"], ours["predictions"], peft["predictions"],
                                                               strict=True) if x != y]
        return (f"- **{goal}: {value}.** PEFT's own score margin between the two labels on those examples: at most "
                f"{max(margins):.1e} (ties within float32 summation noise flip either way).")
    a = next(a for a in results["agree"] if a["shots"] == shots)
    return (f"- **{goal}: {value}.** `auto` loss rel. err {a['auto']['loss_rel_err']:.1e}, gradient "
            f"{a['auto']['grad_rel_err']:.1e}; the `never` control (PEFT's layout run by cptune) gives "
            f"{a['never']['loss_rel_err']:.1e} and {a['never']['grad_rel_err']:.1e}.")


def _render_misses(results: dict) -> list[str]:
    """For every missed goal: what bounds it, from this run's FLOP counts, timings, profiles and fits."""
    missed = [(g, v) for g, v, verdict in goal_rows(results) if verdict == "missed"]
    out = ["## Reading the misses", ""]
    if not missed:
        return out + ["None: every goal was met in this run."]
    for goal, value in missed:
        if goal.startswith(("training step, batch", "useful FLOPs")) and "batch 1," not in goal:
            out.append(_miss_training(results, goal, value))
        elif goal.startswith("training step, batch 1"):
            c = train_row(results, _goal_shots(goal), 1)
            out.append(f"- **{goal}: {value}.** At batch 1 cptune runs PEFT's layout (executed "
                       f"{c['impls']['cptune']['executed_flops'] / 1e9:.0f} vs "
                       f"{c['impls']['peft']['executed_flops'] / 1e9:.0f} GFLOP); spreads "
                       + ", ".join(f"{i} {_spread(c['impls'][i]['times'])} s" for i in TRAIN_IMPLS) + ".")
        elif goal.startswith("memory"):
            out.append(_miss_memory(results, goal, value))
        elif goal.startswith("classification"):
            out.append(_miss_classify(results, goal, value))
        else:
            out.append(_miss_agreement(results, goal, value))
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
        + f" GFLOP/s; the higher, {machine_peak(results) / 1e9:.0f}, is used below.",
        f"cptune's query layout (`cptune.cpt.engine.layout_report` of the loaded model): {_layout(results)}.", "",
        "## How it is measured", "",
        "- Training time: for each (shots, batch), one process holds all three implementations and runs one",
        f"  untimed warm-up step each (which also counts FLOPs), then {results['steps']} rounds of one step each,",
        "  in rotating order (A B C, B C A, C A B, ...). `cptune` is the `auto` path (context encoded once per",
        "  batch when batch > 1; PEFT's layout at batch 1); PEFT runs with its default (`use_cache` on) and",
        "  with `use_cache=False`. A step is forward + backward + AdamW on the delta (+ cptune's projection;",
        "  PEFT projects inside its next forward). Queries: the first B of "
        f"{NUM_TRAIN_QUERIES} held-out training examples",
        "  (the first 8 as in earlier reports), right-padded to the longest in the batch (PEFT's input",
        "  contract); cptune runs them after the context in the layout named above.",
        "- Peak RSS: a fresh process per (implementation, configuration): load, one training step, then",
        "  `getrusage(RUSAGE_SELF).ru_maxrss`, absolute, model included; cptune's memory above the loaded",
        "  model is measured in the same processes (the memory section says how).",
        "- The machine is shared, and other processes (test runs) used CPU now and then. Paired rounds are",
        "  the defense: a burst hits all implementations of a round alike. Before each round the benchmark also",
        f"  waits up to {results['quiet_wait']:g} s for other processes to go quiet, and it records the cores",
        "  they kept busy during each timed step (`other CPU`: 0 = quiet, 2 = both cores; from /proc/stat minus",
        "  our own CPU time). Rounds with high `other CPU` are slower for every implementation; read ratios",
        "  rather than absolute seconds there.", "",
        "## Goals (issue 13)", "",
        "Speedups are against the faster of the two PEFT variants; the memory, FLOP-rate and agreement",
        "goals are explained in their sections below.", "",
        "| goal | measured | verdict |", "|---|---|---|",
    ]
    out += [f"| {g} | {v} | **{verdict}** |" for g, v, verdict in goal_rows(results)]
    out += [""] + _render_training(results) + [""] + _render_flops(results)
    if results["classify"]:
        out += [""] + _render_classify(results)
    out += [""] + _render_agreement(results) + [""] + _render_memory(results) + [""] + _render_bounds(results)
    out += [""] + _render_misses(results)
    if prof := results.get("profile"):
        out += [""] + _render_profile(prof)
    out += ["", "![step time vs batch, classification throughput](performance.png)", ""]
    return "\n".join(out)


def write_report(results: dict, out_dir: Path) -> None:
    """Write ``performance.md`` and ``performance.png`` into ``out_dir``."""
    plot_figure(results, out_dir / "performance.png")
    write_text_atomic(out_dir / "performance.md", render_report(results))
