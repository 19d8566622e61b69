#!/usr/bin/env bash
# The GPU check in one go: the device tests, benchmarks/gpu_check.py, and `cptune train`/`predict` on CUDA.
#
#     bash benchmarks/gpu_check.sh OUT_DIR [MODEL [DATA]]
#
# MODEL: a model folder (default: the embedded smollm2-135m); with RANDOM_WEIGHTS=1 only its config and
# tokenizer are read and a model of its shape with seeded random weights is checked (gpu_check.py
# --random-weights). DATA: a built-in dataset name or a CSV/TSV/JSONL file with text and label columns
# (default: rotten_tomatoes). DEVICE=cpu runs the same parts on the CPU (a dry run of this script),
# STEPS and CLASSIFIER_STEPS shorten it, PYTHON picks the interpreter (default: python3).
# Each part runs even if an earlier one failed; the logs and gpu_check.json go to OUT_DIR; the exit
# status is the number of parts that failed.
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [MODEL [DATA]]}
model=${2:-smollm2-135m}
data=${3:-rotten_tomatoes}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
work=$(mktemp -d "${TMPDIR:-/tmp}/cptune-gpu-check.XXXXXX")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
failed=0

part() {  # part NAME COMMAND...: run it, log to OUT_DIR/NAME.log, count a failure
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" 2>&1 | tee "$out/$name.log"; then
    echo "== $name: ok ($((SECONDS - start)) s)"
  else
    echo "== $name: FAILED ($((SECONDS - start)) s)"
    failed=$((failed + 1))
  fi
}

check_args=(--model "$model" --data "$data" --device "$device" --steps "${STEPS:-12}"
            --classifier-steps "${CLASSIFIER_STEPS:-10}" --out "$out/gpu_check.json")
if [ "${RANDOM_WEIGHTS:-0}" = 1 ]; then
  check_args+=(--random-weights "$work/model")
fi

part env "$python" -c "import sys, torch, transformers, tokenizers, peft, huggingface_hub, cptune
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
      transformers.__version__, 'tokenizers', tokenizers.__version__, 'peft', peft.__version__,
      'huggingface_hub', huggingface_hub.__version__, 'cptune', cptune.__file__)
print('cuda available:', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
part device_tests "$python" -m pytest -v -rfEs -p no:cacheprovider tests/test_device.py
part gpu_check "$python" benchmarks/gpu_check.py "${check_args[@]}"

# The CLI end to end on the model gpu_check.py checked (its random-weight copy if it made one).
cli_model=$model
[ -d "$work/model" ] && cli_model=$work/model
part cli_train "$python" -m cptune train --data "$data" --model "$cli_model" --device "$device" --context-size 8 \
  --template "input: {x} output: {y}" --steps "${CLI_STEPS:-4}" --output "$work/classifier"
part cli_predict "$python" -m cptune predict "$work/classifier" "a gripping, funny and moving film" \
  "dull, lifeless and far too long" --device "$device"
rm -rf "$work"
echo "== parts failed: $failed"
exit "$failed"
