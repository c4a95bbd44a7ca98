#!/usr/bin/env bash
# Shared launcher of summarization with a trained checkpoint; experiments call it from their summarize.sh:
#   bash scripts/summarize.sh experiments/009_text_summary --documents new.jsonl --output summaries.jsonl
#   bash scripts/summarize.sh experiments/009_text_summary --documents letters/ --output s.jsonl --checkpoint final_adapter
#   bash scripts/summarize.sh experiments/009_text_summary --documents new.jsonl --output s.jsonl \
#       --length_policy truncate_document      # cut the end of documents too long for the prompt, listing them
# Rerun the same command to resume: ids already in --output are skipped. How it works: longctx/summarize.py.
set -euo pipefail

EXP_DIR="$(cd "${1:?usage: summarize.sh EXPERIMENT_DIR --documents FILE --output FILE [--setting value ...]}" && pwd)"
shift
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXP_NAME="$(basename "$EXP_DIR")"

source "$REPO_ROOT/scripts/common.sh"
GPUS_FOUND="$(count_gpus)"

# knobs:
OUTPUT_DIR="${OUTPUT_DIR:-runs/$EXP_NAME}"                # the training run whose checkpoint summarizes
CONFIG="${CONFIG:-}"                                      # empty: the run's own settings (OUTPUT_DIR/run_config.yaml)
NUM_PROCESSES="${NUM_PROCESSES:-$(( GPUS_FOUND > 0 ? GPUS_FOUND : 1 ))}"  # each summarizes its share of the documents
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-}"          # GPUs to use, e.g. 0,1; empty: every GPU
MASTER_PORT="${MASTER_PORT:-29512}"                       # differs from training's 29500 and evaluation's 29511
OMP_NUM_THREADS="${OMP_NUM_THREADS:-}"                    # CPU threads per process; empty: 1 if several share a CPU
DRY_RUN="${DRY_RUN:-0}"                                   # 1: print the command and exit without running it
PYTHON="${PYTHON:-python}"                                # the Python of the project's environment
# end of knobs

help_if_asked "${BASH_SOURCE[0]}" \
"Flags: --documents FILE|FOLDER --output FILE [--checkpoint best_checkpoint|final_adapter|checkpoint-N|base]
  [--length_policy truncate_document], and any setting of the run's config (e.g. --max_new_tokens 256):
  $PYTHON -m longctx.summarize --help" "$@"
require_int NUM_PROCESSES "$NUM_PROCESSES" 1
require_int MASTER_PORT "$MASTER_PORT" 1
[[ -n "$CUDA_VISIBLE_DEVICES" ]] && export CUDA_VISIBLE_DEVICES
[[ "$GPUS_FOUND" -eq 0 ]] && export DS_ACCELERATOR=cpu  # DeepSpeed would warn that it found no GPU: none is expected
export PYTORCH_ALLOC_CONF="$(alloc_conf_with_expandable_segments)"  # as in evaluation: no fragmentation between lengths

# --documents and --output are the caller's paths: relative ones are resolved here, before moving to the repository
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --documents|--output) ARGS+=("$1"); shift; [[ $# -gt 0 && "$1" != /* ]] && ARGS+=("$PWD/$1") || ARGS+=("${1:-}"); shift || true ;;
    --documents=*|--output=*) value="${1#*=}"; [[ "$value" != /* ]] && value="$PWD/$value"; ARGS+=("${1%%=*}=$value"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
set -- ${ARGS[@]+"${ARGS[@]}"}

cd "$REPO_ROOT"
if [[ -z "$CONFIG" ]]; then
  # Summarize with the settings the run was trained with (flags given at training time included).
  if [[ -f "$OUTPUT_DIR/run_config.yaml" ]]; then CONFIG="$OUTPUT_DIR/run_config.yaml"; else CONFIG="$EXP_DIR/config.yaml"; fi
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "$OMP_NUM_THREADS" && "$GPUS_FOUND" -eq 0 && "$NUM_PROCESSES" -gt 1 ]]; then
  OMP_NUM_THREADS=1  # processes sharing CPU cores oversubscribe them otherwise
fi
[[ -n "$OMP_NUM_THREADS" ]] && export OMP_NUM_THREADS

SCRIPT=(-m longctx.summarize --config "$CONFIG" --output_dir "$OUTPUT_DIR")
run_scoring_processes "${SCRIPT[@]}" -- "$@"
