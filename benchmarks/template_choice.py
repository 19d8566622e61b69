"""What template="auto" chooses on the embedded model, and every candidate's held-out score.

    python benchmarks/template_choice.py --data rotten_tomatoes subj --shots 4 8 --seed 0

For each (dataset, shots): a balanced sample of `shots` labelled examples (cptune.data.sample_splits,
the same draw as `cptune demo` and `compare`), then cptune.selection.choose_template on them alone.
Prints the choice, its cost, and a Markdown table of the candidates (held-out log-prob of the true
label and accuracy over the two halves).
"""

from __future__ import annotations

import argparse
import time

from cptune.data import DATASET_DEFAULTS, load_dataset, sample_splits
from cptune.models import load_model
from cptune.selection import choose_template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["rotten_tomatoes"])
    parser.add_argument("--shots", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    base, tok = load_model()
    print(f"model loaded in {time.perf_counter() - start:.1f} s", flush=True)
    for name in args.data:
        dataset = load_dataset(name)
        words = DATASET_DEFAULTS[name][1]
        for shots in args.shots:
            examples, _, _ = sample_splits(dataset, shots, 0, args.seed)
            choice = choose_template(base, tok, [(ex.text, ex.label) for ex in examples], words, seed=args.seed)
            print(f"\n{name}, {shots} shots, seed {args.seed}: chose {choice.summary()}\n", flush=True)
            print("| template | words | held-out log-prob | held-out accuracy |\n|---|---|---|---|")
            for s in choice.scores:
                shown = s["format"].replace("\n", "\\n")
                score = (f"{s['log_prob']:.3f} | {s['accuracy']:.2f}" if "log_prob" in s
                         else f"skipped: {s['skipped']} | -")
                print(f"| `{shown}` | {', '.join(s['words'].values())} | {score} |", flush=True)


if __name__ == "__main__":
    main()
