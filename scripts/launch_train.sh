#!/usr/bin/env bash
# Shared training launcher; experiments call it from their launch_train.sh:
#   bash scripts/launch_train.sh experiments/009_text_summary [--any_setting value ...]
# Every knob is an environment variable with its default below; flags after the experiment folder are
# settings from config.yaml (`train_cluster.py --help` lists them) and win over the file.
set -euo pipefail

EXP_DIR="$(cd "${1:?usage: launch_train.sh EXPERIMENT_DIR [--setting value ...]}" && pwd)"
shift
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXP_NAME="$(basename "$EXP_DIR")"

source "$REPO_ROOT/scripts/common.sh"
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-}"          # e.g. 0,1,2,3; empty: every GPU of the machine
[[ -n "$CUDA_VISIBLE_DEVICES" ]] && export CUDA_VISIBLE_DEVICES
GPUS_FOUND="$(count_gpus)"

CONFIG="${CONFIG:-$EXP_DIR/config.yaml}"                # the experiment's settings
OUTPUT_DIR="${OUTPUT_DIR:-runs/$EXP_NAME}"                # checkpoints, final_adapter, reports, W&B files
NUM_PROCESSES="${NUM_PROCESSES:-$(( GPUS_FOUND > 0 ? GPUS_FOUND : 1 ))}"  # per machine: one per GPU
NUM_MACHINES="${NUM_MACHINES:-1}"                         # multi-node: run this script on every machine
MACHINE_RANK="${MACHINE_RANK:-0}"                         # 0 .. NUM_MACHINES-1
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"                   # address of machine 0, reachable from the others
MASTER_PORT="${MASTER_PORT:-29500}"
LAUNCHER="${LAUNCHER:-accelerate}"                        # accelerate | deepspeed
USE_DEEPSPEED="${USE_DEEPSPEED:-auto}"                    # auto: ZeRO-2 on GPUs or with >1 process; 1 | 0
DS_CONFIG="${DS_CONFIG:-$EXP_DIR/ds_config_zero2.json}"
REQUIRE_GPU="${REQUIRE_GPU:-0}"                           # 1: refuse to start without CUDA GPUs
WANDB_PROJECT="${WANDB_PROJECT:-longctx-$EXP_NAME}"
WANDB_MODE="${WANDB_MODE:-}"                              # online | offline; empty: offline without credentials
OMP_NUM_THREADS="${OMP_NUM_THREADS:-}"                    # empty: 1 per process when several share a CPU
RESUME="${RESUME:-auto}"                                  # auto: continue from the newest complete checkpoint; never
OVERWRITE="${OVERWRITE:-0}"                               # 1 (with RESUME=never): delete the old run's checkpoints
DRY_RUN="${DRY_RUN:-0}"                                   # 1: print the command and exit without running it
PLAN="${PLAN:-check}"                                     # 1: print memory plan, exit 0; check: stop if no fit; 0: off
PLAN_OVERRIDE="${PLAN_OVERRIDE:-0}"                       # 1: launch even when the memory plan does not fit

cd "$REPO_ROOT"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# Run plan (python -m longctx.planner): reads the config and the architecture, loads no weights and no CUDA.
# Planned for a GPU when the machine has one or the experiment requires one, else for the CPU (never blocks). This
# launch's GPU count is passed only on a machine with GPUs: elsewhere the plan is for the GPUs the experiment is
# sized for (plan_gpus), as `python -m longctx.planner` prints it.
run_planner() {
  local device=cpu extra=()
  if [[ "$GPUS_FOUND" -gt 0 || "$REQUIRE_GPU" == "1" ]]; then
    device=cuda
    local mib
    mib="$( (nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null || true) | head -n 1)"
    mib="$(tr -dc '0-9' <<<"$mib")"
    [[ "${mib:-0}" -ge 1024 ]] && extra+=(--gpu_memory_gib "$(awk -v m="$mib" 'BEGIN { printf "%.1f", m / 1024 }')")
    [[ "$USE_DEEPSPEED" != "0" ]] && extra+=(--deepspeed "$DS_CONFIG")
  fi
  if [[ "$GPUS_FOUND" -gt 0 ]]; then
    extra+=(--num_gpus "$(( NUM_PROCESSES * NUM_MACHINES ))" --processes_per_machine "$NUM_PROCESSES")
  fi
  "${PYTHON:-python}" -m longctx.planner --config "$CONFIG" --experiment_dir "$EXP_DIR" --device "$device" \
    --output_dir "$OUTPUT_DIR" ${extra[@]+"${extra[@]}"} "$@"
}
if [[ "$PLAN" == "1" ]]; then
  status=0
  run_planner "$@" || status=$?
  exit $(( status == 3 ? 0 : status ))  # 3 = does not fit: printed, which is all PLAN=1 asks for
fi

