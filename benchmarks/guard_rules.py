"""How should the balance guard correct a collapse it sees on domain-context inputs? Rules weighed on
the raw scores that ``benchmarks/collapse_guard.py`` saves (no refitting).

    python benchmarks/guard_rules.py benchmarks/grids/issue24/collapse_guard/domain/*.json

For each cell: the dev accuracy and most-predicted label's share with no correction, with the guard
before domain-context inputs (its 7 inputs: the training rows and the content-free ones), with the full
correction (remove the label bias measured on the guard's inputs, as ``check_balance`` does) and with
the smallest correction that ends the collapse on those inputs (``alpha * bias``, ``alpha`` the least
of 0.05, 0.10, ..., 1 with the inputs' top share within :func:`cptune.balance.collapse_limit`), and
with the full correction only past the strict limit (``collapse_limit(share, strict=True)``, what the
guard does when its inputs include domain-context random words), and with both: the strict limit to
decide, the smallest correction to act (what :func:`cptune.balance.check_balance` does).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from cptune.balance import collapse_limit, collapsed_label, label_shares, smallest_correction
from cptune.scoring import label_bias, remove_label_bias


def outcome(dev: torch.Tensor, gold: list[int], bias: torch.Tensor | None, alpha: float = 1.0) -> tuple[float, float]:
    scores = dev if bias is None else remove_label_bias(dev, alpha * bias)
    predicted = scores.argmax(-1).tolist()
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    return accuracy, max(label_shares(predicted, dev.shape[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    table = {"none": [], "seven": [], "full": [], "smallest": [], "strict": [], "default": []}
    print("| data | shots | seed | inputs' top share | none | before (7 inputs) | full correction "
          "| smallest correction (alpha) | strict limit, full correction "
          "| strict limit, smallest correction (the default) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.files:
        info = json.load(open(path))
        for row in info["rows"]:
            s = row["scores"]
            dev, probe, gold, ref = torch.tensor(s["dev"]), torch.tensor(s["probe"]), s["dev_gold"], s["reference"]
            collapsed = collapsed_label(probe.argmax(-1).tolist(), ref) is not None
            bias = label_bias(probe) if collapsed else None
            alpha = smallest_correction(probe, ref)[0] if collapsed else 0.0
            strict = collapsed_label(probe.argmax(-1).tolist(), ref, strict=True) is not None
            seven = (row["guard-7"]["accuracy"], row["guard-7"]["top_share"])  # as collapse_guard.py measured it
            results = {"none": outcome(dev, gold, None), "seven": seven, "full": outcome(dev, gold, bias),
                       "smallest": outcome(dev, gold, bias, alpha),
                       "strict": outcome(dev, gold, bias if strict else None),
                       "default": outcome(dev, gold, smallest_correction(probe, ref)[1] if strict else None)}
            for key, value in results.items():
                table[key].append(value)
            top = max(label_shares(probe.argmax(-1).tolist(), probe.shape[1]))
            cells = [f"{a:.3f} / {t:.0%}" for a, t in results.values()]
            print(f"| {info['args']['data']} | {info['args']['shots']} | {row['seed']} | {top:.0%} "
                  f"(limits {collapse_limit(max(ref)):.0%}, {collapse_limit(max(ref), True):.0%}) | {cells[0]} | "
                  f"{cells[1]} | {cells[2]} | {cells[3]} ({alpha:.2f}) | {cells[4]} | {cells[5]} |")
    means = {k: (statistics.fmean(a for a, _ in v), max(t for _, t in v)) for k, v in table.items()}
    print("| mean (largest share) | | | | " + " | ".join(f"{a:.3f} ({t:.0%})" for a, t in means.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
