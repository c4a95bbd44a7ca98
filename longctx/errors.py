"""Every error this project raises on purpose, in one leaf module (it imports nothing of the project).

Each message is one line that names the setting, file:line or directory, the value, and the fix; the entry points
turn them into exit statuses (longctx.exit_status): a ConfigError or DataError is bad input (2), found before anything
expensive starts wherever it can be.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting is wrong. The message names the setting, the value and the fix."""


class ChatTemplateError(ConfigError):
    """The chat template cannot be split into prompt and target. The message names the template and what is wrong."""


class ArchitectureError(ConfigError):
    """The model's shape cannot be read without weights. The message says what to provide."""


class DataError(ValueError):
    """A record is unusable. The message names the file, the 1-based line, the field and the fix."""


class AdapterError(ValueError):
    """An adapter directory is missing files or holds empty / misshapen tensors."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or gradient norm; raised on every rank at once (the check is all-reduced), so no rank waits
    forever on the others."""


class DiskFullError(RuntimeError):
    """OUTPUT_DIR's filesystem filled up while the run wrote to it. The message names the directory, its free space,
    what was being written (removed, being incomplete), the last complete checkpoint and what to do."""


class Preempted(Exception):
    """Training stopped for a signal after saving a checkpoint; the message says which and how to resume."""

    def __init__(self, message: str, signal_name: str = "a signal"):
        super().__init__(message)
        self.signal_name = signal_name


class RankFailed(RuntimeError):
    """Raised on every rank of an evaluation at the collective where a failure (of any rank) became known.
    `failure`: the longctx.eval.rank_failures.RankFailure (rank, what it was doing, reason, exit status); the message
    is its one line, which rank 0 prints."""

    def __init__(self, failure):
        super().__init__(failure.line())
        self.failure = failure
