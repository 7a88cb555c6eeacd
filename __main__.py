"""`python -m clusterfx` and the `clusterfx` console script: see `compiler/cli.py`."""

import sys

from clusterfx.compiler.cli import main

if __name__ == "__main__":
    sys.exit(main())
