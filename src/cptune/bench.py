"""Benchmark: cptune's context-once CPT against PEFT 0.21.2's duplicated context, on the embedded SmolLM2.

One run measures, side by side: training step time (forward + backward + AdamW) and peak RSS at
several batch sizes and context lengths; test-set classification throughput; executed and useful
FLOPs per step against the machine's measured fp32 matmul peak; loss, gradient and prediction
agreement. It writes ``docs/performance.md`` and ``docs/performance.png``.

Every measurement runs in a fresh subprocess (``--worker``) that prints one JSON line, so each peak
RSS belongs to one (implementation, configuration). The driver alternates implementations per
configuration (A B C, then B C A, ...) so drifts in machine load hit all of them, and records the
CPU time other processes used during each timed window. PEFT is needed (``pip install 'cptune[test]'``).

    python benchmarks/bench.py            # full run (~20 min on 2 cores)
    python benchmarks/bench.py --quick    # smoke run, writes to runs/bench-quick/
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

TEMPLATE_TEXT = "input: {x} output: {y}"
LABEL_WORDS = {"negative": "negative", "positive": "positive"}
CPT_FIELDS = dict(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95, opt_projection_epsilon=0.2,
                  opt_projection_format_epsilon=0.1)
SEED = 0
TEST_SIZE = 200
NUM_TRAIN_QUERIES = 8  # real Rotten Tomatoes examples used as training queries (the largest batch)
LR = 1e-3
TRAIN_IMPLS = ("cptune", "peft", "peft-nocache")
CLASSIFY_IMPLS = ("cptune", "peft", "floor")
GIB = 1024**3
PEAK_SIZE = 2048  # fp32 matmul peak: (PEAK_SIZE x PEAK_SIZE) @ (PEAK_SIZE x PEAK_SIZE)
BATCH1_NOISE = 0.95  # batch-1 ratio at or above this counts as "no slower" within run-to-run noise


# ---------------------------------------------------------------------------------------------
# worker side: one measurement, one fresh process, one JSON line on stdout
# ---------------------------------------------------------------------------------------------


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB on Linux


class _ForeignCPU:
    """CPU seconds used by other processes during a window: /proc/stat busy time minus our own."""

    def __enter__(self):
        self._t, self._busy, self._own = time.perf_counter(), self._machine_busy(), self._own_cpu()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t
        foreign = (self._machine_busy() - self._busy) - (self._own_cpu() - self._own)
        self.cores = max(foreign, 0.0) / max(wall, 1e-9)  # average busy cores of other processes
        return False

    @staticmethod
    def _machine_busy() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime


def _causal_pairs(lq: int, lk: int) -> int:
    # torch's is_causal mask is top-left aligned: query i sees keys 0..i.
    return sum(min(i + 1, lk) for i in range(lq))


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    """QK^T and PV of CPU flash attention (FlopCounterMode has no formula for the CPU kernel)."""
    b, h, lq, hd = query_shape
    lk = key_shape[2]
    pairs = _causal_pairs(lq, lk) if is_causal else lq * lk
    return 4 * b * h * pairs * hd


def _sdpa_cpu_backward_flops(grad_shape, query_shape, key_shape, value_shape, out_shape_, lse_shape,
                             dropout_p=0.0, is_causal=False, *args, **kwargs) -> int:
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape, dropout_p, is_causal)  # dQ, dK, dV, dP


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
    })


def _model_dims(base) -> dict:
    cfg = base.config.get_text_config()
    layers = base.get_decoder().layers
    linear = sum(p.numel() for layer in layers for p in layer.parameters() if p.ndim == 2)
    heads = cfg.num_attention_heads
    return {"layers": len(layers), "hidden": cfg.hidden_size, "vocab": base.get_input_embeddings().weight.shape[0],
            "heads": heads, "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "linear_params": linear}


def _setup(shots: int):
    from cptune import Template, build_context
    from cptune.data import load_dataset, sample_splits
    from cptune.pretrained import load_model

    base, tok = load_model()
    demos, extra, test = sample_splits(load_dataset("rotten_tomatoes"), shots=shots, test_size=TEST_SIZE,
                                       seed=SEED, extra_train=NUM_TRAIN_QUERIES)
    template = Template(TEMPLATE_TEXT)
    return base, tok, template, build_context(demos, template, tok, LABEL_WORDS), extra, test


def _probe_delta(context, hidden: int) -> torch.Tensor:
    """A fixed nonzero delta inside every projection ball (half the smallest radius), zero on frozen rows."""
    from cptune.roles import is_trainable

    gen = torch.Generator().manual_seed(SEED)
    delta = torch.randn(len(context), hidden, generator=gen)
    radius = 0.5 * min(CPT_FIELDS["opt_projection_epsilon"], CPT_FIELDS["opt_projection_format_epsilon"])
    delta = delta / delta.norm(dim=1, keepdim=True) * radius * (hidden / 2048) ** 0.5
    return delta * is_trainable(context.roles).unsqueeze(1)


def _cptune_model(base, context):
    from cptune import get_cpt_model

    return get_cpt_model(base, context.to_config(**CPT_FIELDS))


def _peft_model(base, context):
    warnings.filterwarnings("ignore")
    import peft

    cfg = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=context.token_ids.tolist(), cpt_mask=[1] * len(context),
                         cpt_tokens_type_mask=context.type_codes.tolist(), **CPT_FIELDS)
    return peft.get_peft_model(base, cfg)


def _peft_delta(model) -> torch.nn.Parameter:
    return model.prompt_encoder["default"].delta_embedding.weight


def _step_fn(impl: str, base, context, queries):
    """Build the implementation and return ``step() -> (loss, t_forward, t_backward, t_optimizer)``."""
    if impl == "cptune":
        model = _cptune_model(base, context)
        params = [model.prompt_encoder.delta]
    else:
        model = _peft_model(base, context)
        params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    base.eval()  # as cptune.train does; SmolLM2 has no dropout, so PEFT's train mode changes nothing
    optimizer = torch.optim.AdamW(params, lr=LR)
    extra = {"use_cache": False} if impl == "peft-nocache" else {}

    def step():
        t0 = time.perf_counter()
        if impl == "cptune":
            loss = model(**queries, return_logits=False).loss
        else:  # PEFT shifts input_type_mask in place: a fresh copy every call
            loss = model(**{k: v.clone() for k, v in queries.items()}, **extra).loss
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        if impl == "cptune":
            model.project_()  # PEFT projects inside its next forward
        t3 = time.perf_counter()
        return float(loss), t1 - t0, t2 - t1, t3 - t2

    return step


def worker_train(impl: str, shots: int, batch: int, steps: int) -> dict:
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    step = _step_fn(impl, base, context, queries)
    rss_setup = _peak_rss_gb()
    counter = _flop_counter()
    with counter:  # the warm-up step, untimed, counts the executed FLOPs
        step()
    times, phases, losses = [], [], []
    with _ForeignCPU() as foreign:
        for _ in range(steps):
            loss, tf, tb, to = step()
            times.append(tf + tb + to)
            phases.append((tf, tb, to))
            losses.append(loss)
    return {"impl": impl, "shots": shots, "batch": batch, "context_tokens": len(context),
            "query_lengths": queries["attention_mask"].sum(1).tolist(), "padded_length": queries["input_ids"].shape[1],
            "label_tokens_context": _context_label_count(context),
            "times": times, "median_s": statistics.median(times),
            "forward_s": statistics.median(p[0] for p in phases), "backward_s": statistics.median(p[1] for p in phases),
            "optimizer_s": statistics.median(p[2] for p in phases), "losses": losses,
            "executed_flops": counter.get_total_flops(), "rss_setup_gb": rss_setup, "peak_rss_gb": _peak_rss_gb(),
            "foreign_cores": foreign.cores, "threads": torch.get_num_threads(), "dims": _model_dims(base)}


def _context_label_count(context) -> int:
    from cptune.roles import TokenRole

    return int((context.roles == TokenRole.LABEL).sum())


@torch.no_grad()
def _peft_scores(model, tok, template, texts, num_context: int, batch: int) -> torch.Tensor:
    """PEFT's forward (context re-encoded for every row), first label token's log-prob at the answer position."""
    from cptune.evaluate import query_token_ids
    from cptune.template import label_token_ids

    first = [ids[0] for ids in label_token_ids(template, tok, LABEL_WORDS).values()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows_all = query_token_ids(texts, template, tok)
    out = []
    for start in range(0, len(rows_all), batch):
        rows = rows_all[start:start + batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits  # (b, N + T, V): right padding
        last = torch.tensor([num_context + len(r) - 1 for r in rows])
        out.append(torch.log_softmax(logits[torch.arange(len(rows)), last].float(), dim=-1)[:, first])
    return torch.cat(out)


def worker_classify(impl: str, shots: int, batch: int, test_size: int) -> dict:
    from cptune.evaluate import score_texts

    base, tok, template, context, _, test = _setup(shots)
    texts = [ex.text for ex in test[:test_size]]
    delta = _probe_delta(context, base.get_input_embeddings().weight.shape[1])
    if impl == "peft":
        model = _peft_model(base, context)
        model.eval()
        with torch.no_grad():
            _peft_delta(model).copy_(delta)

        def score(xs):
            return _peft_scores(model, tok, template, xs, len(context), batch)
    else:
        model = _cptune_model(base, context)
        with torch.no_grad():
            model.prompt_encoder.delta.copy_(delta)

        def score(xs):
            with torch.no_grad():
                embeds = model.context_embeddings() if impl == "cptune" else None
            return score_texts(base, tok, template, LABEL_WORDS, xs, context_embeds=embeds, batch_size=batch)
    score(texts[:batch])  # warm-up
    with _ForeignCPU() as foreign:
        t0 = time.perf_counter()
        scores = score(texts)
        seconds = time.perf_counter() - t0
    return {"impl": impl, "shots": shots, "batch": batch, "context_tokens": len(context), "examples": len(texts),
            "seconds": seconds, "examples_per_s": len(texts) / seconds, "predictions": scores.argmax(1).tolist(),
            "scores": [[round(float(v), 6) for v in row] for row in scores], "peak_rss_gb": _peak_rss_gb(),
            "foreign_cores": foreign.cores, "threads": torch.get_num_threads()}


def worker_agree(shots: int, batch: int) -> dict:
    """cptune (auto path, and the plain path as a control) vs PEFT: loss and delta gradient, float32."""
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    delta = _probe_delta(context, base.get_input_embeddings().weight.shape[1])
    theirs = _peft_model(copy.deepcopy(base), context)
    with torch.no_grad():
        _peft_delta(theirs).copy_(delta)
    loss_t = theirs(**{k: v.clone() for k, v in queries.items()}).loss
    loss_t.backward()
    grad_t = _peft_delta(theirs).grad.clone()
    ours = _cptune_model(base, context)
    result = {"shots": shots, "batch": batch, "dtype": "float32", "peft_loss": float(loss_t)}
    for mode in ("auto", "never"):
        ours.prefix_sharing = mode
        with torch.no_grad():
            ours.prompt_encoder.delta.copy_(delta)
        ours.prompt_encoder.delta.grad = None
        loss_o = ours(**queries, return_logits=False).loss
        loss_o.backward()
        grad_o = ours.prompt_encoder.delta.grad
        result[mode] = {"loss": float(loss_o), "loss_rel_err": abs(float(loss_o) - float(loss_t)) / abs(float(loss_t)),
                        "grad_rel_err": float((grad_o - grad_t).norm() / grad_t.norm())}
    return result


def worker_profile(shots: int, batch: int, top: int = 14) -> dict:
    """torch.profiler table of one cptune training step (after a warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    step = _step_fn("cptune", base, context, render_queries(extra[:batch], template, tok, LABEL_WORDS))
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        wall = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]
    return {"shots": shots, "batch": batch, "wall_s": wall, "ops": rows}


