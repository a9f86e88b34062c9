"""python -m fracture.audit: the command; its code is fracture.data.audit."""

import sys

from fracture.data.audit import main

if __name__ == "__main__":
    sys.exit(main())
