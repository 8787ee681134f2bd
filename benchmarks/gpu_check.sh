#!/usr/bin/env bash
# The GPU check, prepared for a lent H200 (the `device` tool) or any CUDA machine; about 8 minutes.
# Runs in priority order and appends as it goes, so a run cut short still returns what it measured:
#   1. the CUDA tests (bf16/fp16 packed training, no host-device sync inside a step, compile)
#   2. step ceiling + end-to-end packed training (val_s, ckpt_s) for resnet18/34/50 at 96 px,
#      bf16, channels_last, eager, batch 512; end to end as a fraction of the ceiling
#   3. data path rates: loader alone and with the device augmentation
#   4. the seed-like folder pipeline at 224 px (frozen ResNet34 + head, batch 32), for the ratio
#   5. compiled variants, batch 256
# Results: $OUT/bench.jsonl (one JSON line per measurement), $OUT/summary.txt, $OUT/log.txt.
# Uses the machine's python3 and torch; the repo root is on the path (no install needed).
# SMOKE=1 runs the same flow tiny on CPU (to check the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
DATA=${DATA:-/tmp/cancernet-gpu}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [[ ${SMOKE:-0} == 1 ]]; then N=600 POOL=200 STEPS=3 DEV=cpu W=1 BIG=32 SMALL=16 ARCHS="resnet18" TESTS="-k nothing"
else N=60000 POOL=5000 STEPS=60 DEV=cuda W=$(( $(nproc) > 12 ? 12 : $(nproc) )) BIG=512 SMALL=256 ARCHS="resnet18 resnet34 resnet50" TESTS=""
fi
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
bench() { timeout "${LIMIT:-240}" $PY -m cancernet bench "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/bench.jsonl"; }
B="--config configs/base.yaml data.root=$DATA model.pretrained=none data.num_workers=$W train.device=$DEV"
[[ $DEV == cpu ]] && B="$B train.amp=off data.image_size=32"

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; $PY -c \
  "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"; } \
  2>&1 | tee "$OUT/gpu.txt"
log "synth $N patches + prepare"
$PY -m cancernet synth "$DATA" --n-train "$N" --n-test 0 --pool "$POOL" --workers "$(nproc)" 2>>"$OUT/log.txt"
$PY -m cancernet prepare --config configs/base.yaml data.root="$DATA" --workers "$(nproc)" 2>>"$OUT/log.txt"

log "1. CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py $TESTS 2>&1 | tee "$OUT/pytest.txt" | tail -n 5

log "2. step ceiling and end to end, eager, batch $BIG"
for arch in $ARCHS; do
  bench step $B model.arch=$arch train.batch_size=$BIG --steps $STEPS
  bench train $B model.arch=$arch train.batch_size=$BIG --steps $STEPS
done

log "3. data path (loader alone, and with the device augmentation)"
bench data $B train.batch_size=$BIG --steps $STEPS

log "4. seed-like folder pipeline at 224 px (frozen ResNet34 + head, batch 32)"
S="--config configs/seed_frozen.yaml data.root=$DATA model.pretrained=none data.num_workers=$W train.device=$DEV"
[[ $DEV == cpu ]] && S="$S data.image_size=64"
bench train $S --steps $STEPS
bench step $S --steps $STEPS

log "5. compiled, and batch $SMALL"
for arch in $ARCHS; do
  LIMIT=300 bench step $B model.arch=$arch train.batch_size=$BIG model.compile=true --steps $STEPS
done
LIMIT=300 bench train $B model.arch=resnet18 train.batch_size=$BIG model.compile=true --steps $STEPS
for arch in $ARCHS; do bench step $B model.arch=$arch train.batch_size=$SMALL --steps $STEPS; done

log "summary"
$PY - "$OUT/bench.jsonl" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ceiling = {(r["arch"], r["batch_size"], r["compile"]): r["images_per_s"] for r in rows if r["bench"] == "step"}
for r in rows:
    key = (r.get("arch"), r["batch_size"], r.get("compile"))
    extra = ""
    if r["bench"] == "train" and key in ceiling:
        extra = f"  {100 * r['images_per_s'] / ceiling[key]:.0f}% of the step ceiling; val_s {r['val_s']} ckpt_s {r['ckpt_s']}"
    what = r.get("arch") or r.get("path")
    print(f"{r['bench']:5s} {what!s:9s} batch {r['batch_size']:4d} compile={r.get('compile', '-')!s:5s} "
          f"augmented={r.get('augmented', '-')!s:5s} {r['images_per_s']:>10.0f} img/s{extra}")
EOF
log done
