"""The scheduler's domain errors: why a request cannot be served, in the scheduler's words.

They carry a stable `code` (the error table's vocabulary) and, where it helps the client, a
`retry_after` in seconds, but no HTTP status: the HTTP layer (`swapper/errors.py`) maps them.
"""

from __future__ import annotations

from typing import Sequence


class SchedulerError(Exception):
    """A request the scheduler cannot serve."""

    code = "service_unavailable"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class QueueFull(SchedulerError):
    code = "queue_full"


class QueueTimeout(SchedulerError):
    code = "queue_timeout"


class InsufficientMemory(SchedulerError):
    code = "insufficient_memory"


class LoadFailed(SchedulerError):
    code = "model_load_failed"


class ShuttingDown(SchedulerError):
    code = "shutting_down"


class UnknownModel(SchedulerError):
    """The model left the catalog (reload) between resolution and the lease."""

    code = "model_not_found"


class Unloaded(SchedulerError):
    """A waiter whose model was unloaded or removed before it became ready."""

    code = "model_unloaded"


class NotLoaded(SchedulerError):
    """A request that must not load its model (autoload off, admin unload of an idle model)."""

    code = "model_not_loaded"


class AlreadyLoaded(SchedulerError):
    """An admin load of a model that is already loaded or loading."""

    code = "model_already_loaded"


class Pinned(SchedulerError):
    """An unload of a pinned model without force."""

    code = "model_pinned"


class LoadError(Exception):
    """Raised by a launcher when a child fails to start."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail: Sequence[str] = ()):
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = list(log_tail)


class IllegalTransition(RuntimeError):
    """A lifecycle change the transition table does not allow: a bug, never a user error."""
