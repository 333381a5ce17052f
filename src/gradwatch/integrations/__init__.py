"""Framework integrations: gradwatch inside loops that own the optimizer step.

Each integration lives in its own module and is imported only by its path, so
``import gradwatch`` never imports Lightning or transformers::

    from gradwatch.integrations.lightning import GradwatchCallback     # pip install gradwatch[lightning]
    from gradwatch.integrations.transformers import GradwatchCallback  # pip install gradwatch[transformers]

Both measure with :meth:`gradwatch.Watch.observe` right before the framework's
``optimizer.step()``: per-layer norms before clipping, findings, and, on a
non-finite step, every gradient set to None (the step changes nothing) and the
learning-rate scheduler step that the framework takes anyway rewound
(:class:`SchedulerRewind`), so a skipped step does not advance the schedule.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch

__all__ = ["SchedulerRewind"]


class SchedulerRewind:
    """Undo the learning-rate scheduler steps a framework takes after a skipped update.

    Call :meth:`save` when a step is skipped (before the framework steps its
    schedulers) and :meth:`restore` after it did: schedulers and optimizer
    hyper-parameters (``lr``, momentum, betas, ...) return to their saved values.
    Does nothing when nothing was saved.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(1)); opt = torch.optim.SGD([p], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> rewind = SchedulerRewind()
        >>> rewind.save([sched], opt); opt.step(); sched.step(); rewind.restore()
        >>> opt.param_groups[0]["lr"], sched.last_epoch
        (1.0, 0)
    """

    def __init__(self) -> None:
        self._saved: list[tuple[Any, dict[str, Any]]] | None = None
        self._groups: list[tuple[dict[str, Any], dict[str, Any]]] = []

    @property
    def pending(self) -> bool:
        """True between :meth:`save` and :meth:`restore`."""
        return self._saved is not None

    def save(self, schedulers: Iterable[Any], optimizer: torch.optim.Optimizer | None) -> None:
        """Remember the state of ``schedulers`` and the optimizer's hyper-parameters."""
        self._saved = [(s, copy.deepcopy(s.state_dict())) for s in schedulers if s is not None and hasattr(s, "state_dict")]
        groups = optimizer.param_groups if optimizer is not None else []
        self._groups = [(g, {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}) for g in groups]

    def restore(self) -> None:
        """Put back what :meth:`save` remembered (once)."""
        if self._saved is None:
            return
        for scheduler, state in self._saved:
            scheduler.load_state_dict(state)
        for group, values in self._groups:
            group.update(values)
        self._saved = None
        self._groups = []


def severity_level(severity: str) -> float:
    """A finding's severity as a number for metric loggers: info 1, warning 2, error 3."""
    return {"info": 1.0, "warning": 2.0, "error": 3.0}.get(severity, 0.0)
