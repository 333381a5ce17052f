"""Records: what the Watch measures on one step, as plain data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .findings import Finding, json_line

_isfinite = math.isfinite
# The steps.jsonl line of a common step, by (clip threshold?, loss scale?, update ratio?): one % per line.
_STEP_LINE = {
    (threshold, scale, ratio): (
        '{"step":%d,"loss":%.9g,"grad_norm":%.9g,"clip_coef":%.9g,"clipped":%s,"skipped":%s,"time_ms":%.4f'
        + (',"clip_threshold":%.9g' if threshold else "") + (',"loss_scale":%.9g' if scale else "")
        + (',"update_ratio":[%s]' if ratio else "") + ',"row":%d}\n'
    )
    for threshold in (False, True) for scale in (False, True) for ratio in (False, True)
}


@dataclass(slots=True)
class StepRecord:
    """Everything measured on one step (host-side numbers; per-layer arrays in depth order).

    ``layer_grad_norms`` are measured *before* clipping and, under fp16, after
    unscaling (comparable across precisions).
    """

    step: int
    loss: float
    grad_norm: float
    clip_coef: float
    clip_threshold: float | None
    clipped: bool
    skipped: bool
    loss_finite: bool
    layer_names: list[str]
    layer_grad_norms: np.ndarray
    layer_weight_norms: np.ndarray
    update_ratio: np.ndarray | None = None
    loss_scale: float | None = None
    nonfinite_layers: list[str] = field(default_factory=list)
    missing_layers: list[str] = field(default_factory=list)
    time_ms: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        return self.loss_finite and math.isfinite(self.grad_norm)

    def to_json_line(self, row: int) -> str:
        """:meth:`to_json` plus the matrix ``row``, encoded as one line of ``steps.jsonl``.

        The common step (finite numbers, nothing optional but the clip threshold,
        the loss scale and the update ratio) is formatted directly with one ``%``:
        numbers with 9 significant digits (a float32 exactly; the norms are
        float32 on the device), ``time_ms`` with 4 decimals, the update ratios with 5 digits.
        Lines are encoded in the training loop's thread (at each flush of the
        run directory). Any other step goes through ``json.dumps`` with full
        precision.

        Example:
            >>> r = StepRecord(3, 0.5, 2.0, 0.5, 1.0, True, False, True, ["fc"], np.ones(1), np.ones(1), time_ms=1.25)
            >>> r.to_json_line(2)
            '{"step":3,"loss":0.5,"grad_norm":2,"clip_coef":0.5,"clipped":true,"skipped":false,"time_ms":1.2500,"clip_threshold":1,"row":2}\\n'
        """
        threshold, scale = self.clip_threshold, self.loss_scale
        ratios = self.update_ratio.tolist() if self.update_ratio is not None else None
        if (
            self.extra or self.nonfinite_layers or self.missing_layers or not self.loss_finite
            or not _isfinite(self.loss + self.grad_norm + self.clip_coef + self.time_ms  # one check for all (NaN, inf)
                             + (0.0 if threshold is None else threshold) + (0.0 if scale is None else scale)
                             + (0.0 if ratios is None else sum(ratios)))
        ):
            data = self.to_json()
            data["row"] = row
            return json_line(data)
        values: tuple[Any, ...] = (self.step, self.loss, self.grad_norm, self.clip_coef,
                                   "true" if self.clipped else "false", "true" if self.skipped else "false", self.time_ms)
        if threshold is not None:
            values += (threshold,)
        if scale is not None:
            values += (scale,)
        if ratios is not None:  # 5 significant digits, as to_json writes them
            values += (("%.5g," * len(ratios))[:-1] % tuple(ratios),)
        return _STEP_LINE[threshold is not None, scale is not None, ratios is not None] % (values + (row,))

    def to_json(self) -> dict[str, Any]:
        """The step line of ``steps.jsonl`` (dense per-layer arrays go to the .f32 matrices)."""
        data: dict[str, Any] = {
            "step": self.step,
            "loss": self.loss,
            "grad_norm": self.grad_norm,
            "clip_coef": self.clip_coef,
            "clipped": self.clipped,
            "skipped": self.skipped,
            "time_ms": round(self.time_ms, 4),
        }
        if self.clip_threshold is not None:
            data["clip_threshold"] = self.clip_threshold
        if self.loss_scale is not None:
            data["loss_scale"] = self.loss_scale
        if self.update_ratio is not None:
            data["update_ratio"] = [float(f"{v:.5g}") if math.isfinite(v) else repr(float(v)) for v in self.update_ratio.tolist()]
        if self.nonfinite_layers:
            data["nonfinite_layers"] = self.nonfinite_layers
        if self.missing_layers:
            data["missing_layers"] = self.missing_layers
        if not self.loss_finite:
            data["loss_finite"] = False
        data.update(self.extra)
        return data


@dataclass(slots=True)
class StepResult:
    """What ``Watch.step`` returns.

    Attributes:
        step: 1-based step number.
        loss: the loss as a float.
        grad_norm: the global gradient norm *before* clipping.
        clipped: whether clipping scaled the gradients down.
        skipped: whether the update was not applied (non-finite step).
        findings: findings raised on this step.
        loss_scale: the fp16 loss scale used for this step (None otherwise).
        record: the full :class:`StepRecord`.

    ``layer_grad_norms`` (layer name -> pre-clip norm) is built only when read.
    """

    step: int
    loss: float
    grad_norm: float
    clipped: bool
    skipped: bool
    findings: list[Finding]
    loss_scale: float | None = None
    record: StepRecord | None = None

    @property
    def layer_grad_norms(self) -> dict[str, float]:
        if self.record is None:
            return {}
        return dict(zip(self.record.layer_names, self.record.layer_grad_norms.tolist()))

    @property
    def layer_weight_norms(self) -> dict[str, float]:
        if self.record is None:
            return {}
        return dict(zip(self.record.layer_names, self.record.layer_weight_norms.tolist()))
