"""``python -m align.cli`` runs the ``dlm-align`` command (used by torchrun and accelerate launches)."""

import sys

from align.cli import main

sys.exit(main())
