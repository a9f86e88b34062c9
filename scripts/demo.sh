#!/usr/bin/env bash
# README command 1: set up .venv and train the demo on built-in synthetic radiographs (CPU, a few minutes).
# Extra arguments go to fracture.fit, e.g. `bash scripts/demo.sh --trainer.max_epochs 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[train]"
[ -f data/synthetic/train/annotations.csv ] || .venv/bin/python -m fracture.synth --out data/synthetic --n 1000 --seed 0
exec .venv/bin/python -m fracture.fit --config configs/demo.yaml "$@"
