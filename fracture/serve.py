"""python -m fracture.serve: the command; its code is fracture.deploy.serve."""

import sys

from fracture.deploy.serve.app import main

if __name__ == "__main__":
    sys.exit(main())
