"""python -m fracture.synth: the command; its code is fracture.data.synth."""

import sys

from fracture.data.synth import main

if __name__ == "__main__":
    sys.exit(main())
