"""python -m fracture.datasets: the command; its code is fracture.data.datasets."""

import sys

from fracture.data.datasets import main

if __name__ == "__main__":
    sys.exit(main())
