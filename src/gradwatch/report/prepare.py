"""One run, prepared for the report: every number the charts and tables need (numpy only).

:func:`prepare` reads a :class:`~gradwatch.rundir.Run` once and computes, from
every step, the per-layer RMS matrix, the effective per-layer gain of each step,
the checkpoints of the depth chart and the last gradient RMS of each layer. The
figures then only thin these arrays for display (see :mod:`.data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..findings import Finding
from ..rundir import Run
from . import data


@dataclass
class RunView:
    """What the report shows of one run (arrays over all steps; nothing thinned)."""

    label: str
    path: Path
    meta: dict[str, Any]
    layers: list[dict[str, Any]]
    layer_names: list[str]
    steps: np.ndarray  # (S,) step numbers
    loss: np.ndarray  # (S,)
    grad_norm: np.ndarray  # (S,) pre-clip global norm
    clip_coef: np.ndarray  # (S,)
    clipped: np.ndarray  # (S,) bool
    skipped: np.ndarray  # (S,) bool
    loss_scale: np.ndarray  # (S,) NaN where absent
    rms: np.ndarray  # (S, L) per-layer gradient RMS, pre-clip
    gain: np.ndarray  # (S,) effective per-layer gain
    update_ratio: np.ndarray  # (S, L) NaN where not measured
    checkpoints: np.ndarray  # rows of the depth chart
    last_rms: np.ndarray  # (L,) last finite RMS of each layer
    threshold: float | None
    findings: list[Finding]
    activations: data.ActivationStats | None
    events: list[dict[str, Any]]
    act_grad: data.SampledCurve | None = None
    bundles: list[Path] = field(default_factory=list)
    threshold_per_step: np.ndarray | None = None  # the max norm that applied on each step (NaN: none)
    norm: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (L,) normalization layers
    forecast: dict[str, Any] | None = None  # the latest fp16 forecast, only if it is worth acting on
    lost_updates: dict[str, Any] | None = None  # the latest bf16 lost-update event
    signals: data.PrecursorSeries | None = None  # signals.jsonl (None: no precursor signal measured)
    precursor_thresholds: data.PrecursorThresholds | None = None

    def precursor_steps(self, code: str) -> list[int]:
        """Steps at which a finding with ``code`` was raised."""
        return [int(f.step) for f in self.findings if f.code == code]

    def norm_of(self, names: list[str]) -> np.ndarray:
        """Which of ``names`` are normalization layers (by the layer table's types)."""
        return data.norm_mask(names, self.layers)

    @property
    def n_steps(self) -> int:
        return int(self.steps.size)

    @property
    def has_loss_scale(self) -> bool:
        return bool(np.isfinite(self.loss_scale).any() and np.nanmax(self.loss_scale) > 0)

    @property
    def update_rows(self) -> np.ndarray:
        """Rows on which update ratios were measured."""
        return np.flatnonzero(np.isfinite(self.update_ratio).any(axis=1)) if self.update_ratio.size else np.zeros(0, np.int64)


def prepare(run: Run, label: str | None = None, checkpoints: int = 6) -> RunView:
    """Compute everything the report shows of ``run``.

    Example:
        >>> view = prepare(load_run("runs/exp1"))  # doctest: +SKIP
        >>> view.rms.shape == view.update_ratio.shape  # doctest: +SKIP
        True
    """
    steps = run.steps
    forecast = _latest(run.events, "fp16_forecast")
    amp = (run.meta.get("settings") or {}).get("amp") if isinstance(run.meta.get("settings"), dict) else None
    share = amp.get("underflow_share", 0.05) if isinstance(amp, dict) else 0.05
    try:
        from ..amp.summary import forecast_matters

        relevant = forecast_matters(forecast, float(share))
    except Exception:  # a malformed event must not cost the whole report
        relevant = False
    rms = run.layer_rms() if len(run.layer_names) else np.zeros((steps["step"].size, 0))
    usable = (np.isfinite(rms) & (rms > 0)).any(axis=1) if rms.size else np.zeros(steps["step"].size, bool)
    return RunView(
        label=label if label is not None else (run.path.name or str(run.path)),
        path=run.path,
        meta=run.meta,
        layers=run.layers,
        layer_names=list(run.layer_names),
        steps=steps["step"],
        loss=steps["loss"],
        grad_norm=steps["grad_norm"],
        clip_coef=steps["clip_coef"],
        clipped=steps["clipped"],
        skipped=steps["skipped"],
        loss_scale=steps["loss_scale"],
        rms=rms,
        gain=data.effective_gain(rms) if rms.size else np.full(steps["step"].size, np.nan),
        update_ratio=steps["update_ratio"],
        checkpoints=data.checkpoint_rows(steps["step"], usable, checkpoints),
        last_rms=data.last_finite_rows(rms) if rms.size else np.zeros(len(run.layer_names)),
        threshold=data.clip_threshold(run.meta),
        threshold_per_step=steps.get("clip_threshold"),
        findings=list(run.findings),
        activations=data.activation_stats(run.activations),
        events=list(run.events),
        act_grad=data.activation_grad_curve(run.activations, run.layer_names),
        bundles=run.bundles,
        norm=data.norm_mask(run.layer_names, run.layers),
        forecast=forecast if relevant else None,
        lost_updates=_latest(run.events, "bf16_lost_updates"),
        signals=data.precursor_series(run.signals),
        precursor_thresholds=data.precursor_thresholds(run.meta),
    )


def _latest(events: list[Any], kind: str) -> dict[str, Any] | None:
    found = [e for e in events if isinstance(e, dict) and e.get("event") == kind]
    return found[-1] if found else None
