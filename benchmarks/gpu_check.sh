#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 (the `device` tool) or any CUDA machine. A lent GPU comes with
# about 15 minutes in all (start-up included) and a rerun must fit, so the default check ends in
# under 6 minutes: its most important rows first, each section in a time box, and a deadline
# (DEADLINE, default 330 s) shortens the last boxes if earlier ones ran long. FULL=1 adds the
# sections that matter less (resnet18, the seed-like pipeline, the data path, torch.compile).
# Each measurement is appended as soon as it is made, and the summary is rewritten after every
# section, so a run cut short still returns what it measured.
#
# What a bare GPU image lacks (pytest, tifffile, OpenSlide) travels as wheels: before the call, here,
#   python benchmarks/carried_wheels.py download .whl
# and the call carries .whl (section 0 installs what is missing from it, with no index).
#
# section (box, s)                                  what it answers
# 0 carried wheels; synth 20K patches (5K           the data the rest reads (~10 s on 16 cores)
#   distinct) + prepare; a synthetic slide (30)
# 1 launch-bound or not: base.yaml's eager DDP      host time to issue one step vs the device's time
#   step (augmentation, DDP, AdamW, EMA), resnet34,  for it (CUDA events, the host issuing behind a
#   96 px, bf16, batch 256 and 512 (2 x 40)         device-side sleep): host-bound at >= 80%
# 2 CUDA tests, none may skip (100)                 AMP, no host-device sync in a step, determinism
# 3 resnet34 step ceiling + end to end, batch 256   end to end as a share of the ceiling, and the
#   (20 + 35)                                       epoch boundary (validation, checkpoint)
# 4 whole slide: predict-slide, resnet18 96 px,     tiles/s and the share the model waited for the
#   batch 512, bf16 (40)                            slide readers
# boxes: 30 + 80 + 100 + 55 + 40 = 305 s, plus the summary.
# FULL=1 then: 5 resnet18 ceiling + end to end (55), 6 seed-like folder pipeline (55), 7 data path
# (20), 8 torch.compile inside / around DDP (75): 510 s more (DEADLINE=900 for all of it).
#
# Results: $OUT/bench.jsonl (one JSON line per measurement), $OUT/summary.txt (the launch verdict
# first, then end to end as % of the step ceiling), $OUT/pytest.txt, $OUT/log.txt, $OUT/gpu.txt.
# Uses the machine's python3 and torch; the repo root is on the path (no install needed).
# SMOKE=1 runs the same flow tiny on CPU, FULL included, with no deadline and boxes 10x longer:
# whether every section runs, not how fast (CI runs it, from carried wheels: tests/test_benchmarks.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
DATA=${DATA:-/tmp/cancernet-gpu}
DEADLINE=${DEADLINE:-330}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 WANDB_MODE=disabled
STRETCH=1
if [[ ${SMOKE:-0} == 1 ]]; then
  N=300 POOL=60 STEPS=2 DEV=cpu W=0 BIG=16 SMALL_SIZE=32 SEED_SIZE=48 TESTS=(--collect-only) FULL=1
  SLIDE="--rows 16 --cols 24" DEADLINE=100000 STRETCH=10
  export TORCHDYNAMO_DISABLE=1  # the flow, not inductor: compiling on a CPU takes minutes
else
  N=20000 POOL=5000 STEPS=60 DEV=cuda W=$(( $(nproc) > 12 ? 12 : $(nproc) )) BIG=512 SMALL_SIZE=96 SEED_SIZE=224
  TESTS=()
  SLIDE="--rows 160 --cols 240"
  export CANCERNET_REQUIRE_CUDA=1  # a CUDA test that skips is a failure here
fi
FULL=${FULL:-0}
log() { echo "== $(date +%T) [${SECONDS}s] $*" | tee -a "$OUT/log.txt"; }
# boxed SECONDS CMD...: run CMD for at most SECONDS, and never past the deadline
boxed() {
  local box=$(( $1 * STRETCH )); shift
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

log "1. launch-bound or not: the shipped recipe's eager DDP step, resnet34, host vs device time"
HALF=$(( BIG / 2 ))
for batch in $HALF $BIG; do
  bench 40 launch $B model.arch=resnet34 train.batch_size=$batch --steps $STEPS
done
summary

log "2. CUDA tests"
boxed 100 $PY -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py ${TESTS[@]+"${TESTS[@]}"} > "$OUT/pytest.txt" 2>&1
tail -n 5 "$OUT/pytest.txt"

log "3. step ceiling and end to end, resnet34, batch $HALF (base.yaml's), bf16, channels_last"
bench 20 step $B model.arch=resnet34 train.batch_size=$HALF --steps $STEPS
bench 35 train $B model.arch=resnet34 train.batch_size=$HALF --steps $STEPS
summary

log "4. whole slide: predict-slide tiles/s (resnet18, 96 px, untrained weights), reader wait share"
bench 40 slide $B model.arch=resnet18 data.image_size=96 train.eval_batch_size=$BIG --slide "$DATA/slides/slides/slide_000.tif"
summary

if [[ $FULL == 1 ]]; then
  log "5. resnet18 step ceiling and end to end, batch $BIG"
  bench 20 step $B model.arch=resnet18 train.batch_size=$BIG --steps $STEPS
  bench 35 train $B model.arch=resnet18 train.batch_size=$BIG --steps $STEPS
  summary

  log "6. seed-like folder pipeline (frozen resnet34 + head, $SEED_SIZE px, batch 32)"
  S="--config configs/seed_frozen.yaml data.root=$DATA model.pretrained=none data.num_workers=$W train.device=$DEV data.image_size=$SEED_SIZE"
  bench 35 train $S --steps $STEPS
  bench 20 step $S --steps $STEPS
  summary

  log "7. data path (loader alone, and with the device augmentation)"
  bench 20 data $B train.batch_size=$BIG --steps $STEPS
  summary

  log "8. torch.compile, resnet18: step inside a DDP wrapper, compiled inside it / around it"
  bench 45 step $B model.arch=resnet18 train.batch_size=$BIG model.compile=true model.compile_scope=model --ddp --steps $STEPS
  bench 30 step $B model.arch=resnet18 train.batch_size=$BIG model.compile=true model.compile_scope=ddp --ddp --steps $STEPS
  summary
fi

cat "$OUT/summary.txt"
log "done"
