"""longctx.run.tracking: one W&B run per OUTPUT_DIR across launches, and WANDB_MODE=online on a machine that cannot
reach the W&B server falls back to offline (saying so) instead of hanging in wandb.init. The real wandb, offline; the
"server" is a port on this machine, open or closed."""

from __future__ import annotations

import json
import socket

import pytest

from longctx.run import tracking


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_server_reachable_is_a_tcp_connection_to_wandb_base_url():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert tracking.server_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not tracking.server_reachable(f"http://127.0.0.1:{closed_port()}")


def test_online_without_a_reachable_server_runs_offline_and_a_relaunch_continues_the_run(tmp_path, monkeypatch,
                                                                                          capsys):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("WANDB_PROJECT", "longctx-test")
    first = tracking.start_wandb_run(str(tmp_path), "run-a", {"lora_r": 16})
    wandb.finish()
    out = capsys.readouterr().out
    assert (f"W&B: {tracking.os.environ['WANDB_BASE_URL']} cannot be reached from this machine (no connection in 5 s); "
            f"running offline into {tmp_path / 'wandb'} (upload later with `wandb sync`)") in out
    assert f"W&B: run {first} (offline; its id is kept in {tmp_path / 'wandb_run.json'})" in out
    assert json.loads((tmp_path / "wandb_run.json").read_text()) == {
        "id": first, "project": "longctx-test", "name": "run-a", "mode": "offline"}

    second = tracking.start_wandb_run(str(tmp_path), "run-a", {"lora_r": 16})  # the relaunch
    wandb.finish()
    assert second == first
    assert f"W&B: run {first} (offline, continued;" in capsys.readouterr().out
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{first}"))) == 2


@pytest.fixture(autouse=True)
def _restore_wandb_mode(monkeypatch):
    """start_wandb_run switches WANDB_MODE to offline in os.environ; monkeypatch restores it after the test."""
    monkeypatch.setenv("WANDB_MODE", tracking.os.environ.get("WANDB_MODE", "offline"))
