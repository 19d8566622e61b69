"""cptune vs PEFT's CPT, side by side; writes docs/performance.md and docs/performance.png.

    python benchmarks/bench.py            # the full run recorded in docs/performance.md
    python benchmarks/bench.py --quick    # smoke run (a few minutes), writes to runs/bench-quick/
    python benchmarks/bench.py --help

The measurement code lives in the package next to this script, benchmarks/cptbench/ (outside the
installed cptune package); the workers it spawns run this script too.
"""

import sys
from pathlib import Path

try:
    import cptune  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cptbench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
