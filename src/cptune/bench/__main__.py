"""``python -m cptune.bench``: the benchmark, and how the driver runs each ``--worker`` measurement."""

import sys

from cptune.bench.cli import main

sys.exit(main())
