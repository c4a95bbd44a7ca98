#!/usr/bin/env bash
# Summarize new documents with a checkpoint of the run (default: its best_checkpoint, from the evaluation's report):
#   bash experiments/011_million_tokens/summarize.sh --documents new.jsonl --output summaries.jsonl
#   bash experiments/011_million_tokens/summarize.sh --documents letters/ --output s.jsonl --checkpoint final_adapter
#   bash experiments/011_million_tokens/summarize.sh --documents new.jsonl --output s.jsonl --length_policy truncate_document
#   NUM_PROCESSES=4 bash experiments/011_million_tokens/summarize.sh --documents new.jsonl --output s.jsonl   # 4 GPUs share them
# Rerun the same command to resume. --help: the knobs, and where the flags are. How it works: longctx/summarize.py.
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$EXP_DIR/../../scripts/summarize.sh" "$EXP_DIR" "$@"
