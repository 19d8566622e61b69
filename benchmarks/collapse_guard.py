"""Does the balance guard (issue 24 item 2) undo the SUBJ 4-shot collapses? Dev accuracy and the
most-predicted label's share, without the guard, with its first inputs (the labelled rows and the
content-free inputs), with the inputs it has now (those and domain-context inputs) and with the dev
texts given as ``unlabeled`` too.

    OMP_NUM_THREADS=1 python benchmarks/collapse_guard.py --data subj --shots 4 --seeds 0 3 4 --dev-size 200
    OMP_NUM_THREADS=1 python benchmarks/collapse_guard.py ... --finalists 3 --out runs/collapse-guard-finalists

Each cell's shots are the issue-14 grid cell's (:func:`cptune.app.compare.cell_splits`); the dev set
is :func:`template_dev.dev_set`'s, disjoint from every grid cell's test set and shots. One default
CPTClassifier fit per cell (``template="auto"``, 40 steps, the cell's seed) with the guard off; the
guard's check (:func:`cptune.balance.check_balance`, on the inputs ``CPTClassifier.fit`` gives it)
is then run on the fitted context, so the three rows share one training run. Writes
``OUT/collapse_guard.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from template_dev import dev_set

from cptune.app.classifier import CPTClassifier
from cptune.app.compare import Cell, cell_splits
from cptune.balance import balance_inputs, check_balance, label_shares
from cptune.cpt.saving import write_text_atomic
from cptune.data import load_dataset
from cptune.models import DEFAULT_MODEL, load_model
from cptune.scoring import CONTENT_FREE_TEXTS, ContextScorer, remove_label_bias
from cptune.training import TrainSettings

TEST_SIZE = 300  # the grid's test sets, which the dev set avoids


def summary(predicted: list[int], gold: list[int], num_labels: int) -> dict:
    return {"accuracy": sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold),
            "top_share": max(label_shares(predicted, num_labels))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="subj")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 3, 4])
    parser.add_argument("--dev-size", type=int, default=200)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--finalists", type=int, default=0,
                        help="CPTClassifier(finalists=K): the best K templates by the ICL score get a few CPT steps "
                             "each before the choice (default 0: the ICL score alone)")
    parser.add_argument("--out", default="runs/collapse-guard")
    args = parser.parse_args(argv)
    base, tok = load_model(args.model, device="cpu", dtype="float32")
    dataset = load_dataset(args.data)
    dev = dev_set(dataset, [4, 8], [0, 1, 2, 3, 4], args.dev_size)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        shots, _, _ = cell_splits(dataset, Cell(dataset.name, args.shots, seed, "cpt"), TEST_SIZE)
        clf = CPTClassifier((base, tok), balance_guard=False, finalists=args.finalists,
                            train=TrainSettings(steps=40, batch_size=4, lr=1e-3, seed=seed))
        clf.fit([ex.text for ex in shots], [ex.label for ex in shots])
        index = {label: i for i, label in enumerate(clf.classes_)}
        gold = [index[ex.label] for ex in dev]
        with torch.no_grad():
            context = clf.cpt_model_.context_embeddings()  # (1, N, d)
        words = {str(label): word for label, word in clf.label_words_.items()}
        scorer = ContextScorer(base, tok, clf.template_, words, context)
        dev_texts = [ex.text for ex in dev]
        raw = scorer.scores(scorer.query_ids(dev_texts))  # (n, C)
        raw_rows = scorer.scores(scorer.query_ids([ex.text for ex in shots]))  # (k, C): what a rule may check
        rows_gold = [index[ex.label] for ex in shots]
        reference = label_shares([index[ex.label] for ex in shots], len(clf.classes_))
        examples = [(ex.text, ex.label) for ex in shots]
        inputs = balance_inputs(examples, examples, seed=seed)[0]  # what fit gives the guard (N = k: no held-out rows)
        seven = {"training rows (in the context: optimistic)": [ex.text for ex in shots],
                 "content-free": list(CONTENT_FREE_TEXTS)}  # the guard before domain-context inputs
        row = {"seed": seed, "template": clf.template_.format, "none": summary(raw.argmax(-1).tolist(), gold, 2),
               "finalists": (clf.template_choice_ or {}).get("finalists", [])}
        variants = (("guard-7", seven), ("guard", inputs),
                    ("guard+unlabeled", balance_inputs(examples, examples, dev_texts, seed=seed)[0]))
        for name, given in variants:
            check = check_balance(scorer, given, reference)
            scores = raw if check.bias is None else remove_label_bias(raw, torch.tensor(check.bias))
            rows_scores = raw_rows if check.bias is None else remove_label_bias(raw_rows, torch.tensor(check.bias))
            row[name] = {**summary(scores.argmax(-1).tolist(), gold, 2), "corrected": check.bias is not None,
                         "probe_top_share": max(check.shares),
                         "training_rows": summary(rows_scores.argmax(-1).tolist(), rows_gold, 2)}
        probe = [text for group in inputs.values() for text in group]
        probe_scores = scorer.scores(scorer.query_ids(probe))  # (m, C)
        row["scores"] = {"dev": raw.tolist(), "dev_gold": gold, "probe": probe_scores.tolist(), "reference": reference}
        # (the raw scores, to weigh other rules without refitting)
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "collapse_guard.json", json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print("| seed | template | none: acc / top share | guard, 7 inputs | guard (default) | guard + unlabeled dev |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k]['accuracy']:.3f} / {r[k]['top_share']:.0%}" + (" (corrected)" if r[k].get("corrected") else "")
                 for k in ("none", "guard-7", "guard", "guard+unlabeled")]
        print(f"| {r['seed']} | `{r['template']!r}` | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
