"""cptune against PEFT's CPT on one device: training step time, GPU memory, parity and classification.

    # the prepared GPU run (benchmarks/gpu_bench.sh sets it up; about 9 minutes on an H100):
    python3 benchmarks/gpu_vs_peft.py --shapes smollm2-135m smollm2-360m llama-3.2-1b --tokenizer .gpu/tokenizer \\
        --data .gpu/rt.csv --device cuda --batches 1 8 32 --layouts auto packed onepass padded \\
        --max-seconds 480 --out $OUT/gpu_vs_peft.json --markdown $OUT/gpu_vs_peft.md
    # the same code as a CPU dry run, on a tiny shape (a minute):
    python benchmarks/gpu_vs_peft.py --shapes tiny --tokenizer .gpu/tokenizer --data .gpu/rt.csv --device cpu \\
        --dtypes float32 --shots 4 --batches 1 8 --steps 2 --test-size 16 --layouts auto packed onepass padded
    # a model folder instead of a shape (its config and tokenizer; seeded random weights):
    python3 benchmarks/gpu_vs_peft.py --model .gpu/smollm2-135m-shape --random-weights /tmp/rw --data .gpu/rt64.csv

For every model (``--shapes``: random weights in a published model's shape, :data:`SHAPES`; or
``--model``), dtype (the frozen base model in it; the deltas stay float32), context size (``--shots``
demonstrations from the data) and batch size, every implementation wraps the same base model with
the same context, CPT fields, training queries and learning rate (``benchmarks/cptbench``: the CPU
benchmark's builders and step function). The implementations are PEFT and cptune in each of
``--layouts`` (``auto``: what ``cptune.cpt.engine`` picks, row ``cptune``; a named layout: row
``cptune-LAYOUT``, with the context shared at every batch size, batch 1 included), and with
``--compile`` also ``cptune-compiled`` (``auto`` with ``torch.compile``). The script measures:

- training: the median time of up to ``--steps`` AdamW steps after ``WARMUP_STEPS`` untimed ones
  (fewer once a cell has run ``--cell-seconds``, at least ``MIN_STEPS``), the implementations
  alternating step by step in rotating order (synchronised on CUDA), with each one's peak GPU memory
  and what its steps added to the memory already allocated; per cptune row, the ratio PEFT / cptune.
  An implementation that runs out of memory is recorded as such and the others go on;
- parity: both first-step losses, the first step's delta gradients, and both deltas after all the
  steps (PEFT's projected as its next forward would) - in float32 a loss gap above
  ``LOSS_TOLERANCE`` (relative) prints a FAIL line, but the run goes on;
- classification: the time to score ``--test-size`` texts (the rows not used as demonstrations or
  training queries, repeated as needed) with cptune's cached-context scorer
  (:class:`cptune.scoring.ContextScorer`, what ``score_texts`` and the classifier run: the context
  encoded once) against PEFT's model on every full sequence, both with the same fixed nonzero delta;
  the agreement of their predictions.

Progress goes to stderr, one line per measurement; ``--out`` gets one JSON file (rewritten after every
measurement, atomically, so a run cut short keeps what it measured): an environment block, the
options, and one row per implementation and measurement plus comparison rows; ``--markdown`` the
tables for docs/scaling.md (also rewritten after every measurement). A measurement that raises is
recorded as an error row and the run goes on; once ``--max-seconds`` have passed the remaining ones
are recorded as skipped. The cells run in the order of ``--shapes``, then dtype, shots, batch.

With ``--shapes`` the weights are seeded random ones built on the device (weights cannot travel to a
GPU machine), the text is tokenised by ``--tokenizer`` (a folder; SmolLM2's tokenizer, 49,152 ids,
for every shape: Llama-3.2-1B's larger vocabulary keeps its embedding and LM-head cost, only ids
below 49,152 occur), so the losses say nothing about accuracy. ``--model`` and ``--random-weights``
work as in ``benchmarks/gpu_check.py``. Without CUDA, ``--device cuda`` says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

try:
    import cptune  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cptbench.settings import CPT_FIELDS, SEED, TEMPLATE_TEXT  # noqa: E402
from cptbench.workers import (  # noqa: E402
    peft_batch_scores,
    peft_delta,
    peft_model,
    probe_delta,
    rotate,
    step_fn,
)
from gpu_check import save_random_model  # noqa: E402

WARMUP_STEPS = 2
MIN_STEPS = 3  # timed steps a cell keeps even past --cell-seconds
LAYOUT_CHOICES = ("auto", "packed", "onepass", "padded")

# Published shapes (each model's config.json on the Hugging Face hub: HuggingFaceTB/SmolLM2-135M,
# HuggingFaceTB/SmolLM2-360M, meta-llama/Llama-3.2-1B; SmolLM2-135M's also matches the embedded
# model's converted config). All are Llama-architecture models with tied input/output embeddings.
# Llama-3.2-1B's "llama3" RoPE frequency scaling is left out: it changes no tensor shape or cost.
# "tiny" is for dry runs (its vocabulary is the tokenizer's).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         intermediate_size=2560, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=None, max_position_embeddings=8192, rope_theta=10000.0),
}
LOSS_TOLERANCE = 1e-4  # float32 first-step loss gap, relative to PEFT's loss
GIB = 2**30


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    import cptune

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "peft": peft.__version__, "cptune": cptune.__version__,
           "cptune_path": str(Path(cptune.__file__).parent), "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   device_memory_gib=round(props.total_memory / GIB, 1))
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


class Clock:
    """Wall time of a block, synchronised on CUDA; and the peak memory it allocated there."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.seconds = 0.0
        self.peak_gib = self.added_gib = None

    def __enter__(self) -> Clock:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated = torch.cuda.memory_allocated(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device is not None:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        if self.device is not None:
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_gib, self.added_gib = peak / GIB, (peak - self.allocated) / GIB


def _max(values) -> float | None:
    values = [v for v in values if v is not None]
    return round(max(values), 4) if values else None


def splits(data, shots: int, num_queries: int, test_size: int):
    """Demonstrations, ``num_queries`` training queries, and ``test_size`` test texts from the other rows.

    The test texts are the rows neither shown nor trained on, in file order, repeated to ``test_size``.
    """
    from cptune.data import sample_splits

    classes = len(data.labels)
    extra = -(-num_queries // classes) * classes  # sample_splits takes a multiple of the class count
    demos, queries, _ = sample_splits(data, shots, 0, seed=SEED, extra_train=extra)
    used = {ex.text for ex in demos + queries}
    rest = [ex.text for ex in data.examples if ex.text not in used]
    if not rest:
        raise ValueError(f"{shots} shots and {extra} training queries leave no row of the data for testing")
    return demos, queries[:num_queries], [rest[i % len(rest)] for i in range(test_size)], len(rest)


def cptune_variants(layouts: list[str], compiled: bool) -> list[tuple[str, str, bool]]:
    """``(row name, layout, compiled)`` of each cptune implementation measured."""
    variants = [("cptune" if layout == "auto" else f"cptune-{layout}", layout, False) for layout in layouts]
    if compiled:
        variants.append(("cptune-compiled", "auto", True))
    return variants


def build_cptune(base, context, layout: str):
    """cptune's CPT model for one layout; a named layout shares the context at batch 1 too."""
    from cptune import get_cpt_model

    return get_cpt_model(base, context.to_config(**CPT_FIELDS), query_layout=layout,
                         prefix_sharing="auto" if layout == "auto" else "always")


def measure_training(base, context, queries: dict, steps: int, dtype: str, device: torch.device,
                     variants: list[tuple[str, str, bool]], cell_seconds: float = float("inf")) -> list[dict]:
    """Every implementation on one base model, alternating step by step; one row each and comparisons."""
    models = {name: build_cptune(base, context, layout) for name, layout, _ in variants}
    for name, _, compile_it in variants:
        models[name].compile_(compile_it)
    models["peft"] = peft_model(base, context)
    impls = tuple(models)
    step = {name: step_fn("peft" if name == "peft" else "cptune", base, context, queries, model=model)
            for name, model in models.items()}
    cells = {impl: {"losses": [], "times": [], "warmup": [], "peak": [], "added": [], "error": None} for impl in impls}
    first_grads = {}
    started = time.perf_counter()
    for r in range(WARMUP_STEPS + steps):
        if r >= WARMUP_STEPS + MIN_STEPS and time.perf_counter() - started > cell_seconds:
            break
        for impl in rotate(impls, r):
            cell = cells[impl]
            if cell["error"]:
                continue
            try:
                with Clock(device) as clock:
                    loss = step[impl]()[0]
            except torch.OutOfMemoryError:
                cell["error"] = "out of memory"
                models[impl].zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            cell["losses"].append(loss)
            cell["peak"].append(clock.peak_gib)
            cell["added"].append(clock.added_gib)
            (cell["times"] if r >= WARMUP_STEPS else cell["warmup"]).append(clock.seconds)
            if r == 0:
                first_grads[impl] = _delta(models[impl], impl).grad.detach().float().clone()
    rows = []
    for impl, cell in cells.items():
        row = {"kind": "train", "impl": impl, "delta_dtype": str(_delta(models[impl], impl).dtype)}
        if impl != "peft":
            row["layout"] = models[impl].query_layout_report()
        if cell["error"] or not cell["times"]:
            rows.append({**row, "error": cell["error"] or "no timed step"})
            continue
        rows.append({**row, "median_step_s": round(statistics.median(cell["times"]), 5),
                     "step_s": [round(t, 5) for t in cell["times"]], "first_loss": cell["losses"][0],
                     "warmup_step_s": [round(t, 4) for t in cell["warmup"]],  # with --compile: the compiling
                     "last_loss": cell["losses"][-1], "peak_gpu_gib": _max(cell["peak"]),
                     "step_added_gpu_gib": _max(cell["added"])})
    by_impl = {row["impl"]: row for row in rows}
    peft_row = by_impl["peft"]
    with torch.no_grad():
        theirs = models["peft"].prompt_encoder["default"].get_projection().float()  # as its next forward sets it
    compares = []
    for name, _, _ in variants:
        ours_row = by_impl[name]
        compare = {"kind": "train_compare", "impl": name, "steps_compared": len(cells[name]["losses"])}
        if "error" in ours_row or "error" in peft_row:
            compares.append({**compare, "error": ours_row.get("error") and f"{name}: {ours_row['error']}"
                             or f"peft: {peft_row['error']}"})
            continue
        ours = models[name].prompt_encoder.delta.float()
        loss_gap = abs(ours_row["first_loss"] - peft_row["first_loss"]) / max(abs(peft_row["first_loss"]), 1e-30)
        grad_gap = (first_grads[name] - first_grads["peft"]).norm() / first_grads["peft"].norm().clamp(min=1e-30)
        compare.update(peft_over_cptune=round(peft_row["median_step_s"] / ours_row["median_step_s"], 3),
                       first_loss_rel_gap=loss_gap, first_grad_rel_gap=float(grad_gap),
                       delta_max_abs_gap=float((ours - theirs).abs().max()), delta_max_abs=float(theirs.abs().max()),
                       last_loss_gap=abs(ours_row["last_loss"] - peft_row["last_loss"]))
        if len(cells[name]["losses"]) != len(cells["peft"]["losses"]):
            compare["delta_max_abs_gap"] = None  # different step counts: the deltas are not comparable
        if peft_row["peak_gpu_gib"] is not None:
            compare["memory_cptune_over_peft"] = round(ours_row["peak_gpu_gib"] / peft_row["peak_gpu_gib"], 3)
        if dtype == "float32":
            compare["float32_loss_ok"] = loss_gap <= LOSS_TOLERANCE
        compares.append(compare)
    return [*rows, *compares]


def _delta(model, impl: str) -> torch.nn.Parameter:
    return peft_delta(model) if impl == "peft" else model.prompt_encoder.delta


def measure_classification(base, tok, template, words: dict, context, texts: list[str], batch: int,
                           device: torch.device, variants: list[tuple[str, str, bool]]) -> list[dict]:
    """Score ``texts`` with cptune's cached context (each variant) and with PEFT's full sequences; one row
    each and comparisons."""
    from cptune.scoring import ContextScorer, query_token_ids
    from cptune.text.template import label_token_ids

    ours, theirs = build_cptune(base, context, "auto"), peft_model(base, context)
    theirs.eval()
    delta = probe_delta(context, base.get_input_embeddings().weight.shape[1])
    with torch.no_grad():
        ours.prompt_encoder.delta.copy_(delta)
        peft_delta(theirs).copy_(delta)
    rows = query_token_ids(texts, template, tok)  # tokenised once for all, untimed
    label_ids = list(label_token_ids(template, tok, words).values())
    first_ids = [ids[0] for ids in label_ids]  # PEFT's scores read the first label token only
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def cptune_scorer(layout, compile_it):
        def score(chunk):
            with torch.no_grad():
                embeds = ours.context_embeddings()  # (1, N, d) in the base dtype
            return ContextScorer(base, tok, template, words, embeds, batch_size=batch, layout=layout,
                                 compile=compile_it).scores(chunk)
        return score

    def score_peft(chunk):
        return torch.cat([peft_batch_scores(theirs, chunk[s:s + batch], first_ids, len(context), pad)
                          for s in range(0, len(chunk), batch)])

    scorers = {name: cptune_scorer(layout, compile_it) for name, layout, compile_it in variants}
    scorers["peft"] = score_peft
    out = {}
    for impl, score in scorers.items():
        try:
            score(rows[:batch])  # warm-up
            with Clock(device) as clock:
                scores = score(rows).float().cpu()
        except torch.OutOfMemoryError:
            out[impl] = {"kind": "classify", "impl": impl, "error": "out of memory"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        out[impl] = {"kind": "classify", "impl": impl, "seconds": round(clock.seconds, 4),
                     "examples_per_s": round(len(rows) / clock.seconds, 2), "peak_gpu_gib": _max([clock.peak_gib]),
                     "added_gpu_gib": _max([clock.added_gib]), "scores": scores}
    b = out["peft"].pop("scores", None)
    compares = []
    for name, _, _ in variants:
        a = out[name].pop("scores", None)
        compare = {"kind": "classify_compare", "impl": name}
        if a is None or b is None:
            compares.append({**compare, "error": out[name].get("error") or out["peft"].get("error")})
            continue
        compare.update(peft_over_cptune=round(out["peft"]["seconds"] / out[name]["seconds"], 3),
                       same_predictions=float((a.argmax(1) == b.argmax(1)).float().mean()),
                       max_abs_score_gap=float((a - b).abs().max()),
                       single_token_labels=all(len(ids) == 1 for ids in label_ids),
                       cptune_predicted_share=[round(float((a.argmax(1) == c).float().mean()), 3)
                                               for c in range(a.shape[1])])
        compares.append(compare)
    return [*out.values(), *compares]


def shape_model(shape: str, tokenizer_dir: str, dtype: str, device: torch.device):
    """A seeded random-weight Llama of a published shape (:data:`SHAPES`), built on ``device``, and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from cptune.models import resolve_dtype

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dims = dict(SHAPES[shape])
    theta = dims.pop("rope_theta")
    dims["vocab_size"] = dims["vocab_size"] or len(tok)
    if dims["vocab_size"] < len(tok):
        raise ValueError(f"shape {shape} has {dims['vocab_size']} token ids but the tokenizer {len(tok)}")
    config = LlamaConfig(**dims, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": theta},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(SEED)
    with device:  # initialised where it runs: a 1B model's random init on the host CPU would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype))
    return model.eval(), tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder, name or hub id (default: smollm2-135m)")
    parser.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                        help="save --model's shape with seeded random weights in DIR and measure that")
    parser.add_argument("--shapes", nargs="+", default=None, choices=list(SHAPES),
                        help="random-weight models of these published shapes instead of --model")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --shapes")
    parser.add_argument("--data", default="rotten_tomatoes", help="built-in name or CSV/TSV/JSONL file")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="base model dtypes (default: float32 bfloat16)")
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16], help="context sizes (default: 4 16)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--layouts", nargs="+", default=["auto"], choices=LAYOUT_CHOICES,
                        help="cptune's query layouts to measure (default: auto)")
    parser.add_argument("--compile", action="store_true", help="also measure cptune (auto) under torch.compile")
    parser.add_argument("--steps", type=int, default=20, help=f"timed training steps after {WARMUP_STEPS} warm-up ones "
                        "(default: 20)")
    parser.add_argument("--cell-seconds", type=float, default=float("inf"),
                        help=f"end a training cell's rounds after this many seconds ({MIN_STEPS} timed steps at least)")
    parser.add_argument("--classify-batches", nargs="+", type=int, default=None,
                        help="batch sizes of the classification runs (default: --batches)")
    parser.add_argument("--test-size", type=int, default=256, help="texts scored per classification (default: 256)")
    parser.add_argument("--max-seconds", type=float, default=210.0,
                        help="skip the measurements not started after this many seconds (default: 210)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables for docs/scaling.md here")
    args = parser.parse_args(argv)
    for name in ("shots", "batches", "classify_batches"):
        values = getattr(args, name)
        if values is not None and min(values) < 1:
            parser.error(f"--{name.replace('_', '-')} {values}: every value must be >= 1")
    if args.steps < 1 or args.test_size < 1:
        parser.error(f"--steps {args.steps} and --test-size {args.test_size} must be >= 1")
    if args.shapes and (args.model or args.random_weights):
        parser.error("--shapes builds its own models: give it without --model and --random-weights")
    if args.shapes and not args.tokenizer:
        parser.error("--shapes needs --tokenizer DIR (a tokenizer folder, e.g. SmolLM2's)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the GPU comparison was skipped (nothing ran)")
        return 0
    warnings.filterwarnings("ignore")
    from cptune import Template, build_context, render_queries
    from cptune.cpt.engine import layout_report
    from cptune.cpt.saving import write_json_atomic, write_text_atomic
    from cptune.data import load_dataset
    from cptune.models import DEFAULT_MODEL, load_model

    start = time.perf_counter()
    device = torch.device(args.device)
    variants = cptune_variants(args.layouts, args.compile)
    if args.shapes:
        models = [(shape, lambda dtype, shape=shape: shape_model(shape, args.tokenizer, dtype, device))
                  for shape in args.shapes]
    else:
        model_path = args.model or DEFAULT_MODEL
        if args.random_weights is not None:
            model_path = save_random_model(model_path, args.random_weights, SEED)
            log(f"random weights of {args.model or DEFAULT_MODEL}'s shape saved in {model_path}")
        models = [(model_path, lambda dtype: load_model(model_path, dtype=dtype, device=device))]
    data = load_dataset(args.data)
    words = {label: str(label) for label in data.labels}
    template = Template(TEMPLATE_TEXT)
    result = {"environment": environment(device), "model": args.shapes or models[0][0],
              "random_weights": bool(args.shapes) or args.random_weights is not None, "data": args.data,
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "shapes": {s: SHAPES[s] for s in args.shapes or []},
              "template": TEMPLATE_TEXT, "warmup_steps": WARMUP_STEPS, "rows": []}
    log(f"{result['environment']['device_name']}: torch {torch.__version__}, transformers "
        f"{result['environment']['transformers']}, peft {result['environment']['peft']}")

    def record(rows: list[dict]) -> None:
        result["rows"].extend(rows)
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        if args.out:
            write_json_atomic(args.out, result)
        if args.markdown:
            write_text_atomic(args.markdown, markdown(result))

    for model_name, build in models:
        for dtype in args.dtypes:
            if time.perf_counter() - start > args.max_seconds:
                log(f"{model_name} {dtype}: skipped (past --max-seconds {args.max_seconds:g})")
                record([{"kind": "model", "model": model_name, "dtype": dtype, "skipped": True}])
                continue
            try:
                base, tok = build(dtype)
            except Exception as err:  # noqa: BLE001 - e.g. a shape that does not fit: the others go on
                log(f"{model_name} {dtype}: ERROR {type(err).__name__}: {err}")
                record([{"kind": "model", "model": model_name, "dtype": dtype,
                         "error": f"{type(err).__name__}: {err}"}])
                continue
            layout = layout_report(base)
            parameters = sum(p.numel() for p in base.parameters())
            record([{"kind": "model", "model": model_name, "dtype": dtype, "parameters": parameters, "layout": layout}])
            log(f"{model_name} {dtype}: {parameters / 1e6:.0f}M parameters; cptune's layout: {layout}")
            for shots in args.shots:
                demos, train_examples, texts, distinct = splits(data, shots, max(args.batches), args.test_size)
                context = build_context(demos, template, tok, words)
                cells = [("train", b) for b in args.batches] + [("classify", b) for b in
                                                                args.classify_batches or args.batches]
                for kind, batch in cells:
                    where = {"model": model_name, "dtype": dtype, "shots": shots, "batch": batch,
                             "context_tokens": len(context)}
                    label = f"{model_name} {dtype} shots={shots} batch={batch} {kind}"
                    if time.perf_counter() - start > args.max_seconds:
                        log(f"{label}: skipped (past --max-seconds {args.max_seconds:g})")
                        record([{"kind": f"{kind}_compare", **where, "skipped": True}])
                        continue
                    t0 = time.perf_counter()
                    try:
                        if kind == "train":
                            queries = render_queries(train_examples[:batch], template, tok, words)
                            queries = {k: v.to(device) for k, v in queries.items()}
                            rows = measure_training(base, context, queries, args.steps, dtype, device, variants,
                                                    args.cell_seconds)
                            extra = {"query_tokens": int(queries["attention_mask"].sum()), "layout": layout}
                        else:
                            rows = measure_classification(base, tok, template, words, context, texts, batch, device,
                                                          variants)
                            extra = {"examples": len(texts), "distinct_texts": distinct}
                    except Exception as err:  # noqa: BLE001 - one failed measurement must not end the run
                        log(f"{label}: ERROR {type(err).__name__}: {err}\n{traceback.format_exc()}")
                        record([{"kind": f"{kind}_compare", **where, "error": f"{type(err).__name__}: {err}"}])
                        continue
                    finally:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    rows = [{**where, **extra, **row} for row in rows]
                    record(rows)
                    log(f"{label}: {describe(rows)} [{time.perf_counter() - t0:.1f} s]")
                    for row in rows:
                        if row.get("float32_loss_ok") is False:
                            log(f"FAIL {label} {row['impl']}: float32 first-step loss gap "
                                f"{row['first_loss_rel_gap']:.2e} (relative) is above {LOSS_TOLERANCE:g}")
            del base
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["summary"] = summary(result["rows"])
    record([])
    for line in result["summary"]:
        log(line)
    log(f"done in {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 0


def describe(rows: list[dict]) -> str:
    """One progress line for a measurement's rows (implementations first, the comparisons after)."""
    impls = {r["impl"]: r for r in rows if r["kind"] in ("train", "classify")}
    compares = [r for r in rows if r["kind"].endswith("_compare")]
    peft = impls["peft"]
    if compares[0]["kind"] == "train_compare":
        parts = [f"peft {_seconds(peft, 'median_step_s')}{_memory(peft)}"]
        for c in compares:
            ours = impls[c["impl"]]
            if "error" in c:
                parts.append(f"{c['impl']} ERROR {c['error']}")
                continue
            parts.append(f"{c['impl']} {_seconds(ours, 'median_step_s')} (x{c['peft_over_cptune']:.2f}, loss rel "
                         f"{c['first_loss_rel_gap']:.1e}, grad rel {c['first_grad_rel_gap']:.1e}){_memory(ours)}")
        return "step " + "; ".join(parts)
    parts = [f"peft {_seconds(peft, 'seconds')}"]
    for c in compares:
        if "error" in c:
            parts.append(f"{c['impl']} ERROR {c['error']}")
            continue
        parts.append(f"{c['impl']} {_seconds(impls[c['impl']], 'seconds')} (x{c['peft_over_cptune']:.2f}, same "
                     f"predictions {c['same_predictions']:.3f}, max score gap {c['max_abs_score_gap']:.1e})")
    return f"{impls[compares[0]['impl']].get('examples', '')} texts: " + "; ".join(parts)


def _seconds(row: dict, key: str) -> str:
    return f"{row[key]:.4f} s" if key in row else row.get("error", "-")


def _memory(row: dict) -> str:
    return f", peak {row['peak_gpu_gib']:.2f} GiB" if row.get("peak_gpu_gib") is not None else ""


def summary(rows: list[dict]) -> list[str]:
    """A compact table, one line per comparison: PEFT / cptune time and the parity figures."""
    lines = ["model          dtype     shots batch  kind      impl             peft/cptune  parity"]
    for row in rows:
        if not row["kind"].endswith("_compare"):
            continue
        kind = row["kind"].removesuffix("_compare")
        head = (f"{str(row['model'])[-14:]:<14} {row['dtype']:<9} {row['shots']:>5} {row['batch']:>5}  {kind:<9} "
                f"{row.get('impl', ''):<16}")
        if "error" in row or row.get("skipped"):
            lines.append(f"{head} {'skipped' if row.get('skipped') else 'ERROR ' + str(row['error'])[:60]}")
        elif kind == "train":
            fail = "  FAIL" if row.get("float32_loss_ok") is False else ""
            gap = row["delta_max_abs_gap"]
            lines.append(f"{head} {row['peft_over_cptune']:>11.2f}  loss rel {row['first_loss_rel_gap']:.1e}, "
                         f"delta gap {'-' if gap is None else f'{gap:.1e}'}{fail}")
        else:
            lines.append(f"{head} {row['peft_over_cptune']:>11.2f}  same predictions {row['same_predictions']:.3f}")
    return lines


def markdown(result: dict) -> str:
    """The training and classification tables for docs/scaling.md from the rows measured so far."""
    env = result["environment"]
    lines = [f"Device: {env['device_name']} ({env['device']}); torch {env['torch']}, CUDA {env['cuda']}, "
             f"transformers {env['transformers']}, PEFT {env['peft']}; {result.get('elapsed_s', 0):.0f} s so far.", ""]
    cells: dict[tuple, dict] = {}
    for row in result["rows"]:
        if row["kind"] in ("train", "classify", "train_compare", "classify_compare"):
            key = (row["kind"].removesuffix("_compare"), row["model"], row["dtype"], row["shots"], row["batch"])
            cell = cells.setdefault(key, {"context_tokens": row.get("context_tokens"), "impls": {}, "compare": {}})
            if row.get("skipped") or ("error" in row and "impl" not in row):
                cell["note"] = "skipped" if row.get("skipped") else f"error: {row['error'][:50]}"
            elif row["kind"].endswith("_compare"):
                cell["compare"][row["impl"]] = row
            else:
                cell["impls"][row["impl"]] = row
    names = [name for name, _, _ in cptune_variants(result["options"]["layouts"], result["options"]["compile"])]
    for kind, key, title in (("train", "median_step_s", "Training step, median s (PEFT / cptune in parentheses)"),
                             ("classify", "seconds", f"Classification of {result['options']['test_size']} texts, s")):
        lines += [f"**{title}**", "", "| model | dtype | shots (ctx) | batch | PEFT | " + " | ".join(names)
                  + (" | peak GiB PEFT / " + " / ".join(names) if kind == "train" else "") + " |"]
        lines.append("|" + "---|" * (5 + len(names) + (kind == "train")))
        for (k, model, dtype, shots, batch), cell in cells.items():
            if k != kind:
                continue
            head = f"| {model} | {dtype} | {shots} ({cell['context_tokens']}) | {batch} |"
            if "note" in cell:
                lines.append(f"{head} {cell['note']} |" + " |" * (len(names) + (kind == "train")))
                continue
            peft = cell["impls"].get("peft", {})
            row = [f"{peft[key]:.3f}" if key in peft else peft.get("error", "-")]
            for name in names:
                ours, compare = cell["impls"].get(name, {}), cell["compare"].get(name, {})
                if key in ours and "peft_over_cptune" in compare:
                    row.append(f"{ours[key]:.3f} (**{compare['peft_over_cptune']:.2f}**)")
                else:
                    row.append(f"{ours[key]:.3f}" if key in ours else ours.get("error", "-"))
            if kind == "train":
                peaks = [cell["impls"].get(n, {}).get("peak_gpu_gib") for n in ["peft", *names]]
                row.append(" / ".join("-" if p is None else f"{p:.2f}" for p in peaks))
            lines.append(f"{head} {' | '.join(row)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
