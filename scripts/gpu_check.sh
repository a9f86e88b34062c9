#!/usr/bin/env bash
# The researcher's GPU path in one run (about 6 minutes on one H100): the default config (seed CNN, the full
# 50 epochs) in fp32, then configs/fracatlas.yaml (resnet18) in bf16-mixed with augmentation on the GPU,
# each followed by its test. Prints per-epoch time, images/s and peak GPU memory (perf/* in metrics.csv),
# mean and peak GPU utilisation (nvidia-smi, sampled every second) and the test metrics.
#
#   bash scripts/gpu_check.sh DATA_DIR [WHEELS_DIR]
#
# DATA_DIR: a dataset in the standard layout; on a machine with little room use a compact copy:
#   python -m fracture.datasets compact data/fracatlas --out data/fracatlas-224 --size 224      # 17 MiB for FracAtlas
# or `synthetic` to generate 2000 synthetic radiographs there. WHEELS_DIR (default data/wheels): wheels
# of what the GPU machine lacks (jsonargparse), installed offline; fill it on a machine with network:
#   pip download -d data/wheels --no-deps "jsonargparse>=4.27" docstring-parser typeshed-client
# DRY_RUN=1 runs the same path on the CPU for 2 epochs of 8 batches (this is how it is checked without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/gpu_check.sh DATA_DIR [WHEELS_DIR]}
WHEELS=${2:-data/wheels}
PY=${PYTHON:-python3}
OUT=${OUT:-checkpoints/gpu-check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

source scripts/offline_wheels.sh
install_offline "$PY" "$WHEELS" "jsonargparse>=4.27:jsonargparse" "docstring-parser:docstring_parser"
if [ "$DATA" = synthetic ]; then
    DATA=data/gpu-check-synthetic
    [ -f "$DATA/train/annotations.csv" ] || "$PY" -m fracture.synth --out "$DATA" --n 2000 --seed 0
fi
"$PY" - <<'EOF'
import platform, torch, lightning
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}, GPU: {gpu}, "
      f"CPU ISA {torch.backends.cpu.get_cpu_capability()}", flush=True)
EOF

if [ "${DRY_RUN:-0}" = 1 ]; then
    HW=(--trainer.accelerator cpu --trainer.devices 1 --trainer.max_epochs 2 --trainer.limit_train_batches 8 --trainer.limit_val_batches 4
        --trainer.limit_test_batches 4 --data.num_workers 0)
    BF16=(--trainer.precision bf16-mixed)
else
    HW=(--trainer.accelerator gpu --trainer.devices 1 --data.num_workers 8)
    BF16=(--trainer.precision bf16-mixed --data.augment_on device --model.channels_last true)
fi

run() {  # name, then fit arguments
    local name=$1; shift
    local util="$OUT/$name.gpu.csv" sampler=""
    mkdir -p "$OUT"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$util" & sampler=$!
    fi
    local start=$SECONDS
    "$PY" -m fracture.fit "$@" --data.root "$DATA" --output_dir "$OUT" --run_name "$name" --trainer.enable_progress_bar false "${HW[@]}"
    [ -n "$sampler" ] && kill "$sampler" 2>/dev/null || true
    echo "== $name: $((SECONDS - start)) s in all"
    "$PY" scripts/epoch_summary.py "$OUT/$name" "$util"
}

run default-fp32 --config configs/default.yaml --trainer.precision 32
run fracatlas-bf16 --config configs/fracatlas.yaml "${BF16[@]}"
