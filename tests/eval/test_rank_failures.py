"""longctx.eval.rank_failures: when one process of a data-parallel evaluation raises, every process learns of it at the same
collective and stops, with one line naming the failed rank and the reason and a non-zero status, within a bound."""

from __future__ import annotations

import subprocess

import pytest

from longctx.errors import ConfigError
from longctx.eval import rank_failures as ranks
from longctx.eval.rank_failures import RankFailure
from support.env import subprocess_env
from support.evaluation import copy_run
from support.paths import REPO_ROOT

# Rank {rank} raises in {module}.{function}; everything else is the real evaluation, launched for real.
WRAPPER = '''
import os

from longctx.eval import cli, {module}

real = {module}.{function}


def failing(*args, **kwargs):
    if os.environ["RANK"] == "{rank}":
        raise {error}
    return real(*args, **kwargs)


{module}.{function} = failing
cli.main()
'''
BOUND_SECONDS = 240  # the whole launch, model loads included (15-30 s here); the backend's timeout is 1800 s


class Rank:  # what accelerate's PartialState tells process r of n
    def __init__(self, r: int, n: int):
        self.process_index, self.num_processes = r, n


def test_failure_line_names_the_rank_and_keeps_the_bad_input_status():
    error = RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
    failure = RankFailure.of(Rank(1, 4), "scoring checkpoint-2", error)
    assert failure.line() == ("error: rank 1 of 4 failed while scoring checkpoint-2: RuntimeError: CUDA out of "
                              "memory. Tried to allocate 2 GiB; every rank stopped")
    assert failure.status == 1
    alone = RankFailure.of(Rank(0, 1), "scoring checkpoint-2", error)
    assert alone.line() == ("error: failed while scoring checkpoint-2: RuntimeError: CUDA out of memory. Tried to "
                            "allocate 2 GiB")
    bad = RankFailure.of(Rank(0, 2), "looking for checkpoints", ConfigError("setting 'run_dir' = 'x': no checkpoint"))
    assert bad.line() == "error: setting 'run_dir' = 'x': no checkpoint"  # as with one process
    assert bad.status == 2


def bad_setting():
    raise ConfigError("setting 'x' = 0")


def test_one_process_gets_results_or_the_failure_with_its_traceback(capsys):
    from accelerate import PartialState

    state = PartialState(cpu=True)  # one process: the collectives hand back what they were given
    assert ranks.gather(state, "scoring checkpoint-1", lambda: [(0, "text")]) == [[(0, "text")]]
    assert ranks.from_main(state, "looking for checkpoints", lambda: ("plan", 1)) == ("plan", 1)
    with pytest.raises(ranks.RankFailed) as info:
        ranks.from_main(state, "writing the report", lambda: 1 / 0)
    assert str(info.value) == "error: failed while writing the report: ZeroDivisionError: division by zero"
    assert info.value.failure.status == 1
    assert "Traceback" in capsys.readouterr().err  # printed where it happened
    with pytest.raises(ranks.RankFailed) as info:
        ranks.gather(state, "scoring checkpoint-1", bad_setting)
    assert str(info.value) == "error: setting 'x' = 0" and info.value.failure.status == 2
    assert "Traceback" not in capsys.readouterr().err  # a bad setting needs none


@pytest.mark.e2e
@pytest.mark.parametrize("module, function, rank, error, line", [
    ("generation", "generate_batches", 1, 'RuntimeError("injected: rank 1 cannot generate")',
     "error: rank 1 of 2 failed while scoring base: RuntimeError: injected: rank 1 cannot generate; "
     "every rank stopped"),
    ("results", "save_row", 0, 'OSError(28, "No space left on device")',
     "error: rank 0 of 2 failed while writing the results of base: OSError: [Errno 28] No space left on "
     "device; every rank stopped"),
], ids=["rank 1 generating", "rank 0 writing"])
def test_a_failed_rank_stops_every_rank_promptly(trained_run, tmp_path, module, function, rank, error, line):
    out = copy_run(trained_run, tmp_path / "run")
    wrapper = tmp_path / "eval_with_a_failure.py"
    wrapper.write_text(WRAPPER.format(module=module, function=function, rank=rank, error=error))
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(29631 + rank), "--dynamo_backend", "no", "--mixed_precision", "no",
               str(wrapper), "--config", str(out / "run_config.yaml"), "--output_dir", str(out), "--all_checkpoints",
               "--report_to", "none", "--generation_batch_size", "2"]
    # The timeout is the bound: a rank left waiting in a collective would hold the launch for the backend's.
    proc = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=BOUND_SECONDS)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert line in proc.stderr.splitlines(), proc.stderr[-5000:]
    assert proc.stderr.count(line) == 1  # rank 0 alone prints it
    assert f'raise {error}' in proc.stderr  # the failed rank's own traceback is kept
    assert not (out / "eval_results.jsonl").exists()  # nothing scored: the first model, the base, failed
