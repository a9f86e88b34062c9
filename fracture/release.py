"""python -m fracture.release: the command; its code is fracture.deploy.release."""

import sys

from fracture.deploy.release import main

if __name__ == "__main__":
    sys.exit(main())
