"""``python -m ingestd``: the same as the ``ingestd`` console script."""

import sys

from ingestd.cli import main

if __name__ == "__main__":  # children started with spawn import this module too
    sys.exit(main())
