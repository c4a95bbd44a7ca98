#!/usr/bin/env bash
# Shared evaluation launcher; experiments call it from their eval_all_checkpoints.sh:
#   bash scripts/eval_all_checkpoints.sh experiments/009_text_summary [--any_setting value ...]
#   bash scripts/eval_all_checkpoints.sh experiments/009_text_summary --follow     # while training runs
#   bash scripts/eval_all_checkpoints.sh experiments/009_text_summary --force      # score everything again
#   bash scripts/eval_all_checkpoints.sh experiments/009_text_summary --average_last 3   # + the average of the last 3
# How evaluation works: docs/evaluation.md.
set -euo pipefail

EXP_DIR="$(cd "${1:?usage: eval_all_checkpoints.sh EXPERIMENT_DIR [--setting value ...]}" && pwd)"
shift
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXP_NAME="$(basename "$EXP_DIR")"

source "$REPO_ROOT/scripts/common.sh"
GPUS_FOUND="$(count_gpus)"

# knobs:
OUTPUT_DIR="${OUTPUT_DIR:-runs/$EXP_NAME}"                # the training run to score
CONFIG="${CONFIG:-}"                                      # empty: the run's own settings (OUTPUT_DIR/run_config.yaml)
NUM_PROCESSES="${NUM_PROCESSES:-$(( GPUS_FOUND > 0 ? GPUS_FOUND : 1 ))}"  # each generates its share of the data
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-}"          # GPUs to use, e.g. 0,1; empty: every GPU
MASTER_PORT="${MASTER_PORT:-29511}"                       # differs from training's 29500: both can run at once
OMP_NUM_THREADS="${OMP_NUM_THREADS:-}"                    # CPU threads per process; empty: 1 if several share a CPU
WANDB_PROJECT="${WANDB_PROJECT:-longctx-$EXP_NAME}"       # W&B project
WANDB_MODE="${WANDB_MODE:-}"                              # online | offline; empty: offline without credentials
DRY_RUN="${DRY_RUN:-0}"                                   # 1: print the command and exit without running it
PYTHON="${PYTHON:-python}"                                # the Python of the project's environment
# end of knobs

help_if_asked "${BASH_SOURCE[0]}" \
"Settings: any setting of the run's config is also a flag (e.g. --max_new_tokens 256), plus --force,
  --follow, --average NAME NAME ... / --average_last K (one more row: the exact average of those checkpoints'
  LoRA updates) and the other evaluation options: $PYTHON $EXP_DIR/eval_checkpoint.py --help" "$@"
require_int NUM_PROCESSES "$NUM_PROCESSES" 1
require_int MASTER_PORT "$MASTER_PORT" 1
[[ -n "$CUDA_VISIBLE_DEVICES" ]] && export CUDA_VISIBLE_DEVICES
[[ "$GPUS_FOUND" -eq 0 ]] && export DS_ACCELERATOR=cpu  # DeepSpeed would warn that it found no GPU: none is expected
export PYTORCH_ALLOC_CONF="$(alloc_conf_with_expandable_segments)"  # as in training: no fragmentation between lengths

cd "$REPO_ROOT"
if [[ -z "$CONFIG" ]]; then
  # Score with the settings the run was trained with (flags given at training time included).
  if [[ -f "$OUTPUT_DIR/run_config.yaml" ]]; then CONFIG="$OUTPUT_DIR/run_config.yaml"; else CONFIG="$EXP_DIR/config.yaml"; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
[[ -z "$WANDB_MODE" ]] && WANDB_MODE="$(default_wandb_mode)"
export WANDB_PROJECT WANDB_MODE WANDB_DIR="${WANDB_DIR:-$OUTPUT_DIR}"
if [[ -z "$OMP_NUM_THREADS" && "$GPUS_FOUND" -eq 0 && "$NUM_PROCESSES" -gt 1 ]]; then
  OMP_NUM_THREADS=1  # processes sharing CPU cores oversubscribe them otherwise
fi
[[ -n "$OMP_NUM_THREADS" ]] && export OMP_NUM_THREADS

SCRIPT=("$EXP_DIR/eval_checkpoint.py" --config "$CONFIG" --output_dir "$OUTPUT_DIR" --all_checkpoints)
run_scoring_processes "${SCRIPT[@]}" -- "$@"
