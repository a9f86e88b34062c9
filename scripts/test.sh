#!/usr/bin/env bash
# README command 2: set up .venv with the training, DICOM, serving, PACS, pretrained-weights and test extras, then run the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k export`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[train,dicom,serve,pacs,pretrained,dev]"
exec .venv/bin/python -m pytest -q "$@"
