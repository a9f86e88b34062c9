"""Thin wrapper: `python scripts/predict_onnx.py …` = `python -m fracture.predict …` (torch-free)."""

import sys

from fracture.deploy.predict import main

if __name__ == "__main__":
    sys.exit(main())
