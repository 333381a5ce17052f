"""``training_stalled``: no run whose steps are all skipped may be silent.

Each skipped step has its own finding (or none: an fp16 overflow is GradScaler's
normal way of finding its scale), but a run where *every* step is skipped is not
learning at all, whatever the reason. After ``stall_after`` consecutive skipped
steps (``DiagnosisConfig(stall_after=8)``) this plugin raises one error finding
that says why the steps are skipped (the reasons counted over the streak) and
what to change; it fires again only after an applied step ended the streak.

It is always on (also with ``diagnose=False``): the check is one integer
comparison per step.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .findings import Finding
from .plugins import SkipReason, StepContext, WatchPlugin

if TYPE_CHECKING:
    from .records import StepRecord

__all__ = ["StallPlugin", "stall_finding"]

_WHY = {  # completes "in N step(s) ..."
    SkipReason.NONFINITE: "the loss or a gradient was NaN/inf",
    SkipReason.SCALER_OVERFLOW: "the fp16 loss scaler found inf/NaN in the scaled gradients",
    SkipReason.SPIKE: "the spike rule (on_spike='skip') found the loss or norm an outlier",
    SkipReason.VETO: "a plugin vetoed the update",
}


def _counted(reasons: Counter) -> str:
    return "; ".join(f"in {n} step{'s' if n != 1 else ''} {_WHY[r]}" for r, n in reasons.most_common())


def _fixes(reason: SkipReason, loss_scale: float | None, lr: float | None, fp16: bool) -> list[str]:
    lower = f"lower the learning rate (lr={lr:.3g} now)" if lr else "lower the learning rate"
    if fp16 and reason is SkipReason.NONFINITE:  # (a forward pass beyond float16's range: its own finding)
        return ["see this run's fp16_overflow and non-finite findings for the op that overflows or makes NaN",
                "train in bfloat16 instead: precision='bf16' has float32's range and needs no loss scaling",
                lower]
    if reason is SkipReason.SCALER_OVERFLOW:
        scale = f" (it is {loss_scale:.3g} now)" if loss_scale is not None else ""
        return ["train in bfloat16 instead: precision='bf16' has float32's range and needs no loss scaling",
                f"the loss scale keeps falling{scale} and every step still overflows: a value beyond 65504 "
                "in the forward pass cannot be fixed by scaling; see the fp16_overflow finding for the op, "
                "and keep that module in float32 (torch.autocast(enabled=False) around it)",
                lower]
    if reason is SkipReason.SPIKE:
        return ["the loss level has moved for good, not spiked: raise RepairConfig(spike_threshold=...) "
                "or turn on_spike off",
                lower]
    if reason is SkipReason.VETO:
        return ["see the vetoing plugin's findings; it refused every update"]
    return ["see this run's non-finite findings (op, module, source line) for where the NaN/inf is made",
            lower, "on_nonfinite='rollback' to restore the last good weights and back off the lr",
            "clip_norm=1.0"]


def stall_finding(step: int, streak: int, reasons: Counter, loss_scale: float | None,
                  lr: float | None, fp16: bool = False) -> Finding:
    """The ``training_stalled`` finding for ``streak`` skipped steps ending at ``step`` (pure).

    Example:
        >>> f = stall_finding(8, 8, Counter({SkipReason.NONFINITE: 8}), None, 0.1)
        >>> f.code, f.severity, f.evidence["reasons"]
        ('training_stalled', 'error', {'nonfinite': 8})
    """
    main = reasons.most_common(1)[0][0] if reasons else SkipReason.NONFINITE
    counted = _counted(reasons)
    message = (f"Training has stalled: the last {streak} steps (to step {step}) were all skipped, so the "
               f"weights have not changed since step {step - streak}. Why: {counted}.")
    evidence = {"consecutive_skipped": streak, "reasons": {r.value: n for r, n in reasons.most_common()},
                "loss_scale": loss_scale, "lr": lr}
    return Finding("training_stalled", "error", step, message, evidence=evidence,
                   fixes=_fixes(main, loss_scale, lr, fp16))


class StallPlugin(WatchPlugin):
    """Raises ``training_stalled`` after ``stall_after`` consecutive skipped steps (once per streak).

    Example:
        >>> import torch, gradwatch as gw
        >>> model = torch.nn.Linear(2, 1)
        >>> watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                  diagnosis=gw.DiagnosisConfig(stall_after=3))
        >>> for _ in range(3):
        ...     _ = watch.step(lambda: model(torch.ones(1, 2)).sum() * float("nan"))
        >>> [f.code for f in watch.findings].count("training_stalled")
        1
    """

    name = "stall"
    quiet_step = True  # no mid-step hook at all

    def __init__(self, stall_after: int = 8) -> None:
        self.stall_after = stall_after
        self.streak = 0
        self.reasons: Counter = Counter()

    def after_step(self, ctx: StepContext, record: "StepRecord") -> list[Finding]:
        if not record.skipped:
            self.streak = 0
            if self.reasons:
                self.reasons = Counter()
            return []
        self.streak += 1
        self.reasons.update(record.skipped_by or [SkipReason.NONFINITE])
        if self.streak != self.stall_after:
            return []
        fp16 = self.view.precision.mode == "fp16"
        return [stall_finding(ctx.step, self.streak, self.reasons, record.loss_scale, self.view.lr(), fp16)]

    def state_dict(self) -> dict:
        return {"streak": self.streak, "reasons": {r.value: n for r, n in self.reasons.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.streak = int(state.get("streak", 0))
        self.reasons = Counter({SkipReason(k): int(v) for k, v in state.get("reasons", {}).items()})
