"""The exit statuses of every command of this project (one table), and how a training process's status and one-line
reason reach the launcher.

    0   OK               finished (training: the final adapter is saved and verified)
    1   FAILED           failed; the reason is the last line of the output
    2   BAD_INPUT        a bad setting, knob, data file, record or run directory, found before anything expensive
    3   DOES_NOT_FIT     the run plan does not fit (GPU or host memory); PLAN_OVERRIDE=1 launches anyway
    4   NOTHING_TO_SCORE evaluation's --preflight: every checkpoint is already scored (the report was refreshed);
                         eval_all_checkpoints.sh then exits 0 without starting any process group
    75  PREEMPTED        stopped for a signal (SIGTERM / SIGUSR1 / Ctrl-C) after saving a complete checkpoint of the
                         step it was in; relaunch the same command to resume (the SLURM script requeues the job on 75)

accelerate and torchrun turn every failing rank into their own exit status 1 and a traceback. So each training
process that stops for a reason records {status, reason} in LONGCTX_STATUS_DIR (a directory the launcher makes per
launch), and the launcher prints the first reason as its last line and exits with that status
(`python -m longctx.exit_status DIR LAUNCH_STATUS`). This module imports nothing heavy: the launcher runs it after
training.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

OK, FAILED, BAD_INPUT, DOES_NOT_FIT, NOTHING_TO_SCORE, PREEMPTED = 0, 1, 2, 3, 4, 75
STATUS_DIR_ENV = "LONGCTX_STATUS_DIR"


def record(status: int, reason: str) -> bool:
    """Record this process's exit status and reason for the launcher; False when not launched by it."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if not directory:
        return False
    rank = os.environ.get("RANK", "0")
    path = Path(directory) / f"rank-{rank}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"rank": int(rank), "status": status, "reason": reason, "time": time.time()}))
    os.replace(tmp, path)
    return True


def record_pid() -> None:
    """Tell the launcher this rank's process id (LONGCTX_STATUS_DIR/rank-N.pid): a second Ctrl-C stops the ranks at
    once, and torch's agent starts them in sessions of their own, out of the launcher's reach otherwise."""
    directory = os.environ.get(STATUS_DIR_ENV)
    if directory:
        (Path(directory) / f"rank-{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))


def first_recorded(directory: str | os.PathLike) -> dict | None:
    """The earliest record of a launch (the root cause when one rank's failure made the others fail), or None;
    `ranks` lists every rank of this machine that recorded the same status and reason."""
    records = []
    for path in Path(directory).glob("rank-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    first = min(records, key=lambda r: (r["time"], r["rank"]))
    same = sorted(r["rank"] for r in records if (r["status"], r["reason"]) == (first["status"], first["reason"]))
    return {**first, "ranks": same}


def main(argv: list[str] | None = None) -> int:
    """`python -m longctx.exit_status DIR LAUNCH_STATUS`: print the recorded reason (the launch's last line) and return
    the status to exit with: the recorded one, else the launcher's own."""
    directory, launch_status = (argv if argv is not None else sys.argv[1:])[:2]
    found = first_recorded(directory)
    if found is None:
        if int(launch_status):
            print(f"error: training exited with status {launch_status} and recorded no reason (killed by a signal, "
                  f"or out of memory?); see the output above.", file=sys.stderr)
        return int(launch_status)
    stream = sys.stdout if found["status"] in (OK, PREEMPTED) else sys.stderr
    alike = f" (the same on ranks {', '.join(map(str, found['ranks']))})" if len(found["ranks"]) > 1 else ""
    print(found["reason"] + alike, file=stream)
    return int(found["status"])


if __name__ == "__main__":
    sys.exit(main())
