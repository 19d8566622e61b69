"""Numbers for the report: FLOP formulas, look-ups into saved results, speedup ratios, the goals."""

from __future__ import annotations

import statistics

import torch

from cptbench.settings import (
    AGREE_TOLERANCE,
    BATCH1_NOISE,
    BATCH_CONTEXT_TOLERANCE,
    CLASSIFY_IMPLS,
    OLD_BATCH_CONTEXT_MIB,
    PEAK_SHARE_GOAL,
    RSS_BATCHES,
    TRAIN_IMPLS,
)

GOAL_BATCH = 8  # the batch of the speedup and FLOP-rate goals


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


def packed_flops(dims: dict, context_tokens: int, context_labels: int, query_lengths: list[int]) -> float:
    """FLOPs of cptune's packed step: context once, the S query tokens in one row after it.

    As :func:`useful_flops`, but attention is dense over S x (N + S) (the mask hides the other
    queries; the kernel computes them) and the context's last position also gets logits.
    """
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
    n, total = context_tokens, sum(query_lengths)
    logits = context_labels + 1 + len(query_lengths)
    forward = 2 * dims["linear_params"] * (n + total) + 2 * dims["hidden"] * dims["vocab"] * logits
    return 2 * forward + 3 * attn * (n * (n + 1) / 2 + total * (n + total))


def layout_flops(cfg: dict, impl: str) -> float | None:
    """The formula of the layout ``impl`` ran in training configuration ``cfg`` (None: no formula here)."""
    n, b = cfg["context_tokens"], cfg["batch"]
    if impl != "cptune" or b == 1:  # cptune at batch 1 runs PEFT's layout
        return duplicated_flops(cfg["dims"], n, cfg["padded_length"], b)
    if cfg.get("layout", "").startswith("packed"):
        return packed_flops(cfg["dims"], n, cfg["context_labels"], cfg["query_lengths"])
    return None


def classify_flops(dims: dict, context_tokens: int, lengths: list[int], batch: int,
                   packed: bool = False) -> dict[str, float]:
    """Forward FLOPs of classifying queries of ``lengths``, batch by batch, for each implementation.

    cptune: context once (one logit) + each batch's queries after it: right-padded rows attending to
    N + w keys, or with ``packed`` one row of S tokens attending densely to N + S keys; PEFT: every
    row is context + query, logits at every position; floor: the queries alone, laid out as
    cptune's. Matmuls, attention (dense when masked) and the vocabulary projection, as in the
    training formula.
    """
    lin, head = 2 * dims["linear_params"], 2 * dims["hidden"] * dims["vocab"]
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
    n = context_tokens
    total = {"cptune": lin * n + attn * n * (n + 1) / 2 + head, "peft": 0.0, "floor": 0.0}
    for start in range(0, len(lengths), batch):
        chunk = lengths[start:start + batch]
        b, w = len(chunk), max(chunk)
        if packed:
            t = sum(chunk)
            total["floor"] += lin * t + attn * t * t + head * b
            total["cptune"] += lin * t + attn * t * (n + t) + head * b
        else:
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


def useful_share(results: dict, cfg: dict) -> float:
    """cptune's useful FLOPs per second in training configuration ``cfg``, as a share of the matmul peak."""
    useful = useful_flops(cfg["dims"], cfg["context_tokens"], cfg["context_labels"], cfg["query_lengths"])
    return useful / median_time(cfg, "cptune") / machine_peak(results)


def memory_points(results: dict) -> list[dict]:
    """cptune's RSS results at ``RSS_BATCHES`` that hold the memory above the loaded model."""
    rows = [r for r in results["rss"] if r["impl"] == "cptune" and r["batch"] in RSS_BATCHES and "extra_mib" in r]
    return sorted(rows, key=lambda r: (r["shots"], r["batch"]))


