"""Every label the user has (issue 24 item 4), on dev data: N labelled rows, a k-row context, CPT
against zero-shot, ICL, LoRA and SetFit trained on the same N rows.

    OMP_NUM_THREADS=1 python benchmarks/train_size_dev.py --train-sizes 64
    OMP_NUM_THREADS=1 python benchmarks/train_size_dev.py --report-only

For each dataset: the dev set of :func:`template_dev.dev_set` (balanced, disjoint from the test sets
and shots of the issue-14 grid cells, seeds 0-4, 4 and 8 shots). For each (N, seed), N balanced
labelled rows are drawn from what is left once the dev texts and the test sets of the grid cells
(:func:`cptune.app.compare.cell_splits`, 300 examples, seeds 0-4) are removed, so no row trained on
here is a test example of the final grid, and no grid test set is read. The k demonstrations are
:func:`cptune.recipe.context_examples` of those rows (the ones ``CPTClassifier(context_size=k)``
draws with the same seed).

Methods: ``zero-shot``, ``icl``, ``lora`` and ``setfit`` through :func:`cptune.methods.make_method`
as ``cptune compare --train-size N --template auto`` runs them (shots = the k demonstrations,
training queries = all N rows; template and label words chosen by
:func:`cptune.selection.choose_template` on the N rows, once per (dataset, N, seed));
``classifier``: the default ``CPTClassifier(context_size=k)`` fitted on the N rows;
``classifier-cv``: the same with ``choose_steps=True`` (the number of CPT steps chosen by
cross-validation on the rows outside the context), skipped with a note where CPTClassifier has no
such parameter. Each finished row is appended to ``OUT/rows.jsonl`` at once; a rerun skips the rows
already there. Prints a Markdown table: mean dev accuracy over the seeds and the mean share of the
most-predicted label.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

from template_dev import dev_set

from cptune.app.classifier import CPTClassifier
from cptune.app.compare import Cell, append_result, cell_format, cell_splits, read_results
from cptune.balance import label_shares
from cptune.data import Dataset, load_dataset, sample_splits
from cptune.methods import ENCODER_METHODS, make_method
from cptune.methods.base import MethodSettings
from cptune.models import DEFAULT_MODEL, load_model
from cptune.recipe import context_examples
from cptune.scoring import classification_metrics
from cptune.selection import choose_template
from cptune.text.template import Template
from cptune.training import TrainSettings

GRID_TEST_SIZE = 300  # the final grid's test sets, never trained on here
GRID_SEEDS = [0, 1, 2, 3, 4]
DEV_SHOTS = [4, 8]  # the issue-14 cells whose shots and test sets the dev set avoids
METHOD_NAMES = ("zero-shot", "icl", "lora", "setfit", "classifier", "classifier-cv")
CLASSIFIER_METHODS = {"classifier": {}, "classifier-cv": {"choose_steps": True}}
GENERIC_TEMPLATE = "input: {x} output: {y}"  # what the encoder methods are handed (and ignore)
ROWS_NAME = "rows.jsonl"
KEY = ("dataset", "train_size", "seed", "method")


def labelled_pool(dataset: Dataset, dev: list) -> Dataset:
    """The dataset without the dev texts and without every grid cell's test set."""
    taken = {ex.text for ex in dev}
    for seed in GRID_SEEDS:
        _, _, test = cell_splits(dataset, Cell(dataset.name, 8, seed, "zero-shot"), GRID_TEST_SIZE)
        taken |= {ex.text for ex in test}
    return Dataset(dataset.name, [ex for ex in dataset.examples if ex.text not in taken], dataset.labels,
                   dataset.provenance)


def summary(predicted: list[int], gold: list[int], num_labels: int) -> dict:
    """Dev accuracy, macro-F1 and the most-predicted label's share."""
    metrics = classification_metrics(predicted, gold, num_labels)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
            "top_share": max(label_shares(predicted, num_labels)),
            "predicted_shares": label_shares(predicted, num_labels)}


def run_method(method: str, base, tok, rows: list, shots: list, dev: list, words: dict, seed: int,
               choice: tuple | None) -> tuple[dict, CPTClassifier | None]:
    """Fit one method on the labelled rows and score it on the dev set.

    Args:
        choice: ``(template, label words, choice record)`` the LM methods use (``None`` for the others).

    Returns:
        The row's result fields, and the fitted classifier for the classifier methods (else ``None``).
    """
    labels = list(words)
    gold = [labels.index(ex.label) for ex in dev]
    texts = [ex.text for ex in dev]
    if method in CLASSIFIER_METHODS:
        clf = CPTClassifier(model=(base, tok), labels=dict(words), context_size=len(shots),
                            train=TrainSettings(seed=seed), verbose=False, **CLASSIFIER_METHODS[method])
        start = time.perf_counter()
        clf.fit([ex.text for ex in rows], [ex.label for ex in rows])
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        predicted = [labels.index(label) for label in clf.predict(texts)]
        score_seconds = time.perf_counter() - start
        template_choice = clf.template_choice_ or {}
        return {**summary(predicted, gold, len(labels)), "fit_seconds": round(fit_seconds, 1),
                "score_seconds": round(score_seconds, 1), "template": template_choice.get("format"),
                "words": template_choice.get("words"), "choice_seconds": template_choice.get("seconds"),
                "steps_choice": getattr(clf, "steps_choice_", None),
                "balance_corrected": clf.label_bias_ is not None,
                "context_matches": list(clf.context_examples_) == [(ex.text, ex.label) for ex in shots]}, clf
    encoder = method in ENCODER_METHODS  # reads neither template nor label-word text: no choice made for it
    template, used_words, record = (Template(GENERIC_TEMPLATE), words, None) if encoder else choice
    model = make_method(method, base, tok, template, used_words, MethodSettings().replace(seed=seed))
    fit = model.fit(shots, rows)
    start = time.perf_counter()
    scores = model.scores(texts)  # (n, C), columns in label_words order
    score_seconds = time.perf_counter() - start
    return {**summary(scores.argmax(-1).tolist(), gold, len(labels)), "fit_seconds": round(fit.seconds, 1),
            "score_seconds": round(score_seconds, 1),
            "template": None if encoder else template.format, "words": None if encoder else record["words"],
            "choice_from": None if encoder else record["from"]}, None


