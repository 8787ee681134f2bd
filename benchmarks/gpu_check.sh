#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 (the `device` tool) or any CUDA machine. It must fit the slot a
# lent GPU comes with (about 15 minutes in all, at most 10 per command, start-up included), so it is
# built to end in under 8 minutes: sections run in order of value, each in a time box, and a
# deadline (DEADLINE, default 450 s) shortens the last boxes if earlier ones ran long. Each
# measurement is appended as soon as it is made, and the summary is rewritten after every section,
# so a run cut short still returns what it measured.
#
# What a bare GPU image lacks (pytest, tifffile, OpenSlide) travels as wheels: before the call, here,
#   python benchmarks/carried_wheels.py download .whl
# and the call carries .whl (section 0 installs what is missing from it, with no index).
#
# section (box)                                   expected on one H200, and why
# 0 carried wheels; synth 60K patches (5K         ~15 s: 16 processes render, write and decode
#   distinct) + prepare (30)
# 1 CUDA tests, none may skip (100)                 ~70 s: pytest start 10, two AMP runs 10 each,
#                                                   two sync checks 5 each, deterministic pair 10,
#                                                   torch.compile of resnet18 (inductor, cold) ~30
# 2 resnet18/34 step ceiling + end to end, batch    step ~12 s: start 6, cuDNN autotuning 2, 60
#   512, bf16, channels_last (2 x (20 + 35))        steps 2-4; end to end also starts the loader
#                                                   workers (fork server) and ends with an epoch
#                                                   boundary, a row of its own printed after
# 3 seed-like folder pipeline: frozen resnet34,     ~15 s each: 60 steps of 32 patches decoded
#   224 px, batch 32, end to end + step (35 + 20)   from TIFFs by the loader workers
# 4 data path: loader alone / with device aug (20)  ~10 s: 4 measurements of 60 batches
# 5 whole slide: predict-slide, resnet18 96 px,     ~25 s: two passes over ~23K tissue tiles; the
#   batch 512, bf16 (40; the slide is written in 0)  readers (loader workers) set the pace
# 6 torch.compile, resnet18 only: step inside a     ~45 s cold (inductor), ~25 s on the warm cache;
#   DDP wrapper, compiled inside / outside (45+30)  last, as the least certain to fit
# boxes: 45 + 100 + 110 + 55 + 20 + 40 + 75 = 445 s, plus the summary (2 s).
#
# Results: $OUT/bench.jsonl (one JSON line per measurement), $OUT/summary.txt (end to end as % of
# the step ceiling, ours / seed-like), $OUT/pytest.txt, $OUT/log.txt, $OUT/gpu.txt.
# Uses the machine's python3 and torch; the repo root is on the path (no install needed).
# SMOKE=1 runs the same flow tiny on CPU (CI runs it, from carried wheels: tests/test_benchmarks.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
DATA=${DATA:-/tmp/cancernet-gpu}
DEADLINE=${DEADLINE:-450}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
if [[ ${SMOKE:-0} == 1 ]]; then
  N=300 POOL=60 STEPS=2 DEV=cpu W=0 BIG=16 SMALL_SIZE=32 SEED_SIZE=48 ARCHS="resnet18" TESTS=(--collect-only)
  SLIDE="--rows 16 --cols 24"
  export TORCHDYNAMO_DISABLE=1  # the flow, not inductor: compiling on a CPU takes minutes
else
  N=60000 POOL=5000 STEPS=60 DEV=cuda W=$(( $(nproc) > 12 ? 12 : $(nproc) )) BIG=512 SMALL_SIZE=96 SEED_SIZE=224
  ARCHS="resnet18 resnet34" TESTS=()
  SLIDE="--rows 160 --cols 240"
  export CANCERNET_REQUIRE_CUDA=1  # a CUDA test that skips is a failure here
