# Sourced by slurm/common.sh and slurm/extract.sbatch: where cancernet is, and how many processes
# this node runs. Uses the Python environment active at submission (sbatch passes it on).

CANCERNET_HOME=${CANCERNET_HOME:-$SLURM_SUBMIT_DIR}
export PYTHONPATH="$CANCERNET_HOME${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "${NPROC_PER_NODE:-}" ]]; then  # one process per GPU Slurm gave this node
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then NPROC_PER_NODE=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | wc -l)
  else NPROC_PER_NODE=1
  fi
fi
