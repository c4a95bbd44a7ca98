"""longctx.exit_status: the one table of exit statuses, and how a rank's status and reason reach the launcher
(`python -m longctx.exit_status DIR LAUNCH_STATUS`, the launcher's last step)."""

from __future__ import annotations

import json
import re

from longctx import exit_status
from support.paths import EVAL_LAUNCH, LAUNCH, REPO_ROOT

COMMON, SUMMARIZE_LAUNCH = REPO_ROOT / "scripts" / "common.sh", REPO_ROOT / "scripts" / "summarize.sh"


def test_the_statuses_are_distinct_and_the_launchers_use_the_same_numbers():
    table = {"OK": 0, "FAILED": 1, "BAD_INPUT": 2, "DOES_NOT_FIT": 3, "NOTHING_TO_SCORE": 4, "PREEMPTED": 75}
    assert {name: getattr(exit_status, name) for name in table} == table
    launcher = LAUNCH.read_text()
    assert "Exit status: 0 finished, 1 failed, 2 bad input, 3 plan does not fit, 75 stopped for a signal" in launcher
    assert re.search(r'\[\[ "\$status" -eq 3 \]\]', launcher)  # DOES_NOT_FIT, the plan's verdict
    # NOTHING_TO_SCORE: evaluation's and summarize's launchers exit 0 when their preflight says nothing is left
    assert re.search(r'\[\[ "\$status" -eq 4 \]\] && exit 0', COMMON.read_text())
    for script in (EVAL_LAUNCH, SUMMARIZE_LAUNCH):
        assert script.read_text().endswith('run_scoring_processes "${SCRIPT[@]}" -- "$@"\n')


def test_without_the_launchers_directory_nothing_is_recorded(monkeypatch, tmp_path):
    monkeypatch.delenv(exit_status.STATUS_DIR_ENV, raising=False)
    assert exit_status.record(exit_status.FAILED, "error: x") is False
    assert list(tmp_path.iterdir()) == []


def test_a_rank_records_its_status_and_reason_in_one_file(monkeypatch, tmp_path):
    monkeypatch.setenv(exit_status.STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")
    assert exit_status.record(exit_status.PREEMPTED, "preempted: stopped at step 7") is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-3.json"]  # no temporary file left behind
    record = json.loads((tmp_path / "rank-3.json").read_text())
    assert (record["rank"], record["status"], record["reason"]) == (3, 75, "preempted: stopped at step 7")


def write(directory, rank, status, reason, time):
    (directory / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "status": status, "reason": reason, "time": time}))


def test_the_earliest_reason_wins_and_the_ranks_that_gave_the_same_are_listed(tmp_path):
    # rank 2 failed first (t=5); rank 0 then stopped for the same reason at t=5 too (lower rank listed first);
    # rank 1 failed later (t=9) because of them: the root cause is rank 0's (earliest time, then lowest rank)
    write(tmp_path, 2, 1, "error: rank 2: OSError: disk full", 5.0)
    write(tmp_path, 0, 1, "error: rank 2: OSError: disk full", 5.0)
    write(tmp_path, 1, 1, "error: rank 1: RuntimeError: peer gone", 9.0)
    (tmp_path / "rank-4.json").write_text("{cut off")  # a record being written when the launch ended: ignored
    first = exit_status.first_recorded(tmp_path)
    assert (first["rank"], first["reason"], first["ranks"]) == (0, "error: rank 2: OSError: disk full", [0, 2])


def test_the_launcher_prints_the_reason_last_and_exits_with_its_status(tmp_path, capsys):
    write(tmp_path, 0, 75, "preempted: checkpoint-7 is saved", 1.0)
    write(tmp_path, 1, 75, "preempted: checkpoint-7 is saved", 1.0)
    assert exit_status.main([str(tmp_path), "1"]) == 75  # accelerate's own status (1) gives way to the recorded one
    out = capsys.readouterr()
    assert (out.out, out.err) == ("preempted: checkpoint-7 is saved (the same on ranks 0, 1)\n", "")


def test_a_launch_that_recorded_nothing_says_so_only_when_it_failed(tmp_path, capsys):
    assert exit_status.main([str(tmp_path), "0"]) == 0
    assert capsys.readouterr().err == ""
    assert exit_status.main([str(tmp_path), "137"]) == 137
    assert capsys.readouterr().err == ("error: training exited with status 137 and recorded no reason (killed by a "
                                       "signal, or out of memory?); see the output above.\n")