def worker_peak(size: int = PEAK_SIZE, repeats: int = 7, inner: int = 5) -> dict:
    """Best-of-``repeats`` fp32 matmul rate, ``inner`` products per timing."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    c = torch.empty(size, size)
    torch.mm(a, b, out=c)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        rates.append(inner * 2 * size**3 / (time.perf_counter() - t0))
    return {"size": size, "best_flops": max(rates), "median_flops": statistics.median(rates),
            "threads": torch.get_num_threads()}


def run_worker(args) -> int:
    warnings.filterwarnings("ignore")
    shots, batch = (args.shots or [4])[0], (args.batches or [8])[0]
    if args.worker == "train":
        result = worker_train(args.impl, shots, batch, args.steps)
    elif args.worker == "classify":
        result = worker_classify(args.impl, shots, batch, args.test_size)
    elif args.worker == "agree":
        result = worker_agree(shots, batch)
    elif args.worker == "profile":
        result = worker_profile(shots, batch)
    else:
        result = worker_peak()
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# driver side: spawn workers in alternation, keep every result, write the report
# ---------------------------------------------------------------------------------------------


def _spawn(log, *worker_args: str) -> dict:
    cmd = [sys.executable, "-m", "cptune.bench", "--worker", *worker_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(worker_args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    log(f"  {' '.join(worker_args):<55} {time.perf_counter() - t0:6.1f} s")
    return result


def _machine() -> dict:
    import peft
    import transformers

    import cptune

    cpu = "unknown"
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) * 1024 / GIB
    except (OSError, StopIteration):
        mem = float("nan")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(cptune.__file__).parent, timeout=10).stdout.strip() or "n/a"
    except OSError:
        commit = "n/a"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "cptune": cptune.__version__, "git": commit, "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _rotate(items: tuple, k: int) -> tuple:
    k %= len(items)
    return items[k:] + items[:k]


def run_benchmark(steps: int, shots: list[int], batches: list[int], test_size: int, json_path: Path, log) -> dict:
    """Run every worker; results are saved to ``json_path`` after each one."""
    results = {"machine": _machine(), "steps": steps, "command": "", "peak": [], "train": [], "classify": [],
               "agree": [], "profile": None}

    def save():
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))

    log("matmul peak")
    results["peak"].append(_spawn(log, "peak"))
    log(f"training steps: warm-up + {steps} timed, implementations alternated per configuration")
    configs = [(s, b) for s in shots for b in batches]
    for i, (s, b) in enumerate(configs):
        for impl in _rotate(TRAIN_IMPLS, i):
            results["train"].append(_spawn(log, "train", "--impl", impl, "--shots", str(s), "--batches", str(b),
                                           "--steps", str(steps)))
            save()
    log(f"classification: {test_size} test examples, batch 8")
    for i, s in enumerate(shots):
        for impl in _rotate(CLASSIFY_IMPLS, i):
            results["classify"].append(_spawn(log, "classify", "--impl", impl, "--shots", str(s), "--batches", "8",
                                              "--test-size", str(test_size)))
            save()
    log("agreement and profile")
    for s in shots:
        results["agree"].append(_spawn(log, "agree", "--shots", str(s), "--batches", str(max(batches))))
    results["profile"] = _spawn(log, "profile", "--shots", str(max(shots)), "--batches", str(max(batches)))
    results["peak"].append(_spawn(log, "peak"))
    save()
    return results


# -- numbers for the report -------------------------------------------------------------------


def useful_flops(dims: dict, context_tokens: int, context_labels: int, query_lengths: list[int]) -> float:
    """FLOPs a CPT training step needs at least (see docs/performance.md for the formula).

    Context once (causal attention), queries unpadded attending to context + themselves, vocabulary
    projection only where a loss is taken; backward = input gradients only (weights frozen).
    """
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]  # per (query, key) pair, forward
    n = context_tokens
    tokens = n + sum(query_lengths)
    pairs = n * (n + 1) / 2 + sum(q * n + q * (q + 1) / 2 for q in query_lengths)
    logits = context_labels + len(query_lengths)  # one label token per query
    linear = 2 * dims["linear_params"] * tokens + 2 * dims["hidden"] * dims["vocab"] * logits
    return 2 * linear + 3 * attn * pairs


def duplicated_flops(dims: dict, context_tokens: int, padded_length: int, batch: int) -> float:
    """FLOPs of PEFT's layout: every row holds context + padded query, logits everywhere, dense masked attention."""
    rows_len = context_tokens + padded_length
    attn = 4 * dims["layers"] * dims["heads"] * dims["head_dim"]
    linear = (2 * dims["linear_params"] + 2 * dims["hidden"] * dims["vocab"]) * batch * rows_len
    pairs = batch * (rows_len * rows_len if batch > 1 else rows_len * (rows_len + 1) / 2)
    return 2 * linear + 3 * attn * pairs


