"""``python -m secateurs``: the command line, as ``torchrun -m secateurs run RECIPE`` starts it."""

import sys

from secateurs.cli import main

if __name__ == "__main__":
    sys.exit(main())
