#!/usr/bin/env bash
# Score every saved checkpoint of the run (then final_adapter) with ROUGE, in step order:
#   bash experiments/000_tiny_smoke/eval_all_checkpoints.sh
#   OUTPUT_DIR=/scratch/run1 bash experiments/000_tiny_smoke/eval_all_checkpoints.sh --max_new_tokens 256
# Knobs: the environment variables at the top of scripts/eval_all_checkpoints.sh. Flags: any config.yaml setting.
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$EXP_DIR/../../scripts/eval_all_checkpoints.sh" "$EXP_DIR" "$@"
