"""Benchmark: cptune's context-once CPT against PEFT 0.21.2's duplicated context, on the embedded SmolLM2.

One run measures, side by side: training step time (forward + backward + AdamW) and peak RSS at
several batch sizes and context lengths; test-set classification throughput; executed and useful
FLOPs per step against the machine's measured fp32 matmul peak; loss, gradient and prediction
agreement. It writes ``docs/performance.md`` and ``docs/performance.png``.

Every measurement runs in a fresh subprocess (``--worker ...``) that prints one JSON line. Step
times come from one process per configuration that alternates the implementations step by step
(A B C, B C A, ...), so drifts in machine load hit all of them; each peak RSS comes from its own
process (one implementation, one configuration). The CPU time other processes used during every
timed step is recorded. PEFT is needed (``pip install 'cptune[test]'``).

    python benchmarks/bench.py            # full run (~22 min on 2 quiet cores)
    python benchmarks/bench.py --quick    # smoke run, writes to runs/bench-quick/

Sections: worker side (measurements), driver side (spawning, saving), numbers for the report
(FLOP formulas, goals), the report (markdown and plot), entry points (``main``, ``add_arguments``, ``run``).
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
QUIET_WAIT = 10.0  # default longest wait (s) for other processes to go quiet before a measured round
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


def _anonymous_copy(base):
    """The model with its weights in ordinary memory.

    ``from_pretrained`` leaves safetensors weights memory-mapped from the cache file; under memory
    pressure the kernel may drop those clean pages and read them again, slowing only the model that
    uses them. Timed workers run every implementation on one such copy.
    """
    return copy.deepcopy(base)


def _step_fn(impl: str, base, context, queries, model=None):
    """Return ``step() -> (loss, t_forward, t_backward, t_optimizer)`` for ``impl`` (built unless ``model``)."""
    if model is None:
        model = _cptune_model(base, context) if impl == "cptune" else _peft_model(base, context)
    params = [model.prompt_encoder.delta] if impl == "cptune" else [p for p in model.parameters() if p.requires_grad]
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


def _wait_for_quiet(max_wait: float, threshold: float = 0.5, probe: float = 1.0) -> float:
    """Wait (at most ``max_wait`` s) until other processes keep fewer than ``threshold`` cores busy.

    Returns the seconds waited. A test run starting next to a measurement oversubscribes the two
    cores, and OpenMP then slows both sides several-fold; this gate skips the start of such bursts.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        with _ForeignCPU() as foreign:
            time.sleep(probe)
        if foreign.cores < threshold:
            break
    return time.perf_counter() - t0


def worker_train_time(shots: int, batch: int, steps: int, quiet_wait: float) -> dict:
    """All three implementations in one process, steps alternated A B C, B C A, ... (paired rounds).

    They share one copy of the frozen model (neither wrapper changes it); PEFT's two variants share
    one PEFT model, each with its own optimizer.
    """
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    base = _anonymous_copy(base)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    peft_model = _peft_model(base, context)
    step = {impl: _step_fn(impl, base, context, queries, model=None if impl == "cptune" else peft_model)
            for impl in TRAIN_IMPLS}
    out = {impl: {"impl": impl, "times": [], "phases": [], "foreign": [], "losses": []} for impl in TRAIN_IMPLS}
    for impl in TRAIN_IMPLS:  # warm-up round, untimed, counts the executed FLOPs
        counter = _flop_counter()
        with counter:
            step[impl]()
        out[impl]["executed_flops"] = counter.get_total_flops()
        out[impl]["flops_by_op"] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    waited = []
    for r in range(steps):
        waited.append(_wait_for_quiet(quiet_wait))
        for impl in _rotate(TRAIN_IMPLS, r):
            with _ForeignCPU() as foreign:
                loss, tf, tb, to = step[impl]()
            cell = out[impl]
            cell["times"].append(tf + tb + to)
            cell["phases"].append((tf, tb, to))
            cell["foreign"].append(foreign.cores)
            cell["losses"].append(loss)
    return {"shots": shots, "batch": batch, "context_tokens": len(context),
            "context_labels": _context_label_count(context), "query_lengths": queries["attention_mask"].sum(1).tolist(),
            "padded_length": queries["input_ids"].shape[1], "quiet_waited_s": waited,
            "threads": torch.get_num_threads(), "dims": _model_dims(base), "impls": out}


