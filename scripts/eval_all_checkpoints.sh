#!/usr/bin/env bash
# Shared evaluation launcher; experiments call it from their eval_all_checkpoints.sh:
#   bash scripts/eval_all_checkpoints.sh experiments/009_text_summary [--any_setting value ...]
# Scores every complete checkpoint of OUTPUT_DIR in step order, then final_adapter, with ROUGE; appends one row per
# checkpoint to OUTPUT_DIR/eval_results.jsonl and prints the table by step with the best checkpoint marked.
set -euo pipefail

EXP_DIR="$(cd "${1:?usage: eval_all_checkpoints.sh EXPERIMENT_DIR [--setting value ...]}" && pwd)"
shift
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXP_NAME="$(basename "$EXP_DIR")"

OUTPUT_DIR="${OUTPUT_DIR:-runs/$EXP_NAME}"               # the training run to score
CONFIG="${CONFIG:-}"                                     # empty: the run's own settings (OUTPUT_DIR/run_config.yaml)
WANDB_PROJECT="${WANDB_PROJECT:-longctx-$EXP_NAME}"
WANDB_MODE="${WANDB_MODE:-}"                             # empty: offline without credentials
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"                                  # 1: print the command and exit without running it

cd "$REPO_ROOT"
if [[ -z "$CONFIG" ]]; then
  # Score with the settings the run was trained with (flags given at training time included).
  if [[ -f "$OUTPUT_DIR/run_config.yaml" ]]; then CONFIG="$OUTPUT_DIR/run_config.yaml"; else CONFIG="$EXP_DIR/config.yaml"; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "$WANDB_MODE" ]]; then
  if [[ -n "${WANDB_API_KEY:-}" ]] || grep -qs "api.wandb.ai" "$HOME/.netrc"; then WANDB_MODE=online; else WANDB_MODE=offline; fi
fi
export WANDB_PROJECT WANDB_MODE WANDB_DIR="${WANDB_DIR:-$OUTPUT_DIR}"

CMD=("$PYTHON" "$EXP_DIR/eval_checkpoint.py" --config "$CONFIG" --run_dir "$OUTPUT_DIR" --all_checkpoints)
echo "+ ${CMD[*]} $*"
[[ "$DRY_RUN" == "1" ]] && exit 0
exec "${CMD[@]}" "$@"
