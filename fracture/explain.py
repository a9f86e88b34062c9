"""python -m fracture.explain: the command; its code is fracture.train.explain."""

import sys

from fracture.train.explain import main

if __name__ == "__main__":
    sys.exit(main())
