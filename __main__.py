"""`python -m clusterfx` and the `clusterfx` console script: see `cli/__init__.py`."""

import sys

from clusterfx.cli import main

if __name__ == "__main__":
    sys.exit(main())
