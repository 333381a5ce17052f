"""LR backoff: after k skipped or rolled-back steps within a window, lower the learning rate.

One skipped step is a bad batch; several within a short window say the
learning rate is too high for where the run now is (PaLM and OLMo lowered it
by hand after repeated spikes). :class:`LRBackoff` counts steps whose update
was not applied - skipped as non-finite, vetoed as a spike, rolled back -
and, when ``k`` of them fall within the last ``window`` steps, multiplies every
param group's ``lr`` by ``factor``, raises an ``lr_too_high`` finding that says
so (from and to, and which steps), writes an ``lr_backoff`` event to the run
directory, and starts counting afresh.

With ``on_nonfinite="rollback"`` a rollback is a lost step too. The rollback
lowers the lr itself on every restore (``rollback_lr_factor``, default 0.5);
that counts as the window's backoff and the count starts afresh. With
``rollback_lr_factor=1`` rollbacks only count, and this rule alone lowers the lr.

A learning-rate scheduler that recomputes ``lr`` from its own ``base_lrs``
(LambdaLR, CosineAnnealingLR, ...) overwrites the change on its next step:
scale ``scheduler.base_lrs`` yourself when the finding appears, or use a
scheduler that multiplies the current ``lr``.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from ..findings import Finding
from ..plugins import StepContext, WatchPlugin
from ..records import StepRecord


def _check_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"lr_backoff must be a factor in (0, 1), None (off) or 'auto', got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _lr_value(lr: Any) -> float:
    return float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)


def scale_lr_(optimizer: torch.optim.Optimizer, factor: float) -> tuple[list[float], list[float]]:
    """Multiply every param group's ``lr`` by ``factor`` (a tensor lr in place). Returns (before, after).

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> scale_lr_(opt, 0.5)
        ([0.1], [0.05])
    """
    before, after = [], []
    for group in optimizer.param_groups:
        lr = group["lr"]
        before.append(_lr_value(lr))
        if isinstance(lr, torch.Tensor):
            lr.mul_(factor)
        else:
            group["lr"] = lr * factor
        after.append(_lr_value(group["lr"]))
    return before, after


class LRBackoff(WatchPlugin):
    """Lower the learning rate by ``factor`` after ``after`` lost steps within ``window`` steps.

    Usually made by the Watch: on by default with ``on_spike="skip"`` or
    ``on_nonfinite="rollback"``; ``RepairConfig(lr_backoff=0.5)`` turns it on always,
    ``lr_backoff=None`` off; ``lr_backoff_after`` and ``lr_backoff_window`` set
    k and the window.

    Args:
        factor: multiply the lr by this, in (0, 1). Default: 0.5.
        after: number of lost steps that triggers a backoff. Default: 5 (at a 1%
            rate of bad batches, 5 within 50 steps happen to ~1 window in 7000; an
            instability driven by the lr loses that many in a few steps).
        window: the lost steps must fall within this many steps. Default: 50.

    Example:
        >>> import torch, gradwatch as gw
        >>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = gw.Watch(model, opt, repair=gw.RepairConfig(lr_backoff=0.5, lr_backoff_after=2))
        >>> bad = torch.tensor([[float("nan"), 1.0]])
        >>> for _ in range(2):
        ...     _ = watch.step(lambda: model(bad).sum())
        >>> opt.param_groups[0]["lr"], watch.findings[-1].code
        (0.05, 'lr_too_high')
        >>> watch.close()
    """

    name = "lr_backoff"

    def __init__(self, factor: float = 0.5, after: int = 5, window: int = 50) -> None:
        self.factor = _check_factor(factor)
        self.after = _check_int("lr_backoff_after", after, 1)
        self.window = _check_int("lr_backoff_window", window, 1)
        if self.after > self.window:
            raise ValueError(f"lr_backoff_after ({after}) must not exceed lr_backoff_window ({window})")
        self.lost: deque[tuple[int, str]] = deque()
        self.backoffs: list[dict[str, Any]] = []

    def after_step(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        if not record.skipped:
            return []
        rolled = ctx.rollback  # set by the NaN plugin, which runs before this one
        reason = "+".join(r.value for r in record.skipped_by) if record.skipped_by else "skipped"
        if rolled is not None:
            reason = "rollback"
        self.lost.append((ctx.step, reason))
        while self.lost and self.lost[0][0] <= ctx.step - self.window:
            self.lost.popleft()
        if rolled is not None and getattr(rolled, "factor", 1.0) < 1.0:
            # The rollback lowered the lr itself (rollback_lr_factor): that is this window's backoff.
            self.lost.clear()
            return []
        if len(self.lost) < self.after:
            return []
        return [self._back_off(ctx.step)]

    def _back_off(self, step: int) -> Finding:
        lost = list(self.lost)
        self.lost.clear()
        before, after = scale_lr_(self.view.optimizer, self.factor)
        event = {
            "event": "lr_backoff",
            "step": step,
            "factor": self.factor,
            "lr_before": before,
            "lr_after": after,
            "lost_steps": [s for s, _ in lost],
            "reasons": [r for _, r in lost],
            "window": self.window,
        }
        self.backoffs.append(event)
        writer = self.view.writer
        if writer is not None:
            writer.append("events", event)
        steps = ", ".join(f"{s} ({r})" for s, r in lost)
        lr_from = ", ".join(f"{v:.3g}" for v in before)
        lr_to = ", ".join(f"{v:.3g}" for v in after)
        message = (
            f"{len(lost)} steps within {self.window} steps were not applied (steps {steps}); "
            f"the learning rate was lowered from {lr_from} to {lr_to} (x{self.factor:g})."
        )
        evidence = dict(event, backoffs=len(self.backoffs), action="lr_backoff")
        fixes = [
            f"restart from a checkpoint with lr={after[0]:.3g}" + (" (first param group)" if len(after) > 1 else ""),
            "lengthen the learning-rate warm-up",
            "if a scheduler sets lr from base_lrs, scale scheduler.base_lrs by the same factor",
        ]
        return Finding("lr_too_high", "warning", step, message, evidence=evidence, fixes=fixes)

    def state_dict(self) -> dict[str, Any]:
        return {"lost": [list(x) for x in self.lost], "backoffs": list(self.backoffs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lost = deque((int(s), str(r)) for s, r in state.get("lost", []))
        self.backoffs = list(state.get("backoffs", []))

