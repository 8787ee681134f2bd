#!/usr/bin/env bash
# One prepared GPU check (for the `device` tool or any CUDA machine), ~6 minutes on one H100:
#   synthetic 50k set -> prepare -> bench step / bench train (ResNet34, 96 px, bf16, packed)
#   -> the seed-like folder pipeline at 224 px -> bench data -> CUDA tests.
# Writes JSON lines and logs under $OUT (default ./gpu_out). Uses the machine's python3 + torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
DATA=${DATA:-/tmp/cancernet-gpu}
W=$(( $(nproc) > 8 ? 8 : $(nproc) ))
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
log() { echo "== $*" | tee -a "$OUT/log.txt"; }
run() { "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/bench.jsonl"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
log synth; $PY -m cancernet synth "$DATA" --n-train 50000 --n-test 0 --pool 5000 --workers "$(nproc)" 2>>"$OUT/log.txt"
log prepare; $PY -m cancernet prepare --config configs/base.yaml data.root="$DATA" 2>>"$OUT/log.txt"
B="--config configs/base.yaml data.root=$DATA model.pretrained=none data.num_workers=$W"
log "step ceiling (eager, then compiled)"
run $PY -m cancernet bench step $B --steps 100
run $PY -m cancernet bench step $B --steps 100 model.compile=true
log "end to end, packed path"
run $PY -m cancernet bench train $B --steps 150
run $PY -m cancernet bench train $B --steps 150 model.compile=true
log "seed-like folder pipeline at 224 px (frozen ResNet34 + head, batch 32)"
run $PY -m cancernet bench train --config configs/seed_frozen.yaml data.root="$DATA" model.pretrained=none \
  data.num_workers="$W" --steps 100
run $PY -m cancernet bench step --config configs/seed_frozen.yaml data.root="$DATA" model.pretrained=none --steps 100
log "data paths"
run $PY -m cancernet bench data $B --steps 100
log "CUDA tests"
$PY -m pytest -q tests/test_gpu.py 2>&1 | tee "$OUT/pytest.txt"
log done
