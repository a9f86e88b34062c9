"""python -m fracture.ensemble: the command; its code is fracture.train.ensemble."""

import sys

from fracture.train.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
