"""longctx.run.lock: one live run per OUTPUT_DIR. A lease held by a live launch refuses another, naming it; the
launch's own token adopts it; a holder that died (on this host: its process is gone; anywhere: no heartbeat for
STALE_SECONDS) leaves it to the next launch; of several launches taking a stale lease over at once, one wins."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from longctx.errors import ConfigError
from longctx.run import lock
from longctx.run.layout import RUN_LOCK


def write_lease(out, token="theirs", host=None, pid=None, started=1_700_000_000.0, beat=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_LOCK).write_text(json.dumps({"token": token, "host": host or socket.gethostname(),
                                            "pid": pid or os.getpid(), "started": started,
                                            "beat": time.time() if beat is None else beat}))


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_launch_takes_the_lease_and_a_second_is_refused_naming_the_first(tmp_path):
    first = lock.acquire(tmp_path, "one")
    assert json.loads((tmp_path / RUN_LOCK).read_text())["token"] == "one"
    assert (first.host, first.pid) == (socket.gethostname(), os.getpid())
    with pytest.raises(ConfigError) as info:
        lock.acquire(tmp_path, "two")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(first.started))
    assert str(info.value) == (
        f"OUTPUT_DIR {tmp_path} is in use by a live run: host {socket.gethostname()}, process {os.getpid()}, since "
        f"{since} (last heartbeat 0 s ago); wait for it to end or stop it, or choose another OUTPUT_DIR (a run that "
        f"died without ending frees it 120 s after its last heartbeat).")
    # the launch's own token: training's rank 0 adopts its launcher's lease (pid now its own), keeping its start
    adopted = lock.acquire(tmp_path, "one", pid=12345)
    assert (adopted.pid, adopted.started) == (12345, first.started)


def test_a_holder_that_died_on_this_host_frees_the_lease_at_once(tmp_path, capsys):
    write_lease(tmp_path, pid=dead_pid())  # heartbeat just now, but its process is gone (kill -9)
    assert lock.acquire(tmp_path, "mine").token == "mine"
    assert "the lease of a run that ended without releasing it" in capsys.readouterr().out


@pytest.mark.parametrize("age,live", [(119, True), (121, False)])
def test_a_holder_on_another_host_is_live_until_its_heartbeat_is_120_s_old(tmp_path, age, live):
    write_lease(tmp_path, host="node-b", pid=1, beat=time.time() - age)
    if live:
        with pytest.raises(ConfigError, match="in use by a live run: host node-b, process 1, since 2023-11-14"):
            lock.acquire(tmp_path, "mine")
    else:
        assert lock.acquire(tmp_path, "mine").token == "mine"


def test_only_the_holder_renews_or_releases_its_lease(tmp_path):
    write_lease(tmp_path, token="theirs", beat=100.0)
    assert lock.beat(tmp_path, "mine") is False and lock.release(tmp_path, "mine") is False
    assert json.loads((tmp_path / RUN_LOCK).read_text())["beat"] == 100.0
    assert lock.beat(tmp_path, "theirs") is True
    assert json.loads((tmp_path / RUN_LOCK).read_text())["beat"] > 100.0
    assert lock.release(tmp_path, "theirs") is True and not (tmp_path / RUN_LOCK).exists()


def _contend(out, token, barrier, results):
    barrier.wait()
    try:
        lock.acquire(out, token)
        results.put(token)
    except ConfigError:
        results.put(None)


def test_of_several_launches_taking_over_a_stale_lease_at_once_one_wins(tmp_path):
    write_lease(tmp_path, host="node-b", beat=0.0)  # long dead
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(tmp_path, f"launch-{i}", barrier, results)) for i in range(6)]
    for p in procs:
        p.start()
    won = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    winners = [w for w in won if w]
    assert len(winners) == 1, won
    assert json.loads((tmp_path / RUN_LOCK).read_text())["token"] == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_LOCK]  # no stale copy left behind


def test_a_take_over_guard_left_by_a_launch_that_died_holding_it_blocks_nothing_for_long(tmp_path):
    write_lease(tmp_path, host="node-b", beat=0.0)  # long dead
    guard = tmp_path / f"{RUN_LOCK}.takeover"
    guard.write_text("")
    os.utime(guard, (time.time() - 60, time.time() - 60))  # its launch died 60 s ago, past TAKE_OVER_SECONDS (10)
    assert lock.acquire(tmp_path, "mine").token == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [RUN_LOCK]


def test_the_launchers_command_line_says_one_line_and_exits_2_when_held(tmp_path):
    write_lease(tmp_path, token="theirs")
    proc = subprocess.run([sys.executable, "-m", "longctx.run.lock", "acquire", str(tmp_path), "mine"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: OUTPUT_DIR {tmp_path} is in use by a live run")
    assert len(proc.stderr.splitlines()) == 1
