#!/usr/bin/env bash
# The final grid of issue 24 (docs/results.md): benchmarks/final_grid.py split into one job per
# (model, dataset, seed), JOBS at a time, seeds first (so an interrupted run leaves whole seeds), each
# job with one thread. Rerun it after an interruption: the rows already written are skipped.
#
#   bash benchmarks/final_grid.sh                    # SmolLM2 then Gemma, 2 jobs at a time
#   MODELS=gemma SEEDS="0 1" bash benchmarks/final_grid.sh
#   METHODS="zero-shot icl lora setfit" bash benchmarks/final_grid.sh   # a subset of the methods
set -euo pipefail
OUT=${OUT:-benchmarks/grids/issue24/final}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-.venv/bin/python}
MODELS=${MODELS:-smollm2 gemma}
SEEDS=${SEEDS:-0 1 2 3 4}
DATASETS=${DATASETS:-rotten_tomatoes subj bbc_news reuters_r8}
METHODS=${METHODS:-}  # empty: every method of the model
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
mkdir -p "$OUT/logs"
for model in $MODELS; do
  for seed in $SEEDS; do
    for dataset in $DATASETS; do
      printf '%s\0' "$model" "$dataset" "$seed" "$OUT" "$METHODS"
    done
  done
done | xargs -0 -n 5 -P "$JOBS" sh -c '
  "$0" benchmarks/final_grid.py --model "$1" --data "$2" --seeds "$3" --out "$4" ${5:+--methods $5} \
    >> "$4/logs/$1-$2-seed$3.log" 2>&1 || { echo "failed: $1 $2 seed $3 (see $4/logs)" >&2; exit 255; }
  echo "done: $1 $2 seed $3"' "$PYTHON"
"$PYTHON" benchmarks/final_grid.py --report-only --out "$OUT"
