"""Worker side of the benchmark: one measurement, one fresh process, one JSON line on stdout.

The driver runs each of these as ``python benchmarks/bench.py --worker ...`` (see ``run_worker``).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings

import torch

from cptbench.meters import (
    ForeignCPU,
    flop_counter,
    peak_rss_gb,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    wait_for_quiet,
)
from cptbench.settings import (
    CLASSIFY_IMPLS,
    CPT_FIELDS,
    LABEL_WORDS,
    LR,
    NUM_TRAIN_QUERIES,
    PEAK_SIZE,
    QUIET_WAIT,
    SEED,
    TEMPLATE_TEXT,
    TEST_SIZE,
    TRAIN_IMPLS,
)


def _model_dims(base) -> dict:
    cfg = base.config.get_text_config()
    layers = base.get_decoder().layers
    linear = sum(p.numel() for layer in layers for p in layer.parameters() if p.ndim == 2)
    heads = cfg.num_attention_heads
    return {"layers": len(layers), "hidden": cfg.hidden_size, "vocab": base.get_input_embeddings().weight.shape[0],
            "heads": heads, "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            "linear_params": linear}


def _training_queries(dataset, shots: int):
    """Demonstrations, ``NUM_TRAIN_QUERIES`` held-out training queries and the test set.

    The first 8 queries, the demonstrations and the test set are those of ``extra_train=8`` (the
    split the earlier reports used); the rest are the examples a larger test set would add, so
    they are disjoint from all of them and class-balanced.
    """
    from cptune.data import sample_splits

    first = 8
    demos, extra, test = sample_splits(dataset, shots=shots, test_size=TEST_SIZE, seed=SEED, extra_train=first)
    more = NUM_TRAIN_QUERIES - first
    _, _, wider = sample_splits(dataset, shots=shots, test_size=TEST_SIZE + more, seed=SEED, extra_train=first)
    taken = {ex.text for ex in test}
    extra = extra + [ex for ex in wider if ex.text not in taken][:more]
    if len(extra) != NUM_TRAIN_QUERIES:
        raise ValueError(f"the split gave {len(extra)} training queries, not {NUM_TRAIN_QUERIES}")
    return demos, extra, test


def _setup(shots: int):
    from cptune import Template, build_context
    from cptune.data import load_dataset
    from cptune.models import load_model

    base, tok = load_model(device="cpu", dtype="float32")  # a CPU measurement, GPU or not
    demos, extra, test = _training_queries(load_dataset("rotten_tomatoes"), shots)
    template = Template(TEMPLATE_TEXT)
    return base, tok, template, build_context(demos, template, tok, LABEL_WORDS), extra, test


def _layout(base) -> str:
    """The query layout cptune's engine picks for ``base`` and why (runs its self-check, outside any timing)."""
    from cptune.cpt.engine import layout_report

    return layout_report(base)


def probe_delta(context, hidden: int) -> torch.Tensor:
    """A fixed nonzero delta inside every projection ball (half the smallest radius), zero on frozen rows."""
    from cptune.cpt.roles import is_trainable

    gen = torch.Generator().manual_seed(SEED)
    delta = torch.randn(len(context), hidden, generator=gen)
    radius = 0.5 * min(CPT_FIELDS["opt_projection_epsilon"], CPT_FIELDS["opt_projection_format_epsilon"])
    delta = delta / delta.norm(dim=1, keepdim=True) * radius * (hidden / 2048) ** 0.5
    return delta * is_trainable(context.roles).unsqueeze(1)


def cptune_model(base, context):
    """cptune's CPT model on ``base`` for ``context``, with the benchmark's CPT fields."""
    from cptune import get_cpt_model

    return get_cpt_model(base, context.to_config(**CPT_FIELDS))


def peft_model(base, context):
    """PEFT's CPT model on ``base`` for the same context and CPT fields (``base`` is wrapped, not copied)."""
    warnings.filterwarnings("ignore")
    import peft

    cfg = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=context.token_ids.tolist(), cpt_mask=[1] * len(context),
                         cpt_tokens_type_mask=context.type_codes.tolist(), **CPT_FIELDS)
    return peft.get_peft_model(base, cfg)


def peft_delta(model) -> torch.nn.Parameter:
    """PEFT's trainable delta, ``(N, d)`` float32 (unprojected until its next forward)."""
    return model.prompt_encoder["default"].delta_embedding.weight


