"""The radius dev study's paired differences: dev accuracy at the last step, relative minus absolute radius,
for every (dataset, shots, seed) both folders hold, and CPT minus ICL (step 0) for each radius.

    python benchmarks/grids/issue24/radius/paired.py                       # this folder's copies
    python benchmarks/grids/issue24/radius/paired.py runs/radius-gemma-absolute runs/radius-gemma-relative
"""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent


def last_and_first(folder: Path) -> dict[tuple, dict]:
    """(dataset, shots, seed) -> the run's dev accuracy at its first and last checkpoint, with the share."""
    runs = {}
    for line in (folder / "trajectories.jsonl").read_text().splitlines():
        run = json.loads(line)
        first, last = run["trajectory"][0], run["trajectory"][-1]
        runs[(run["dataset"], run["shots"], run["seed"])] = {
            "icl": first["accuracy"], "cpt": last["accuracy"], "share": max(last["predicted_share"]),
            "train_loss": last["train_loss"], "step": last["step"]}
    return runs


def main(argv: list[str]) -> None:
    absolute, relative = (Path(a) for a in argv) if argv else (HERE / "absolute", HERE / "relative")
    a, r = last_and_first(absolute), last_and_first(relative)
    both = sorted(set(a) & set(r))
    print("| dataset | shots | seed | ICL | CPT absolute | CPT relative | relative - absolute "
          "| most-predicted share, absolute / relative | train loss, absolute / relative |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in both:
        x, y = a[key], r[key]
        print(f"| {key[0]} | {key[1]} | {key[2]} | {x['icl']:.3f} | {x['cpt']:.3f} | {y['cpt']:.3f} | "
              f"{y['cpt'] - x['cpt']:+.3f} | {x['share']:.2f} / {y['share']:.2f} | "
              f"{x['train_loss']:.2f} / {y['train_loss']:.2f} |")
    print()
    print("| dataset | pairs | relative - absolute | CPT - ICL, absolute | CPT - ICL, relative |")
    print("|---|---|---|---|---|")
    for dataset in sorted({k[0] for k in both}):
        keys = [k for k in both if k[0] == dataset]
        print(f"| {dataset} | {len(keys)} | {statistics.mean(r[k]['cpt'] - a[k]['cpt'] for k in keys):+.3f} | "
              f"{statistics.mean(a[k]['cpt'] - a[k]['icl'] for k in keys):+.3f} | "
              f"{statistics.mean(r[k]['cpt'] - r[k]['icl'] for k in keys):+.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
