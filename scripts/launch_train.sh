#!/usr/bin/env bash
# Shared training launcher; experiments call it from their launch_train.sh:
#   bash scripts/launch_train.sh experiments/009_text_summary [--any_setting value ...]
#   bash experiments/009_text_summary/launch_train.sh --help        # the knobs below, then where the settings are
# Every knob is an environment variable with its default below; flags after the experiment folder are settings from
# config.yaml (`train_cluster.py --help` lists them) and win over the file.
# Order: knobs checked -> preflight (python -m longctx.preflight: settings, every data record, OUTPUT_DIR, run plan;
# one line and exit 2 on a mistake, 3 when the plan does not fit) -> the launch -> the training's status and reason.
# Exit status: 0 finished, 1 failed, 2 bad input, 3 plan does not fit, 75 stopped for a signal with a checkpoint,
# 130 a second Ctrl-C (stopped at once).
set -euo pipefail

EXP_DIR="$(cd "${1:?usage: launch_train.sh EXPERIMENT_DIR [--setting value ...]}" && pwd)"
shift
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXP_NAME="$(basename "$EXP_DIR")"
source "$REPO_ROOT/scripts/common.sh"
GPUS_FOUND="$(count_gpus)"

# knobs:
CONFIG="${CONFIG:-$EXP_DIR/config.yaml}"                  # the experiment's settings file
OUTPUT_DIR="${OUTPUT_DIR:-runs/$EXP_NAME}"                # one run: checkpoints, final_adapter, reports, W&B files
NUM_PROCESSES="${NUM_PROCESSES:-$(( GPUS_FOUND > 0 ? GPUS_FOUND : 1 ))}"  # processes per machine, one per GPU
CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-}"          # GPUs to use, e.g. 0,1,2,3; empty: every GPU
NUM_MACHINES="${NUM_MACHINES:-1}"                         # machines of the job; run this on each of them
MACHINE_RANK="${MACHINE_RANK:-0}"                         # this machine: 0 .. NUM_MACHINES-1
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"                   # address of machine 0, reachable from the others
MASTER_PORT="${MASTER_PORT:-29500}"                       # rendezvous port on machine 0
LAUNCHER="${LAUNCHER:-accelerate}"                        # accelerate | deepspeed (one machine only)
USE_DEEPSPEED="${USE_DEEPSPEED:-auto}"                    # auto: ZeRO-2 with GPUs or several processes; 1 | 0
DS_CONFIG="${DS_CONFIG:-$EXP_DIR/ds_config_zero2.json}"   # DeepSpeed config when DeepSpeed is on
REQUIRE_GPU="${REQUIRE_GPU:-0}"                           # 1: refuse to train without CUDA GPUs (009 sets it)
RESUME="${RESUME:-auto}"                                  # auto: continue the same run in OUTPUT_DIR | never
OVERWRITE="${OVERWRITE:-0}"                               # 1: delete the run in OUTPUT_DIR and start afresh
PLAN="${PLAN:-check}"                                     # check: stop if the plan does not fit | 1: print it, exit | 0
PLAN_OVERRIDE="${PLAN_OVERRIDE:-0}"                       # 1: launch even when the plan does not fit
PREEMPT_GRACE_SECONDS="${PREEMPT_GRACE_SECONDS:-7200}"    # after SIGTERM/SIGUSR1/Ctrl-C: time to finish the step, save
WANDB_PROJECT="${WANDB_PROJECT:-longctx-$EXP_NAME}"       # W&B project
WANDB_MODE="${WANDB_MODE:-}"                              # online | offline; empty: offline without credentials
OMP_NUM_THREADS="${OMP_NUM_THREADS:-}"                    # CPU threads per process; empty: 1 if several share a CPU
DRY_RUN="${DRY_RUN:-0}"                                   # 1: check, print the command, run nothing
PYTHON="${PYTHON:-python}"                                # the Python of the project's environment
# end of knobs