def _anonymous_copy(base):
    """The model with its weights in ordinary memory.

    ``from_pretrained`` leaves safetensors weights memory-mapped from the cache file; under memory
    pressure the kernel may drop those clean pages and read them again, slowing only the model that
    uses them. Timed workers run every implementation on one such copy.
    """
    return copy.deepcopy(base)


def step_fn(impl: str, base, context, queries, model=None):
    """Return ``step() -> (loss, t_forward, t_backward, t_optimizer)`` for ``impl`` (built unless ``model``)."""
    if model is None:
        model = cptune_model(base, context) if impl == "cptune" else peft_model(base, context)
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


def rotate(items: tuple, k: int) -> tuple:
    k %= len(items)
    return items[k:] + items[:k]


def worker_train_time(shots: int, batch: int, steps: int, quiet_wait: float) -> dict:
    """All three implementations in one process, steps alternated A B C, B C A, ... (paired rounds).

    They share one copy of the frozen model (neither wrapper changes it); PEFT's two variants share
    one PEFT model, each with its own optimizer.
    """
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    base = _anonymous_copy(base)
    layout = _layout(base)  # before the FLOP-counted warm-up: the self-check runs once per model
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    shared_peft = peft_model(base, context)
    step = {impl: step_fn(impl, base, context, queries, model=None if impl == "cptune" else shared_peft)
            for impl in TRAIN_IMPLS}
    out = {impl: {"impl": impl, "times": [], "phases": [], "foreign": [], "losses": []} for impl in TRAIN_IMPLS}
    for impl in TRAIN_IMPLS:  # warm-up round, untimed, counts the executed FLOPs
        counter = flop_counter()
        with counter:
            step[impl]()
        out[impl]["executed_flops"] = counter.get_total_flops()
        out[impl]["flops_by_op"] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    waited = []
    for r in range(steps):
        waited.append(wait_for_quiet(quiet_wait))
        for impl in rotate(TRAIN_IMPLS, r):
            with ForeignCPU() as foreign:
                loss, tf, tb, to = step[impl]()
            cell = out[impl]
            cell["times"].append(tf + tb + to)
            cell["phases"].append((tf, tb, to))
            cell["foreign"].append(foreign.cores)
            cell["losses"].append(loss)
    return {"shots": shots, "batch": batch, "context_tokens": len(context),
            "context_labels": _context_label_count(context), "query_lengths": queries["attention_mask"].sum(1).tolist(),
            "padded_length": queries["input_ids"].shape[1], "quiet_waited_s": waited,
            "threads": torch.get_num_threads(), "dims": _model_dims(base), "layout": layout, "impls": out}


def worker_train_rss(impl: str, shots: int, batch: int) -> dict:
    """Peak RSS of one implementation training: a fresh process, load + one step (AdamW state included).

    Besides the absolute peak (``ru_maxrss``), the RSS of the loaded model is read just before the
    step (every weight page touched, the layout self-check done, the wrapper and optimizer built),
    then the peak mark is restarted there, so ``extra_mib`` is what the step adds on top.
    """
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    layout = _layout(base)
    step = step_fn(impl, base, context, queries)
    with torch.no_grad():  # weights may be memory-mapped from the file: make them all resident first
        for p in base.parameters():
            p.sum()
    rss_setup = peak_rss_gb()
    loaded = rss_mib()
    restarted = reset_peak_rss()
    times = [sum(step()[1:])]
    peak = peak_rss_mib() if restarted else peak_rss_gb() * 1024
    return {"impl": impl, "shots": shots, "batch": batch, "context_tokens": len(context),
            "query_tokens": int(queries["attention_mask"].sum()), "layout": layout, "rss_setup_gb": rss_setup,
            "peak_rss_gb": peak_rss_gb(), "loaded_mib": loaded, "step_peak_mib": peak,
            "extra_mib": peak - loaded, "peak_restarted": restarted, "step_s": times}


def _context_label_count(context) -> int:
    from cptune.cpt.roles import TokenRole

    return int((context.roles == TokenRole.LABEL).sum())


def _pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


@torch.no_grad()
def peft_batch_scores(model, rows: list[list[int]], first_label_ids: list[int], num_context: int, pad: int):
    """PEFT's forward on one batch (context re-encoded in every row); first label token's log-prob.

    Returns ``(len(rows), len(first_label_ids))`` on the model's device.
    """
    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in _pad_right(rows, pad))
    logits = model(input_ids=ids, attention_mask=mask).logits  # (b, N + T, V), right padding
    last = torch.tensor([num_context + len(r) - 1 for r in rows], device=device)
    rows_at = torch.arange(len(rows), device=device)
    return torch.log_softmax(logits[rows_at, last].float(), dim=-1)[:, first_label_ids]


