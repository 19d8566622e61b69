"""Which rule should template="auto" choose by? Each cell's held-out log-probabilities per candidate,
and the dev accuracy each rule's choices would get.

    OMP_NUM_THREADS=1 python benchmarks/template_rule.py --dev benchmarks/grids/issue14/template-dev

For every issue-14 grid cell (datasets, 4 and 8 shots, seeds 0-4), every candidate's two-fold held-out
label log-probability on that cell's shots, example by example (:func:`cptune.selection.held_out_log_probs`,
what :func:`cptune.selection.choose_template` averages), is written to ``OUT/cells.jsonl`` (one line per
cell; a rerun skips the cells already there). Then each rule picks a candidate per cell from those
numbers alone, and the pick is looked up in ``template_dev.json`` (``benchmarks/template_dev.py``: every
candidate's zero-shot accuracy on a dev set disjoint from the grid's test sets). Rules:

- ``argmax``: the best mean log-probability (the rule of ``choose_template``; its picks must equal the
  ``chosen`` of template_dev.json, which the script checks);
- ``margin M``: the generic template (the catalogue's first with the given words) unless the best mean
  beats it by more than M nats;
- ``paired z``: the generic unless the best beats it by more than z paired standard errors (the
  standard deviation of the per-example differences over the square root of their number).

Writes ``OUT/template_rule.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from template_dev import key  # the candidates' names in template_dev.json (this script's folder is on sys.path)

from cptune.app.compare import Cell, cell_format, cell_splits
from cptune.cpt.saving import write_text_atomic
from cptune.data import load_dataset
from cptune.models import DEFAULT_MODEL, load_model
from cptune.selection import TEMPLATE_CATALOGUE, halves, held_out_log_probs, word_candidates

TEST_SIZE = 300
MARGINS = (0.05, 0.1, 0.2)
ZS = (1.0, 2.0)


def cell_scores(base, tok, name: str, shots: int, seed: int) -> dict:
    """Per-example held-out gold log-probabilities of every candidate on one cell's shots."""
    dataset = load_dataset(name, default_split="train")
    _, words = cell_format(dataset)
    demos, _, _ = cell_splits(dataset, Cell(name, shots, seed, "zero-shot"), TEST_SIZE)
    parts = halves([(ex.text, ex.label) for ex in demos], seed)
    candidates = {}
    for _, template in TEMPLATE_CATALOGUE:
        for candidate in word_candidates(words):
            log_probs, gold = held_out_log_probs(base, tok, template, candidate, parts)
            candidates[key(template, candidate)] = [round(v, 5) for v in
                                                           log_probs.gather(1, gold[:, None]).squeeze(1).tolist()]
    return {"dataset": name, "shots": shots, "seed": seed,
            "generic": key(TEMPLATE_CATALOGUE[0][1], words), "log_probs": candidates}


def pick(cell: dict, rule: str, value: float = 0.0) -> str:
    """The candidate a rule picks from one cell's numbers (ties keep the earlier candidate)."""
    means = {k: statistics.fmean(v) for k, v in cell["log_probs"].items()}
    best = max(means, key=means.get)  # max keeps the first of equal values, like choose_template
    if rule == "argmax":
        return best
    generic = cell["generic"]
    gain = means[best] - means[generic]
    if rule == "margin":
        return best if gain > value else generic
    diffs = [a - b for a, b in zip(cell["log_probs"][best], cell["log_probs"][generic], strict=True)]
    spread = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    return best if gain > value * spread else generic


def report(cells: list[dict], dev: dict) -> str:
    rules = [("argmax", "argmax", 0.0)] + [(f"margin {m}", "margin", m) for m in MARGINS] + \
            [(f"paired z={z:g}", "paired", z) for z in ZS]
    lines = ["Dev accuracy of each rule's choice minus the generic template's, mean over the seeds "
             "(template-dev's dev sets; in brackets: cells where the rule kept the generic).", "",
             "| dataset | shots | cells | " + " | ".join(r[0] for r in rules) + " |",
             "|---|---|---|" + "---|" * len(rules)]
    for name in dict.fromkeys(c["dataset"] for c in cells):
        accuracy = dev[name]["accuracy"]
        for shots in sorted({c["shots"] for c in cells if c["dataset"] == name}):
            mine = [c for c in cells if c["dataset"] == name and c["shots"] == shots]
            row = [name, str(shots), str(len(mine))]
            for _, rule, value in rules:
                picks = [pick(c, rule, value) for c in mine]
                gain = statistics.fmean(accuracy[p] - accuracy[c["generic"]] for p, c in zip(picks, mine, strict=True))
                kept = sum(p == c["generic"] for p, c in zip(picks, mine, strict=True))
                row.append(f"{gain:+.3f} ({kept})")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["rotten_tomatoes", "subj"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--dev", default="benchmarks/grids/issue14/template-dev",
                        help="folder of template_dev.py's per-dataset <name>.json files")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", default="runs/template-rule")
    args = parser.parse_args(argv)
    dev = {}
    for name in args.data:
        dev.update(json.loads((Path(args.dev) / f"{name}.json").read_text(encoding="utf-8")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cells.jsonl"
    cells = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
    done = {(c["dataset"], c["shots"], c["seed"]) for c in cells}
    base = tok = None
    for name in args.data:
        for shots in args.shots:
            for seed in args.seeds:
                if (name, shots, seed) in done:
                    continue
                if base is None:
                    base, tok = load_model(args.model, device="cpu", dtype="float32")
                cell = cell_scores(base, tok, name, shots, seed)
                with open(path, "a", encoding="utf-8") as f:  # one line per cell: a rerun resumes
                    f.write(json.dumps(cell) + "\n")
                cells.append(cell)
                print(f"{name} k={shots} seed={seed}: argmax {pick(cell, 'argmax')}", flush=True)
    cells = [c for c in cells if c["dataset"] in args.data and c["shots"] in args.shots and c["seed"] in args.seeds]
    for c in cells:  # the argmax rule is choose_template's: it must reproduce template_dev's choices
        listed = [x["chosen"] for x in dev[c["dataset"]]["cells"] if (x["shots"], x["seed"]) == (c["shots"], c["seed"])]
        if listed and listed[0] != pick(c, "argmax"):
            raise SystemExit(f"{c['dataset']} k={c['shots']} seed={c['seed']}: argmax picks {pick(c, 'argmax')}, "
                             f"template_dev chose {listed[0]}")
    text = report(cells, dev)
    write_text_atomic(out / "template_rule.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
