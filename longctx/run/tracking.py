"""The W&B run of a training run: one run per OUTPUT_DIR, across every relaunch.

Rank 0 starts the run before the model loads. Its id is fixed at the first launch and kept in
OUTPUT_DIR/wandb_run.json, so a relaunch after a crash, a kill -9 or a preemption continues the same run (the
dashboard shows one loss curve; offline, every launch's folder carries the same id and `wandb sync` merges them).
The run's config holds every resolved setting, the git commit and the chat template's hash; the Trainer's
WandbCallback then finds the run started and adds its own fields. With WANDB_MODE=online on a machine that cannot
reach the W&B server, the run goes offline and says so, instead of waiting for wandb.init's timeouts.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from ..utils.atomic_write import write_atomic
from ..utils.distributed import print0
from .layout import WANDB_DIR, WANDB_RUN

REACH_TIMEOUT_SECONDS = 5.0
HELD_RUN_WAIT_SECONDS = 60.0  # a killed launch's W&B service lets its run go within seconds of noticing


def wants_wandb(training) -> bool:
    return "wandb" in (training.report_to or [])


def server_reachable(base_url: str | None = None, timeout: float = REACH_TIMEOUT_SECONDS) -> bool:
    """Whether a TCP connection to the W&B server (WANDB_BASE_URL, default api.wandb.ai) opens within `timeout`."""
    url = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def recorded_run(output_dir: str | Path) -> dict:
    path = Path(output_dir) / WANDB_RUN
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def start_wandb_run(output_dir: str, run_name: str | None, config: dict) -> str:
    """Start (or continue) this OUTPUT_DIR's W&B run; rank 0 only. Returns the run id."""
    import wandb

    if os.environ.get("WANDB_MODE", "online") not in ("offline", "disabled") and not server_reachable():
        server = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        os.environ["WANDB_MODE"] = "offline"
        print0(f"W&B: {server} cannot be reached from this machine (no connection in {REACH_TIMEOUT_SECONDS:g} s); "
               f"running offline into {Path(output_dir) / WANDB_DIR} (upload later with `wandb sync`)")
    recorded = recorded_run(output_dir)
    project = os.environ.get("WANDB_PROJECT") or recorded.get("project") or "huggingface"
    deadline = time.monotonic() + HELD_RUN_WAIT_SECONDS
    while True:
        try:
            run = wandb.init(id=recorded.get("id"), resume="allow", project=project, name=run_name, dir=output_dir,
                             config=config)  # id None: W&B makes one, kept below for every later launch
            break
        except Exception as err:  # noqa: BLE001 - wandb's own error types move between versions
            # A launch killed with kill -9 leaves its W&B service holding the run for a few seconds more (it ends
            # when it notices its process is gone): a relaunch right after waits for it instead of failing.
            if "is in use" not in str(err) or time.monotonic() > deadline:
                raise
            print0(f"W&B: run {recorded.get('id')} is still held by an earlier launch's W&B process (killed?); "
                   f"waiting for it to let go (up to {HELD_RUN_WAIT_SECONDS:g} s)")
            time.sleep(2)
    write_atomic(Path(output_dir) / WANDB_RUN, json.dumps(  # what evaluation recorded there stays
        {**recorded, "id": run.id, "project": run.project, "name": run.name, "mode": run.settings.mode}))
    print0(f"W&B: run {run.id} ({run.settings.mode}"
           f"{', continued' if recorded.get('id') else ''}; its id is kept in {Path(output_dir) / WANDB_RUN})")
    return run.id


def finish_wandb_run(preempted: bool = False) -> None:
    """Close the W&B run; a preempted run is marked so, and the relaunch continues it."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        if preempted:
            wandb.run.mark_preempting()
        wandb.finish()
