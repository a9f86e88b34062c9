#!/usr/bin/env bash
# Localisation's long schedule on one GPU, against the classifier at the same budget (issue #10's next step):
#   1. the localiser of configs/fracatlas_localise.yaml from scratch (bce_dice map loss, lr 1e-3 cosine), E1 epochs;
#   2. its fine-tune with the focal map loss, map weight 3, pointing loss 5, lr 1e-3, E2 epochs;
#   3. a second cosine cycle of that fine-tune at lr 5e-4, E3 epochs (the README's best recipe on the CPU: 20 + 20 + 16);
#   4. beside them on the same GPU, configs/fracatlas.yaml (resnet18 classify, 224 px) for E1 + E2 + E3 epochs;
# then `fracture.evaluate` of the localiser's last epoch and of the classifier's best and last epochs on the test split.
# The epochs are sized to the wall-clock budget from a measured training step, and every stage has a time guard,
# so the reports are written inside the budget. Prints per-epoch time, images/s and peak GPU memory.
#
#   bash scripts/gpu_localise.sh DATA_DIR SECONDS [WHEELS_DIR]
#
# DATA_DIR: a FracAtlas import with boxes (python -m fracture.datasets import fracatlas … ; 14 MiB).
# SECONDS: the budget for all of it. WHEELS_DIR: as in scripts/gpu_check.sh (jsonargparse, offline).
# Results land in RESULTS (default checkpoints/gpu-localise); with OUT set (a results folder that is fetched
# back), a bundle of the run folders without optimiser state and the reports is split there in 15 MiB parts:
#   cat OUT/bundle.tgz.part-* | tar xz
# DRY_RUN=1 runs the same path on the CPU, 2 + 2 + 2 epochs of 3 batches (how it is checked without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash scripts/gpu_localise.sh DATA_DIR SECONDS [WHEELS_DIR]}
BUDGET=${2:?usage: bash scripts/gpu_localise.sh DATA_DIR SECONDS [WHEELS_DIR]}
WHEELS=${3:-data/wheels}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-checkpoints/gpu-localise}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS
left() { echo $((BUDGET - (SECONDS - START))); }

if ! "$PY" -c "import jsonargparse, docstring_parser" 2>/dev/null; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "jsonargparse>=4.27" docstring-parser typeshed-client
fi
mkdir -p "$RESULTS"

