"""``python -m cptune`` runs the command line."""

import sys

from cptune.cli import main

sys.exit(main())