def memory_fit(results: dict) -> dict | None:
    """Least squares ``extra_MiB = a + b*N + c*S + e*B*N`` over :func:`memory_points`.

    N: context tokens, S: total query tokens, B: batch. None when the points cannot determine the
    four coefficients (fewer than two context sizes or batches).
    """
    points = memory_points(results)
    x = torch.tensor([[1.0, p["context_tokens"], p["query_tokens"], p["batch"] * p["context_tokens"]]
                      for p in points], dtype=torch.float64).reshape(-1, 4)
    if len(points) < 4 or int(torch.linalg.matrix_rank(x)) < 4:
        return None
    y = torch.tensor([p["extra_mib"] for p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    fitted = (x @ coef).tolist()
    a, b, c, e = coef.tolist()
    dof = len(points) - 4  # standard error of e from the residuals, where there are some to spare
    sigma2 = float(((x @ coef - y) ** 2).sum()) / dof if dof else float("nan")
    e_se = (sigma2 * float(torch.linalg.inv(x.T @ x)[3, 3])) ** 0.5
    largest = max(points, key=lambda p: p["batch"] * p["context_tokens"])
    return {"a": a, "b": b, "c": c, "e": e, "points": points, "fitted": fitted,
            "rms": float(((x @ coef - y) ** 2).mean().sqrt()), "largest": largest, "e_se": e_se,
            "e_term_mib": e * largest["batch"] * largest["context_tokens"],
            "limit": BATCH_CONTEXT_TOLERANCE * OLD_BATCH_CONTEXT_MIB}


def prediction_disagreements(classify: dict) -> int:
    ours, peft = classify["impls"]["cptune"]["predictions"], classify["impls"]["peft"]["predictions"]
    return sum(x != y for x, y in zip(ours, peft, strict=True))


def goal_rows(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows of issue 13; speedups against the faster PEFT variant."""
    rows = []
    shots, _ = grid_axes(results)
    for s, target in ((4, 4.0), (8, 5.5)):
        if (cfg := train_row(results, s, GOAL_BATCH)) is not None:
            x = paired_ratio(cfg, faster_peft(cfg))
            rows.append((f"training step, batch {GOAL_BATCH}, {s} shots: >= {target:g}x PEFT", f"{x:.2f}x",
                         "met" if x >= target else "missed"))
    for s in shots:
        if (cfg := train_row(results, s, 1)) is not None:
            x = paired_ratio(cfg, faster_peft(cfg))
            verdict = "met" if x >= 1 else ("met within noise" if x >= BATCH1_NOISE else "missed")
            rows.append((f"training step, batch 1, {s} shots: no slower than PEFT", f"{x:.2f}x", verdict))
    for s in (4, 8):
        if (cfg := train_row(results, s, GOAL_BATCH)) is not None:
            share = useful_share(results, cfg)
            rows.append((f"useful FLOPs, batch {GOAL_BATCH}, {s} shots: >= {100 * PEAK_SHARE_GOAL:.0f}% of the "
                         "matmul peak", f"{100 * share:.0f}%", "met" if share >= PEAK_SHARE_GOAL else "missed"))
    if (fit := memory_fit(results)) is not None:
        rows.append(("memory above the loaded model: no batch x context term (fitted e <= "
                     f"{fit['limit']:.4f} MiB per context token per row)", f"e = {fit['e']:.4f} ± {fit['e_se']:.4f}",
                     "met" if fit["e"] <= fit["limit"] else "missed"))
    for s in shots:
        if (c := classify_row(results, s)) is not None:
            ours, _, floor = (c["impls"][i]["seconds"] for i in CLASSIFY_IMPLS)
            rows.append((f"classification, {s} shots: within 1.1x of queries alone", f"{ours / floor:.2f}x",
                         "met" if ours / floor <= 1.1 else "missed"))
    for a in sorted(results["agree"], key=lambda a: a["shots"]):
        err = max(a["auto"]["loss_rel_err"], a["auto"]["grad_rel_err"])
        rows.append((f"loss and gradient, batch {a['batch']}, {a['shots']} shots: within {AGREE_TOLERANCE:.0e} of "
                     "PEFT (relative)", f"{err:.1e}", "met" if err <= AGREE_TOLERANCE else "missed"))
        if (c := classify_row(results, a["shots"])) is not None:
            wrong = prediction_disagreements(c)
            rows.append((f"predictions, {a['shots']} shots: identical to PEFT's", f"{wrong} / {c['examples']} differ",
                         "met" if wrong == 0 else "missed"))
    return rows
