"""``python -m cptune`` runs the command line."""

import sys

from cptune.app.cli import main

sys.exit(main())