def worker_train_rss(impl: str, shots: int, batch: int) -> dict:
    """Peak RSS of one implementation training: a fresh process, load + one step (AdamW state included)."""
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    step = _step_fn(impl, base, context, render_queries(extra[:batch], template, tok, LABEL_WORDS))
    rss_setup = _peak_rss_gb()
    times = [sum(step()[1:])]
    return {"impl": impl, "shots": shots, "batch": batch, "rss_setup_gb": rss_setup, "peak_rss_gb": _peak_rss_gb(),
            "step_s": times}


def _context_label_count(context) -> int:
    from cptune.roles import TokenRole

    return int((context.roles == TokenRole.LABEL).sum())


def _pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def _peft_batch_scores(model, rows: list[list[int]], first_label_ids: list[int], num_context: int, pad: int):
    """PEFT's forward on one batch (context re-encoded in every row); first label token's log-prob."""
    ids, mask = _pad_right(rows, pad)
    logits = model(input_ids=ids, attention_mask=mask).logits  # (b, N + T, V), right padding
    last = torch.tensor([num_context + len(r) - 1 for r in rows])
    return torch.log_softmax(logits[torch.arange(len(rows)), last].float(), dim=-1)[:, first_label_ids]


def worker_classify(shots: int, batch: int, test_size: int, quiet_wait: float) -> dict:
    """Classify the test set three ways, alternating batch by batch: cached context, PEFT, queries alone.

    cptune's time is one context encoding plus its per-batch scoring with the reused cache, exactly
    what ``score_texts`` runs; ``score_texts`` itself is timed afterwards (one pass each, cptune and
    floor) and must give the same scores.
    """
    from cptune.evaluate import encode_context, label_log_likelihoods, query_token_ids, score_texts
    from cptune.template import label_token_ids

    base, tok, template, context, _, test = _setup(shots)
    base = _anonymous_copy(base)  # shared by all three; neither wrapper changes it
    texts = [ex.text for ex in test[:test_size]]
    delta = _probe_delta(context, base.get_input_embeddings().weight.shape[1])
    ours = _cptune_model(base, context)
    theirs = _peft_model(base, context)
    theirs.eval()
    with torch.no_grad():
        ours.prompt_encoder.delta.copy_(delta)
        _peft_delta(theirs).copy_(delta)
    labels = list(label_token_ids(template, tok, LABEL_WORDS).values())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = query_token_ids(texts, template, tok)  # tokenisation: the same for all three, not timed
    n = len(context)

    def ours_embeds():
        with torch.no_grad():
            return ours.context_embeddings()

    score = {
        "cptune": lambda chunk, cache: label_log_likelihoods(base, cache, chunk, labels, batch, pad_id=pad),
        "peft": lambda chunk, cache: _peft_batch_scores(theirs, chunk, [ids[0] for ids in labels], n, pad),
        "floor": lambda chunk, cache: label_log_likelihoods(base, None, chunk, labels, batch, pad_id=pad),
    }
    for impl in CLASSIFY_IMPLS:  # warm-up
        score[impl](rows[:batch], encode_context(base, ours_embeds()))
    out = {impl: {"impl": impl, "seconds": 0.0, "parts": [], "foreign": []} for impl in CLASSIFY_IMPLS}
    t0 = time.perf_counter()
    cache = encode_context(base, ours_embeds())  # once per run: part of cptune's time
    out["cptune"]["seconds"] += time.perf_counter() - t0
    for k, start in enumerate(range(0, len(rows), batch)):
        if k % 5 == 0:
            _wait_for_quiet(quiet_wait)
        for impl in _rotate(CLASSIFY_IMPLS, k):
            with _ForeignCPU() as foreign:
                t0 = time.perf_counter()
                out[impl]["parts"].append(score[impl](rows[start:start + batch], cache))
                out[impl]["seconds"] += time.perf_counter() - t0
            out[impl]["foreign"].append(foreign.cores)
    for impl, cell in out.items():
        scores = torch.cat(cell.pop("parts"))
        cell.update(examples_per_s=len(texts) / cell["seconds"], predictions=scores.argmax(1).tolist(),
                    scores=[[round(float(v), 6) for v in row] for row in scores])
        if impl != "peft":  # the public function, one pass, as a cross-check of the decomposition
            t0 = time.perf_counter()
            whole = score_texts(base, tok, template, LABEL_WORDS, texts, context_embeds=ours_embeds()
                                if impl == "cptune" else None, batch_size=batch)
            cell["score_texts_s"] = time.perf_counter() - t0
            cell["score_texts_max_diff"] = float((whole - scores).abs().max())
    return {"shots": shots, "batch": batch, "context_tokens": n, "examples": len(texts),
            "query_lengths": [len(r) for r in rows], "dims": _model_dims(base), "threads": torch.get_num_threads(),
            "impls": out}


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


