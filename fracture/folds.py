"""python -m fracture.folds: the command; its code is fracture.scoring.folds."""

import sys

from fracture.scoring.folds import main

if __name__ == "__main__":
    sys.exit(main())
