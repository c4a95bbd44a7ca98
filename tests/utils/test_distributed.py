"""longctx.utils.distributed: rank 0 prints; one process does the work for the job and every rank gets its result
or its exception; gather in rank order; the CPU process group that lets several training processes be one job.
Two-process cases run in real gloo process groups (support.processes)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from longctx.utils import distributed
from support.processes import run_ranks


def test_one_process_reads_its_rank_from_the_launchers_environment(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert (distributed.rank(), distributed.is_main_process(), distributed.is_distributed()) == (1, False, False)
    distributed.print0("from rank 1")
    monkeypatch.setenv("RANK", "0")
    distributed.print0("from rank 0")
    assert capsys.readouterr().out == "from rank 0\n"
    assert distributed.on_rank_zero(lambda: 41 + 1) == 42
    assert distributed.gather_from_all("x") == ["x"]
    assert distributed.cpu_process_group_args(["--deepspeed", "ds.json"]) == []  # WORLD_SIZE unset: one process


def _rank_zero_work(rank: int, world_size: int):
    calls = []

    def read_files():
        calls.append(rank)
        return {"verdict": "resume", "by": dist.get_rank()}

    def refuse():
        raise ValueError(f"bad data, found by rank {dist.get_rank()}")

    verdict = distributed.on_rank_zero(read_files)
    try:
        distributed.on_rank_zero(refuse)
        error = None
    except ValueError as err:
        error = str(err)
    return calls, verdict, error, distributed.gather_from_all(rank * 10), distributed.is_main_process()


def test_rank_zero_works_for_the_job_and_every_rank_gets_its_result_or_its_error(tmp_path):
    results = run_ranks(_rank_zero_work, tmp_path)
    # only rank 0 ran the work; both got rank 0's value, and both raised rank 0's exception
    assert results == [
        ([0], {"verdict": "resume", "by": 0}, "bad data, found by rank 0", [0, 10], True),
        ([], {"verdict": "resume", "by": 0}, "bad data, found by rank 0", [0, 10], False),
    ]


def _cpu_group(rank: int, world_size: int):
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    flags = distributed.cpu_process_group_args(["--config", "c.yaml", "--deepspeed", "ds.json"])
    state = (dist.get_world_size(), dist.get_rank(), dist.get_backend(),
             PartialState._shared_state["distributed_type"] == DistributedType.DEEPSPEED)
    distributed.teardown()
    return flags, state, dist.is_initialized()


def test_cpu_processes_form_one_gloo_job_marked_as_deepspeeds(tmp_path):
    """Without GPUs, TrainingArguments would leave each process alone (world size 1); the flag tells it to use the
    group made here. RANK / WORLD_SIZE / MASTER_* are the launcher's (run_ranks sets them; no group is made first)."""
    results = run_ranks(_cpu_group, tmp_path, init_group=False)
    flag = ["--accelerator_config", '{"use_configured_state": true}']
    assert results == [(flag, (2, 0, "gloo", True), False), (flag, (2, 1, "gloo", True), False)]


@pytest.fixture(autouse=True)
def no_launcher_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