def _profiled(fn, top: int) -> dict:
    """Run ``fn`` once under torch.profiler (CPU); its ``top`` ops by self time."""
    from torch.profiler import ProfilerActivity, profile

    _wait_for_quiet(QUIET_WAIT)
    with _ForeignCPU() as foreign, profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / total} for e in events[:top]]
    return {"wall_s": wall, "total_ms": total / 1e3, "ops": rows, "foreign_cores": foreign.cores}


def worker_profile(shots: int, batch: int, top: int = 14, classify_batches: int = 5) -> dict:
    """Profiles: one training step of cptune and of PEFT; label scoring with the cached context and without."""
    from cptune import render_queries
    from cptune.evaluate import encode_context, label_log_likelihoods, query_token_ids
    from cptune.template import label_token_ids

    base, tok, template, context, extra, test = _setup(shots)
    base = _anonymous_copy(base)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    result = {"shots": shots, "batch": batch, "impls": {}}
    for impl in TRAIN_IMPLS[:2]:
        step = _step_fn(impl, base, context, queries)
        step()  # warm-up
        result["impls"][impl] = _profiled(step, top)
    labels = list(label_token_ids(template, tok, LABEL_WORDS).values())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = query_token_ids([ex.text for ex in test[:classify_batches * 8]], template, tok)
    with torch.no_grad():
        cache = encode_context(base, _cptune_model(base, context).context_embeddings())

    def scorer(context_cache):
        return lambda: label_log_likelihoods(base, context_cache, rows, labels, 8, pad_id=pad)

    scorer(cache)()  # warm-up
    result["classify"] = {"examples": len(rows), "impls": {"cptune": _profiled(scorer(cache), top),
                                                           "floor": _profiled(scorer(None), top)}}
    return result


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
    if args.worker == "train-time":
        result = worker_train_time(shots, batch, args.steps or 5, args.quiet_wait)
    elif args.worker == "train-rss":
        result = worker_train_rss(args.impl, shots, batch)
    elif args.worker == "classify":
        result = worker_classify(shots, batch, args.test_size or TEST_SIZE, args.quiet_wait)
    elif args.worker == "agree":
        result = worker_agree(shots, batch)
    elif args.worker == "profile":
        result = worker_profile(shots, batch)
    else:
        result = worker_peak()
    print(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# driver side: spawn the workers, keep every result, write the report
# ---------------------------------------------------------------------------------------------


def _spawn(log, *worker_args: str) -> dict:
    cmd = [sys.executable, "-m", "cptune.bench", "--worker", *worker_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {' '.join(worker_args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"  {' '.join(worker_args):<58} {time.perf_counter() - t0:6.1f} s")
    return json.loads(lines[-1])


def _machine() -> dict:
    import peft
    import transformers

    import cptune

    cpu, mem = "unknown", float("nan")
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        mem = next(int(ln.split()[1]) for ln in open("/proc/meminfo") if ln.startswith("MemTotal")) * 1024 / GIB
    except (OSError, StopIteration):
        pass
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


def run_benchmark(steps: int, shots: list[int], batches: list[int], test_size: int, quiet_wait: float,
                  json_path: Path, log, resume: bool = False) -> dict:
    """Run every worker; the raw results are saved to ``json_path`` after each one.

    With ``resume``, results already in ``json_path`` (same settings) are kept and their workers skipped.
    """
    results = {"machine": _machine(), "steps": steps, "quiet_wait": quiet_wait, "test_size": test_size,
               "command": "", "peak": [], "train": [], "rss": [], "classify": [], "agree": [], "profile": None}
    if resume and json_path.is_file():
        saved = json.loads(json_path.read_text())
        if (saved.get("steps"), saved.get("quiet_wait"), saved.get("test_size", test_size)) != (
                steps, quiet_wait, test_size):
            raise ValueError(f"cannot resume {json_path}: it was measured with other settings")
        results.update({k: saved[k] for k in ("peak", "train", "rss", "classify", "agree", "profile")})
        log(f"resuming {json_path}")
    wait = str(quiet_wait)

    def save():
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=1))

    log("matmul peak")
    results["peak"].append(_spawn(log, "peak"))
    log(f"training: warm-up + {steps} rounds of A B C steps per configuration; then peak RSS, one process each")
    for i, (s, b) in enumerate((s, b) for s in shots for b in batches):
        if _train(results, s, b) is None:
            results["train"].append(_spawn(log, "train-time", "--shots", str(s), "--batches", str(b), "--steps",
                                           str(steps), "--quiet-wait", wait))
            save()
        for impl in _rotate(TRAIN_IMPLS, i):
            if not any((r["impl"], r["shots"], r["batch"]) == (impl, s, b) for r in results["rss"]):
                results["rss"].append(_spawn(log, "train-rss", "--impl", impl, "--shots", str(s), "--batches",
                                             str(b)))
                save()
    log(f"classification: {test_size} test examples, batch 8, implementations alternated batch by batch")
    for s in shots:
        if _classify(results, s) is None:
            results["classify"].append(_spawn(log, "classify", "--shots", str(s), "--batches", "8", "--test-size",
                                              str(test_size), "--quiet-wait", wait))
            save()
    log("agreement and profile")
    for s in shots:
        if not any(a["shots"] == s for a in results["agree"]):
            results["agree"].append(_spawn(log, "agree", "--shots", str(s), "--batches", str(max(batches))))
            save()
    if results["profile"] is None:
        results["profile"] = _spawn(log, "profile", "--shots", str(max(shots)), "--batches", str(max(batches)))
    results["peak"].append(_spawn(log, "peak"))
    save()
    return results


# -- numbers for the report -------------------------------------------------------------------


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


def _train(results: dict, shots: int, batch: int) -> dict | None:
    return next((r for r in results["train"] if (r["shots"], r["batch"]) == (shots, batch)), None)


def _rss(results: dict, impl: str, shots: int, batch: int) -> float:
    rows = [r["peak_rss_gb"] for r in results["rss"] if (r["impl"], r["shots"], r["batch"]) == (impl, shots, batch)]
    return rows[0] if rows else float("nan")


def _median(cfg: dict, impl: str) -> float:
    return statistics.median(cfg["impls"][impl]["times"])


def _paired(cfg: dict, slow: str, fast: str = "cptune") -> float:
    """Median over rounds of t(slow) / t(fast): each round ran the implementations back to back."""
    a, b = cfg["impls"][slow]["times"], cfg["impls"][fast]["times"]
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def _best(cfg: dict, slow: str, fast: str = "cptune") -> float:
    """min t(slow) / min t(fast): the ratio of the fastest rounds."""
    return min(cfg["impls"][slow]["times"]) / min(cfg["impls"][fast]["times"])


def _faster_peft(cfg: dict) -> str:
    return min(TRAIN_IMPLS[1:], key=lambda impl: _median(cfg, impl))


def _classify(results: dict, shots: int) -> dict | None:
    return next((r for r in results["classify"] if r["shots"] == shots), None)


def _peak(results: dict) -> float:
    return max(p["best_flops"] for p in results["peak"])


def _axes(results: dict) -> tuple[list[int], list[int]]:
    return sorted({r["shots"] for r in results["train"]}), sorted({r["batch"] for r in results["train"]})


def _goals(results: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, verdict) rows against the faster (for memory: smaller) PEFT variant."""
    rows = []
    shots, batches = _axes(results)
    big = max(batches)
    for s, target in ((4, 3.0), (8, 5.0)):
        if (cfg := _train(results, s, big)) is not None:
            x = _paired(cfg, _faster_peft(cfg))
            rows.append((f"training step, batch {big}, {s} shots: >= {target:g}x PEFT", f"{x:.2f}x",
                         "met" if x >= target else "missed"))
    for s in shots:
        if (cfg := _train(results, s, 1)) is not None:
            x = _paired(cfg, _faster_peft(cfg))
            verdict = "met" if x >= 1 else ("met within noise" if x >= BATCH1_NOISE else "missed")
            rows.append((f"training step, batch 1, {s} shots: no slower than PEFT", f"{x:.2f}x", verdict))
    for s in shots:
        frac = _rss(results, "cptune", s, big) / min(_rss(results, i, s, big) for i in TRAIN_IMPLS[1:])
        if frac != frac:  # NaN: not measured (a partial run)
            continue
        rows.append((f"peak RSS, batch {big}, {s} shots: <= 0.5 x PEFT", f"{frac:.2f} x",
                     "met" if frac <= 0.5 else "missed"))
    for s, target in ((4, 4.0), (8, 6.0)):
        if (c := _classify(results, s)) is not None:
            ours, peft, floor = (c["impls"][i]["seconds"] for i in CLASSIFY_IMPLS)
            rows.append((f"classification, {s} shots: >= {target:g}x PEFT", f"{peft / ours:.2f}x",
                         "met" if peft / ours >= target else "missed"))
            rows.append((f"classification, {s} shots: within 1.2x of queries alone", f"{ours / floor:.2f}x",
                         "met" if ours / floor <= 1.2 else "missed"))
    return rows


# -- the report -------------------------------------------------------------------------------


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots, batches = _axes(results)
    fig, axes = plt.subplots(1, len(shots) + 1, figsize=(5 * (len(shots) + 1), 4))
    styles = {"cptune": ("tab:blue", "o", "cptune"), "peft": ("tab:red", "s", "PEFT"),
              "peft-nocache": ("tab:orange", "^", "PEFT use_cache=False")}
    for ax, s in zip(axes[:-1], shots, strict=True):
        cfgs = [c for b in batches if (c := _train(results, s, b)) is not None]
        for impl, (color, marker, label) in styles.items():
            ax.plot([c["batch"] for c in cfgs], [_median(c, impl) for c in cfgs], marker=marker, color=color,
                    label=label)
        ax.set(title=f"training step, {s} shots ({cfgs[0]['context_tokens']} context tokens)", xlabel="batch",
               ylabel="seconds (median)", xticks=batches, ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes[-1]
    cls = sorted(results["classify"], key=lambda c: c["shots"]) or [{"shots": 0, "examples": 0, "impls": {
        impl: {"examples_per_s": 0.0} for impl in CLASSIFY_IMPLS}}]
    width = 0.27
    names = {"cptune": "cptune (cached context)", "peft": "PEFT", "floor": "queries alone (floor)"}
    for k, (impl, color) in enumerate(zip(CLASSIFY_IMPLS, ("tab:blue", "tab:red", "tab:gray"), strict=True)):
        bars = ax.bar([i + (k - 1) * width for i in range(len(cls))],
                      [c["impls"][impl]["examples_per_s"] for c in cls], width, color=color, label=names[impl])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    top = max(c["impls"][impl]["examples_per_s"] for c in cls for impl in CLASSIFY_IMPLS) or 1.0
    ax.set(title=f"classification, {cls[0]['examples']} examples, batch 8", ylabel="examples / s",
           xticks=range(len(cls)), xticklabels=[f"{c['shots']} shots" for c in cls], ylim=(0, 1.3 * top))
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    m = results["machine"]
    fig.suptitle(f"cptune vs PEFT {m['peft']} CPT, SmolLM2-135M fp32, {m['cpu']} ({m['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spread(times: list[float]) -> str:
    return f"{min(times):.2f}-{max(times):.2f}"


def _render_training(results: dict) -> list[str]:
    shots, batches = _axes(results)
    out = ["## Training step (forward + backward + AdamW)", "",
           "Seconds are medians over the rounds; speedups are medians of the per-round paired ratios, and in",
           "parentheses the ratio of the fastest rounds (contention only ever adds time, so the minimum is the",
           "other robust estimate on a busy machine).", "",
           "| shots (ctx tokens) | batch | query tokens | cptune s | PEFT s | PEFT no-cache s | speedup vs PEFT | "
           "vs no-cache | cptune RSS GB | PEFT RSS GB | no-cache RSS GB | other CPU, median (max) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in shots:
        for b in batches:
            if (c := _train(results, s, b)) is None:
                continue
            lengths = c["query_lengths"]
            foreign = [f for impl in TRAIN_IMPLS for f in c["impls"][impl]["foreign"]]
            span = f"{min(lengths)}-{max(lengths)} (pad to {c['padded_length']})" if b > 1 else str(lengths[0])
            out.append(f"| {s} ({c['context_tokens']}) | {b} | {span} | "
                       + " | ".join(f"{_median(c, i):.2f}" for i in TRAIN_IMPLS)
                       + f" | {_paired(c, 'peft'):.2f}x ({_best(c, 'peft'):.2f}x) | "
                       f"{_paired(c, 'peft-nocache'):.2f}x ({_best(c, 'peft-nocache'):.2f}x) | "
                       + " | ".join(f"{_rss(results, i, s, b):.2f}" for i in TRAIN_IMPLS)
                       + f" | {statistics.median(foreign):.2f} ({max(foreign):.2f}) |")
    out += ["", "Spread (min-max over rounds) and median phases forward / backward / optimizer+projection, s:", "",
            "| shots | batch | cptune | PEFT | PEFT no-cache |", "|---|---|---|---|---|"]
    for s in shots:
        for b in batches:
            if (c := _train(results, s, b)) is not None:
                cells = []
                for impl in TRAIN_IMPLS:
                    x = c["impls"][impl]
                    phases = [statistics.median(p[k] for p in x["phases"]) for k in range(3)]
                    cells.append(f"{_spread(x['times'])}; {phases[0]:.2f} / {phases[1]:.2f} / {phases[2]:.3f}")
                out.append(f"| {s} | {b} | " + " | ".join(cells) + " |")
    return out


def _render_flops(results: dict) -> list[str]:
    peak = _peak(results)
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
            t, executed = _median(c, impl), c["impls"][impl]["executed_flops"]
            out.append(f"| {c['shots']} | {c['batch']} | {impl} | {executed / 1e9:.0f} | {useful / 1e9:.0f} | "
                       f"{dup / 1e9:.0f} | {executed / t / 1e9:.0f} | {100 * executed / t / peak:.0f}% | "
                       f"{100 * useful / t / peak:.0f}% |")
    return out


def _render_classify(results: dict) -> list[str]:
    n = results["classify"][0]["examples"]
    out = ["## Classification throughput", "",
           f"{n} test examples, batch 8, score = first label token's log-probability at the answer position.",
           "The three run in one process, batch by batch in rotating order. cptune: the context's KV cache is",
           "encoded once (its time included) and reused for every batch (`cptune.evaluate.label_log_likelihoods`,",
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


def _render_bounds(results: dict) -> list[str]:
    """Each speedup split into a FLOP ratio and an efficiency ratio; memory above the loaded model."""
    shots, batches = _axes(results)
    out = ["## What bounds the figures", "",
           "A speedup is (PEFT's executed FLOPs / cptune's) x (cptune's FLOP/s / PEFT's): the first factor is",
           "what the layout saves, the second how well the smaller pieces of work run. The FLOP ratio is the",
           "speedup cptune would reach at PEFT's efficiency.", "",
           "| shots | batch | vs | speedup (medians) | FLOP ratio | efficiency ratio | cptune % of peak | "
           "PEFT % of peak |",
           "|---|---|---|---|---|---|---|---|"]
    peak = _peak(results)
    for s in shots:
        for b in batches:
            if (c := _train(results, s, b)) is None:
                continue
            ours = c["impls"]["cptune"]["executed_flops"] / _median(c, "cptune")
            for impl in TRAIN_IMPLS[1:]:
                theirs = c["impls"][impl]["executed_flops"] / _median(c, impl)
                ratio = c["impls"][impl]["executed_flops"] / c["impls"]["cptune"]["executed_flops"]
                out.append(f"| {s} | {b} | {impl} | {_median(c, impl) / _median(c, 'cptune'):.2f}x | {ratio:.2f} | "
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
        if (c := _classify(results, a["shots"])) is not None:
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
    missed = [(g, v) for g, v, verdict in _goals(results) if verdict == "missed"]
    out = ["## Reading the misses", ""]
    if not missed:
        return out + ["None: every goal was met in this run."]
    peak, prof = _peak(results), results.get("profile") or {}
    _, batches = _axes(results)
    for goal, value in missed:
        shots = int(goal.split(" shots")[0].split()[-1])
        if goal.startswith(f"training step, batch {max(batches)}"):
            c = _train(results, shots, max(batches))
            p = _faster_peft(c)
            ex_c, ex_p = c["impls"]["cptune"]["executed_flops"], c["impls"][p]["executed_flops"]
            eff_c, eff_p = ex_c / _median(c, "cptune") / peak, ex_p / _median(c, p) / peak
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
            c = _train(results, shots, 1)
            out.append(f"- **{goal}: {value}.** At batch 1 cptune runs PEFT's layout (executed "
                       f"{c['impls']['cptune']['executed_flops'] / 1e9:.0f} vs "
                       f"{c['impls']['peft']['executed_flops'] / 1e9:.0f} GFLOP); spreads "
                       + ", ".join(f"{i} {_spread(c['impls'][i]['times'])} s" for i in TRAIN_IMPLS) + ".")
        elif goal.startswith("peak RSS"):
            out.append(f"- **{goal}: {value}.** See the peak RSS table above: the loaded model is a floor for both.")
        elif goal.startswith("classification") and "queries alone" in goal:
            c = _classify(results, shots)
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
            c = _classify(results, shots)
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
        "Generated by `cptune.bench` (`benchmarks/bench.py`) from one run, measured with:", "",
        f"    {results['command']}", "",
        "Rerun it, rewriting this file and `performance.png`, with `python benchmarks/bench.py` (or `cptune bench`;",
        "`--help` lists the options; `--report-only runs/bench/results.json` re-renders saved results).", "",
        "Model: the embedded SmolLM2-135M-Instruct (llama, 30 layers, hidden 576, vocabulary 49,152), float32.",
        "Data: Rotten Tomatoes snippets (a stand-in for SST-2/MR; seeded splits, seed 0), template",
        "`input: {x} output: {y}`, labels `negative`/`positive`, loss decay 0.95.", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GiB RAM; torch {m['torch']} with "
        f"{threads} threads (its default, left as is), transformers {m['transformers']}, peft {m['peft']}, "
        f"Python {m['python']}; cptune {m['cptune']} at `{m['git']}`; {m['date']}; the run took "
        f"{results.get('wall_s', 0) / 60:.0f} min.",
        f"fp32 matmul peak ({PEAK_SIZE}x{PEAK_SIZE} @ {PEAK_SIZE}x{PEAK_SIZE}, best of 7), start and end of the run: "
        + ", ".join(f"{p['best_flops'] / 1e9:.0f}" for p in results["peak"])
        + f" GFLOP/s; the higher, {_peak(results) / 1e9:.0f}, is used below.", "",
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
    out += [f"| {g} | {v} | **{verdict}** |" for g, v, verdict in _goals(results)]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(results, out_dir / "performance.png")
    (out_dir / "performance.md").write_text(render_report(results))


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cptune bench`` / ``benchmarks/bench.py``."""
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
        results = run_benchmark(steps, shots, batches, test_size, args.quiet_wait, json_path,
                                lambda line: print(line, flush=True), resume=args.resume)
        launcher = "python benchmarks/bench.py" if sys.argv[0].endswith("bench.py") else "cptune"
        results["command"] = " ".join([launcher, *sys.argv[1:]])
        results["wall_s"] = time.perf_counter() - t0
        json_path.write_text(json.dumps(results, indent=1))
        print(f"raw results: {json_path} ({results['wall_s'] / 60:.1f} min)")
    write_report(results, out_dir)
    print(f"report: {out_dir / 'performance.md'}, {out_dir / 'performance.png'}")
    for goal, value, verdict in _goals(results):
        print(f"  {verdict:>16}  {value:>8}  {goal}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m cptune.bench`` and ``benchmarks/bench.py``."""
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
