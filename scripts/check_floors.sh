#!/usr/bin/env bash
# Check the lowest versions pyproject.toml claims: a throwaway venv with lightning, torchmetrics and onnxruntime
# at their floors runs the tests of training (EMA, DDP, bf16), export, INT8 and the torch-free predictor.
# torch/torchvision: 2.14.1/0.29.1, the only pair this project's machines can install (see README, "Versions").
#   bash scripts/check_floors.sh            # VENV=/tmp/fracture-floors by default
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-/tmp/fracture-floors}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "lightning==2.6.0" "torchmetrics==1.3.1" "onnxruntime==1.19.0" \
    "numpy==1.26.4" "opencv-python-headless==4.8.1.78" -e ".[train,dicom,serve,dev]"
"$venv/bin/python" - <<'EOF'
import cv2, lightning, numpy, onnxruntime, torch, torchmetrics
print(f"floors: torch {torch.__version__}, lightning {lightning.__version__}, torchmetrics {torchmetrics.__version__}, "
      f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, opencv {cv2.__version__}")
EOF
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_architecture.py tests/test_backbones.py tests/test_training_path.py tests/test_export.py \
    tests/test_predict.py tests/test_serve.py tests/test_fit.py "$@"