fi
log() { echo "== $(date +%T) [${SECONDS}s] $*" | tee -a "$OUT/log.txt"; }
# boxed SECONDS CMD...: run CMD for at most SECONDS, and never past the deadline
boxed() {
  local box=$1; shift
  local left=$(( DEADLINE - SECONDS )); (( left < box )) && box=$left
  if (( box < 5 )); then log "skipped (deadline): $*"; return 0; fi
  timeout "$box" "$@" || log "exit $? (box ${box}s): $*"
}
bench() {  # JSON lines to bench.jsonl (and the screen), log lines to log.txt
  local box=$1; shift
  boxed "$box" $PY -m cancernet bench "$@" 2>>"$OUT/log.txt" | tee -a "$OUT/log.txt" | grep --line-buffered '^{' \
    | tee -a "$OUT/bench.jsonl"
}
summary() { $PY benchmarks/gpu_summary.py "$OUT/bench.jsonl" > "$OUT/summary.txt" 2>>"$OUT/log.txt"; }
B="--config configs/base.yaml data.root=$DATA model.pretrained=none data.num_workers=$W train.device=$DEV train.amp=bf16"
[[ $DEV == cpu ]] && B="$B train.amp=off data.image_size=$SMALL_SIZE"

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null; $PY -c \
  "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"; } \
  2>&1 | tee "$OUT/gpu.txt"
SITE=${TMPDIR:-/tmp}/cancernet-site-$$
$PY benchmarks/carried_wheels.py install "$WHEELS" "$SITE" 2>&1 | tee -a "$OUT/log.txt"
(( PIPESTATUS[0] == 0 )) || exit 2
export PYTHONPATH=$PYTHONPATH:$SITE
log "0. carried wheels, synth $N patches + prepare, and a synthetic slide"
$PY -m cancernet synth-slides "$DATA/slides" --n 1 $SLIDE --tumour-rate 1 >>"$OUT/log.txt" 2>&1 &
SLIDE_PID=$!
boxed 30 bash -c "$PY -m cancernet synth '$DATA' --n-train $N --n-test 0 --pool $POOL --workers $(nproc) \
  && $PY -m cancernet prepare --config configs/base.yaml data.root='$DATA' --workers $(nproc)" >>"$OUT/log.txt" 2>&1
for _ in $(seq 30); do kill -0 $SLIDE_PID 2>/dev/null || break; sleep 0.5; done  # at most 15 s more for the slide

log "1. CUDA tests"
boxed 100 $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py "${TESTS[@]}" > "$OUT/pytest.txt" 2>&1
tail -n 5 "$OUT/pytest.txt"

log "2. step ceiling and end to end, batch $BIG, bf16, channels_last"
for arch in $ARCHS; do
  bench 20 step $B model.arch=$arch train.batch_size=$BIG --steps $STEPS
  bench 35 train $B model.arch=$arch train.batch_size=$BIG --steps $STEPS
  summary
done

log "3. seed-like folder pipeline (frozen resnet34 + head, $SEED_SIZE px, batch 32)"
S="--config configs/seed_frozen.yaml data.root=$DATA model.pretrained=none data.num_workers=$W train.device=$DEV data.image_size=$SEED_SIZE"
bench 35 train $S --steps $STEPS
bench 20 step $S --steps $STEPS
summary

log "4. data path (loader alone, and with the device augmentation)"
bench 20 data $B train.batch_size=$BIG --steps $STEPS
summary

log "5. whole slide: predict-slide tiles/s (resnet18, 96 px, untrained weights), reader wait share"
bench 40 slide $B model.arch=resnet18 data.image_size=96 train.eval_batch_size=$BIG --slide "$DATA/slides/slides/slide_000.tif"
summary
log "6. torch.compile, resnet18: step inside a DDP wrapper, compiled inside it / around it"
bench 45 step $B model.arch=resnet18 train.batch_size=$BIG model.compile=true model.compile_scope=model --ddp --steps $STEPS
bench 30 step $B model.arch=resnet18 train.batch_size=$BIG model.compile=true model.compile_scope=ddp --ddp --steps $STEPS
summary

cat "$OUT/summary.txt"
log "done"
