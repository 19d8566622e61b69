"""The main job: zero-shot vs ICL vs CPT on a balanced k-shot split of a built-in dataset."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cptune.config import CPTConfig
from cptune.context import build_context, render_queries
from cptune.data import load_dataset, sample_splits
from cptune.evaluate import classification_metrics, score_texts
from cptune.model import get_cpt_model
from cptune.pretrained import DEFAULT_MODEL, load_model
from cptune.template import Template
from cptune.training import TrainSettings, train

DATASET_TEMPLATES = {
    "rotten_tomatoes": ("input: {x} output: {y}", {"negative": "negative", "positive": "positive"}),
}


@dataclass(frozen=True)
class DemoSettings:
    """Settings of the main job (defaults: the paper's SST-2 demo, scaled to a 2-core CPU).

    The demonstrations are the only labelled data: CPT trains with each of them as a query
    after the context, as the paper does with very few examples.
    """

    model: str = DEFAULT_MODEL
    dataset: str = "rotten_tomatoes"
    shots: int = 4
    test_size: int = 200
    seed: int = 0
    steps: int = 40
    batch_size: int = 4
    lr: float = 1e-3
    eps_input: float = 0.2
    eps_format: float = 0.1
    decay: float = 0.95
    output: str = "runs/demo"

    def __post_init__(self) -> None:
        # Check everything before the first minute of work, not after it.
        if self.dataset not in DATASET_TEMPLATES:
            raise ValueError(f"unknown dataset {self.dataset!r}; the demo knows: {', '.join(DATASET_TEMPLATES)}")
        for name in ("shots", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        self.train_settings()
        CPTConfig(opt_weighted_loss_type="decay", opt_loss_decay_factor=self.decay,
                  opt_projection_epsilon=self.eps_input, opt_projection_format_epsilon=self.eps_format)

    def train_settings(self) -> TrainSettings:
        """The CPT training settings of this run."""
        return TrainSettings(steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed)


def _accuracy_row(name, scores, gold, labels, seconds) -> dict:
    predicted = scores.argmax(dim=-1).tolist()
    metrics = classification_metrics(predicted, gold, len(labels))
    return {"method": name, **metrics, "seconds": round(seconds, 1)}


def run_demo(settings: DemoSettings, progress: bool = True) -> dict:
    """Run the main job; write ``adapter/`` and ``results.json`` under ``settings.output``."""
    torch.manual_seed(settings.seed)
    fmt, label_words = DATASET_TEMPLATES[settings.dataset]
    template = Template(fmt)
    dataset = load_dataset(settings.dataset)
    shots, _, test = sample_splits(dataset, settings.shots, settings.test_size, settings.seed)
    base, tokenizer = load_model(settings.model)
    labels = list(label_words)
    gold = [labels.index(ex.label) for ex in test]
    texts = [ex.text for ex in test]
    rows = []

    def timed(name, context_embeds):
        start = time.perf_counter()
        scores = score_texts(base, tokenizer, template, label_words, texts, context_embeds)
        rows.append(_accuracy_row(name, scores, gold, labels, time.perf_counter() - start))
        if progress:
            print(f"{name}: accuracy {rows[-1]['accuracy']:.3f}", flush=True)

    timed("zero-shot", None)
    context = build_context(shots, template, tokenizer, label_words)
    with torch.no_grad():
        icl_embeds = base.get_input_embeddings()(context.token_ids.unsqueeze(0))
    timed("ICL", icl_embeds)
    config = context.to_config(
        opt_weighted_loss_type="decay",
        opt_loss_decay_factor=settings.decay,
        opt_projection_epsilon=settings.eps_input,
        opt_projection_format_epsilon=settings.eps_format,
        tokenizer_name_or_path=settings.model,
    )
    model = get_cpt_model(base, config)
    queries = render_queries(shots, template, tokenizer, label_words)
    start = time.perf_counter()
    result = train(model, queries, settings.train_settings(), progress=progress)
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        timed("CPT", model.context_embeddings())
    rows[-1]["train_seconds"] = round(train_seconds, 1)
    out = Path(settings.output)
    model.save_pretrained(out / "adapter")
    report = {
        "settings": asdict(settings),
        "template": fmt,
        "label_words": label_words,
        "context_tokens": len(context),
        "final_train_loss": result.losses[-1],
        "results": rows,
        "data": dataset.provenance,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    write_json_atomic(out / "results.json", report)
    return report


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def format_table(report: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| method | accuracy | macro-F1 | seconds |", "|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['method']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['seconds']} |")
    return "\n".join(lines)
