"""Errors gradwatch raises, and the guard that keeps internal errors out of the user's loop."""

from __future__ import annotations

import logging
import traceback
import warnings
from typing import Any

logger = logging.getLogger("gradwatch")


class GradwatchWarning(UserWarning):
    """A warning gradwatch emits about itself (an internal error it recovered from)."""


class NonFiniteError(RuntimeError):
    """Raised by ``Watch.step`` with ``on_nonfinite="raise"`` on a non-finite step.

    Attributes:
        record: the :class:`~gradwatch.records.StepRecord` of the failing step.
        finding: the finding that explains it, when one was made (else None).
    """

    def __init__(self, message: str, record: Any = None, finding: Any = None) -> None:
        super().__init__(message)
        self.record = record
        self.finding = finding


class InternalErrorReporter:
    """Reports each distinct internal error once (warning + log), then stays quiet.

    Example:
        >>> reporter = InternalErrorReporter()
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     for _ in range(3):
        ...         _ = reporter.report("measure", ValueError("boom"))
        >>> len(seen), reporter.count
        (1, 3)
    """

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()
        self.count = 0
        self.last: BaseException | None = None

    def report(self, where: str, exc: BaseException) -> bool:
        """Record ``exc``; warn and log it the first time. Returns True if it was new."""
        self.count += 1
        self.last = exc
        key = (where, type(exc).__name__)
        if key in self.seen:
            return False
        self.seen.add(key)
        detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        logger.error("gradwatch internal error in %s (training goes on without it):\n%s", where, detail)
        warnings.warn(
            f"gradwatch: internal error in {where}: {type(exc).__name__}: {exc}. "
            "Training goes on; this step was taken as plain training would. Reported once.",
            GradwatchWarning,
            stacklevel=3,
        )
        return True
