#!/usr/bin/env bash
# Train the release recipe (frozen before any test score; docs/release.md) on one GPU or on the CPU:
#   classifier  configs/fracatlas.yaml, 224 px letterbox, 30 epochs, best by validation AUROC      (beside the rest on a GPU)
#   localiser   configs/fracatlas_localise.yaml, 20 epochs, best by validation AUROC
#   fine-tune   focal map loss, map weight 3, pointing loss 5, lr 1e-3, 20 epochs from it, last epoch
#   2nd cycle   the same at lr 5e-4, 16 epochs from the fine-tune's last epoch, last epoch
# No stage scores the test split (--test_after_fit false). Then, on any machine:
#   python -m fracture.ensemble RESULTS/localise-ft2/last.ckpt --classifier RESULTS/classify/best-….ckpt --out …
#
#   bash scripts/train_release.sh DATA_DIR SECONDS [WHEELS_DIR]
#
# SECONDS caps each stage's wall time (trainer.max_time), so the run ends inside it whatever the hardware;
# a capped stage says so and the card must. WHEELS_DIR: wheels of jsonargparse and its needs for a machine
# without an index. With OUT set (a folder fetched back from a lent GPU), the two checkpoints the release
# needs are written there without optimiser state, conv/linear weights in fp16 (`python -m fracture.train.checkpoint
# narrow`: the device tool returns at most 64 MiB; loading casts them back to fp32), with every stage's logs,
# in 15 MiB parts (`cat NAME.ckpt.part-* > NAME.ckpt`).
# DRY_RUN=1: the same path on the CPU, 2 epochs of 3 batches per stage (how it is checked without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/train_release.sh DATA_DIR SECONDS [WHEELS_DIR]}
BUDGET=${2:?usage: bash scripts/train_release.sh DATA_DIR SECONDS [WHEELS_DIR]}
WHEELS=${3:-data/wheels}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-checkpoints/release}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
hms() { printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60)); }

source scripts/offline_wheels.sh
install_offline "$PY" "$WHEELS" "jsonargparse>=4.27:jsonargparse" "docstring-parser:docstring_parser"
mkdir -p "$RESULTS"
"$PY" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

E1=20 E2=20 E3=16 EC=30 VAL1=2 VAL_EVERY=4  # validation every 2 / 4 epochs: the picks need no more, a GPU's epoch is shorter than it
if [ "${DRY_RUN:-0}" = 1 ]; then
    E1=2 E2=2 E3=2 EC=2 VAL1=1 VAL_EVERY=1
    HW=(--trainer.accelerator cpu --trainer.devices 1 --trainer.limit_train_batches 3 --trainer.limit_val_batches 3 --data.num_workers 0)
    CLS_HW=("${HW[@]}")
else
    HW=(--trainer.accelerator gpu --trainer.devices 1 --data.num_workers 8 --data.augment_on device)
    CLS_HW=(--trainer.accelerator gpu --trainer.devices 1 --data.num_workers 5 --data.augment_on device)
fi
COMMON=(--data.root "$DATA" --output_dir "$RESULTS" --trainer.precision bf16-mixed --model.channels_last true
        --trainer.enable_progress_bar false --test_after_fit false)

# The classifier shares the GPU with the localiser's three stages and gets the whole budget.
timeout $((BUDGET + 30)) "$PY" -m fracture.fit --config configs/fracatlas.yaml "${COMMON[@]}" "${CLS_HW[@]}" --run_name classify \
    --data.resize letterbox --trainer.max_epochs "$EC" --trainer.max_time "$(hms "$((BUDGET - 20))")" > "$RESULTS/classify.log" 2>&1 &
CLASSIFY=$!

S1=$(( $(left) * 40 / 100 ))
timeout $((S1 + 30)) "$PY" -m fracture.fit --config configs/fracatlas_localise.yaml "${COMMON[@]}" "${HW[@]}" --run_name localise \
    --trainer.max_epochs "$E1" --trainer.check_val_every_n_epoch "$VAL1" --trainer.max_time "$(hms "$S1")" > "$RESULTS/localise.log" 2>&1 || echo "localise: exit $?"
FINE_TUNE=(--config configs/fracatlas_localise.yaml "${COMMON[@]}" "${HW[@]}" --model.map_loss focal --model.map_weight 3 --model.point_weight 5
           --best_by val/froc_mean --trainer.check_val_every_n_epoch "$VAL_EVERY")
S2=$(( ($(left) - 25) * 55 / 100 ))
timeout $((S2 + 30)) "$PY" -m fracture.fit "${FINE_TUNE[@]}" --run_name localise-ft --init_from "$(ls "$RESULTS"/localise/best-*.ckpt | head -1)" \
    --model.recipe.lr 0.001 --trainer.max_epochs "$E2" --trainer.max_time "$(hms "$S2")" > "$RESULTS/localise-ft.log" 2>&1 || echo "localise-ft: exit $?"
S3=$(( $(left) - 25 ))
timeout $((S3 + 30)) "$PY" -m fracture.fit "${FINE_TUNE[@]}" --run_name localise-ft2 --init_from "$RESULTS/localise-ft/last.ckpt" \
    --model.recipe.lr 0.0005 --trainer.max_epochs "$E3" --trainer.max_time "$(hms "$S3")" > "$RESULTS/localise-ft2.log" 2>&1 || echo "localise-ft2: exit $?"
wait "$CLASSIFY" || echo "classify: exit $?"

for run in classify localise localise-ft localise-ft2; do
    echo "== $run (recipe: $(case $run in classify) echo $EC;; localise) echo $E1;; localise-ft) echo $E2;; *) echo $E3;; esac) epochs)"
    grep -E "^(epoch|error|warning)|Error" "$RESULTS/$run.log" | tail -n 40 || true
    "$PY" scripts/epoch_summary.py "$RESULTS/$run" || true
done
echo "== done in $((SECONDS - START)) s"

if [ -n "${OUT:-}" ]; then
    "$PY" -m fracture.train.checkpoint narrow "$(ls "$RESULTS"/classify/best-*.ckpt | head -1)" "$OUT/classify-best.ckpt"
    "$PY" -m fracture.train.checkpoint narrow "$RESULTS/localise-ft2/last.ckpt" "$OUT/localise-ft2-last.ckpt"
    for f in "$OUT"/*.ckpt; do split -b 15m "$f" "$f.part-" && rm "$f"; done  # 16 MiB a file comes back
    tar czf "$OUT/logs.tgz" --exclude='*.ckpt' --exclude='*/tensorboard' "$RESULTS"
    ls -la "$OUT"
fi
