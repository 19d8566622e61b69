"""Numbers for the report: FLOP formulas, look-ups into saved results, speedup ratios, the goals."""

from __future__ import annotations

import statistics

from cptbench.settings import BATCH1_NOISE, CLASSIFY_IMPLS, TRAIN_IMPLS


def useful_flops(dims: dict, context_tokens: int, context_labels: int, query_lengths: list[int]) -> float:
    """FLOPs a CPT training step needs at least (the formula is written out in the report).

    Context once (causal attention), queries unpadded attending to context + themselves, vocabulary
    projection only where a loss is taken; backward = input gradients only (weights frozen).
    """
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]  # per (query, key) pair, forward
    n = context_tokens
    pairs = n * (n + 1) / 2 + sum(q * n + q * (q + 1) / 2 for q in query_lengths)
    logits = context_labels + len(query_lengths)  # one label token per query
    forward = 2 * dims["linear_params"] * (n + sum(query_lengths)) + 2 * dims["hidden"] * dims["vocab"] * logits
    return 2 * forward + 3 * attn * pairs


def duplicated_flops(dims: dict, context_tokens: int, padded_length: int, batch: int) -> float:
    """FLOPs of PEFT's layout: every row is context + padded query, logits everywhere, dense masked attention."""
    width = context_tokens + padded_length
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
    forward = (2 * dims["linear_params"] + 2 * dims["hidden"] * dims["vocab"]) * batch * width
    pairs = batch * width * width if batch > 1 else width * (width + 1) / 2  # batch 1: no mask, causal kernel
    return 2 * forward + 3 * attn * pairs


def classify_flops(dims: dict, context_tokens: int, lengths: list[int], batch: int) -> dict[str, float]:
    """Forward FLOPs of classifying queries of ``lengths``, batch by batch (right-padded), for each implementation.

    cptune: context once (one logit) + queries attending to N + w keys; PEFT: every row is context +
    query, logits at every position; floor: queries alone. Matmuls, attention (dense when masked)
    and the vocabulary projection, as in the training formula.
    """
    lin, head = 2 * dims["linear_params"], 2 * dims["hidden"] * dims["vocab"]
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
    n = context_tokens
    total = {"cptune": lin * n + attn * n * (n + 1) / 2 + head, "peft": 0.0, "floor": 0.0}
    for start in range(0, len(lengths), batch):
        chunk = lengths[start:start + batch]
        b, w = len(chunk), max(chunk)
        total["floor"] += lin * b * w + attn * b * w * w + head * b
        total["cptune"] += lin * b * w + attn * b * w * (n + w) + head * b
        total["peft"] += (lin + head) * b * (n + w) + attn * b * (n + w) ** 2
    return total


def train_row(results: dict, shots: int, batch: int) -> dict | None:
    return next((r for r in results["train"] if (r["shots"], r["batch"]) == (shots, batch)), None)


def peak_rss(results: dict, impl: str, shots: int, batch: int) -> float:
    rows = [r["peak_rss_gb"] for r in results["rss"] if (r["impl"], r["shots"], r["batch"]) == (impl, shots, batch)]
    return rows[0] if rows else float("nan")


def median_time(cfg: dict, impl: str) -> float:
    return statistics.median(cfg["impls"][impl]["times"])


def paired_ratio(cfg: dict, slow: str, fast: str = "cptune") -> float:
    """Median over rounds of t(slow) / t(fast): each round ran the implementations back to back."""
    a, b = cfg["impls"][slow]["times"], cfg["impls"][fast]["times"]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def best_ratio(cfg: dict, slow: str, fast: str = "cptune") -> float:
    """min t(slow) / min t(fast): the ratio of the fastest rounds."""
    return min(cfg["impls"][slow]["times"]) / min(cfg["impls"][fast]["times"])


def faster_peft(cfg: dict) -> str:
    return min(TRAIN_IMPLS[1:], key=lambda impl: median_time(cfg, impl))


def classify_row(results: dict, shots: int) -> dict | None:
    return next((r for r in results["classify"] if r["shots"] == shots), None)


def machine_peak(results: dict) -> float:
    return max(p["best_flops"] for p in results["peak"])


def grid_axes(results: dict) -> tuple[list[int], list[int]]:
    return sorted({r["shots"] for r in results["train"]}), sorted({r["batch"] for r in results["train"]})


def goal_rows(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows against the faster (for memory: smaller) PEFT variant."""
    rows = []
    shots, batches = grid_axes(results)
    big = max(batches)
    for s, target in ((4, 3.0), (8, 5.0)):
        if (cfg := train_row(results, s, big)) is not None:
            x = paired_ratio(cfg, faster_peft(cfg))
            rows.append((f"training step, batch {big}, {s} shots: >= {target:g}x PEFT", f"{x:.2f}x",
                         "met" if x >= target else "missed"))
    for s in shots:
        if (cfg := train_row(results, s, 1)) is not None:
            x = paired_ratio(cfg, faster_peft(cfg))
            verdict = "met" if x >= 1 else ("met within noise" if x >= BATCH1_NOISE else "missed")
            rows.append((f"training step, batch 1, {s} shots: no slower than PEFT", f"{x:.2f}x", verdict))
    for s in shots:
        frac = peak_rss(results, "cptune", s, big) / min(peak_rss(results, i, s, big) for i in TRAIN_IMPLS[1:])
        if frac != frac:  # NaN: not measured (a partial run)
            continue
        rows.append((f"peak RSS, batch {big}, {s} shots: <= 0.5 x PEFT", f"{frac:.2f} x",
                     "met" if frac <= 0.5 else "missed"))
    for s, target in ((4, 4.0), (8, 6.0)):
        if (c := classify_row(results, s)) is not None:
            ours, peft, floor = (c["impls"][i]["seconds"] for i in CLASSIFY_IMPLS)
            rows.append((f"classification, {s} shots: >= {target:g}x PEFT", f"{peft / ours:.2f}x",
                         "met" if peft / ours >= target else "missed"))
            rows.append((f"classification, {s} shots: within 1.2x of queries alone", f"{ours / floor:.2f}x",
                         "met" if ours / floor <= 1.2 else "missed"))
    return rows
