"""`python -m unetx.bench`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m unetx.bench"))
