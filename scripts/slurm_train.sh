#!/usr/bin/env bash
# Body of every experiment's slurm_train.sbatch (the sbatch file holds only its #SBATCH values and this call):
#   bash scripts/slurm_train.sh EXPERIMENT_DIR [--setting value ...]      # inside a SLURM allocation
# Every node runs EXPERIMENT_DIR/launch_train.sh with NUM_MACHINES = the job's nodes, MACHINE_RANK = its node index and
# MASTER_ADDR = the first node: one job of nodes x GPUs-per-node ranks (accelerate + DeepSpeed's standard multi-node
# launcher: torchrun's rendezvous, no ssh). OUTPUT_DIR must be on a filesystem every node mounts (the training checks
# it). When the ranks stop for the signal they save a checkpoint and exit with status 75; the job is then requeued,
# runs the same command again and resumes from that checkpoint, into the same W&B run. Knobs (OUTPUT_DIR,
# WANDB_PROJECT, ...) are read from the environment of `sbatch`, as for launch_train.sh.
set -euo pipefail

EXP_DIR="${1:?usage: slurm_train.sh EXPERIMENT_DIR [--setting value ...]}"
shift
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # sed reads all: no SIGPIPE
export MASTER_ADDR NUM_MACHINES="$SLURM_JOB_NUM_NODES" MASTER_PORT="${MASTER_PORT:-29500}" EXP_DIR
echo "job $SLURM_JOB_ID: $NUM_MACHINES node(s), machine 0 at $MASTER_ADDR:$MASTER_PORT (restart ${SLURM_RESTART_COUNT:-0})"

status=0
srun --ntasks-per-node=1 --kill-on-bad-exit=0 \
  bash -c 'MACHINE_RANK="$SLURM_NODEID" exec bash "$EXP_DIR/launch_train.sh" "$@"' launch "$@" \
  || status=$?
if [[ "$status" -eq 75 ]]; then
  echo "job $SLURM_JOB_ID: stopped at a checkpoint (exit 75); requeued, it resumes from there"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