# E1, E2, E3 (and the validation intervals) from one measured training step of the localiser
read -r E1 V1 E2 V2 E3 V3 < <("$PY" - "$DATA" "$BUDGET" "${DRY_RUN:-0}" <<'EOF'
import sys, time
import pandas as pd, torch, lightning
from fracture.losses import image_loss, map_loss
from fracture.networks import ResNet
from fracture.preprocess import Contract

data, budget, dry = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
dev = "cuda" if torch.cuda.is_available() else "cpu"
name = torch.cuda.get_device_name() if dev == "cuda" else "none"
print(f"torch {torch.__version__}, lightning {lightning.__version__}, GPU: {name}", file=sys.stderr)
if dry:
    print(2, 2, 2, 2, 2, 2)
    sys.exit()
net = ResNet(18, "localise").build(Contract(image_size=448, resize="letterbox")).to(dev).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(net.parameters(), 1e-3)
x = (torch.rand(32, 1, 256, 256, device=dev) * 255).contiguous(memory_format=torch.channels_last)
y = (torch.rand(32, device=dev) > 0.5).float()
def step():
    with torch.autocast(dev, torch.bfloat16):
        pooled, joint, maps = net.forward_maps(x)
        loss = image_loss(pooled, y, 1.0) + image_loss(joint, y, 1.0) + map_loss(maps, torch.zeros_like(maps), y >= 0, "bce_dice")
    opt.zero_grad()
    loss.backward()
    opt.step()
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for _ in range(5):
    step()
sync()
t = time.perf_counter()
for _ in range(20):
    step()
sync()
s = (time.perf_counter() - t) / 20
steps = int(len(pd.read_csv(f"{data}/train/annotations.csv")) * 0.85) // 32
epoch = 2.5 * steps * s + 1.5          # loader, augmentation, logging, last.ckpt: measured 2-3x a bare step elsewhere
val = 15.0                             # the box decoding chosen on 407 validation maps: 13 s on a 2-core EPYC
stage1 = 0.32 * budget                 # the rest: two fine-tune cycles, evaluation, bundle
v1 = min(max(1, int((stage1 / 2 - val) / epoch)), 100)  # validated twice: half-way and at the end
e1 = 2 * v1
e2 = max(2, 2 * int(min((0.26 * budget - 2 * val) / epoch, e1) / 2))  # at most the CPU recipe's 20 + 20 + 16, in proportion
e3 = max(2, 2 * int(0.4 * e2))
print(f"localise step {s * 1000:.1f} ms at batch 32, 256 px crops; {steps} steps/epoch: ~{epoch:.1f} s/epoch "
      f"-> {e1} + {e2} + {e3} epochs", file=sys.stderr)
print(e1, v1, e2, e2 // 2, e3, e3 // 2)
EOF
)
echo "== epochs: localise $E1 (validated every $V1) + fine-tune $E2 (every $V2) + $E3 (every $V3); classify $((E1 + E2 + E3)); $(left) s left"

if [ "${DRY_RUN:-0}" = 1 ]; then
    HW=(--trainer.accelerator cpu --trainer.devices 1 --trainer.limit_train_batches 3 --trainer.limit_val_batches 3 --data.num_workers 0)
    EVAL=(--bootstrap 20)
else
    HW=(--trainer.accelerator gpu --trainer.devices 1 --data.num_workers 6)
    EVAL=()
fi
COMMON=(--data.root "$DATA" --output_dir "$RESULTS" --trainer.precision bf16-mixed --data.augment_on device --model.channels_last true
        --trainer.enable_progress_bar false --test_after_fit false "${HW[@]}")
hms() { printf '00:00:%02d:%02d' $(($1 / 60)) $(($1 % 60)); }
epoch_summary() { "$PY" scripts/epoch_summary.py "$1"; }  # a run folder's per-epoch time, throughput, memory and validation

CLS_BUDGET=$(( $(left) * 60 / 100 ))
(
    timeout $((CLS_BUDGET + 60)) "$PY" -m fracture.fit --config configs/fracatlas.yaml "${COMMON[@]}" --run_name classify \
        --trainer.max_epochs $((E1 + E2 + E3)) --trainer.max_time "$(hms "$CLS_BUDGET")" > "$RESULTS/classify.log" 2>&1 || echo "classify fit: exit $?"
    epoch_summary "$RESULTS/classify" || true
    for which in best last; do
        ckpt=$(ls "$RESULTS"/classify/"$which"*.ckpt 2>/dev/null | head -1) || true
        timeout 150 "$PY" -m fracture.evaluate --ckpt "$ckpt" --root "$DATA" --out "$RESULTS/reports/classify-$which" "${EVAL[@]}" > "$RESULTS/eval-classify-$which.log" 2>&1 \
            || echo "evaluate classify $which: exit $?"
    done
) > "$RESULTS/classify-summary.log" 2>&1 &
CLASSIFY=$!

S1=$(( $(left) * 50 / 100 ))
timeout $((S1 + 60)) "$PY" -m fracture.fit --config configs/fracatlas_localise.yaml "${COMMON[@]}" --run_name localise \
    --trainer.max_epochs "$E1" --trainer.check_val_every_n_epoch "$V1" --trainer.max_time "$(hms "$S1")" 2>&1 | grep -E "^epoch|rror" || true
epoch_summary "$RESULTS/localise" || true
FINE_TUNE=(--config configs/fracatlas_localise.yaml "${COMMON[@]}" --model.map_loss focal --model.map_weight 3 --model.point_weight 5)
S2=$(( ($(left) - 90) * 55 / 100 ))
timeout $((S2 + 30)) "$PY" -m fracture.fit "${FINE_TUNE[@]}" --run_name localise-ft --init_from "$RESULTS/localise/last.ckpt" --model.recipe.lr 0.001 \
    --trainer.max_epochs "$E2" --trainer.check_val_every_n_epoch "$V2" --trainer.max_time "$(hms "$S2")" 2>&1 | grep -E "^epoch|rror" || true
epoch_summary "$RESULTS/localise-ft" || true
S3=$(( $(left) - 90 ))
timeout $((S3 + 30)) "$PY" -m fracture.fit "${FINE_TUNE[@]}" --run_name localise-ft2 --init_from "$RESULTS/localise-ft/last.ckpt" --model.recipe.lr 0.0005 \
    --trainer.max_epochs "$E3" --trainer.check_val_every_n_epoch "$V3" --trainer.max_time "$(hms "$S3")" 2>&1 | grep -E "^epoch|rror" || true
epoch_summary "$RESULTS/localise-ft2" || true
timeout 120 "$PY" -m fracture.evaluate --ckpt "$RESULTS/localise-ft2/last.ckpt" --root "$DATA" --out "$RESULTS/reports/localise-ft2-last" "${EVAL[@]}" \
    > "$RESULTS/eval-localise.log" 2>&1 || echo "evaluate localise: exit $?"
wait "$CLASSIFY" || true
cat "$RESULTS/classify-summary.log"
"$PY" - "$RESULTS"/reports/*/metrics.json <<'EOF'
import json, sys
def cell(m, ci, key):
    return f"{key} {m[key]:.3f} ({ci[key][0]:.3f}-{ci[key][1]:.3f})"
for path in sys.argv[1:]:
    report = json.loads(open(path).read())
    b = report["operating_points"]["balanced"]
    cells = [cell(b["metrics"], b["ci95"], k) for k in ("auroc", "sensitivity", "specificity")]
    if "localisation" in report:
        loc = report["localisation"]["model"]
        cells += [cell(loc["metrics"], loc["ci95"], k) for k in ("pointing_hit_rate", "froc_centre_sensitivity_at_1_fp", "froc_iou_sensitivity_at_1_fp")]
    print(path, "|", " | ".join(cells))
EOF
echo "== done in $((SECONDS - START)) s"

if [ -n "${OUT:-}" ]; then  # the run folders without optimiser state (the weights stay loadable), the reports, the logs
    "$PY" - "$RESULTS" <<'EOF'
import sys, torch
from pathlib import Path
for ckpt in Path(sys.argv[1]).glob("localise-ft*/last.ckpt"):
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for key in ("optimizer_states", "lr_schedulers"):
        state.pop(key, None)
    torch.save(state, ckpt)
EOF
    tar czf - --exclude='*/tensorboard' --exclude='classify/*.ckpt' --exclude='localise/*.ckpt' --exclude='localise-ft*/best-*.ckpt' "$RESULTS" | split -b 15m - "$OUT/bundle.tgz.part-"
    ls -la "$OUT"
fi
