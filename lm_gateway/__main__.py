"""``python -m lm_gateway``: the same as the ``lm-gateway`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