help_if_asked "${BASH_SOURCE[0]}" \
"Settings: every key of $CONFIG is also a flag after the script, e.g. --learning_rate 5e-5;
  all of them, grouped (model, data, LoRA, memory, run, evaluation, then transformers' TrainingArguments):
  $PYTHON $EXP_DIR/train_cluster.py --help
Exit status: 0 finished, 1 failed, 2 bad input, 3 plan does not fit, 75 stopped for a signal (resumable), 130 a
second Ctrl-C." "$@"

require_one_of LAUNCHER "$LAUNCHER" accelerate deepspeed
require_one_of USE_DEEPSPEED "$USE_DEEPSPEED" auto 0 1
require_one_of RESUME "$RESUME" auto never
require_one_of OVERWRITE "$OVERWRITE" 0 1
require_one_of PLAN "$PLAN" check 1 0
require_int NUM_PROCESSES "$NUM_PROCESSES" 1
require_int NUM_MACHINES "$NUM_MACHINES" 1
require_int MASTER_PORT "$MASTER_PORT" 1
require_int PREEMPT_GRACE_SECONDS "$PREEMPT_GRACE_SECONDS" 0
[[ "$MACHINE_RANK" =~ ^[0-9]+$ && "$MACHINE_RANK" -lt "$NUM_MACHINES" ]] ||
  die "MACHINE_RANK=$MACHINE_RANK; with NUM_MACHINES=$NUM_MACHINES use 0 .. $(( NUM_MACHINES - 1 )) (machine 0 at MASTER_ADDR)."
if [[ "$LAUNCHER" == "deepspeed" && "$NUM_MACHINES" -gt 1 ]]; then
  die "LAUNCHER=deepspeed with NUM_MACHINES=$NUM_MACHINES: DeepSpeed's runner starts the other machines over ssh/pdsh from a hostfile; use LAUNCHER=accelerate (the default) on every machine: one job through torchrun's rendezvous, no ssh."
fi
[[ -n "$CUDA_VISIBLE_DEVICES" ]] && export CUDA_VISIBLE_DEVICES
if [[ "$USE_DEEPSPEED" == "auto" ]]; then
  USE_DEEPSPEED=$(( GPUS_FOUND > 0 || NUM_PROCESSES * NUM_MACHINES > 1 ? 1 : 0 ))
fi
[[ "$LAUNCHER" == "deepspeed" && "$USE_DEEPSPEED" != "1" ]] && die "LAUNCHER=deepspeed needs USE_DEEPSPEED=1 (or auto)."

cd "$REPO_ROOT"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_ALLOC_CONF="$(alloc_conf_with_expandable_segments)"  # read first by torch; the planner plans with it
SETTINGS=(--config "$CONFIG" --output_dir "$OUTPUT_DIR" --resume "$RESUME")
[[ "$OVERWRITE" == "1" ]] && SETTINGS+=(--overwrite true)  # the setting: the preflight and training act on it
[[ "$USE_DEEPSPEED" == "1" ]] && SETTINGS+=(--deepspeed "$DS_CONFIG")
SETTINGS+=("$@")

# The preflight's view of this launch: planned for a GPU when the machine has one or the experiment requires one;
# elsewhere for the GPUs the experiment is sized for (plan_gpus), as `python -m longctx.planner` prints it.
FACTS=(--world_size "$(( NUM_PROCESSES * NUM_MACHINES ))" --machine_rank "$MACHINE_RANK" --experiment_dir "$EXP_DIR")
if [[ "$GPUS_FOUND" -gt 0 || "$REQUIRE_GPU" == "1" ]]; then
  FACTS+=(--device cuda)
  mib="$( (nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null || true) | sed -n 1p)"
  mib="$(tr -dc '0-9' <<<"$mib")"
  [[ "${mib:-0}" -ge 1024 ]] && FACTS+=(--gpu_memory_gib "$(awk -v m="$mib" 'BEGIN { printf "%.1f", m / 1024 }')")
  if [[ "$GPUS_FOUND" -gt 0 ]]; then  # the training machine: the plan is for this launch, and its host memory
    FACTS+=(--num_gpus "$(( NUM_PROCESSES * NUM_MACHINES ))" --processes_per_machine "$NUM_PROCESSES")
    FACTS+=(--host_memory_gib "$(awk '/^MemAvailable:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo)")
  fi
else
  FACTS+=(--device cpu)
fi
preflight() { "$PYTHON" -m longctx.preflight "${FACTS[@]}" "$@" -- "${SETTINGS[@]}"; }
# This launch's lease of OUTPUT_DIR (longctx/run/lock.py): machine 0's preflight takes it, training's rank 0 adopts it.
export LONGCTX_RUN_TOKEN="${LONGCTX_RUN_TOKEN:-$(cat /proc/sys/kernel/random/uuid 2>/dev/null || echo "$$-$RANDOM$RANDOM")}"
export LONGCTX_LAUNCHER_PID=$$
beat_pid=""
cleanup() {  # whatever ends this script: the lease goes (only this launch's own), then the status files
  [[ -n "$beat_pid" ]] && kill "$beat_pid" 2>/dev/null
  if [[ "$MACHINE_RANK" == "0" && "$PLAN" != "1" ]]; then
    "$PYTHON" -m longctx.run.lock release "$OUTPUT_DIR" "$LONGCTX_RUN_TOKEN" 2>/dev/null || true
  fi
  [[ -n "${LONGCTX_STATUS_DIR:-}" ]] && rm -rf "$LONGCTX_STATUS_DIR"
  return 0
}
trap cleanup EXIT

if [[ "$PLAN" == "1" ]]; then
  preflight --plan only   # the plan for the machine the experiment is written for, whatever this machine has
  exit
fi
if [[ "$GPUS_FOUND" -eq 0 && "$REQUIRE_GPU" == "1" ]]; then
  die "$EXP_NAME is sized for CUDA GPUs and this machine has none (nvidia-smi found no GPU); PLAN=1 prints its plan here, and bash experiments/000_tiny_smoke/launch_train.sh runs the same code path on a CPU in minutes."
fi
if [[ -z "$OMP_NUM_THREADS" && "$GPUS_FOUND" -eq 0 && "$NUM_PROCESSES" -gt 1 ]]; then
  OMP_NUM_THREADS=1  # processes sharing CPU cores oversubscribe them otherwise (8x slower measured)
fi
[[ -n "$OMP_NUM_THREADS" ]] && export OMP_NUM_THREADS
[[ "$GPUS_FOUND" -eq 0 ]] && export DS_ACCELERATOR=cpu  # DeepSpeed would warn that it found no GPU: none is expected
[[ -z "$WANDB_MODE" ]] && WANDB_MODE="$(default_wandb_mode)"
export WANDB_PROJECT WANDB_MODE WANDB_DIR="${WANDB_DIR:-$OUTPUT_DIR}"
# torchrun's agent forwards SIGUSR1 as well as SIGTERM and SIGINT to the ranks, and gives them this long to save and
# exit (its flags' environment names, and the names torch's elastic launcher reads itself).
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" PET_SHUTDOWN_TIMEOUT="$PREEMPT_GRACE_SECONDS"
export TORCHELASTIC_SIGNALS_TO_HANDLE="$PET_SIGNALS_TO_HANDLE" TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$PREEMPT_GRACE_SECONDS"

if [[ "$LAUNCHER" == "deepspeed" ]]; then
  LAUNCH=(deepspeed --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  if [[ -n "$CUDA_VISIBLE_DEVICES" ]]; then
    # --num_gpus would make DeepSpeed's runner drop CUDA_VISIBLE_DEVICES and take GPUs 0..N-1
    LAUNCH+=(--include "localhost:$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | sed -n "1,${NUM_PROCESSES}p" | paste -sd,)")
  else
    LAUNCH+=(--num_gpus "$NUM_PROCESSES")
  fi
elif [[ "$NUM_PROCESSES" -eq 1 && "$NUM_MACHINES" -eq 1 && "$USE_DEEPSPEED" != "1" ]]; then
  LAUNCH=("$PYTHON")  # one process, no DeepSpeed: accelerate launch would only wrap it
else
  LAUNCH=(accelerate launch --quiet --num_processes "$(( NUM_PROCESSES * NUM_MACHINES ))" --num_machines
          "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port
          "$MASTER_PORT" --dynamo_backend no --mixed_precision no)
  if [[ "$USE_DEEPSPEED" == "1" ]]; then
    LAUNCH+=(--use_deepspeed --deepspeed_config_file "$DS_CONFIG")
    # several machines: torchrun's rendezvous on each machine (no pdsh/ssh, no .deepspeed_env file written)
    [[ "$NUM_MACHINES" -gt 1 ]] && LAUNCH+=(--deepspeed_multinode_launcher standard)
  else
    LAUNCH+=(--multi_gpu)
  fi
  [[ "$GPUS_FOUND" -eq 0 ]] && LAUNCH+=(--num_cpu_threads_per_process "${OMP_NUM_THREADS:-1}")
fi

if [[ "$PLAN" == "check" ]]; then CHECK=(--plan check); else CHECK=(--plan off); fi
[[ "$DRY_RUN" == "1" ]] && CHECK+=(--dry_run true)  # check only: OVERWRITE=1 removes nothing
status=0
preflight "${CHECK[@]}" || status=$?
if [[ "$status" -eq 3 && "$PLAN_OVERRIDE" == "1" ]]; then
  echo "warning: the plan does not fit; launching anyway (PLAN_OVERRIDE=1)." >&2
elif [[ "$status" -eq 3 ]]; then
  echo "error: the run plan above does not fit; use a switch or value it suggests, or PLAN_OVERRIDE=1 to launch anyway." >&2
  exit 3
elif [[ "$status" -ne 0 ]]; then
  exit "$status"  # the reason is the line above
fi

echo "+ $(printf '%q ' "${LAUNCH[@]}" "$EXP_DIR/train_cluster.py" "${SETTINGS[@]}")"
echo "  (W&B mode: $WANDB_MODE, project: $WANDB_PROJECT; OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}; PYTORCH_ALLOC_CONF=$PYTORCH_ALLOC_CONF)"
[[ "$DRY_RUN" == "1" ]] && exit 0

# The launch runs in its own process group; SIGTERM / SIGUSR1 to this script go to all of it (the ranks stop at the
# end of their optimizer step with a checkpoint), and the script waits for it to end. Ctrl-C (SIGINT, which a
# terminal sends to this script's group) does the same; a second Ctrl-C stops every rank at once.
export LONGCTX_STATUS_DIR="$(mktemp -d)"
mkdir -p "$OUTPUT_DIR"
beat() {  # renews this launch's lease while the launch runs (rank 0 renews it too, from inside training)
  trap '' INT
  while sleep 30; do
    kill -0 "$LONGCTX_LAUNCHER_PID" 2>/dev/null || exit 0
    "$PYTHON" -m longctx.run.lock beat "$OUTPUT_DIR" "$LONGCTX_RUN_TOKEN" >/dev/null 2>&1 || true
  done
}
if [[ "$MACHINE_RANK" == "0" ]]; then beat & beat_pid=$!; fi
set -m
"${LAUNCH[@]}" "$EXP_DIR/train_cluster.py" "${SETTINGS[@]}" &
child=$!
set +m
for sig in TERM USR1; do
  trap "kill -s $sig -- -$child 2>/dev/null || true" "$sig"
done
interrupts=0
on_ctrl_c() {
  interrupts=$(( interrupts + 1 ))
  if [[ "$interrupts" -eq 1 ]]; then
    echo "Ctrl-C: every rank stops at the end of its optimizer step with a checkpoint (exit 75); Ctrl-C again stops them at once, losing the step in progress." >&2
    kill -s INT -- -"$child" 2>/dev/null || true
  else
    local pidfile
    for pidfile in "$LONGCTX_STATUS_DIR"/rank-*.pid; do  # the ranks run in sessions of their own under torch's agent
      [[ -f "$pidfile" ]] && kill -9 "$(cat "$pidfile")" 2>/dev/null
    done
    kill -9 -- -"$child" 2>/dev/null || true
  fi
}
trap on_ctrl_c INT
launch_status=0
wait "$child" || launch_status=$?
while kill -0 "$child" 2>/dev/null; do  # a signal interrupted `wait`: keep waiting for the launch itself
  launch_status=0
  wait "$child" || launch_status=$?
done
if [[ "$interrupts" -ge 2 ]]; then
  echo "error: stopped at once by a second Ctrl-C; the step in progress is lost, the last complete checkpoint stays: relaunch the same command to resume from it" >&2
  exit 130
fi
status=0
"$PYTHON" -m longctx.exit_status "$LONGCTX_STATUS_DIR" "$launch_status" || status=$?  # the reason, as the last line
if [[ "$WANDB_MODE" == "offline" && "$OUTPUT_DIR/wandb_run.json" -nt "$LONGCTX_STATUS_DIR" ]]; then
  echo "W&B ran offline; to upload: wandb sync $OUTPUT_DIR/wandb/offline-run-*"
fi
exit "$status"
