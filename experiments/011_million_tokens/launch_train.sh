#!/usr/bin/env bash
# Train Qwen3-4B-Instruct-2507 + LoRA at 1,048,576 tokens per sample on 8xH100 under DeepSpeed ZeRO-2, each sample
# split over the 8 GPUs (sequence_parallel_size 8 in config.yaml; YaRN RoPE scaling x4):
#   bash experiments/011_million_tokens/launch_train.sh
#   OUTPUT_DIR=/scratch/run1 LAUNCHER=deepspeed bash experiments/011_million_tokens/launch_train.sh --learning_rate 5e-5
# Knobs: the environment variables at the top of scripts/launch_train.sh. Flags: any config.yaml setting.
set -euo pipefail
EXP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export REQUIRE_GPU="${REQUIRE_GPU:-1}"   # sized for 80 GB GPUs; experiments/000_tiny_smoke runs on CPU
exec bash "$EXP_DIR/../../scripts/launch_train.sh" "$EXP_DIR" "$@"