if [[ "$GPUS_FOUND" -eq 0 && "$REQUIRE_GPU" == "1" ]]; then
  echo "error: $EXP_NAME is sized for CUDA GPUs and this machine has none (nvidia-smi found no GPU)." >&2
  echo "       To run the same code path on a CPU in minutes: bash experiments/000_tiny_smoke/launch_train.sh" >&2
  exit 1
fi
if [[ "$LAUNCHER" != "accelerate" && "$LAUNCHER" != "deepspeed" ]]; then
  echo "error: LAUNCHER=$LAUNCHER; use accelerate or deepspeed." >&2
  exit 2
fi
if [[ "$USE_DEEPSPEED" == "auto" ]]; then
  USE_DEEPSPEED=$(( GPUS_FOUND > 0 || NUM_PROCESSES * NUM_MACHINES > 1 ? 1 : 0 ))
fi
if [[ "$LAUNCHER" == "deepspeed" && "$USE_DEEPSPEED" != "1" ]]; then
  echo "error: LAUNCHER=deepspeed needs USE_DEEPSPEED=1 (or auto)." >&2
  exit 2
fi
if [[ -z "$OMP_NUM_THREADS" && "$GPUS_FOUND" -eq 0 && "$NUM_PROCESSES" -gt 1 ]]; then
  OMP_NUM_THREADS=1  # processes sharing CPU cores oversubscribe them otherwise (8x slower measured)
fi
[[ -n "$OMP_NUM_THREADS" ]] && export OMP_NUM_THREADS

[[ -z "$WANDB_MODE" ]] && WANDB_MODE="$(default_wandb_mode)"
export WANDB_PROJECT WANDB_MODE WANDB_DIR="${WANDB_DIR:-$OUTPUT_DIR}"

SCRIPT_ARGS=(--config "$CONFIG" --output_dir "$OUTPUT_DIR" --resume "$RESUME")
[[ "$OVERWRITE" == "1" ]] && SCRIPT_ARGS+=(--overwrite true)
[[ "$USE_DEEPSPEED" == "1" ]] && SCRIPT_ARGS+=(--deepspeed "$DS_CONFIG")

if [[ "$LAUNCHER" == "deepspeed" ]]; then
  LAUNCH=(deepspeed --num_nodes "$NUM_MACHINES" --num_gpus "$NUM_PROCESSES" --master_addr "$MASTER_ADDR"
          --master_port "$MASTER_PORT")
  # Multi-node: started on every machine like the accelerate path (no hostfile or pdsh needed).
  [[ "$NUM_MACHINES" -gt 1 ]] && LAUNCH+=(--no_ssh --node_rank "$MACHINE_RANK")
else
  LAUNCH=(accelerate launch --num_processes "$(( NUM_PROCESSES * NUM_MACHINES ))" --num_machines "$NUM_MACHINES"
          --machine_rank "$MACHINE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
          --dynamo_backend no --mixed_precision no)
  if [[ "$USE_DEEPSPEED" == "1" ]]; then
    LAUNCH+=(--use_deepspeed --deepspeed_config_file "$DS_CONFIG")
  elif [[ "$NUM_PROCESSES" -gt 1 || "$NUM_MACHINES" -gt 1 ]]; then
    LAUNCH+=(--multi_gpu)
  fi
  [[ "$GPUS_FOUND" -eq 0 && "$USE_DEEPSPEED" != "1" && "$NUM_PROCESSES" -eq 1 ]] && LAUNCH+=(--cpu)
fi

if [[ "$PLAN" != "0" ]]; then
  status=0
  run_planner "$@" || status=$?
  if [[ "$status" -eq 3 && "$PLAN_OVERRIDE" != "1" ]]; then
    echo "error: the run plan above does not fit (GPU or host memory); use a switch or value it suggests," >&2
    echo "       or PLAN_OVERRIDE=1 to launch anyway (PLAN=0 skips the plan)." >&2
    exit 3
  elif [[ "$status" -eq 3 ]]; then
    echo "warning: the run plan does not fit; launching anyway (PLAN_OVERRIDE=1)." >&2
  elif [[ "$status" -eq 2 ]]; then
    exit 2  # a bad setting (named above): caught here, before any process group or model load
  elif [[ "$status" -ne 0 ]]; then
    echo "warning: no run plan (exit $status, reason above); launching anyway." >&2
  fi
fi

echo "+ $(printf '%q ' "${LAUNCH[@]}" "$EXP_DIR/train_cluster.py" "${SCRIPT_ARGS[@]}" "$@")"
echo "  (W&B mode: $WANDB_MODE, project: $WANDB_PROJECT; OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset})"
[[ "$DRY_RUN" == "1" ]] && exit 0
mkdir -p "$OUTPUT_DIR"
status=0
"${LAUNCH[@]}" "$EXP_DIR/train_cluster.py" "${SCRIPT_ARGS[@]}" "$@" || status=$?
if [[ "$WANDB_MODE" == "offline" && -d "$WANDB_DIR/wandb" ]]; then
  echo "W&B ran offline; to upload later: wandb sync $WANDB_DIR/wandb/offline-run-*"
fi
exit "$status"
