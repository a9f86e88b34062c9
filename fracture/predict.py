"""python -m fracture.predict: the command; its code is fracture.deploy.predict."""

import sys

from fracture.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
