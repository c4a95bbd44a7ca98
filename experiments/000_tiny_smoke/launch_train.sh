#!/usr/bin/env bash
# Train the embedded default on this machine's CPU (or GPU) in minutes, nothing downloaded:
#   bash experiments/000_tiny_smoke/launch_train.sh
#   NUM_PROCESSES=2 bash experiments/000_tiny_smoke/launch_train.sh    # 2 processes, DeepSpeed ZeRO-2
# Knobs: the environment variables at the top of scripts/launch_train.sh. Flags: any config.yaml setting.
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$EXP_DIR/../.." && pwd)"

# The tiny tokenizer, model and corpus that config.yaml points at (a no-op once built).
(cd "$REPO_ROOT" && PYTHONPATH="$REPO_ROOT" "${PYTHON:-python}" -m longctx.tiny --output_dir .cache/tiny_smoke)
exec bash "$REPO_ROOT/scripts/launch_train.sh" "$EXP_DIR" "$@"
