# Shared by the launchers in this folder: source it, then call the functions.

# Number of GPUs this launch may use: nvidia-smi's count, narrowed by CUDA_VISIBLE_DEVICES when that is set.
count_gpus() {
  local found
  found="$( (nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true) | grep -c . || true)"
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "$found" -gt 0 ]]; then
    found="$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)"
  fi
  echo "$found"
}

# W&B mode when none is set: online only with credentials (the key's value is never printed).
default_wandb_mode() {
  if [[ -n "${WANDB_API_KEY:-}" ]] || grep -qs "api.wandb.ai" "$HOME/.netrc"; then echo online; else echo offline; fi
}

# PyTorch's CUDA allocator setting for training and evaluation alike: expandable segments (samples of every length up to
# 262,144 tokens would otherwise leave cached blocks of earlier sizes that a longer sample cannot use), added to what
# PYTORCH_ALLOC_CONF (or the older PYTORCH_CUDA_ALLOC_CONF) already holds; an explicit expandable_segments is kept.
alloc_conf_with_expandable_segments() {
  local conf="${PYTORCH_ALLOC_CONF:-${PYTORCH_CUDA_ALLOC_CONF:-}}"
  [[ "$conf" == *expandable_segments* ]] || conf="${conf:+$conf,}expandable_segments:True"
  echo "$conf"
}

# One line on stderr, exit 2: a launcher knob is wrong (named, with the fix).
die() {
  echo "error: $*" >&2
  exit 2
}

# `die` unless the knob's value is one of the words given: require_one_of NAME value word...
require_one_of() {
  local name="$1" value="$2" word
  shift 2
  for word in "$@"; do [[ "$value" == "$word" ]] && return 0; done
  die "$name=$value; use one of: $*."
}

# `die` unless the knob's value is a whole number >= the minimum: require_int NAME value minimum
require_int() {
  [[ "$2" =~ ^[0-9]+$ && "$2" -ge "$3" ]] || die "$1=$2; use a whole number >= $3."
}

# --help of a launcher: the knobs between the `# knobs:` and `# end of knobs` lines of the script, each with its
# value in this environment and its one-line meaning. Call after the knobs are set.
print_knobs() {
  local script="$1" line name meaning value
  echo "Environment knobs, set before the command (e.g. NUM_PROCESSES=4 OUTPUT_DIR=/scratch/run1 bash ...);"
  echo "each with its value in this environment (paths from the repository root) and its meaning:"
  while IFS= read -r line; do
    [[ "$line" =~ ^([A-Z_]+)=\"\$\{[A-Z_]+:-.*\}\"[[:space:]]*#[[:space:]]*(.*)$ ]] || continue
    name="${BASH_REMATCH[1]}"
    meaning="${BASH_REMATCH[2]}"
    value="${!name:-(empty)}"
    printf '  %-22s %-34s %s\n' "$name" "${value#"$REPO_ROOT"/}" "$meaning"
  done < <(sed -n '/^# knobs:/,/^# end of knobs/p' "$script")
}

# With -h or --help among the arguments after the first two: the knobs of SCRIPT, then TEXT, and exit 0.
#   help_if_asked "${BASH_SOURCE[0]}" "how to get the settings' help" "$@"
help_if_asked() {
  local script="$1" text="$2" arg
  shift 2
  for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
      print_knobs "$script"
      echo
      printf '%s\n' "$text"
      exit 0
    fi
  done
}

# run_scoring_processes N_SCRIPT_WORDS SCRIPT... -- FLAGS...: evaluation's and summarize's launch. NUM_PROCESSES
# processes (accelerate launch; plain $PYTHON for one), the command echoed first (DRY_RUN=1 stops there); with several,
# one cheap process runs first with --preflight: bad input exits 2 there (the launcher would turn it into 1), and
# when nothing is left to do (exit 4, NOTHING_TO_SCORE in longctx/exit_status.py) no process group and no model start.
run_scoring_processes() {
  local -a script=() launch=()
  while [[ "$1" != "--" ]]; do script+=("$1"); shift; done
  shift
  if [[ "$NUM_PROCESSES" -gt 1 ]]; then
    # --multi_gpu is what starts N processes; on a CPU-only machine they join a gloo group (--cpu would start one).
    launch=(accelerate launch --quiet --multi_gpu --num_processes "$NUM_PROCESSES" --num_machines 1
            --main_process_port "$MASTER_PORT" --dynamo_backend no --mixed_precision no)
    [[ "$GPUS_FOUND" -eq 0 ]] && launch+=(--num_cpu_threads_per_process "${OMP_NUM_THREADS:-1}")
  else
    launch=("$PYTHON")
  fi
  echo "+ ${launch[*]} ${script[*]} $*"
  echo "  (PYTORCH_ALLOC_CONF=$PYTORCH_ALLOC_CONF)"
  [[ "$DRY_RUN" == "1" ]] && exit 0
  if [[ "$NUM_PROCESSES" -gt 1 ]]; then
    local status=0
    "$PYTHON" "${script[@]}" "$@" --preflight || status=$?
    [[ "$status" -eq 4 ]] && exit 0
    [[ "$status" -ne 0 ]] && exit "$status"
  fi
  exec "${launch[@]}" "${script[@]}" "$@"
}
