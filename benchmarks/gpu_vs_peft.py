"""cptune against PEFT's CPT on one device: training step time, GPU memory, parity and classification.

    PYTHONPATH=src python3 benchmarks/gpu_vs_peft.py --model .gpu/smollm2-135m-shape --random-weights /tmp/rw \\
        --data .gpu/rt64.csv --device cuda --out $OUT/gpu_vs_peft.json
    python benchmarks/gpu_vs_peft.py --model .gpu/smollm2-135m-shape --random-weights /tmp/rw --data .gpu/rt64.csv \\
        --device cpu --dtypes float32 --shots 4 --batches 1 --steps 2 --test-size 16    # a CPU dry run

For every dtype (the frozen base model in it; both deltas stay float32), context size (``--shots``
demonstrations from the data) and batch size, both implementations wrap the same base model with
the same context, CPT fields, training queries and learning rate (``benchmarks/cptbench``: the CPU
benchmark's builders and step function), and the script measures:

- training: the median time of ``--steps`` AdamW steps after ``WARMUP_STEPS`` untimed ones, the two
  implementations alternating step by step (synchronised on CUDA), with each one's peak GPU memory
  and what its steps added to the memory already allocated; the ratio PEFT / cptune;
- parity: both first-step losses, the first step's delta gradients, and both deltas after all the
  steps (PEFT's projected as its next forward would) - in float32 a loss gap above
  ``LOSS_TOLERANCE`` (relative) prints a FAIL line, but the run goes on;
- classification: the time to score ``--test-size`` texts (the rows not used as demonstrations or
  training queries, repeated as needed) with cptune's cached-context scorer
  (:class:`cptune.scoring.ContextScorer`, what ``score_texts`` and the classifier run: the context
  encoded once) against PEFT's model on every full sequence, both with the same fixed nonzero delta;
  the agreement of their predictions.

Progress goes to stderr, one line per measurement; ``--out`` gets one JSON file (rewritten after every
measurement, atomically): an environment block, the options, and one row per implementation and
measurement plus one comparison row. A measurement that raises is recorded as an error row and the
run goes on; once ``--max-seconds`` have passed the remaining ones are recorded as skipped.

``--model`` and ``--random-weights`` work as in ``benchmarks/gpu_check.py`` (with ``DIR`` only the
model's config and tokenizer are read: a model of that shape with seeded random weights is measured,
so the losses say nothing about accuracy). Without CUDA, ``--device cuda`` says so and exits 0.
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

from cptbench.settings import SEED, TEMPLATE_TEXT  # noqa: E402
from cptbench.workers import (  # noqa: E402
    cptune_model,
    peft_batch_scores,
    peft_delta,
    peft_model,
    probe_delta,
    rotate,
    step_fn,
)
from gpu_check import save_random_model  # noqa: E402

IMPLS = ("cptune", "peft")
WARMUP_STEPS = 2
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


def measure_training(base, context, queries: dict, steps: int, dtype: str, device: torch.device) -> list[dict]:
    """Both implementations on one base model, alternating step by step; one row each and a comparison."""
    models = {"cptune": cptune_model(base, context), "peft": peft_model(base, context)}
    step = {impl: step_fn(impl, base, context, queries, model=models[impl]) for impl in IMPLS}
    cells = {impl: {"losses": [], "times": [], "peak": [], "added": []} for impl in IMPLS}
    first_grads = {}
    for r in range(WARMUP_STEPS + steps):
        for impl in rotate(IMPLS, r):
            with Clock(device) as clock:
                loss = step[impl]()[0]
            cell = cells[impl]
            cell["losses"].append(loss)
            cell["peak"].append(clock.peak_gib)
            cell["added"].append(clock.added_gib)
            if r >= WARMUP_STEPS:
                cell["times"].append(clock.seconds)
            if r == 0:
                delta = models[impl].prompt_encoder.delta if impl == "cptune" else peft_delta(models[impl])
                first_grads[impl] = delta.grad.detach().float().clone()
    with torch.no_grad():
        ours = models["cptune"].prompt_encoder.delta.float()
        theirs = models["peft"].prompt_encoder["default"].get_projection().float()  # as its next forward sets it
        delta_gap = float((ours - theirs).abs().max())
        delta_scale = float(theirs.abs().max())
    grad_gap = float((first_grads["cptune"] - first_grads["peft"]).norm() / first_grads["peft"].norm().clamp(min=1e-30))
    rows = []
    for impl, cell in cells.items():
        rows.append({"kind": "train", "impl": impl, "median_step_s": round(statistics.median(cell["times"]), 5),
                     "step_s": [round(t, 5) for t in cell["times"]], "first_loss": cell["losses"][0],
                     "last_loss": cell["losses"][-1], "peak_gpu_gib": _max(cell["peak"]),
                     "step_added_gpu_gib": _max(cell["added"]),
                     "delta_dtype": str((models[impl].prompt_encoder.delta if impl == "cptune"
                                          else peft_delta(models[impl])).dtype)})
    first = {impl: cells[impl]["losses"][0] for impl in IMPLS}
    loss_gap = abs(first["cptune"] - first["peft"]) / max(abs(first["peft"]), 1e-30)
    ratio = rows[1]["median_step_s"] / rows[0]["median_step_s"]
    compare = {"kind": "train_compare", "peft_over_cptune": round(ratio, 3),
               "first_loss_rel_gap": loss_gap, "first_grad_rel_gap": grad_gap, "steps_compared": WARMUP_STEPS + steps,
               "delta_max_abs_gap": delta_gap, "delta_max_abs": delta_scale,
               "last_loss_gap": abs(cells["cptune"]["losses"][-1] - cells["peft"]["losses"][-1])}
    if dtype == "float32":
        compare["float32_loss_ok"] = loss_gap <= LOSS_TOLERANCE
    return [*rows, compare]


def measure_classification(base, tok, template, words: dict, context, texts: list[str], batch: int,
                           device: torch.device) -> list[dict]:
    """Score ``texts`` with cptune's cached context and with PEFT's full sequences; one row each and a comparison."""
    from cptune.scoring import ContextScorer, query_token_ids
    from cptune.text.template import label_token_ids

    ours, theirs = cptune_model(base, context), peft_model(base, context)
    theirs.eval()
    delta = probe_delta(context, base.get_input_embeddings().weight.shape[1])
    with torch.no_grad():
        ours.prompt_encoder.delta.copy_(delta)
        peft_delta(theirs).copy_(delta)
    rows = query_token_ids(texts, template, tok)  # tokenised once for both, untimed
    label_ids = list(label_token_ids(template, tok, words).values())
    first_ids = [ids[0] for ids in label_ids]  # PEFT's scores read the first label token only
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def score_cptune(chunk):
        with torch.no_grad():
            embeds = ours.context_embeddings()  # (1, N, d) in the base dtype
        return ContextScorer(base, tok, template, words, embeds, batch_size=batch).scores(chunk)

    def score_peft(chunk):
        return torch.cat([peft_batch_scores(theirs, chunk[s:s + batch], first_ids, len(context), pad)
                          for s in range(0, len(chunk), batch)])

    scorers = {"cptune": score_cptune, "peft": score_peft}
    out = {}
    for impl, score in scorers.items():
        score(rows[:batch])  # warm-up
        with Clock(device) as clock:
            scores = score(rows).float().cpu()
        out[impl] = {"kind": "classify", "impl": impl, "seconds": round(clock.seconds, 4),
                     "examples_per_s": round(len(rows) / clock.seconds, 2), "peak_gpu_gib": _max([clock.peak_gib]),
                     "added_gpu_gib": _max([clock.added_gib]), "scores": scores}
    a, b = out["cptune"].pop("scores"), out["peft"].pop("scores")
    ratio = out["peft"]["seconds"] / out["cptune"]["seconds"]
    compare = {"kind": "classify_compare", "peft_over_cptune": round(ratio, 3),
               "same_predictions": float((a.argmax(1) == b.argmax(1)).float().mean()),
               "max_abs_score_gap": float((a - b).abs().max()),
               "single_token_labels": all(len(ids) == 1 for ids in label_ids),
               "cptune_predicted_share": [round(float((a.argmax(1) == c).float().mean()), 3)
                                          for c in range(a.shape[1])]}
    return [out["cptune"], out["peft"], compare]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder, name or hub id (default: smollm2-135m)")
    parser.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                        help="save --model's shape with seeded random weights in DIR and measure that")
    parser.add_argument("--data", default="rotten_tomatoes", help="built-in name or CSV/TSV/JSONL file")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="base model dtypes (default: float32 bfloat16)")
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 16], help="context sizes (default: 4 16)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--steps", type=int, default=20, help=f"timed training steps after {WARMUP_STEPS} warm-up ones "
                        "(default: 20)")
    parser.add_argument("--test-size", type=int, default=256, help="texts scored per classification (default: 256)")
    parser.add_argument("--max-seconds", type=float, default=210.0,
                        help="skip the measurements not started after this many seconds (default: 210)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    for name in ("shots", "batches"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} {getattr(args, name)}: every value must be >= 1")
    if args.steps < 1 or args.test_size < 1:
        parser.error(f"--steps {args.steps} and --test-size {args.test_size} must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the GPU comparison was skipped (nothing ran)")
        return 0
    warnings.filterwarnings("ignore")
    from cptune import Template, build_context, render_queries
    from cptune.cpt.engine import layout_report
    from cptune.cpt.saving import write_json_atomic
    from cptune.data import load_dataset
    from cptune.models import DEFAULT_MODEL, load_model

    start = time.perf_counter()
    device = torch.device(args.device)
    model_path = args.model or DEFAULT_MODEL
    if args.random_weights is not None:
        model_path = save_random_model(model_path, args.random_weights, SEED)
        log(f"random weights of {args.model or DEFAULT_MODEL}'s shape saved in {model_path}")
    data = load_dataset(args.data)
    words = {label: str(label) for label in data.labels}
    template = Template(TEMPLATE_TEXT)
    result = {"environment": environment(device), "model": model_path,
              "random_weights": args.random_weights is not None, "data": args.data,
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "template": TEMPLATE_TEXT, "warmup_steps": WARMUP_STEPS, "rows": []}
    log(f"{result['environment']['device_name']}: torch {torch.__version__}, transformers "
        f"{result['environment']['transformers']}, peft {result['environment']['peft']}")

    def record(rows: list[dict]) -> None:
        result["rows"].extend(rows)
        result["elapsed_s"] = round(time.perf_counter() - start, 1)
        if args.out:
            write_json_atomic(args.out, result)

    for dtype in args.dtypes:
        base, tok = load_model(model_path, dtype=dtype, device=device)
        layout = layout_report(base)
        log(f"{dtype}: {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters; cptune's layout: {layout}")
        for shots in args.shots:
            demos, train_examples, texts, distinct = splits(data, shots, max(args.batches), args.test_size)
            context = build_context(demos, template, tok, words)
            for kind in ("train", "classify"):
                for batch in args.batches:
                    where = {"dtype": dtype, "shots": shots, "batch": batch, "context_tokens": len(context)}
                    label = f"{dtype} shots={shots} batch={batch} {kind}"
                    if time.perf_counter() - start > args.max_seconds:
                        log(f"{label}: skipped (past --max-seconds {args.max_seconds:g})")
                        record([{"kind": f"{kind}_compare", **where, "skipped": True}])
                        continue
                    t0 = time.perf_counter()
                    try:
                        if kind == "train":
                            queries = render_queries(train_examples[:batch], template, tok, words)
                            queries = {k: v.to(device) for k, v in queries.items()}
                            rows = measure_training(base, context, queries, args.steps, dtype, device)
                            extra = {"query_tokens": int(queries["attention_mask"].sum()), "layout": layout}
                        else:
                            rows = measure_classification(base, tok, template, words, context, texts, batch, device)
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
                    if rows[-1].get("float32_loss_ok") is False:
                        log(f"FAIL {label}: float32 first-step loss gap {rows[-1]['first_loss_rel_gap']:.2e} "
                            f"(relative) is above {LOSS_TOLERANCE:g}")
        del base
    result["summary"] = summary(result["rows"])
    record([])
    for line in result["summary"]:
        log(line)
    log(f"done in {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    return 0


def describe(rows: list[dict]) -> str:
    """One progress line for a measurement's rows (implementations first, the comparison last)."""
    c, p, compare = rows
    if compare["kind"] == "train_compare":
        memory = (f", peak {c['peak_gpu_gib']:.2f} / {p['peak_gpu_gib']:.2f} GiB"
                  if c["peak_gpu_gib"] is not None else "")
        return (f"step cptune {c['median_step_s']:.4f} s, peft {p['median_step_s']:.4f} s "
                f"(x{compare['peft_over_cptune']:.2f}); first loss {c['first_loss']:.6f} vs {p['first_loss']:.6f} "
                f"(rel {compare['first_loss_rel_gap']:.1e}), grad rel {compare['first_grad_rel_gap']:.1e}, "
                f"delta gap {compare['delta_max_abs_gap']:.1e} of {compare['delta_max_abs']:.1e}{memory}")
    return (f"{c['examples']} texts: cptune {c['seconds']:.3f} s, peft {p['seconds']:.3f} s "
            f"(x{compare['peft_over_cptune']:.2f}); same predictions {compare['same_predictions']:.3f}, "
            f"max score gap {compare['max_abs_score_gap']:.1e}")


def summary(rows: list[dict]) -> list[str]:
    """A compact table, one line per measurement: PEFT / cptune time and the parity figures."""
    lines = ["dtype     shots batch  kind      peft/cptune  parity"]
    for row in rows:
        if not row["kind"].endswith("_compare"):
            continue
        kind = row["kind"].removesuffix("_compare")
        head = f"{row['dtype']:<9} {row['shots']:>5} {row['batch']:>5}  {kind:<9}"
        if "error" in row or row.get("skipped"):
            lines.append(f"{head} {'skipped' if row.get('skipped') else 'ERROR ' + row['error'][:60]}")
        elif kind == "train":
            fail = "  FAIL" if row.get("float32_loss_ok") is False else ""
            lines.append(f"{head} {row['peft_over_cptune']:>11.2f}  loss rel {row['first_loss_rel_gap']:.1e}, "
                         f"delta gap {row['delta_max_abs_gap']:.1e}{fail}")
        else:
            lines.append(f"{head} {row['peft_over_cptune']:>11.2f}  same predictions {row['same_predictions']:.3f}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
