#!/usr/bin/env bash
# prepare of a full-size PCam release (262,144 / 32,768 / 32,768 synthetic patches, the release's
# exact layout): wall time and peak RSS, first from plain .h5 files, then from .h5.gz (as PCam is
# distributed). Usage: benchmarks/pcam_prepare.sh [DIR] [WORKERS]   (needs ~20 GB of disk)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/pcam-scale}
WORKERS=${2:-$(nproc)}
PY=${PYTHON:-.venv/bin/python}
timed() { /usr/bin/time -f "%e s wall, %M KB peak RSS (largest process)" "$@"; }
rm -rf "$DIR"
echo "== synth the release layout (5,000 distinct renders reused)"
timed $PY -m cancernet synth "$DIR" --format pcam --n-train 262144 --n-valid 32768 --n-test 32768 --pool 5000 \
  --workers "$WORKERS"
du -sh "$DIR"
echo "== prepare from .h5"
timed $PY -m cancernet prepare --config configs/pcam.yaml data.root="$DIR" --workers "$WORKERS"
du -sh "$DIR/packed"
echo "== gzip the .h5 files (level 1), then prepare from .h5.gz"
for f in "$DIR"/*.h5; do gzip -1 "$f"; done
du -sh "$DIR"
timed $PY -m cancernet prepare --config configs/pcam.yaml data.root="$DIR" --workers "$WORKERS"
