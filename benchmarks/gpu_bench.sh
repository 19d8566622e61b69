#!/usr/bin/env bash
# cptune (every query layout, and compiled) against PEFT on a GPU, prepared here and run there in one command.
#
#     bash benchmarks/gpu_bench.sh prepare          # here, with network to PyPI: fills .gpu/ and .whl/ (~50 MB)
#     bash benchmarks/gpu_bench.sh run OUT_DIR      # on the GPU machine, from the repository root
#     DEVICE=cpu QUICK=1 bash benchmarks/gpu_bench.sh run OUT_DIR   # the same script as a CPU dry run (tiny shape)
#
# prepare: .gpu/tokenizer (the embedded SmolLM2-135M-Instruct's tokenizer: every shape tokenises with it),
# .gpu/rt.csv (512 Rotten Tomatoes rows from the built-in data) and .whl/ (Python 3.12 x86_64 wheels of the
# pinned transformers, tokenizers, PEFT, accelerate, huggingface_hub, safetensors and what they need, but
# torch: the GPU machine brings its own CUDA torch). Both folders are git-ignored: pass them to the device
# tool as `carry` (they travel with the tree; 64 MiB in all).
# run: builds a virtual environment on top of the machine's Python and torch (--system-site-packages, then
# pip from .whl/ only, nothing from the network), then runs benchmarks/gpu_vs_peft.py on random-weight
# models of three published shapes and, with what time is left, the compiled variant on the smallest;
# JSON, markdown tables and logs go to OUT_DIR, each rewritten after every measurement. Budget: about
# 9 minutes on an H100 (GRID_SECONDS for the grid, COMPILE_SECONDS for the compiled run; each measurement
# not started by then is recorded as skipped). PYTHON picks the interpreter (default: python3).
set -u -o pipefail
mode=${1:?usage: bash benchmarks/gpu_bench.sh prepare | run OUT_DIR}
python=${PYTHON:-python3}

if [ "$mode" = prepare ]; then
  set -e
  mkdir -p .gpu .whl
  "$python" - <<'PY'
import csv
from transformers import AutoTokenizer
from cptune.data import load_dataset
from cptune.models import convert_embedded_model

