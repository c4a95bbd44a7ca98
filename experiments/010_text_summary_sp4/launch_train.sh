#!/usr/bin/env bash
# Train Qwen3-4B-Instruct-2507 + LoRA at 262,144 tokens on 4xH100 under DeepSpeed ZeRO-2, each sample split over
# the 4 GPUs (Ulysses sequence parallelism, sequence_parallel_size 4 in config.yaml):
#   bash experiments/010_text_summary_sp4/launch_train.sh
#   OUTPUT_DIR=/scratch/run1 LAUNCHER=deepspeed bash experiments/010_text_summary_sp4/launch_train.sh --learning_rate 5e-5
# Knobs: the environment variables at the top of scripts/launch_train.sh. Flags: any config.yaml setting.
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export REQUIRE_GPU="${REQUIRE_GPU:-1}"   # sized for 80 GB GPUs; experiments/000_tiny_smoke runs on CPU
exec bash "$EXP_DIR/../../scripts/launch_train.sh" "$EXP_DIR" "$@"
