#!/usr/bin/env bash
# Score every saved checkpoint of the run (then final_adapter) with ROUGE; a rerun scores only what is new:
#   bash experiments/000_tiny_smoke/eval_all_checkpoints.sh
#   bash experiments/000_tiny_smoke/eval_all_checkpoints.sh --follow      # alongside training, until final_adapter
#   OUTPUT_DIR=/scratch/run1 bash experiments/000_tiny_smoke/eval_all_checkpoints.sh --max_new_tokens 256
#   NUM_PROCESSES=4 bash experiments/000_tiny_smoke/eval_all_checkpoints.sh    # 4 GPUs share the validation set
# --help: the knobs, and where the flags are. How evaluation works: docs/evaluation.md.
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$EXP_DIR/../../scripts/eval_all_checkpoints.sh" "$EXP_DIR" "$@"
