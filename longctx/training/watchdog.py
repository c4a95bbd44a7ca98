"""A hang watchdog that needs no Python code to run at expiry.

faulthandler's timer thread writes every thread's stack to stderr and exits the process with status 1 when the
guarded section is still running after its time: it fires even when the process is stuck inside a collective
(NCCL / gloo), in I/O or in a C extension, where a Python-level timeout would never get control back. One timer
per process: arming again replaces the running one.
"""

from __future__ import annotations

import faulthandler
import sys

from ..utils.distributed import print0


class Watchdog:
    def __init__(self, seconds: float | None, setting: str):
        self.seconds = seconds
        self.setting = setting  # the setting that sets `seconds`, named in the announcement
        self.armed_for: str | None = None
        self._announced: set[str] = set()

    def arm(self, what: str) -> None:
        """Guard `what` from now on. Each distinct `what` is announced once (rank 0), so a per-step guard does not
        print a line every step."""
        if not self.seconds:
            return
        if what not in self._announced:
            self._announced.add(what)
            print0(f"watchdog: {what} must finish within {self.seconds:g} s ({self.setting}), or every thread's "
                   f"stack is written to the log and the process exits", file=sys.stderr)
        faulthandler.dump_traceback_later(self.seconds, exit=True, file=sys.stderr)
        self.armed_for = what

    def disarm(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self.armed_for = None
