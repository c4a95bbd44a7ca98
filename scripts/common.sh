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