def worker_classify(shots: int, batch: int, test_size: int, quiet_wait: float) -> dict:
    """Classify the test set three ways, alternating batch by batch: cached context, PEFT, queries alone.

    cptune's time is one context encoding plus its per-batch scoring with the reused cache, exactly
    what ``score_texts`` runs; ``score_texts`` itself is timed afterwards (one pass each, cptune and
    floor) and must give the same scores.
    """
    from cptune.scoring import encode_context, label_log_likelihoods, query_token_ids, score_texts
    from cptune.text.template import label_token_ids

    base, tok, template, context, _, test = _setup(shots)
    base = _anonymous_copy(base)  # shared by all three; neither wrapper changes it
    layout = _layout(base)
    texts = [ex.text for ex in test[:test_size]]
    delta = probe_delta(context, base.get_input_embeddings().weight.shape[1])
    ours = cptune_model(base, context)
    theirs = peft_model(base, context)
    theirs.eval()
    with torch.no_grad():
        ours.prompt_encoder.delta.copy_(delta)
        peft_delta(theirs).copy_(delta)
    labels = list(label_token_ids(template, tok, LABEL_WORDS).values())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rows = query_token_ids(texts, template, tok)  # tokenisation: the same for all three, not timed
    n = len(context)

    def ours_embeds():
        with torch.no_grad():
            return ours.context_embeddings()

    score = {
        "cptune": lambda chunk, cache: label_log_likelihoods(base, cache, chunk, labels, batch),
        "peft": lambda chunk, cache: peft_batch_scores(theirs, chunk, [ids[0] for ids in labels], n, pad),
        "floor": lambda chunk, cache: label_log_likelihoods(base, None, chunk, labels, batch),
    }
    for impl in CLASSIFY_IMPLS:  # warm-up
        score[impl](rows[:batch], encode_context(base, ours_embeds()))
    out = {impl: {"impl": impl, "seconds": 0.0, "parts": [], "foreign": []} for impl in CLASSIFY_IMPLS}
    t0 = time.perf_counter()
    cache = encode_context(base, ours_embeds())  # once per run: part of cptune's time
    out["cptune"]["seconds"] += time.perf_counter() - t0
    for k, start in enumerate(range(0, len(rows), batch)):
        if k % 5 == 0:
            wait_for_quiet(quiet_wait)
        for impl in rotate(CLASSIFY_IMPLS, k):
            with ForeignCPU() as foreign:
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
            "layout": layout, "impls": out}


def worker_agree(shots: int, batch: int) -> dict:
    """cptune (auto path, and the plain path as a control) vs PEFT: loss and delta gradient, float32."""
    from cptune import render_queries

    base, tok, template, context, extra, _ = _setup(shots)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    delta = probe_delta(context, base.get_input_embeddings().weight.shape[1])
    theirs = peft_model(copy.deepcopy(base), context)
    with torch.no_grad():
        peft_delta(theirs).copy_(delta)
    loss_t = theirs(**{k: v.clone() for k, v in queries.items()}).loss
    loss_t.backward()
    grad_t = peft_delta(theirs).grad.clone()
    ours = cptune_model(base, context)
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

    wait_for_quiet(QUIET_WAIT)
    with ForeignCPU() as foreign, profile(activities=[ProfilerActivity.CPU]) as prof:
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
    from cptune.scoring import encode_context, label_log_likelihoods, query_token_ids
    from cptune.text.template import label_token_ids

    base, tok, template, context, extra, test = _setup(shots)
    base = _anonymous_copy(base)
    queries = render_queries(extra[:batch], template, tok, LABEL_WORDS)
    result = {"shots": shots, "batch": batch, "impls": {}}
    for impl in TRAIN_IMPLS[:2]:
        step = step_fn(impl, base, context, queries)
        step()  # warm-up
        result["impls"][impl] = _profiled(step, top)
    labels = list(label_token_ids(template, tok, LABEL_WORDS).values())
    rows = query_token_ids([ex.text for ex in test[:classify_batches * 8]], template, tok)
    with torch.no_grad():
        cache = encode_context(base, cptune_model(base, context).context_embeddings())

    def scorer(context_cache):
        return lambda: label_log_likelihoods(base, context_cache, rows, labels, 8)

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
