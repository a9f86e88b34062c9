"""python -m fracture.evaluate: the command; its code is fracture.report.evaluate."""

import sys

from fracture.report.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
