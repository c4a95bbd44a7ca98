"""Every collective of the evaluation loop carries a status, so that one rank's failure stops all ranks at once.

Without this, a rank that raises (loading an adapter, generating, writing a row) simply leaves: on one machine the
launcher's agent then kills the others, and the log's root cause is whichever rank the agent saw die; across
machines with NCCL the others wait in their next collective until its timeout (ddp_timeout: 30 minutes by default).
Here each rank's work between two collectives runs under `attempt`: an exception becomes a `RankFailure` record
(rank, what it was doing, the error in one line) that the rank sends in the very gather or broadcast the others
are already waiting in. Every rank then raises `RankFailed` at the same collective; rank 0 prints one line naming
the failed rank and the reason, all leave through one last barrier (`utils.distributed.teardown`) and exit non-zero
within moments. The failed rank also prints its own traceback (the one line cannot hold it).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import exit_status
from ..errors import ConfigError, DataError, RankFailed
from ..utils.distributed import print0, teardown
from ..utils.warning_filters import silence_unactionable_warnings

Job = TypeVar("Job")


@dataclass(frozen=True)
class RankFailure:
    rank: int
    num_processes: int
    doing: str  # e.g. "scoring checkpoint-200"
    reason: str  # the error in one line
    status: int  # exit status of every process

    @classmethod
    def of(cls, state, doing: str, err: Exception) -> RankFailure:
        """`state`: accelerate's PartialState (or anything with process_index and num_processes)."""
        bad_input = isinstance(err, (ConfigError, DataError))
        text = " ".join(str(err).split())  # one line, whatever the error's own layout
        return cls(state.process_index, state.num_processes, doing,
                   text if bad_input else f"{type(err).__name__}: {text}",
                   exit_status.BAD_INPUT if bad_input else exit_status.FAILED)

    def line(self) -> str:
        if self.status == exit_status.BAD_INPUT:  # the same message as a single process gives (the setting and the fix)
            return f"error: {self.reason}"
        if self.num_processes == 1:
            return f"error: failed while {self.doing}: {self.reason}"
        return (f"error: rank {self.rank} of {self.num_processes} failed while {self.doing}: {self.reason}; "
                f"every rank stopped")


def attempt(state, doing: str, work: Callable[[], Any]) -> Any:
    """work()'s result, or the RankFailure of its exception (its traceback printed by this rank)."""
    try:
        return work()
    except Exception as err:  # whatever it is, the other ranks must hear of it
        failure = RankFailure.of(state, doing, err)
        if failure.status != exit_status.BAD_INPUT:  # a bad setting needs no traceback; anything else does
            traceback.print_exc()
        return failure


def _raise_first_failure(values: list) -> None:
    failures = [v for v in values if isinstance(v, RankFailure)]
    if failures:
        raise RankFailed(min(failures, key=lambda f: f.rank))


def gather(state, doing: str, work: Callable[[], Any]) -> list:
    """Every rank runs `work`; every rank receives the list of all ranks' results (in rank order), or every rank
    raises RankFailed naming the lowest failed rank. `state`: accelerate's PartialState."""
    from accelerate.utils import gather_object

    results = gather_object([attempt(state, doing, work)])
    _raise_first_failure(results)
    return results


def from_main(state, doing: str, work: Callable[[], Any]) -> Any:
    """Rank 0 runs `work` while the others wait; every rank receives its result, or every rank raises
    RankFailed."""
    from accelerate.utils import broadcast_object_list

    message = [attempt(state, doing, work) if state.is_main_process else None]
    broadcast_object_list(message)
    _raise_first_failure(message)
    return message[0]


def run_command(argv: list[str] | None, prepare: Callable[[list[str] | None], Job], preflight: Callable[[Job], int],
                work: Callable[[Job], int]) -> None:
    """main() of a command whose ranks work together (evaluation, summarize): bad input is one line and exit 2,
    a rank's failure one line from rank 0 and every rank's exit with its status, otherwise `work`'s status
    (`preflight`'s with --preflight: the launcher's check before it starts the processes)."""
    silence_unactionable_warnings()
    try:
        job = prepare(argv)
        status = preflight(job) if job.options.preflight else work(job)
    except (ConfigError, DataError) as err:
        print0(f"error: {err}", file=sys.stderr)
        sys.exit(exit_status.BAD_INPUT)
    except RankFailed as err:  # raised on every rank at the same collective
        print0(str(err), file=sys.stderr)
        teardown()  # after the print: the launcher stops every process once one exits
        sys.exit(err.failure.status)
    if status:
        sys.exit(status)
