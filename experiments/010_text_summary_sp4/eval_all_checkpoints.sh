#!/usr/bin/env bash
# Score every saved checkpoint of the run (then final_adapter) with ROUGE, in step order; already scored ones are
# skipped, so a rerun only scores what is new. Writes eval_results.jsonl, eval_summary.md, rouge_by_step.png,
# loss_curve.png and best_checkpoint into OUTPUT_DIR:
#   bash experiments/010_text_summary_sp4/eval_all_checkpoints.sh
#   bash experiments/010_text_summary_sp4/eval_all_checkpoints.sh --follow      # alongside training, until final_adapter
#   OUTPUT_DIR=/scratch/run1 bash experiments/010_text_summary_sp4/eval_all_checkpoints.sh --max_new_tokens 256
#   NUM_PROCESSES=4 bash experiments/010_text_summary_sp4/eval_all_checkpoints.sh    # 4 GPUs share the validation set
# Knobs: the environment variables at the top of scripts/eval_all_checkpoints.sh. Flags: any config.yaml setting,
# and those of `python experiments/010_text_summary_sp4/eval_checkpoint.py --help` (--force, --follow, ...).
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$EXP_DIR/../../scripts/eval_all_checkpoints.sh" "$EXP_DIR" "$@"
