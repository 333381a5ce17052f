"""Spike skipping: do not apply a step whose loss or gradient norm is an outlier.

Large-model practice skips such steps rather than letting one bad batch wreck
the weights or the optimizer's moments: OLMo skips a step whose loss or
gradient norm lies more than 6 standard deviations above the recent ones;
PaLM skipped hundreds of batches around each spike. gradwatch judges a step
against the *robust* baseline of recent finite steps - median and MAD
(:func:`gradwatch.diagnosis.robust.robust_zscore`) - so that NaN and inf never
enter it and one spike moves it by at most one rank.

``Watch(..., on_spike="skip")`` adds :class:`SpikeSkip`: on a finite step, after
the host sync, it scores the loss and the pre-clip global norm; if either
robust z-score exceeds ``spike_threshold`` (default 6) the step's ``veto``
skips the update (weights and optimizer state untouched), adds
``SkipReason.SPIKE`` to ``ctx.skip_reasons`` (the evidence in ``ctx.spike``) and raises a ``loss_spike`` finding with the numbers. The
scored values enter the history whether skipped or not (a robust baseline is
not moved by them, and a genuine shift in level is accepted after about half a
window instead of being skipped forever).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from ..diagnosis.robust import EarlyLevel, median_mad, robust_zscore
from ..findings import Finding
from ..plugins import SkipReason, StepContext, WatchPlugin
from ..records import StepRecord

ON_SPIKE = (None, "skip")
SIGNALS = ("loss", "grad_norm")
#: A spike must also exceed the median by this fraction of |median|: a robust
#: scale of ~0 (a flat history) would otherwise make any wiggle a "spike".
MIN_RELATIVE_JUMP = 0.05
#: ... and by this fraction of the signal's early level (median |x| of its first ``warmup``
#: finite values): a converged loss at 0 that blips to 3.7e-9 (median 0, MAD 0) is no spike.
MIN_EARLY_JUMP = 0.01


def _check_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _log(values: "deque[float]") -> np.ndarray:
    """Natural log of the positive entries (zeros and negatives dropped)."""
    array = np.asarray(values, dtype=np.float64)
    return np.log(array[array > 0])


class SpikeDetector:
    """Robust z-scores of the loss and the gradient norm against their recent finite history.

    The loss is scored as is, the gradient norm on a log scale (norms move by
    factors: a slow x4 drift over training is not a spike, a x1000 jump is).

    Args:
        threshold: a robust z-score above this is a spike. Default: 6.0 (OLMo's).
        window: number of recent finite steps in the baseline. Default: 128 (OLMo's).
        warmup: finite steps needed before any step can be a spike. Default: 32.

    Example:
        >>> det = SpikeDetector(threshold=6, window=50, warmup=5)
        >>> for i in range(20):
        ...     det.observe(2.0 + 0.01 * (i % 3), 1.0 + 0.02 * (i % 5))
        >>> det.check(2.01, 1.02) is None
        True
        >>> det.check(2.0, 500.0)["signal"]
        'grad_norm'
    """

    def __init__(self, threshold: float = 6.0, window: int = 128, warmup: int = 32) -> None:
        self.threshold = _check_float("spike_threshold", threshold)
        self.window = _check_int("spike_window", window, 2)
        self.warmup = _check_int("spike_warmup", warmup, 2)
        if self.warmup > self.window:
            raise ValueError(f"spike_warmup ({warmup}) must not exceed spike_window ({window})")
        self.history: dict[str, deque[float]] = {name: deque(maxlen=self.window) for name in SIGNALS}
        self.early: dict[str, EarlyLevel] = {name: EarlyLevel(self.warmup) for name in SIGNALS}

    def check(self, loss: float, grad_norm: float) -> dict[str, Any] | None:
        """Evidence of the strongest spike among the two signals, or None (not a spike / too little history)."""
        worst: dict[str, Any] | None = None
        for name, value in zip(SIGNALS, (loss, grad_norm)):
            history = self.history[name]
            if len(history) < self.warmup or not math.isfinite(value):
                continue
            if name == "grad_norm":  # norms are multiplicative: score them on a log scale
                if not value > 0:
                    continue
                z = robust_zscore(_log(history), math.log(value))
            else:
                z = robust_zscore(history, value)
            if not z > self.threshold:
                continue
            median, mad = median_mad(history)
            if not value - median > max(MIN_RELATIVE_JUMP * abs(median), self.early[name].floor(MIN_EARLY_JUMP)):
                continue
            if worst is None or z > worst["z"]:
                worst = {
                    "signal": name,
                    "value": float(value),
                    "median": median,
                    "mad": mad,
                    "z": float(z),
                    "scale": "log" if name == "grad_norm" else "linear",
                    "threshold": self.threshold,
                    "window": len(history),
                }
        return worst

    def observe(self, loss: float, grad_norm: float) -> None:
        """Add a step's values to the baselines (non-finite values are dropped)."""
        for name, value in zip(SIGNALS, (loss, grad_norm)):
            if math.isfinite(value):
                self.history[name].append(float(value))
                self.early[name].observe(value)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: list(values) for name, values in self.history.items()}
        state["early"] = {name: level.state_dict() for name, level in self.early.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in SIGNALS:
            self.history[name] = deque((float(v) for v in state.get(name, [])), maxlen=self.window)
            early = state.get("early", {}).get(name)
            self.early[name] = EarlyLevel(self.warmup)
            if early is not None:
                self.early[name].load_state_dict(early)
            else:  # a state from before the early level: the oldest values kept stand in for it
                for value in list(self.history[name])[: self.warmup]:
                    self.early[name].observe(value)


class SpikeSkip(WatchPlugin):
    """Skip (veto) a step whose loss or gradient norm spikes; report it as ``loss_spike``.

    Usually made by ``Watch(on_spike="skip", repair=RepairConfig(spike_threshold=6.0,
    spike_window=128, spike_warmup=32))``; pass an instance in ``plugins=`` to use it directly.

    Example:
        >>> import torch, gradwatch as gw
        >>> model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), lr=0.01)
        >>> watch = gw.Watch(model, opt, on_spike="skip", repair=gw.RepairConfig(spike_warmup=5))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> for _ in range(10):
        ...     _ = watch.step(lambda: torch.nn.functional.mse_loss(model(x), y))
        >>> watch.step(lambda: torch.nn.functional.mse_loss(model(x * 1e3), y)).skipped
        True
        >>> watch.findings[-1].code
        'loss_spike'
        >>> watch.close()
    """

    name = "spike_skip"
    #: The veto reads only the record's loss (the mean over ranks under torch.distributed) and
    #: global norm, and this plugin's history: every rank decides the same, no extra all-reduce.
    veto_is_global = True

    def __init__(self, threshold: float = 6.0, window: int = 128, warmup: int = 32) -> None:
        self.detector = SpikeDetector(threshold, window, warmup)
        self.skipped_steps: list[int] = []

    @property
    def skipped(self) -> int:
        """Number of steps skipped as spikes so far."""
        return len(self.skipped_steps)

    def veto(self, ctx: StepContext, record: StepRecord) -> bool:
        spike = self.detector.check(record.loss, record.grad_norm)
        self.detector.observe(record.loss, record.grad_norm)
        if spike is None:
            return False
        ctx.skip_reasons.append(SkipReason.SPIKE)
        ctx.spike = spike
        self.skipped_steps.append(ctx.step)
        return True

    def after_step(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        spike = ctx.spike
        if spike is None or SkipReason.SPIKE not in record.skipped_by:
            return []
        what = "loss" if spike["signal"] == "loss" else "gradient norm"
        ratio = spike["value"] / spike["median"] if spike["median"] > 0 else None  # no ratio to a median <= 0
        times = f"x{ratio:.3g}; " if ratio is not None else ""
        message = (
            f"Step {ctx.step} was skipped: its {what} {spike['value']:.4g} is {spike['z']:.3g} robust standard "
            f"deviations above the median {spike['median']:.4g} of the last {spike['window']} steps "
            f"({times}threshold {spike['threshold']:g})."
        )
        evidence = dict(spike, ratio=ratio, spikes_skipped=self.skipped, action="skipped")
        fixes = [
            "inspect this step's batch for outliers (pass batch= to watch.step to keep it with the step)",
            "if spikes recur, lower the learning rate or lengthen its warm-up",
            "clip_norm='zclip' to clip spikes instead of skipping them",
        ]
        return [Finding("loss_spike", "warning", ctx.step, message, evidence=evidence, fixes=fixes)]

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state.get("detector", {}))
        self.skipped_steps = [int(s) for s in state.get("skipped_steps", [])]
