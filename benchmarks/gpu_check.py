"""A short GPU check of the CUDA paths: CPT training on SmolLM2 in float32 and bfloat16, and the classifier.

    python benchmarks/gpu_check.py [--out gpu_check.json]

Prints one JSON object per dtype: median step time, peak GPU memory, first/last loss, whether the
shared-prefix loss equals the duplicated-context loss on the GPU, and that the delta stayed float32
and feasible. Then one for ``CPTClassifier`` with its defaults (device and dtype "auto"): where
it ran, and how far its probabilities are from the same classifier trained and scored on the CPU in
float32. Without a CUDA device it says so and exits 0 (nothing to check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def check(dtype: str, steps: int) -> dict:
    import cptune
    from cptune.data import load_dataset, sample_splits
    from cptune.models import load_model
    from cptune.training import TrainSettings, train

    base, tok = load_model(dtype=dtype, device="cuda")
    template = cptune.Template("input: {x} output: {y}")
    words = {"negative": "negative", "positive": "positive"}
    shots, extra, _ = sample_splits(load_dataset("rotten_tomatoes"), 8, 0, seed=0, extra_train=16)
    context = cptune.build_context(shots, template, tok, words)
    queries = cptune.render_queries(shots + extra, template, tok, words)
    model = cptune.get_cpt_model(base, context.to_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95,
                                                         opt_projection_epsilon=0.2))
    batch = {k: v[:8].cuda() for k, v in queries.items()}
    losses = {}
    for mode in ("never", "always"):
        model.prefix_sharing = mode
        with torch.no_grad():
            losses[mode] = model(**batch, return_logits=False).loss.item()
    model.prefix_sharing = "auto"
    times = []
    torch.cuda.reset_peak_memory_stats()

    def tick(step, loss):
        torch.cuda.synchronize()
        times.append(time.perf_counter())

    times.append(time.perf_counter())
    result = train(model, queries, TrainSettings(steps=steps, batch_size=8, lr=1e-3), progress=False, callback=tick)
    step_times = [b - a for a, b in zip(times[1:], times[2:], strict=False)]  # skip the first (warm-up) step
    return {
        "dtype": dtype,
        "device": torch.cuda.get_device_name(),
        "context_tokens": len(context),
        "batch_size": 8,
        "median_step_seconds": round(statistics.median(step_times), 4),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "loss_first_last": [round(result.losses[0], 4), round(result.losses[-1], 4)],
        "shared_vs_duplicated_loss": [losses["always"], losses["never"]],
        "delta_dtype": str(model.prompt_encoder.delta.dtype),
        "delta_feasible": model.prompt_encoder.is_feasible(),
    }


def check_classifier() -> dict:
    """The user's path: CPTClassifier() with device/dtype "auto" on the GPU, against the CPU in float32."""
    from cptune import CPTClassifier, TrainSettings
    from cptune.data import load_dataset, sample_splits

    shots, _, test = sample_splits(load_dataset("rotten_tomatoes"), 8, 32, seed=0)
    words = {"negative": "negative", "positive": "positive"}
    row: dict = {"check": "classifier"}
    probs = {}
    for name, options in (("auto", {}), ("cpu", {"device": "cpu", "dtype": "float32"}),
                          ("cuda_float32", {"device": "cuda", "dtype": "float32"})):
        clf = CPTClassifier(labels=words, train=TrainSettings(steps=10, batch_size=4, lr=1e-3), **options)
        start = time.perf_counter()
        clf.fit([ex.text for ex in shots], [ex.label for ex in shots])
        probs[name] = clf.predict_proba([ex.text for ex in test])
        row[f"{name}_placement"] = clf.placement_
        row[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
    row["max_prob_gap_cuda_float32_vs_cpu"] = float(abs(probs["cuda_float32"] - probs["cpu"]).max())
    row["max_prob_gap_auto_vs_cpu"] = float(abs(probs["auto"] - probs["cpu"]).max())
    row["same_predictions_auto_vs_cpu"] = float((probs["auto"].argmax(1) == probs["cpu"].argmax(1)).mean())
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU check was skipped (nothing ran)")
        return 0
    rows = [check(dtype, args.steps) for dtype in ("float32", "bfloat16")] + [check_classifier()]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
