"""`python -m unetx ...` and `torchrun -m unetx train ...`."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
