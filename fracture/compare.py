"""python -m fracture.compare: the command; its code is fracture.scoring.compare."""

import sys

from fracture.scoring.compare import main

if __name__ == "__main__":
    sys.exit(main())
