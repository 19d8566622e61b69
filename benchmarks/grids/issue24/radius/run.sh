#!/usr/bin/env bash
# The radius dev study of this folder's README (issue 24, item 3) on Gemma 3 270M: both radii, one job
# at a time on one thread, the radii interleaved so that whatever is done when it is stopped stays paired
# (each seed runs with radius=absolute, then radius=relative, before the next seed starts).
#
#   nohup bash benchmarks/grids/issue24/radius/run.sh >> runs/radius-gemma.log 2>&1 &
#
# Run from the repository root. Every recipe_study.py command skips the runs its --out folder already
# holds, so a killed study resumes where it stopped when this script is started again. The study runs
# the code of one commit (CODE_COMMIT, checked out once into runs/radius-code-COMMIT) so that the work
# committed while it runs does not change what it measures halfway; a study resumed later keeps it.
set -euo pipefail

CODE_COMMIT=${CODE_COMMIT:-d489a66}
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
CODE=runs/radius-code-$CODE_COMMIT
if [ ! -d "$CODE" ]; then
  mkdir -p "$CODE.tmp"
  git archive "$CODE_COMMIT" src benchmarks | tar -x -C "$CODE.tmp"
  mv "$CODE.tmp" "$CODE"  # whole or absent: a half-extracted copy is never used
fi

export PYTHONPATH=$PWD/$CODE/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
G=$("$PYTHON" "$CODE/benchmarks/gemma_model.py")

study() {  # shots seed
  for radius in absolute relative; do
    echo "$(date -u +%FT%TZ) shots=$1 seed=$2 radius=$radius"
    "$PYTHON" "$CODE/benchmarks/recipe_study.py" --model "$G" --data rotten_tomatoes subj --shots "$1" \
        --seeds "$2" --set radius=$radius --out runs/radius-gemma-$radius
  done
}

for seed in 0 1 2; do study 4 "$seed"; done
for seed in 0 1 2; do study 8 "$seed"; done
for seed in 3 4; do study 4 "$seed"; study 8 "$seed"; done
echo "$(date -u +%FT%TZ) done"