AutoTokenizer.from_pretrained(convert_embedded_model()).save_pretrained(".gpu/tokenizer")
data = load_dataset("rotten_tomatoes")
with open(".gpu/rt.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["text", "label"])
    for ex in data.examples[:512]:
        writer.writerow([ex.text, ex.label])
print("wrote .gpu/tokenizer and .gpu/rt.csv")
PY
  # The pins: constraints.txt where it names the package, else the version this checkout's environment runs.
  wheels=$("$python" - <<'PY'
import importlib.metadata as md
import re

pins = {}
for line in open("constraints.txt", encoding="utf-8"):
    m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
    if m:
        pins[m.group(1).lower().replace("_", "-")] = m.group(2)

def requires(name):
    out = []
    for r in md.distribution(name).requires or []:
        if ";" in r and "extra" in r.split(";", 1)[1]:
            continue
        out.append(re.split(r"[ <>=!~;\[(]", r, maxsplit=1)[0].strip().lower().replace("_", "-"))
    return out

def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:  # a dependency for another platform or Python (colorama, tomli)
        return None

torch_side, stack = set(), ["torch"]  # torch and its own dependencies come with the GPU machine's torch
while stack:
    name = stack.pop()
    if name not in torch_side:
        torch_side.add(name)
        stack += requires(name) if installed(name) else []
wanted, stack = {}, ["transformers", "tokenizers", "peft", "accelerate", "huggingface-hub", "safetensors", "tqdm"]
while stack:
    name = stack.pop()
    if name in wanted or name in torch_side or installed(name) is None:
        continue
    wanted[name] = pins.get(name, installed(name))
    stack += requires(name)
print(" ".join(f"{k}=={v}" for k, v in sorted(wanted.items())))
PY
)
  echo "downloading: $wheels"
  # shellcheck disable=SC2086
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest .whl $wheels
  du -sh .gpu .whl
  exit 0
fi

[ "$mode" = run ] || { echo "gpu_bench.sh: error: mode must be prepare or run, not $mode" >&2; exit 2; }
out=${2:?usage: bash benchmarks/gpu_bench.sh run OUT_DIR}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$SECONDS
if [ "$device" != cpu ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' ||
    echo "== warning: $("$python" -V) is not Python 3.12, the version of the wheels in .whl/"
  # The pinned top-level packages; pip takes their dependencies from the machine where it has them, else .whl/.
  top=$(ls .whl | grep -E '^(transformers|tokenizers|peft|accelerate|huggingface_hub|safetensors)-' |
        sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/')
  venv=$(mktemp -d "${TMPDIR:-/tmp}/cptune-gpu-venv.XXXXXX")
  # shellcheck disable=SC2086
  if "$python" -m venv --system-site-packages "$venv" &&
     "$venv/bin/python" -m pip install --quiet --no-index --find-links .whl $top 2>&1 | tee "$out/pip.log"; then
    python=$venv/bin/python
  else  # no venv module (or its pip): every wheel into one folder put first on the path, as gpu_check once ran
    echo "== no venv: installing .whl/ with pip --target"
    site=$venv/site
    wheels=(.whl/*.whl)
    if "$python" -c 'import numpy' 2>/dev/null; then  # keep the machine's numpy, the one its torch was built with
      mapfile -t wheels < <(ls .whl/*.whl | grep -v '/numpy-')
    fi
    "$python" -m pip install --quiet --no-index --no-deps --target "$site" "${wheels[@]}" 2>&1 | tee "$out/pip.log"
    export PYTHONPATH=$PWD/src:$site  # before the machine's site-packages: the pinned versions win
  fi
  echo "== environment ready ($((SECONDS - start)) s)"
fi
"$python" -c "import sys, torch, transformers, peft, cptune
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers',
      transformers.__version__, 'peft', peft.__version__, 'cptune', cptune.__file__)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | tee "$out/env.log"

if [ "${QUICK:-0}" = 1 ]; then  # the dry run: a tiny shape, two batch sizes, one dtype
  grid=(--shapes tiny --dtypes float32 --shots 4 --batches 1 8 --classify-batches 8 --steps 2 --test-size 16)
  compile_grid=(--shapes tiny --dtypes float32 --shots 4 --batches 8 --classify-batches 8 --steps 2 --test-size 16)
else
  grid=(--shapes smollm2-135m llama-3.2-1b smollm2-360m --dtypes float32 bfloat16 --shots 4 16 --batches 1 8 32
        --classify-batches 32 --steps 10 --cell-seconds 12 --test-size 256)
  compile_grid=(--shapes smollm2-135m --dtypes float32 bfloat16 --shots 16 --batches 8 --classify-batches 32
                --steps 10 --test-size 256)
fi
common=(--tokenizer .gpu/tokenizer --data .gpu/rt.csv --device "$device")
"$python" benchmarks/gpu_vs_peft.py "${common[@]}" "${grid[@]}" --layouts auto packed onepass padded \
  --max-seconds "${GRID_SECONDS:-360}" --out "$out/gpu_vs_peft.json" --markdown "$out/gpu_vs_peft.md" \
  2>&1 | tee "$out/gpu_vs_peft.log"
grid_status=${PIPESTATUS[0]}
echo "== grid: exit $grid_status ($((SECONDS - start)) s)"
# A hard limit too: compiling a new shape can take long, and the grid's results must not wait on it.
timeout "$(( ${COMPILE_SECONDS:-60} + 90 ))" "$python" benchmarks/gpu_vs_peft.py "${common[@]}" "${compile_grid[@]}" \
  --layouts auto --compile --max-seconds "${COMPILE_SECONDS:-60}" --out "$out/gpu_compile.json" --markdown "$out/gpu_compile.md" \
  2>&1 | tee "$out/gpu_compile.log"
compile_status=${PIPESTATUS[0]}
echo "== compiled: exit $compile_status ($((SECONDS - start)) s)"
exit $((grid_status + compile_status))
