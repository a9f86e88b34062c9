"""Thin wrapper: `python scripts/export_onnx.py …` = `python -m fracture.export …`."""

import sys

from fracture.export.export import main

if __name__ == "__main__":
    sys.exit(main())
