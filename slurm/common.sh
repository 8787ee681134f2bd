# Sourced by slurm/*.sbatch: run directory, processes per node, signal forwarding and requeue.
# Uses the Python environment active at submission (sbatch passes it on); installs nothing.

source "${CANCERNET_HOME:-$SLURM_SUBMIT_DIR}/slurm/env.sh"  # CANCERNET_HOME, PYTHONPATH, NPROC_PER_NODE
CONFIG=${1:?usage: sbatch slurm/<script>.sbatch CONFIG [key=value ...]}
shift
OVERRIDES=("$@")
# Stable across requeues: a requeued job keeps its job id. RUN_DIR=... to choose another.
RUN_DIR=${RUN_DIR:-runs/$(basename "$CONFIG" .yaml)-${SLURM_JOB_ID}}
MAX_RESTARTS=${MAX_RESTARTS:-3}   # torchrun restarts the worker group this often (elastic)
# After a stop signal torchrun gives its workers this long to checkpoint and exit, then kills them;
# keep it below the warning's lead (--signal=B:USR1@120) and the cluster's preemption grace time.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${STOP_TIMEOUT:-90}
# cancernet.cli.launch = torchrun that survives the repeated TERM of a preemption (cancernet/cli/launch.py)

# Node-local disk: each node copies the pack there once and reads it from there (data.stage_dir;
# an override on the command line wins). The job's own folder where the cluster gives one
# ($SLURM_TMPDIR), else $TMPDIR, else /tmp; the run says where it staged, or that the disk had no
# room and it reads the shared pack. (The copy stays for later jobs on the node; remove
# cancernet-pack-* there when done.) Arrays that may be empty expand as ${A[@]+"${A[@]}"}: bash
# before 4.4 (RHEL 7) calls an empty "${A[@]}" unbound under set -u.
STAGE_ROOT=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}
STAGE=("data.stage_dir=$STAGE_ROOT")
TRAIN_ARGS=("$CANCERNET_HOME/train_ddp.py" --config "$CONFIG" "train.out_dir=$RUN_DIR" "${STAGE[@]}"
            ${OVERRIDES[@]+"${OVERRIDES[@]}"} train.resume=auto)

echo "$(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NNODES:-1} node(s) x ${NPROC_PER_NODE} process(es), run dir ${RUN_DIR}, python $(command -v python)," \
     "node-local staging in ${STAGE_ROOT} (packed data)"

STOPPING=0
on_signal() {
  # Slurm's time-limit warning (USR1, from --signal=B:USR1@120) or preemption (TERM, which
  # Slurm also sends to every other process of the job): TERM makes the launcher (srun forwards
  # it) pass TERM to every worker; the workers only set a flag (their loader workers ignore it),
  # agree at the next sync point, rank 0 writes last.pt, and all exit cleanly.
  echo "$(date -Is) received a stop signal: asking training to checkpoint and stop"
  STOPPING=1
  if [[ ${STOP_STEPS:-0} == 1 ]]; then
    # the child is srun: a TERM to srun makes it cancel its step (tasks killed, no checkpoint),
    # so the launchers inside the job's steps are signalled directly
    for step in $(squeue -h -s -j "$SLURM_JOB_ID" -o %i); do
      case $step in *.batch | *.extern) ;; *) scancel --signal=TERM "$step" 2>/dev/null || true ;; esac
    done
  else
    kill -TERM "$CHILD" 2>/dev/null || true
  fi
}

run_and_requeue() {
  # Run "$@" in the background so that the traps fire while it runs, then requeue if stopped.
  trap on_signal USR1 TERM
  "$@" &
  CHILD=$!
  STATUS=0
  while true; do
    wait "$CHILD" && STATUS=0 || STATUS=$?
    kill -0 "$CHILD" 2>/dev/null || break  # a trap interrupted wait: keep waiting for the child
  done
  if [[ $STOPPING == 1 ]]; then
    echo "$(date -Is) training stopped with status $STATUS; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "$(date -Is) training finished with status $STATUS"
  exit "$STATUS"
}
