"""python -m fracture.fit: the command; its code is fracture.train.fit."""

import sys

from fracture.train.fit import main

if __name__ == "__main__":
    sys.exit(main())
