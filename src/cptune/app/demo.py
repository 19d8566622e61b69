"""The main job: zero-shot vs ICL vs CPT on a balanced k-shot split of a built-in dataset."""

from __future__ import annotations

# The settings and the table are read by `cptune demo --help` before anything runs, so this module
# imports torch and the layers inside run_demo only: the command line answers without loading them.
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CLASSIFIER_SUBDIR = "classifier"  # OUTPUT/classifier: a PEFT adapter folder and a cptune classifier
RADIUS_CHOICES = ("absolute", "relative")  # cptune.cpt.projection.RADIUS_MODES, without importing torch (tested)
DATASET_TEMPLATES = {
    "rotten_tomatoes": ("input: {x} output: {y}", {"negative": "negative", "positive": "positive"}),
}


@dataclass(frozen=True)
class DemoSettings:
    """Settings of the main job (defaults: the paper's SST-2 demo, scaled to a 2-core CPU).

    The demonstrations are the only labelled data: CPT trains with each of them as a query
    after the context, as the paper does with very few examples.
    """

    model: str = "smollm2-135m"  # cptune.models.DEFAULT_MODEL (tests check they agree)
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    dataset: str = "rotten_tomatoes"
    template: str = "auto"
    shots: int = 4
    test_size: int = 200
    seed: int = 0
    steps: int = 40
    batch_size: int = 4
    lr: float = 1e-3
    eps_input: float = 0.2
    eps_format: float = 0.1
    decay: float = 0.95
    radius: str = RADIUS_CHOICES[0]
    output: str = "runs/demo"

    def __post_init__(self) -> None:
        # Check everything before the first minute of work, not after it.
        if self.dataset not in DATASET_TEMPLATES:
            raise ValueError(f"unknown dataset {self.dataset!r}; the demo knows: {', '.join(DATASET_TEMPLATES)}")
        for name in ("shots", "test_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        from cptune.cpt.saving import check_can_save
        from cptune.text.template import Template

        if self.template != "auto":
            Template(self.template.replace("\\n", "\n"))
        self.recipe()
        check_can_save(self.output)

    def recipe(self):
        """The CPT recipe of this run (radii, loss decay, and the training loop): a :class:`cptune.CPTRecipe`."""
        from cptune.recipe import CPTRecipe
        from cptune.training import TrainSettings

        return CPTRecipe(eps_input=self.eps_input, eps_format=self.eps_format, decay=self.decay, radius=self.radius,
                         train=TrainSettings(steps=self.steps, batch_size=self.batch_size, lr=self.lr, seed=self.seed))


def _accuracy_row(name, scores, gold, labels, seconds) -> dict:
    from cptune.scoring import classification_metrics

    predicted = scores.argmax(dim=-1).tolist()
    metrics = classification_metrics(predicted, gold, len(labels))
    return {"method": name, **metrics, "seconds": round(seconds, 1)}


def run_demo(settings: DemoSettings, progress: bool = True) -> dict:
    """Run the main job; write ``classifier/`` and ``results.json`` under ``settings.output``.

    ``classifier/`` is a PEFT adapter folder that ``cptune eval`` and ``cptune predict`` (and
    :meth:`CPTClassifier.load`) take as it is.
    """
    import torch

    from cptune.app.classifier import CPTClassifier, shared_model
    from cptune.cpt.saving import write_json_atomic
    from cptune.data import load_dataset, sample_splits
    from cptune.scoring import score_texts
    from cptune.selection import choose_template
    from cptune.text.context import build_context
    from cptune.text.template import Template

    torch.manual_seed(settings.seed)
    _, label_words = DATASET_TEMPLATES[settings.dataset]
    dataset = load_dataset(settings.dataset)
    shots, _, test = sample_splits(dataset, settings.shots, settings.test_size, settings.seed)
    base, tokenizer = shared_model(settings.model, settings.device, settings.dtype, settings.device_map)
    choice = None
    if settings.template == "auto":  # chosen from the shots alone; every method below then uses it
        choice = choose_template(base, tokenizer, [(ex.text, ex.label) for ex in shots], label_words,
                                 seed=settings.seed)
        template, label_words = choice.template, choice.label_words
        if progress:
            print(f"chose {choice.summary()}", flush=True)
    else:
        template = Template(settings.template.replace("\\n", "\n"))
    labels = list(label_words)
    gold = [labels.index(ex.label) for ex in test]
    texts = [ex.text for ex in test]
    rows = []

    def timed(name, context_embeds, label_bias=None):
        start = time.perf_counter()
        scores = score_texts(base, tokenizer, template, label_words, texts, context_embeds, label_bias=label_bias)
        rows.append(_accuracy_row(name, scores, gold, labels, time.perf_counter() - start))
        if progress:
            print(f"{name}: accuracy {rows[-1]['accuracy']:.3f}", flush=True)

    timed("zero-shot", None)
    context = build_context(shots, template, tokenizer, label_words)
    with torch.no_grad():
        table = base.get_input_embeddings()
        icl_embeds = table(context.token_ids.unsqueeze(0).to(table.weight.device))  # (1, N, d)
    timed("ICL", icl_embeds)
    clf = CPTClassifier(settings.model, template=template, labels=label_words, recipe=settings.recipe(),  # shares
                        verbose=progress, device=settings.device, dtype=settings.dtype,  # the model loaded above
                        device_map=settings.device_map)
    start = time.perf_counter()
    clf.fit([ex.text for ex in shots], [ex.label for ex in shots])
    train_seconds = time.perf_counter() - start
    with torch.no_grad():
        # the saved classifier's predictions: with the bias its balance guard removed, if it removed one
        timed("CPT", clf.cpt_model_.context_embeddings(), clf.applied_label_bias())
    rows[-1]["train_seconds"] = round(train_seconds, 1)
    out = Path(settings.output)
    clf.save(out / CLASSIFIER_SUBDIR)
    report = {
        "settings": asdict(settings),
        "template": template.format,
        "template_choice": choice.to_json() if choice is not None else None,
        "label_words": label_words,
        "context_tokens": len(context),
        "final_train_loss": clf.train_result_.losses[-1],
        "balance": clf.balance_,  # the balance guard's check (cptune.balance); its bias is in the CPT row
        "results": rows,
        "data": dataset.provenance,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
    }
    write_json_atomic(out / "results.json", report)
    return report


def format_table(report: dict) -> str:
    """The results as a Markdown table."""
    lines = ["| method | accuracy | macro-F1 | seconds |", "|---|---|---|---|"]
    for row in report["results"]:
        lines.append(f"| {row['method']} | {row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['seconds']} |")
    return "\n".join(lines)