def report(rows: list[dict], datasets: list[str], sizes: list[int], methods: list[str]) -> str:
    """Per dataset and N: mean dev accuracy over the seeds / mean top share, per method."""
    lines = ["| dataset | N | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for name in datasets:
        for n in sizes:
            cells = []
            for method in methods:
                mine = [r for r in rows if (r["dataset"], r["train_size"], r["method"]) == (name, n, method)]
                if not mine:
                    cells.append("-")
                    continue
                acc = statistics.fmean(r["accuracy"] for r in mine)
                share = statistics.fmean(r["top_share"] for r in mine)
                cells.append(f"{acc:.3f} / {share:.0%} ({len(mine)})")
            lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: mean dev accuracy / mean share of the most-predicted label (seeds run)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["rotten_tomatoes", "subj"])
    parser.add_argument("--train-sizes", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--context-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", choices=METHOD_NAMES,
                        default=["zero-shot", "icl", "lora", "setfit", "classifier", "classifier-cv"])
    parser.add_argument("--dev-size", type=int, default=300)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/train-size-dev")
    parser.add_argument("--report-only", action="store_true", help="print the table of OUT/rows.jsonl and exit")
    args = parser.parse_args(argv)
    path = Path(args.out) / ROWS_NAME
    rows = [r for r in read_results(path)[0] if "train_size" in r]
    if args.report_only:
        print(report(rows, args.data, args.train_sizes, args.methods))
        return 0
    other = next((r for r in rows if (r["model"], r["dev_size"], r["shots"]) !=
                  (args.model, args.dev_size, args.context_size)), None)
    if other is not None:
        parser.error(f"{path} holds rows run with model={other['model']!r}, dev_size={other['dev_size']}, "
                     f"context_size={other['shots']}; use another --out")
    methods = list(args.methods)
    if "classifier-cv" in methods and "choose_steps" not in inspect.signature(CPTClassifier).parameters:
        print("note: CPTClassifier has no choose_steps parameter in this tree; skipping classifier-cv "
              "(rerun this command once it has, the other rows are kept)", flush=True)
        methods.remove("classifier-cv")
    done = {tuple(r[k] for k in KEY) for r in rows}
    base, tok = load_model(args.model, device="cpu", dtype="float32")
    for name in args.data:
        dataset = load_dataset(name, default_split="train")
        _, words = cell_format(dataset)
        dev = dev_set(dataset, DEV_SHOTS, GRID_SEEDS, args.dev_size)
        pool = labelled_pool(dataset, dev)
        for n in args.train_sizes:
            for seed in args.seeds:
                todo = [m for m in methods if (name, n, seed, m) not in done]
                if not todo:
                    continue
                labelled = sample_splits(pool, n, 0, seed)[0]
                shots = context_examples(labelled, args.context_size, seed)
                choice = None  # (template, label words, choice record) of template="auto" on these rows
                for method in sorted(todo, key=lambda m: m not in CLASSIFIER_METHODS):  # classifiers first
                    if choice is None and method not in ENCODER_METHODS and method not in CLASSIFIER_METHODS:
                        chosen = choose_template(base, tok, [(ex.text, ex.label) for ex in labelled], words, seed=seed)
                        choice = (chosen.template, chosen.label_words, chosen.to_json() | {"from": "choose_template"})
                    result, clf = run_method(method, base, tok, labelled, shots, dev, words, seed, choice)
                    if method == "classifier":  # its fit made the same choose_template call on the same rows:
                        # the other methods reuse that choice instead of paying for it again
                        choice = (clf.template_, dict(clf.label_words_), clf.template_choice_ | {"from": "classifier"})
                    row = {"dataset": name, "train_size": n, "seed": seed, "method": method,
                           "shots": args.context_size, "dev_size": len(dev), "model": args.model, **result}
                    append_result(path, row)
                    rows.append(row)
                    print(f"{name} N={n} seed={seed} {method}: acc {row['accuracy']:.3f} top share "
                          f"{row['top_share']:.0%} fit {row['fit_seconds']}s score {row['score_seconds']}s "
                          f"{row.get('template')!r} steps {row.get('steps_choice')}", flush=True)
    print(report(rows, args.data, args.train_sizes, args.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
