#!/usr/bin/env bash
# Scale run: 220,025 synthetic patches in the Kaggle layout -> prepare -> one packed epoch.
# Usage: benchmarks/scale_run.sh [DATA_DIR] [WORKERS]   (needs ~13 GB of disk)
# Prints wall times, peak RSS and the bench JSON lines; docs/BENCHMARKS.md records the results.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-/tmp/cancernet-scale}
WORKERS=${2:-$(nproc)}
PY=${PYTHON:-.venv/bin/python}
timed() { /usr/bin/time -f "%e s wall, %M KB peak RSS (largest process)" "$@"; }
rm -rf "$DATA"
echo "== synth 220,025 patches (pool of 5,000 distinct renders per run)"
timed $PY -m cancernet synth "$DATA" --n-train 220025 --n-test 0 --pool 5000 --workers "$WORKERS"
du -sh "$DATA/train"
echo "== prepare"
timed $PY -m cancernet prepare --config configs/base.yaml data.root="$DATA" --workers "$WORKERS"
du -sh "$DATA/packed"
echo "== one epoch of the packed path (all 220,025 patches; uint8 only, then with CPU augmentation)"
timed $PY -m cancernet bench data --config configs/base.yaml data.root="$DATA" train.device=cpu \
  data.num_workers="$WORKERS" --paths packed --steps 0
