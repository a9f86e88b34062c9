"""python -m fracture.node: the command; its code is fracture.deploy.pacs.node."""

import sys

from fracture.deploy.pacs.node import main

if __name__ == "__main__":
    sys.exit(main())
