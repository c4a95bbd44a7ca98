"""longctx.utils.distributed: rank 0 prints; one process does the work for the job and every rank gets its result
or its exception; gather in rank order; the CPU process group that lets several training processes be one job.
Two-process cases run in real gloo process groups (support.processes)."""

from __future__ import annotations

import os

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

    PartialState._reset_state()  # a fresh process, as a launcher starts: not the test worker's singleton, forked
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


def _group_timeouts(rank: int, world_size: int):
    import deepspeed.comm
    import torch

    def seconds(group) -> float:
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()

    before = seconds(dist.new_group([0, 1]))
    distributed.use_timeout_for_new_groups(5400)
    os.environ["DS_ACCELERATOR"] = "cpu"
    deepspeed.comm.init_distributed(dist_backend="gloo")  # DeepSpeed's comm layer over the existing group
    return before, seconds(dist.new_group([0, 1])), seconds(deepspeed.comm.new_group([0, 1]))


def test_groups_made_later_wait_the_runs_timeout_not_torchs_default(tmp_path):
    """DeepSpeed's ZeRO and sequence-parallel groups are made with dist.new_group and no timeout: they get torch's
    default (30 minutes here with gloo; 10 under NCCL) unless use_timeout_for_new_groups set it (training: its
    ddp_timeout)."""
    assert run_ranks(_group_timeouts, tmp_path) == [(1800.0, 5400.0, 5400.0)] * 2


def _evaluation_group_timeout(rank: int, world_size: int):
    import torch
    from accelerate import PartialState

    from longctx.eval.job import EvalArguments
    from longctx.eval.scoring import process_state

    PartialState._reset_state()  # a fresh process, as accelerate launch starts it
    state = process_state(EvalArguments(ddp_timeout=7200))
    default = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout
    later = dist.new_group([0, 1])._get_backend(torch.device("cpu")).options._timeout
    return state.num_processes, default.total_seconds(), later.total_seconds()


def test_the_evaluations_processes_wait_its_ddp_timeout(tmp_path):
    """The evaluation's process group (and any made after it) waits ddp_timeout (the run's, from run_config.yaml) at
    a collective: the processes' shares of a long checkpoint end at different times. Before, it set none."""
    assert run_ranks(_evaluation_group_timeout, tmp_path, init_group=False) == [(2, 7200.0, 7200.0)] * 2