def _cell(results: dict, impl: str, shots: int, batch: int) -> dict | None:
    return next((r for r in results["train"] if (r["impl"], r["shots"], r["batch"]) == (impl, shots, batch)), None)


def _classify(results: dict, impl: str, shots: int) -> dict | None:
    return next((r for r in results["classify"] if (r["impl"], r["shots"]) == (impl, shots)), None)


def _peak(results: dict) -> float:
    return max(p["best_flops"] for p in results["peak"])


def _goals(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows; PEFT is its faster / smaller variant in each comparison."""
    rows = []
    shots = sorted({r["shots"] for r in results["train"]})
    batches = sorted({r["batch"] for r in results["train"]})
    big = max(batches)

    def speedup(s, b):
        ours = _cell(results, "cptune", s, b)
        peft = [c for c in (_cell(results, i, s, b) for i in TRAIN_IMPLS[1:]) if c]
        return (min(c["median_s"] for c in peft) / ours["median_s"]) if ours and peft else None

    for s, target in ((4, 3.0), (8, 5.0)):
        if s in shots:
            x = speedup(s, big)
            rows.append((f"training step, batch {big}, {s} shots: >= {target:g}x PEFT", f"{x:.2f}x",
                         "met" if x >= target else "missed"))
    if 1 in batches:
        for s in shots:
            x = speedup(s, 1)
            verdict = "met" if x >= 1 else ("met within noise" if x >= BATCH1_NOISE else "missed")
            rows.append((f"training step, batch 1, {s} shots: no slower than PEFT", f"{x:.2f}x", verdict))
    for s in shots:
        ours = _cell(results, "cptune", s, big)
        peft = [c for c in (_cell(results, i, s, big) for i in TRAIN_IMPLS[1:]) if c]
        if ours and peft:
            frac = ours["peak_rss_gb"] / min(c["peak_rss_gb"] for c in peft)
            rows.append((f"peak RSS, batch {big}, {s} shots: <= 0.5 x PEFT", f"{frac:.2f} x",
                         "met" if frac <= 0.5 else "missed"))
    for s, target in ((4, 4.0), (8, 6.0)):
        ours, peft, floor = (_classify(results, i, s) for i in CLASSIFY_IMPLS)
        if ours and peft:
            x = ours["examples_per_s"] / peft["examples_per_s"]
            rows.append((f"classification, {s} shots: >= {target:g}x PEFT", f"{x:.2f}x",
                         "met" if x >= target else "missed"))
        if ours and floor:
            x = floor["examples_per_s"] / ours["examples_per_s"]
            rows.append((f"classification, {s} shots: within 1.2x of queries alone", f"{x:.2f}x",
                         "met" if x <= 1.2 else "missed"))
    return rows


# -- the report -------------------------------------------------------------------------------


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted({r["shots"] for r in results["train"]})
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(5 * (len(shots) + 1), 4))
    styles = {"cptune": ("tab:blue", "o"), "peft": ("tab:red", "s"), "peft-nocache": ("tab:orange", "^")}
    for ax, s in zip(axes[:-1], shots, strict=True):
        for impl in TRAIN_IMPLS:
            cells = sorted((r for r in results["train"] if r["impl"] == impl and r["shots"] == s),
                           key=lambda r: r["batch"])
            color, marker = styles[impl]
            ax.plot([c["batch"] for c in cells], [c["median_s"] for c in cells], marker=marker, color=color,
                    label=impl if impl != "peft-nocache" else "peft use_cache=False")
        ctx = next(r["context_tokens"] for r in results["train"] if r["shots"] == s)
        ax.set(title=f"training step, {s} shots ({ctx} context tokens)", xlabel="batch", ylabel="seconds (median)",
               xticks=sorted({r["batch"] for r in results["train"]}))
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    cshots = sorted({r["shots"] for r in results["classify"]})
    width = 0.27
    for k, (impl, color) in enumerate(zip(CLASSIFY_IMPLS, ("tab:blue", "tab:red", "tab:gray"), strict=True)):
        vals = [(_classify(results, impl, s) or {}).get("examples_per_s", 0) for s in cshots]
        bars = ax.bar([i + (k - 1) * width for i in range(len(cshots))], vals, width, color=color,
                      label={"floor": "queries alone (floor)"}.get(impl, impl))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set(title="classification throughput, batch 8", ylabel="examples / s", xticks=range(len(cshots)),
           xticklabels=[f"{s} shots" for s in cshots])
    ax.legend()
    fig.suptitle(f"cptune vs PEFT {results['machine']['peft']} CPT, SmolLM2-135M fp32, {results['machine']['cpu']}, "
                 f"{results['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_lengths(lengths: list[int]) -> str:
    return f"{min(lengths)}-{max(lengths)}" if len(lengths) > 1 else str(lengths[0])


def render_report(results: dict) -> str:
    m = results["machine"]
    peak = _peak(results)
    out = [
        "# Performance: cptune vs PEFT's CPT",
        "",
        "Generated by `cptune.bench` from one run; rerun it with the command below. Model: the embedded",
        "SmolLM2-135M-Instruct (llama architecture, 30 layers, hidden 576), float32. Data: Rotten Tomatoes",
        "snippets (a stand-in for SST-2/MR), template `input: {x} output: {y}`, seeded splits (seed 0).",
        "",
        f"    {results['command']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GiB RAM; torch {m['torch']} "
        f"({results['train'][0]['threads']} threads, the default), transformers {m['transformers']}, "
        f"peft {m['peft']}, Python {m['python']}; cptune {m['cptune']} at `{m['git']}`; {m['date']}.",
        f"Measured fp32 matmul peak ({PEAK_SIZE}x{PEAK_SIZE}, best of 7): "
        + ", ".join(f"{p['best_flops'] / 1e9:.0f}" for p in results["peak"])
        + f" GFLOP/s (start, end of run); {peak / 1e9:.0f} is used below.",
        "",
        "Method. Each (implementation, configuration) runs in a fresh process: load, one untimed warm-up",
        f"step (which also counts FLOPs), then {results['steps']} timed steps; the median is reported. Peak RSS is",
        "that process's `ru_maxrss` at its end (absolute, model included). Implementations alternate per",
        "configuration (A B C, B C A, ...) so load drifts hit all of them. The machine is shared: other processes",
        "(test runs) sometimes used CPU during a measurement; the `other CPU` column gives the cores they kept",
        "busy on average during that timed window (0 = quiet, 2 = both cores). `cptune` is the `auto` path",
        "(context once per batch when batch > 1, PEFT's layout at batch 1); PEFT runs with its default",
        "(`use_cache` on) and with `use_cache=False`. Training queries are the first B of 8 held-out examples,",
        "right-padded to the longest in the batch; the optimizer is AdamW on the delta (cptune projects after the",
        "step, PEFT inside its next forward).",
        "",
        "## Goals (issue 4)",
        "",
        "Ratios are against the faster (for memory: the smaller) of the two PEFT variants in this run.",
        "",
        "| goal | measured | verdict |",
        "|---|---|---|",
    ]
    out += [f"| {g} | {v} | **{verdict}** |" for g, v, verdict in _goals(results)]
    out += ["", "## Training step (forward + backward + AdamW)", "",
            "| shots (ctx tokens) | batch | query tokens | cptune s | PEFT s | PEFT no-cache s | speedup vs PEFT "
            "(no-cache) | cptune RSS GB | PEFT RSS GB | no-cache RSS GB | other CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted({r["shots"] for r in results["train"]}):
        for b in sorted({r["batch"] for r in results["train"]}):
            cells = [_cell(results, i, s, b) for i in TRAIN_IMPLS]
            if not all(cells):
                continue
            c, p, pn = cells
            out.append(
                f"| {s} ({c['context_tokens']}) | {b} | {_fmt_lengths(c['query_lengths'])} (pad {c['padded_length']})"
                f" | {c['median_s']:.2f} | {p['median_s']:.2f} | {pn['median_s']:.2f} | "
                f"{p['median_s'] / c['median_s']:.2f}x ({pn['median_s'] / c['median_s']:.2f}x) | "
                f"{c['peak_rss_gb']:.2f} | {p['peak_rss_gb']:.2f} | {pn['peak_rss_gb']:.2f} | "
                f"{max(x['foreign_cores'] for x in cells):.2f} |")
    out += ["", "Per-step spread (min-max of the timed steps) and phases (median forward / backward / optimizer, s):",
            "",
            "| shots | batch | cptune | PEFT | PEFT no-cache |", "|---|---|---|---|---|"]
    for s in sorted({r["shots"] for r in results["train"]}):
        for b in sorted({r["batch"] for r in results["train"]}):
            cells = [_cell(results, i, s, b) for i in TRAIN_IMPLS]
            if all(cells):
                out.append(f"| {s} | {b} | " + " | ".join(
                    f"{min(x['times']):.2f}-{max(x['times']):.2f}; {x['forward_s']:.2f} / {x['backward_s']:.2f} / "
                    f"{x['optimizer_s']:.3f}" for x in cells) + " |")
    out += ["", "## FLOPs and achieved rate", "",
            "*Executed* FLOPs are counted on the warm-up step with `torch.utils.flop_counter.FlopCounterMode` (every",
            "matmul, forward and backward, as the implementation really ran it, padding included) plus CPU flash",
            "attention, which the counter does not know; we register its formula (4·b·h·Lq·Lk·hd forward, counting",
            "only the causal triangle when the kernel is called with `is_causal`; backward 2x forward). *Useful*",
            "FLOPs are the least a CPT step needs, the same for every implementation:",
            "",
            "    useful = 2·F + 3·A        (backward of a frozen model = input gradients only = 1x forward for",
            "                               matmuls; attention backward = 2x forward: dQ, dK, dV, dP)",
            "    F = 2·P·(N + Σ l_i) + 2·d·V·(M_ctx + B)      forward matmuls",
            "    A = 4·L·H·hd·[N(N+1)/2 + Σ_i (l_i·N + l_i(l_i+1)/2)]   forward attention (causal pairs)",
            "",
            "with P = 106.2 M the non-embedding matmul parameters (q, k, v, o, gate, up, down of 30 layers), N",
            "context tokens, l_i the real query lengths, d = 576, V = 49,152 (the tied vocabulary projection),",
            "M_ctx context label tokens, B queries (one label token each), L = 30 layers, H·hd = 576. Excluded:",
            "norms, rotary embeddings, softmax, the loss, the embedding lookup and AdamW (all elementwise,",
            "<1% of the total). PEFT's layout by the same formula (B rows of N + T_pad tokens, logits at every",
            "position, dense masked attention) is shown as `PEFT layout` and matches its counted figure.",
            "(The common 3x-forward rule for training counts weight gradients, which a frozen model never",
            "computes; it would inflate every rate below by ~1.5x.)",
            "",
            "| shots | batch | impl | executed GFLOP | useful GFLOP | PEFT layout GFLOP | executed GFLOP/s | "
            "% of peak | useful % of peak |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results["train"], key=lambda r: (r["shots"], r["batch"], TRAIN_IMPLS.index(r["impl"]))):
        useful = useful_flops(r["dims"], r["context_tokens"], r["label_tokens_context"], r["query_lengths"])
        dup = duplicated_flops(r["dims"], r["context_tokens"], r["padded_length"], r["batch"])
        rate = r["executed_flops"] / r["median_s"]
        out.append(f"| {r['shots']} | {r['batch']} | {r['impl']} | {r['executed_flops'] / 1e9:.0f} | {useful / 1e9:.0f}"
                   f" | {dup / 1e9:.0f} | {rate / 1e9:.0f} | {100 * rate / peak:.0f}% | "
                   f"{100 * useful / r['median_s'] / peak:.0f}% |")
    out += ["", "## Classification throughput", "",
            f"{results['classify'][0]['examples']} test examples, batch 8, first label token's log-probability at the"
            " answer position. cptune: `score_texts` with the context's KV cache encoded once and reused; PEFT: its"
            " forward on each batch (context re-encoded for every example), logits read at N + len - 1; floor:"
            " `score_texts` without a context. The context holds a fixed nonzero delta (inside the projection"
            " balls) in both implementations.", "",
            "| shots (ctx tokens) | cptune ex/s | PEFT ex/s | floor ex/s | cptune s/ex | PEFT s/ex | speedup vs PEFT"
            " | cptune / floor time | RSS GB (cptune, PEFT, floor) | other CPU |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted({r["shots"] for r in results["classify"]}):
        c, p, f = (_classify(results, i, s) for i in CLASSIFY_IMPLS)
        if c and p and f:
            out.append(f"| {s} ({c['context_tokens']}) | {c['examples_per_s']:.1f} | {p['examples_per_s']:.2f} | "
                       f"{f['examples_per_s']:.1f} | {1 / c['examples_per_s']:.3f} | {1 / p['examples_per_s']:.3f} | "
                       f"{c['examples_per_s'] / p['examples_per_s']:.2f}x | "
                       f"{f['examples_per_s'] / c['examples_per_s']:.2f}x | {c['peak_rss_gb']:.2f}, "
                       f"{p['peak_rss_gb']:.2f}, {f['peak_rss_gb']:.2f} | "
                       f"{max(x['foreign_cores'] for x in (c, p, f)):.2f} |")
    out += ["", "## Agreement with PEFT", "",
            "Same queries, same fixed nonzero delta, float32, real model. `auto` is the path the benchmark times;",
            "`never` (PEFT's layout inside cptune) is a control for float32 summation-order noise.", "",
            "| shots | batch | PEFT loss | auto: loss rel. err | auto: grad rel. err | never: loss rel. err |"
            " never: grad rel. err | prediction disagreements (cached vs PEFT) | max abs score diff |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in results["agree"]:
        c, p = _classify(results, "cptune", a["shots"]), _classify(results, "peft", a["shots"])
        dis = diff = "n/a"
        if c and p:
            pc, pp = torch.tensor(c["predictions"]), torch.tensor(p["predictions"])
            dis = f"{int((pc != pp).sum())} / {len(pc)}"
            diff = f"{float((torch.tensor(c['scores']) - torch.tensor(p['scores'])).abs().max()):.1e}"
        out.append(f"| {a['shots']} | {a['batch']} | {a['peft_loss']:.5f} | {a['auto']['loss_rel_err']:.1e} | "
                   f"{a['auto']['grad_rel_err']:.1e} | {a['never']['loss_rel_err']:.1e} | "
                   f"{a['never']['grad_rel_err']:.1e} | {dis} | {diff} |")
    prof = results.get("profile")
    if prof:
        out += ["", f"## Profile: one cptune training step, {prof['shots']} shots, batch {prof['batch']}", "",
                f"`torch.profiler`, CPU, self time per op ({prof['wall_s']:.2f} s wall under the profiler).", "",
                "| op | calls | self ms | share |", "|---|---|---|---|"]
        out += [f"| `{o['op']}` | {o['calls']} | {o['self_ms']:.0f} | {100 * o['share']:.1f}% |" for o in prof["ops"]]
    out += ["", "![step time and classification throughput](performance.png)", ""]
    return "\n".join(out)


def write_report(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(results, out_dir / "performance.png")
    (out_dir / "performance.md").write_text(render_report(results))


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cptune bench`` / ``benchmarks/bench.py``."""
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per measurement (default 5; "
                        "2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 shots, batch 1 and 8, 40 test examples, "
                        "2 steps; writes to runs/bench-quick unless --out-dir is given")
    parser.add_argument("--shots", type=int, nargs="+", default=None, help="context sizes (default 4 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="training batch sizes (default 1 4 8)")
    parser.add_argument("--test-size", type=int, default=None, help=f"test examples to classify (default {TEST_SIZE})")
    parser.add_argument("--out-dir", type=Path, default=None, help="where performance.md/.png go (default docs)")
    parser.add_argument("--json", type=Path, default=None, help="raw results (default runs/bench/results.json)")
    parser.add_argument("--report-only", type=Path, default=None, metavar="JSON",
                        help="re-render the report from saved raw results without measuring")
    parser.add_argument("--worker", choices=("train", "classify", "agree", "profile", "peak"), help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="cptune", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark (or one worker) for parsed ``args``; returns the exit status."""
    if args.worker:
        return run_worker(args)
    try:
        import peft  # noqa: F401
    except ImportError:
        print("cptune bench compares against PEFT: pip install 'cptune[test]' (peft==0.21.2)", file=sys.stderr)
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
        results = run_benchmark(steps, shots, batches, test_size, json_path, lambda s: print(s, flush=True))
        results["command"] = " ".join(["python benchmarks/bench.py", *sys.argv[1:]]) \
            if sys.argv[0].endswith("bench.py") else " ".join(["cptune", *sys.argv[1:]])
        results["wall_s"] = time.perf_counter() - t0
        json_path.write_text(json.dumps(results, indent=1))
        print(f"raw results: {json_path} ({results['wall_s'] / 60:.1f} min)")
    write_report(results, out_dir)
    print(f"report: {out_dir / 'performance.md'}, {out_dir / 'performance.png'}")
    for goal, value, verdict in _goals(results):
        print(f"  {verdict:>16}  {value:>8}  {goal}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cptune.bench`` / ``benchmarks/bench.py`` entry point."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
