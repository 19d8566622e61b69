"""A short GPU check of the CUDA paths: CPT training on SmolLM2 in float32 and bfloat16, and the classifier.

    python benchmarks/gpu_check.py [--out gpu_check.json]
    python benchmarks/gpu_check.py --model CONFIG_DIR --random-weights DIR --data rows.csv --out gpu_check.json

Prints one JSON object per dtype: median step time, peak GPU memory, first/last loss, whether the
shared-prefix loss equals the duplicated-context loss on the GPU, and that the delta stayed float32
and feasible. Then one for ``CPTClassifier`` with device and dtype "auto": where it ran, and how far
its probabilities are from the same classifier trained and scored on the CPU in float32 (the template
is fixed, so both score the same prompt). Without a CUDA device it says so and exits 0 (nothing to
check); ``--device cpu`` runs the same code on the CPU (a dry run of the script, not a GPU check).

``--model`` is any folder, name or hub id :func:`cptune.models.load_model` takes (default: the embedded
SmolLM2-135M-Instruct). With ``--random-weights DIR`` only its config and tokenizer are read: a model
of that shape with seeded random weights is saved in ``DIR`` and checked instead (for a machine the
real weights cannot reach; the losses and probabilities then say nothing about accuracy).
``--data`` is any source :func:`cptune.data.load_dataset` reads (default: ``rotten_tomatoes``); the
labels are their own label words.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

TEMPLATE = "input: {x} output: {y}"


def save_random_model(source: str, directory: Path, seed: int = 0) -> str:
    """Save a model shaped like ``source`` (its config and tokenizer) with seeded random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(source).save_pretrained(directory)
    return str(directory)


def _words(dataset) -> dict:
    return {label: str(label) for label in dataset.labels}


def check(model_path: str, data, device: str, dtype: str, steps: int) -> dict:
    import cptune
    from cptune.data import sample_splits
    from cptune.models import load_model
    from cptune.training import TrainSettings, train

    cuda = device.startswith("cuda")
    base, tok = load_model(model_path, dtype=dtype, device=device)
    template = cptune.Template(TEMPLATE)
    shots, extra, _ = sample_splits(data, 8, 0, seed=0, extra_train=16)
    context = cptune.build_context(shots, template, tok, _words(data))
    queries = cptune.render_queries(shots + extra, template, tok, _words(data))
    model = cptune.get_cpt_model(base, context.to_config(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95,
                                                         opt_projection_epsilon=0.2))
    batch = {k: v[:8].to(device) for k, v in queries.items()}
    losses = {}
    for mode in ("never", "always"):
        model.prefix_sharing = mode
        with torch.no_grad():
            losses[mode] = model(**batch, return_logits=False).loss.item()
    model.prefix_sharing = "auto"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def tick(step, loss):
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    times.append(time.perf_counter())
    result = train(model, queries, TrainSettings(steps=steps, batch_size=8, lr=1e-3), progress=False, callback=tick)
    step_times = [b - a for a, b in zip(times[1:], times[2:], strict=False)] or [times[-1] - times[0]]  # skip warm-up
    gap = abs(losses["always"] - losses["never"])
    return {
        "dtype": dtype,
        "device": torch.cuda.get_device_name() if cuda else device,
        "context_tokens": len(context),
        "batch_size": 8,
        "median_step_seconds": round(statistics.median(step_times), 4),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
        "loss_first_last": [round(result.losses[0], 4), round(result.losses[-1], 4)],
        "losses_finite": all(torch.isfinite(torch.tensor(result.losses)).tolist()),
        "shared_vs_duplicated_loss": [losses["always"], losses["never"]],
        "shared_vs_duplicated_relative_gap": gap / max(abs(losses["never"]), 1e-12),
        "delta_dtype": str(model.prompt_encoder.delta.dtype),
        "delta_feasible": model.prompt_encoder.is_feasible(),
    }


def check_classifier(model_path: str, data, device: str, steps: int) -> dict:
    """The user's path: CPTClassifier with device/dtype "auto" on the GPU, against the CPU in float32."""
    from cptune import CPTClassifier, TrainSettings
    from cptune.data import sample_splits

    shots, _, test = sample_splits(data, 8, 32, seed=0)
    row: dict = {"check": "classifier", "steps": steps}
    probs = {}
    settings = {"auto": {}, "cpu": {"device": "cpu", "dtype": "float32"}}
    if device != "cpu":
        settings[f"{device}_float32"] = {"device": device, "dtype": "float32"}
    for name, options in settings.items():
        clf = CPTClassifier(model_path, template=TEMPLATE, labels=_words(data),
                            train=TrainSettings(steps=steps, batch_size=4, lr=1e-3), **options)
        start = time.perf_counter()
        clf.fit([ex.text for ex in shots], [ex.label for ex in shots])
        probs[name] = clf.predict_proba([ex.text for ex in test])
        row[f"{name}_placement"] = clf.placement_
        row[f"{name}_seconds"] = round(time.perf_counter() - start, 2)
        row[f"{name}_delta_dtype"] = str(clf.cpt_model_.prompt_encoder.delta.dtype)
    for name in probs:
        if name != "cpu":
            row[f"max_prob_gap_{name}_vs_cpu"] = float(abs(probs[name] - probs["cpu"]).max())
            row[f"same_predictions_{name}_vs_cpu"] = float((probs[name].argmax(1) == probs["cpu"].argmax(1)).mean())
    row["cpu_prob_range"] = [float(probs["cpu"].min()), float(probs["cpu"].max())]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="training steps per dtype (default: 12)")
    parser.add_argument("--classifier-steps", type=int, default=10, help="CPTClassifier steps (default: 10)")
    parser.add_argument("--model", default=None, help="model folder, name or hub id (default: smollm2-135m)")
    parser.add_argument("--random-weights", type=Path, default=None, metavar="DIR",
                        help="save --model's shape with seeded random weights in DIR and check that")
    parser.add_argument("--data", default="rotten_tomatoes", help="built-in name or CSV/TSV/JSONL file")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a dry run")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the GPU check was skipped (nothing ran)")
        return 0
    from cptune.data import load_dataset
    from cptune.models import DEFAULT_MODEL

    model_path = args.model or DEFAULT_MODEL
    if args.random_weights is not None:
        model_path = save_random_model(model_path, args.random_weights)
        print(f"random weights of {args.model or DEFAULT_MODEL}'s shape saved in {model_path}")
    data = load_dataset(args.data)
    rows = []
    for dtype in ("float32", "bfloat16"):
        rows.append(check(model_path, data, args.device, dtype, args.steps))
        print(json.dumps(rows[-1]), flush=True)
    rows.append(check_classifier(model_path, data, args.device, args.classifier_steps))
    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": model_path, "random_weights": args.random_weights is not None, "data": args.data,
                       "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
