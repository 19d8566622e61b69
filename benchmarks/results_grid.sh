#!/usr/bin/env bash
# The six-method grid of docs/results.md: 3 built-in datasets x shots {2, 4, 8} x seeds 0-4 x all six
# methods, 100 balanced test examples per cell, on the embedded SmolLM2-135M.
#
# It is `cptune compare --dataset rotten_tomatoes subj movie_sentiment_5 --shots 2 4 8 --seeds 0 1 2 3 4
# --test-size 100 --output runs/compare` split into 15 independent (dataset, seed) jobs, JOBS at a time
# (a cell depends only on its own dataset, shots, seed and method), then merged into one
# results.jsonl and reported. Rerun it after an interruption: finished cells are skipped.
#
#   bash benchmarks/results_grid.sh                       # JOBS=2 processes, 1 thread each
#   JOBS=1 OMP_NUM_THREADS=2 bash benchmarks/results_grid.sh
set -euo pipefail
OUT=${OUT:-runs/compare}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT/parts"
# one job per (dataset, seed): output folder, dataset, seed (NUL-separated: any folder name works)
for seed in 0 1 2 3 4; do
  for dataset in rotten_tomatoes subj movie_sentiment_5; do
    printf '%s\0' "$OUT/parts/$dataset-seed$seed" "$dataset" "$seed"
  done
done | xargs -0 -n 3 -P "$JOBS" sh -c '
  "$0" -m cptune compare --dataset "$2" --seeds "$3" --shots 2 4 8 --test-size 100 --output "$1" \
    > "$1.log" 2>&1 || { echo "failed: $2 seed $3 (see $1.log)" >&2; exit 255; }
  echo "done: $2 seed $3"' "$PYTHON"
# merge (atomically; OUT/results.jsonl is always rebuilt from the parts) and report
cat "$OUT"/parts/*/results.jsonl > "$OUT/.results.jsonl.tmp"
mv "$OUT/.results.jsonl.tmp" "$OUT/results.jsonl"
"$PYTHON" -m cptune compare --report-only --output "$OUT"
