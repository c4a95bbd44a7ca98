"""One live run per OUTPUT_DIR: a lease, OUTPUT_DIR/.run_lock.json, held for the life of a launch.

    python -m longctx.run.lock acquire OUTPUT_DIR TOKEN    # the launcher's preflight does this (one line, exit 2)
    python -m longctx.run.lock beat OUTPUT_DIR TOKEN       # the launcher, every HEARTBEAT_SECONDS while it runs
    python -m longctx.run.lock release OUTPUT_DIR TOKEN    # the launcher at its end, whatever happened

What it relies on, on any filesystem the machines share (NFS v3/v4, Lustre, GPFS, a local disk): creating a file with
O_CREAT | O_EXCL, and renaming a file within a directory, are atomic; a file opened after its writer replaced it shows
the new content (NFS's close-to-open consistency). Not on flock / fcntl locks: Lustre gives those only node-locally
unless mounted with `-o flock`, and NFS only through its lock manager.

The holder (the launcher, and training's global rank 0 while it runs) rewrites the lease every HEARTBEAT_SECONDS
with the time of that beat. Another launch finds the run live while the last beat is less than STALE_SECONDS old
(the machines' clocks must agree to well within that, as NTP keeps them); on the holder's own host it also asks
whether the holder process is alive, so a run killed with kill -9 blocks a relaunch there not at all, and from
another host (or after its node was lost) for at most STALE_SECONDS. Evaluation never takes the lease: scoring a live
run's checkpoints stays allowed (rows are written under their own lock, longctx.eval.results).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError
from ..utils.atomic_write import write_atomic
from .layout import RUN_LOCK

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0
TAKE_OVER_SECONDS = 10.0  # the longest a take-over of a stale lease holds its guard (a few file operations)
TOKEN_ENV = "LONGCTX_RUN_TOKEN"  # the launch's token: training adopts the lease its launcher took


@dataclass(frozen=True)
class Lease:
    token: str
    host: str
    pid: int
    started: float  # when the launch took the lease (epoch seconds)
    beat: float  # the last heartbeat (epoch seconds)

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, process {self.pid}, since {since} (last heartbeat {now - self.beat:.0f} s ago)"


def read_lease(output_dir: str | os.PathLike) -> Lease | None:
    try:
        return Lease(**json.loads((Path(output_dir) / RUN_LOCK).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):  # absent, or half-written by hand
        return None


def is_live(lease: Lease, now: float | None = None) -> bool:
    """The lease's holder still runs: on this host, its process is alive; anywhere, its last beat is recent."""
    now = time.time() if now is None else now
    if lease.host == socket.gethostname() and not _alive(lease.pid):
        return False
    return now - lease.beat < STALE_SECONDS


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def refuse_if_live(output_dir: str | os.PathLike, token: str | None = None) -> None:
    """ConfigError naming the live run that holds OUTPUT_DIR's lease (unless it is this launch's own, `token`)."""
    held = read_lease(output_dir)
    now = time.time()
    if held is not None and held.token != token and is_live(held, now):
        raise ConfigError(f"OUTPUT_DIR {output_dir} is in use by a live run: {held.describe(now)}; wait for it to "
                          f"end or stop it, or choose another OUTPUT_DIR (a run that died without ending frees it "
                          f"{STALE_SECONDS:.0f} s after its last heartbeat).")


def acquire(output_dir: str | os.PathLike, token: str | None = None, pid: int | None = None) -> Lease:
    """Take OUTPUT_DIR's lease for a launch (`token`; a new one when None), or raise ConfigError naming the live run
    that holds it. A lease with this very token is the launch's own (training adopting its launcher's). A stale lease
    (its holder gone) is replaced under a take-over guard file, created with O_EXCL, so of several launches taking it
    over at once exactly one wins and the others find the winner's live lease."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_LOCK
    now = time.time()
    lease = Lease(token or uuid.uuid4().hex, socket.gethostname(), pid or os.getpid(), now, now)
    waited = 3 * TAKE_OVER_SECONDS  # longer than a dead contender's guard lasts
    deadline = time.monotonic() + waited
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = read_lease(out)
            if held is not None and held.token == lease.token:  # this launch's own: adopted by its holder
                return _write(out, Lease(**{**asdict(lease), "started": held.started}))
            refuse_if_live(out, lease.token)
            if _take_over(path, lease):
                return lease
            if time.monotonic() > deadline:
                raise ConfigError(f"OUTPUT_DIR {out}: another launch has been taking over its stale lease "
                                  f"({RUN_LOCK}) for {waited:.0f} s; check for a second launch, then relaunch.") from None
            time.sleep(0.05)  # another contender holds the guard for a few file operations: look again
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(asdict(lease)))
        return lease


def _take_over(path: Path, lease: Lease) -> bool:
    """Replace a stale (or unreadable) lease with `lease`, holding the take-over guard; False when another contender
    holds the guard, or the lease there is no longer stale (a contender's, now live) or is gone (then O_EXCL
    decides). A guard left by a launch that died holding it is removed after TAKE_OVER_SECONDS."""
    guard = path.with_name(f"{path.name}.takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > TAKE_OVER_SECONDS:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False
    try:
        if not path.exists():
            return False
        current = read_lease(path.parent)
        if current is not None and is_live(current):
            return False
        _write(path.parent, lease)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)
    about = current.describe(time.time()) if current is not None else "unreadable"
    print(f"OUTPUT_DIR {path.parent}: the lease of a run that ended without releasing it ({about}) is taken over",
          flush=True)
    return True


def beat(output_dir: str | os.PathLike, token: str) -> bool:
    """Renew the lease when it is still this launch's; False when it is not (released, or taken over)."""
    held = read_lease(output_dir)
    if held is None or held.token != token:
        return False
    _write(Path(output_dir), Lease(**{**asdict(held), "beat": time.time()}))
    return True


def release(output_dir: str | os.PathLike, token: str) -> bool:
    """Remove the lease when it is this launch's (never another's)."""
    held = read_lease(output_dir)
    if held is None or held.token != token:
        return False
    (Path(output_dir) / RUN_LOCK).unlink(missing_ok=True)
    return True


def _write(out: Path, lease: Lease) -> Lease:
    write_atomic(out / RUN_LOCK, json.dumps(asdict(lease)), durable=False)
    return lease


class Heartbeat:
    """Renews a lease every HEARTBEAT_SECONDS on a daemon thread until stopped (training's global rank 0)."""

    def __init__(self, output_dir: str | os.PathLike, token: str):
        self.output_dir, self.token = output_dir, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="run-lease-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not beat(self.output_dir, self.token):
                    return
            except OSError:  # a full disk or a file-server hiccup: try again at the next beat (stale only after
                continue     # STALE_SECONDS without one), and let the run's own writes report it

    def stop(self, release_lease: bool = True) -> None:
        self._stop.set()
        if release_lease:
            release(self.output_dir, self.token)


def main(argv: list[str] | None = None) -> int:
    """The launcher's side: acquire (one line and exit 2 when held), beat, release."""
    action, output_dir, token = (argv if argv is not None else sys.argv[1:])[:3]
    if action == "acquire":
        try:
            acquire(output_dir, token, pid=int(os.environ.get("LONGCTX_LAUNCHER_PID", os.getppid())))
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 2
        return 0
    if action == "beat":
        return 0 if beat(output_dir, token) else 1
    if action == "release":
        release(output_dir, token)
        return 0
    print(f"error: unknown action {action!r}; use acquire, beat or release.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
