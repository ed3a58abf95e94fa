"""``python -m align.integrations.lm_eval ARGS``: lm-eval's command line with the ``dlm-align`` model registered."""

import sys

from align.integrations.lm_eval import main

if __name__ == "__main__":
    sys.exit(main())
