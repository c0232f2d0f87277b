"""``python -m gesr_jax`` is the ``gesr`` command line."""

import sys

from gesr_jax.cli import main

if __name__ == "__main__":
    sys.exit(main())
