"""The seam between the Watch and what builds on it (diagnosis, NaN root cause, ...).

A :class:`WatchPlugin` sees every step at fixed points. The Watch calls every
method inside its internal-error guard: a plugin that raises is reported once
and the step goes on as plain training would.

Order of calls on step N::

    prepare(N)              at the end of step N-1 (at construction for N = 1):
                            arm hooks for step N's forward (which may run before
                            ``watch.step`` is called, in the ``step(loss)`` form)
    before_forward(ctx)     inside ``watch.step``, before the closure runs
    after_forward(ctx)      the closure returned the loss, before backward
                            (closure form only)
    after_backward(ctx)     gradients present (unscaled), before measuring
    veto(ctx, record)       after the one host sync: True asks to skip the update
    after_step(ctx, record) after the update (or skip): returns findings
    after_update(record)    ``observe()`` only: the caller's ``optimizer.step()`` ran and
                            ``record.update_ratio`` is now measured: returns findings
    abort(ctx)              instead of the rest, when the user's closure or backward
                            raised: remove whatever was armed for this step
    close()
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .findings import Finding
    from .records import StepRecord
    from .watch import Watch


@dataclass(slots=True)
class StepContext:
    """What one step carries between the Watch and its plugins."""

    step: int
    closure: Callable[[], torch.Tensor] | None
    batch: Any
    loss: torch.Tensor | None = None
    skipped_by: list[str] = field(default_factory=list)
    stepped: bool = False  # the optimizer has applied this step's update
    scratch: dict[str, Any] = field(default_factory=dict)  # per-step notes between plugins
    #: every plugin was quiet (``quiet_step``) when the step began: the Watch skips the mid-step hooks
    quiet: bool = False


class WatchPlugin:
    """Base class: every hook is a no-op."""

    name = "plugin"
    #: torch.distributed: True when ``veto`` depends only on the record and the history
    #: (the same on every rank), so the Watch need not agree on it with an extra
    #: all-reduce and host sync. Leave False if it reads rank-local tensors.
    veto_is_global = False
    #: True while the plugin has nothing to do in ``before_forward``, ``after_forward``,
    #: ``after_backward`` and ``veto`` of the coming step: the Watch then does not call them
    #: (they would run on every step for nothing; per-step Python is the overhead budget).
    #: A plugin sets it in ``prepare`` or ``after_step`` for the next step. Default: False.
    quiet_step = False

    def attach(self, watch: "Watch") -> None:
        self.watch = watch

    def prepare(self, next_step: int) -> None:
        pass

    def before_forward(self, ctx: StepContext) -> None:
        pass

    def after_forward(self, ctx: StepContext) -> None:
        pass

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def veto(self, ctx: StepContext, record: "StepRecord") -> bool:
        return False

    def after_step(self, ctx: StepContext, record: "StepRecord") -> list["Finding"]:
        return []

    def after_update(self, record: "StepRecord") -> list["Finding"]:
        return []

    def abort(self, ctx: StepContext) -> None:
        pass

    def close(self) -> None:
        pass
