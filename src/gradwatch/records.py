"""Records: what the Watch measures on one step, as plain data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .fastpath import format_step_line
from .findings import Finding, json_line
from .plugins import SkipReason

@dataclass(slots=True)
class StepRecord:
    """Everything measured on one step (host-side numbers; per-layer arrays in depth order).

    ``layer_grad_norms`` are measured *before* clipping and, under fp16, after
    unscaling (comparable across precisions); one entry per layer of
    ``layer_names`` (every layer of the model, NaN for a layer not measured on
    this step: frozen, or not held by the optimizer). ``skipped_by`` says why
    the update was not applied; ``overflow_skips`` is the run's count of steps
    the fp16 loss scaler skipped, on such a step; ``micro_batches`` the number
    of micro-batches accumulated into the step.
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
    skipped_by: list[SkipReason] = field(default_factory=list)
    overflow_skips: int | None = None
    micro_batches: int = 1

    @property
    def finite(self) -> bool:
        return self.loss_finite and math.isfinite(self.grad_norm)

    def to_json_line(self, row: int) -> str:
        """:meth:`to_json` plus the matrix ``row``, encoded as one line of ``steps.jsonl``.

        The common step (finite numbers, nothing optional but the clip threshold,
        the loss scale and the update ratio) is formatted from a template
        (:func:`gradwatch.fastpath.format_step_line`: 9 significant digits, a
        float32 exactly); any other step goes through ``json.dumps`` with full
        precision. Lines are encoded in the training loop's thread (at each flush
        of the run directory).

        Example:
            >>> r = StepRecord(3, 0.5, 2.0, 0.5, 1.0, True, False, True, ["fc"], np.ones(1), np.ones(1), time_ms=1.25)
            >>> r.to_json_line(2)
            '{"step":3,"loss":0.5,"grad_norm":2,"clip_coef":0.5,"clipped":true,"skipped":false,"time_ms":1.2500,"clip_threshold":1,"row":2}\\n'
        """
        if not (self.skipped_by or self.nonfinite_layers or self.missing_layers or self.micro_batches != 1):
            line = format_step_line(self.step, self.loss, self.grad_norm, self.clip_coef, self.clipped, self.skipped,
                                    self.time_ms, self.clip_threshold, self.loss_scale,
                                    self.update_ratio.tolist() if self.update_ratio is not None else None, row)
            if line is not None:
                return line
        data = self.to_json()
        data["row"] = row
        return json_line(data)

    def to_state(self) -> dict[str, Any]:
        """The record as plain data (lists, not arrays) for ``Watch.state_dict`` (``torch.load(weights_only=True)``)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        for name in ("layer_grad_norms", "layer_weight_norms", "update_ratio"):
            if data[name] is not None:
                data[name] = data[name].tolist()
        data["layer_names"] = list(self.layer_names)
        data["skipped_by"] = [reason.value for reason in self.skipped_by]
        return data

    @classmethod
    def from_state(cls, data: dict[str, Any]) -> "StepRecord":
        """Inverse of :meth:`to_state`.

        Example:
            >>> r = StepRecord(3, 0.5, 2.0, 1.0, None, False, False, True, ["fc"], np.ones(1), np.ones(1))
            >>> StepRecord.from_state(r.to_state()).layer_grad_norms.tolist()
            [1.0]
        """
        values = dict(data)
        for name in ("layer_grad_norms", "layer_weight_norms", "update_ratio"):
            if values.get(name) is not None:
                values[name] = np.asarray(values[name], dtype=np.float64)
        values["skipped_by"] = [SkipReason(v) for v in values.get("skipped_by", [])]
        known = {f for f in cls.__slots__}  # type: ignore[attr-defined]
        return cls(**{k: v for k, v in values.items() if k in known})

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
        if self.skipped_by:
            data["skipped_by"] = [reason.value for reason in self.skipped_by]
        if SkipReason.SCALER_OVERFLOW in self.skipped_by:
            data["overflow_skip"] = True
        if self.overflow_skips is not None:
            data["overflow_skips"] = self.overflow_skips
        if self.micro_batches != 1:
            data["micro_batches"] = self.micro_batches
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
