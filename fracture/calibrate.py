"""python -m fracture.calibrate: the command; its code is fracture.deploy.calibrate."""

import sys

from fracture.deploy.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
