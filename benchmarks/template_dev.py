"""How good are template="auto"'s choices? Every candidate's zero-shot accuracy on a dev set, and where
each grid cell's choice ranks among them.

    OMP_NUM_THREADS=1 python benchmarks/template_dev.py --data rotten_tomatoes subj

For each dataset: a balanced dev set disjoint from the test sets (300 examples) and the shots of the
issue-14 grid cells (seeds 0-4, 4 and 8 shots), so nothing here reads a grid test example. Every
candidate of :data:`cptune.selection.TEMPLATE_CATALOGUE` with each label-word candidate is scored
zero-shot on it (a template's quality without any shots' influence). Then, for each cell, the
choice :func:`cptune.selection.choose_template` makes from that cell's shots alone (as ``compare
--template auto`` does), with the dev accuracy of the choice, of the generic first candidate (what
the fixed template gives) and of the best candidate. Writes ``OUT/template_dev.json`` and prints
Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from cptune.app.compare import Cell, cell_format, cell_splits
from cptune.cpt.saving import write_text_atomic
from cptune.data import Dataset, load_dataset, sample_splits
from cptune.models import DEFAULT_MODEL, load_model
from cptune.scoring import score_texts
from cptune.selection import TEMPLATE_CATALOGUE, choose_template, word_candidates

TEST_SIZE = 300
DEV_SEED = 2000


def dev_set(dataset: Dataset, shots: list[int], seeds: list[int], size: int) -> list:
    """``size`` balanced examples outside every cell's test set and shots."""
    taken = set()
    for seed in seeds:
        for k in shots:
            cell_shots, _, test = cell_splits(dataset, Cell(dataset.name, k, seed, "zero-shot"), TEST_SIZE)
            taken |= {ex.text for ex in test} | {ex.text for ex in cell_shots}
    rest = Dataset(dataset.name, [ex for ex in dataset.examples if ex.text not in taken], dataset.labels,
                   dataset.provenance)
    return sample_splits(rest, 0, size, DEV_SEED)[2]


def key(template, words) -> str:
    return f"{template.format!r} {'/'.join(str(w) for w in words.values())}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["rotten_tomatoes", "subj"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--dev-size", type=int, default=300)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/template-dev")
    args = parser.parse_args(argv)
    base, tok = load_model(args.model, device="cpu", dtype="float32")
    report, lines = {}, []
    for name in args.data:
        dataset = load_dataset(name, default_split="train")
        _, words = cell_format(dataset)
        dev = dev_set(dataset, args.shots, args.seeds, args.dev_size)
        labels = list(words)
        gold = [labels.index(ex.label) for ex in dev]
        accuracy = {}
        for _, template in TEMPLATE_CATALOGUE:
            for candidate in word_candidates(words):
                scores = score_texts(base, tok, template, candidate, [ex.text for ex in dev])
                hits = [p == g for p, g in zip(scores.argmax(-1).tolist(), gold, strict=True)]
                accuracy[key(template, candidate)] = sum(hits) / len(dev)
                print(f"{name} {key(template, candidate)}: {accuracy[key(template, candidate)]:.3f}", flush=True)
        generic = key(TEMPLATE_CATALOGUE[0][1], words)
        best = max(accuracy, key=accuracy.get)
        cells = []
        for k in args.shots:
            for seed in args.seeds:
                shots, _, _ = cell_splits(dataset, Cell(name, k, seed, "zero-shot"), TEST_SIZE)
                choice = choose_template(base, tok, [(ex.text, ex.label) for ex in shots], words, seed=seed)
                chosen = key(choice.template, choice.label_words)
                cells.append({"shots": k, "seed": seed, "chosen": chosen, "dev_accuracy": accuracy[chosen]})
                print(f"{name} k={k} seed={seed}: chose {chosen} ({accuracy[chosen]:.3f})", flush=True)
        report[name] = {"dev_size": len(dev), "accuracy": accuracy, "generic": generic, "cells": cells}
        lines += [f"**{name}** ({len(dev)} dev examples): generic `{generic}` {accuracy[generic]:.3f}, best "
                  f"`{best}` {accuracy[best]:.3f}", "",
                  "| shots | seed | chosen | its dev accuracy | minus generic |", "|---|---|---|---|---|"]
        for c in cells:
            lines.append(f"| {c['shots']} | {c['seed']} | `{c['chosen']}` | {c['dev_accuracy']:.3f} | "
                         f"{c['dev_accuracy'] - accuracy[generic]:+.3f} |")
        for k in args.shots:
            mine = [c["dev_accuracy"] - accuracy[generic] for c in cells if c["shots"] == k]
            lines.append(f"| {k} | mean | | {statistics.fmean(c['dev_accuracy'] for c in cells if c['shots'] == k):.3f}"
                         f" | {statistics.fmean(mine):+.3f} |")
        lines.append("")
    out = Path(args.out)
    write_text_atomic(out / "template_dev.json", json.dumps(report, indent=1))
    write_text_atomic(out / "template_dev.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
