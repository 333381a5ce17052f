"""Mixed-precision diagnosis inside the Watch: overflow, underflow, fp16 forecast, bf16 lost updates.

Two plugins, made by the default-plugin factories registered at the end of
this module (``gradwatch/__init__.py`` imports it):

* telemetry (always on, fp16 with an enabled scaler only): counts the steps the
  scaler skipped because a gradient was inf/nan (``watch.precision.overflow_skips``)
  and marks such a step's line in ``steps.jsonl`` with ``"overflow_skip": true``
  and the running count ``"overflow_skips"``; the layers whose unscaled gradients
  were non-finite are already in the record (``nonfinite_layers``), read from the
  per-layer norms of the step: no extra pass.
* diagnosis (``Watch(diagnose=True)``, the default): the findings
  ``fp16_overflow`` and ``fp16_underflow``, the float16 forecast of fp32 and bf16
  runs and the bf16 lost-update check (finding ``bf16_lost_updates``, info).

Cost: nothing on an unsampled step (a few Python comparisons after the step;
in fp16 runs with a closure, a ~5 KB copy of the CPU RNG state). Every
``precision_every`` steps (default 50 in fp16 runs, 1000 in fp32 and bf16 runs,
and on step 1) one extra pass over the
gradients (exponent bins + ``bincount``) and one small extra host transfer; in
bf16 runs, also one copy of the weights before the update. Rarely, one float32
replay of a step (a forward and a backward, :mod:`gradwatch.nonfinite.replay`):
when ``fp16_overflow`` is raised (at most once per ``overflow_window``) and when
fp16 left a layer's gradient all zero (once per layer).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..distributed import local_tensor
from ..findings import Finding
from ..plugins import StepContext, WatchPlugin
from . import ranges

if TYPE_CHECKING:  # pragma: no cover
    from ..records import StepRecord
    from ..watch import Watch

FORECAST_EVENT = "fp16_forecast"
LOST_UPDATE_EVENT = "bf16_lost_updates"
OVERFLOW_EVENT = "fp16_overflow"


@dataclass
class Fp16Forecast:
    """What float16 does (fp16 runs) or would do (fp32 and bf16 runs) to one step's gradients.

    Attributes:
        step: the sampled step.
        precision: the run's precision.
        layers: layer names, in depth order.
        current_scale: the loss scale of the step (1.0 when nothing scales the loss).
        reference_scale: the scale of the forecast (``forecast_scale``, default
            65536: GradScaler's initial scale).
        at_current / at_reference: :class:`~gradwatch.amp.ranges.Fp16Shares` at both scales.
        zero_share: per layer, share of gradient elements that are exactly zero.
        advice: :class:`~gradwatch.amp.ranges.ScaleAdvice` (the scale to use).
        histogram: :func:`~gradwatch.amp.ranges.compact_histogram` of the gradients.
    """

    step: int
    precision: str
    layers: list[str]
    current_scale: float
    reference_scale: float
    at_current: ranges.Fp16Shares
    at_reference: ranges.Fp16Shares
    zero_share: np.ndarray
    advice: ranges.ScaleAdvice
    histogram: dict[str, Any]

    def to_event(self) -> dict[str, Any]:
        """The ``events.jsonl`` line (see docs/precision.md for the format)."""

        def shares(s: ranges.Fp16Shares) -> dict[str, Any]:
            return {
                "scale": s.scale,
                "flushed": _round(s.flushed),
                "subnormal": _round(s.subnormal),
                "overflow": _round(s.overflow),
            }

        return {
            "event": FORECAST_EVENT,
            "step": self.step,
            "precision": self.precision,
            "layers": list(self.layers),
            "current": shares(self.at_current),
            "reference": shares(self.at_reference),
            "zero_share": _round(self.zero_share),
            "nonzero": self.at_current.nonzero.tolist(),
            "recommended_scale": self.advice.recommended,
            "max_safe_scale": self.advice.max_safe,
            "needed_scale": self.advice.needed,
            "fits": self.advice.fits,
            "layer_scale": _round(self.advice.per_layer),
            "log2_hist": self.histogram,
        }


def _round(values: np.ndarray) -> list[Any]:
    return [float(f"{v:.4g}") if math.isfinite(v) else None for v in np.asarray(values, dtype=np.float64).tolist()]


def _pct(share: float) -> str:
    return f"{100 * share:.3g}%"


def _pow2(value: float) -> str:
    exponent = math.log2(value)
    return f"2^{int(exponent)} = {value:g}" if exponent == int(exponent) else f"{value:g}"


class PrecisionPlugin(WatchPlugin):
    """Loss-scale telemetry, fp16 overflow/underflow findings, fp16 forecast, bf16 lost updates.

    Made by gradwatch itself for every Watch (options are keyword arguments of
    :class:`~gradwatch.Watch`); find it with :func:`precision_plugin`.

    Args:
        every: sample underflow / forecast / lost updates every this many steps (and step 1).
        underflow_share: a layer is underflowing when at least this share of its
            non-zero gradient elements lies below fp16's normal range (2^-14) at
            the current scale.
        overflow_backoffs: ``fp16_overflow`` when the scaler backs off this many
            times within ``overflow_window`` steps (after its first applied step).
        overflow_window: see ``overflow_backoffs``.
        forecast_scale: the loss scale of the fp16 forecast.
        lost_update_share: ``bf16_lost_updates`` when at least this share of a
            layer's updates would be lost in bf16.

    Example:
        >>> import gradwatch as gw
        >>> model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = gw.Watch(model, opt, precision_every=10)
        >>> _ = watch.step(lambda: model(torch.randn(8, 4)).pow(2).mean())
        >>> precision_plugin(watch).last_forecast.reference_scale
        65536.0
        >>> watch.close()
    """

    name = "precision"

    def __init__(
        self,
        every: int = 50,
        underflow_share: float = 0.05,
        overflow_backoffs: int = 3,
        overflow_window: int = 100,
        forecast_scale: float = 65536.0,
        lost_update_share: float = 0.1,
    ) -> None:
        self.every = every
        self.underflow_share = underflow_share
        self.overflow_backoffs = overflow_backoffs
        self.overflow_window = overflow_window
        self.forecast_scale = forecast_scale
        self.lost_update_share = lost_update_share
        self.diagnose = False  # set from Watch(diagnose=...) by the factory
        self.last_forecast: Fp16Forecast | None = None
        self.last_lost_updates: dict[str, Any] | None = None
        self.overflow_steps: collections.deque[int] = collections.deque()
        self._applied_any = False
        self._last_overflow_finding = -(10**9)
        self._underflow_reported: set[str] = set()
        self._lost_reported = False
        self._last_finite_norms: np.ndarray | None = None
        self._overflow_layers: collections.Counter[str] = collections.Counter()

    # ----- hooks ---------------------------------------------------------------------------
    def _sampled(self, step: int) -> bool:
        return self.diagnose and (step == 1 or step % self.every == 0)

    def _bf16_check(self) -> bool:
        watch = self.watch
        return watch.precision.mode == "bf16" or any(p.dtype == torch.bfloat16 for p in watch.index.params)

    def before_forward(self, ctx: StepContext) -> None:
        # fp16 with a closure: keep the RNG state from before the step (a ~5 KB copy, no device
        # work) so that an overflow finding can replay the step with autocast off.
        if self.diagnose and ctx.closure is not None and self.watch.precision.mode == "fp16":
            try:
                from ..nonfinite.replay import capture_rng_state
            except ImportError:  # pragma: no cover - the NaN root-cause package is part of gradwatch
                return
            ctx.scratch["amp_rng"] = capture_rng_state(self.watch.device)

    def after_backward(self, ctx: StepContext) -> None:
        if not self._sampled(ctx.step):
            return
        index = self.watch.index
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in index.params]  # unscaled, not yet clipped (FSDP2: this rank's shard)
            ctx.scratch["amp_hist"] = ranges.exponent_histogram(grads, index.param_layer, len(index), self.watch.device)
            if self._bf16_check():
                ctx.scratch["amp_before"] = [local_tensor(p.detach()).clone() for p in index.params]
                ctx.scratch["amp_intended"] = [(g != 0) if g is not None else None for g in grads]

    veto_is_global = True  # never vetoes: veto() is only its "after the sync, before the update" hook

    def veto(self, ctx: StepContext, record: "StepRecord") -> bool:
        # fp16, sampled, finite: what fp16 flushed is exact zeros by now. A layer whose gradient is
        # entirely zero may have been flushed whole: measure the true (float32) gradients with a
        # replay here, after the step's one sync and *before* its update (the step's own weights).
        hist = ctx.scratch.get("amp_hist")
        if hist is None or self.watch.precision.mode != "fp16" or ctx.closure is None:
            return False
        counts = hist.cpu().numpy()  # sampled steps only: one small extra transfer
        ctx.scratch["amp_counts"] = counts
        with np.errstate(invalid="ignore", divide="ignore"):
            all_zero = counts[:, ranges.ZERO_SLOT] == counts.sum(axis=1)
        names = self.watch.index.names
        untried = {names[i] for i in np.flatnonzero(all_zero)} - self._underflow_reported
        if untried:
            self._underflow_reported.update(untried)  # one replay per all-zero layer and run
            ctx.scratch["amp_true_counts"] = fp32_gradient_histogram(self.watch, ctx.closure, ctx.scratch.get("amp_rng"))
        return False

    def after_step(self, ctx: StepContext, record: "StepRecord") -> list[Finding]:
        precision = self.watch.precision
        # fp16 keeps an RNG copy before every forward; otherwise the mid-step hooks work on sampled steps only
        self.quiet_step = precision.mode != "fp16" and not self._sampled(ctx.step + 1)
        if precision.mode == "fp32" and "amp_hist" not in ctx.scratch:
            return []  # an unsampled fp32 step: nothing to look at (this runs on every step)
        findings: list[Finding] = []
        overflow = precision.scaling and not math.isfinite(record.grad_norm)
        if overflow:  # the scaler saw inf/nan in the unscaled gradients: it skipped and backed off
            precision.overflow_skips += 1
            record.extra["overflow_skip"] = True
            record.extra["overflow_skips"] = precision.overflow_skips
        if not self.diagnose:
            return findings
        if precision.scaling:
            finding = self._check_overflow(ctx, record, overflow)
            if finding is not None:
                findings.append(finding)
        if record.finite and precision.scaling:  # read by the fp16 overflow finding only
            self._last_finite_norms = record.layer_grad_norms  # a fresh host array each step, never written to
        hist = ctx.scratch.pop("amp_hist", None)
        before = ctx.scratch.pop("amp_before", None)
        intended = ctx.scratch.pop("amp_intended", None)
        if hist is not None and record.finite:
            findings.extend(self._forecast(ctx, record, hist))
        if before is not None and not record.skipped:
            findings.extend(self._lost_updates(ctx.step, before, intended))
        return findings

    # ----- fp16 overflow -----------------------------------------------------------------
    def _check_overflow(self, ctx: StepContext, record: "StepRecord", overflow: bool) -> Finding | None:
        step = ctx.step
        if not overflow:
            if not record.skipped:
                self._applied_any = True
        elif self._applied_any:  # backoffs before the first applied step are the scaler calibrating
            self.overflow_steps.append(step)
            self._overflow_layers.update(record.nonfinite_layers)
        while self.overflow_steps and self.overflow_steps[0] <= step - self.overflow_window:
            self.overflow_steps.popleft()
        scale = record.loss_scale
        below_one = scale is not None and scale < 1.0
        repeated = len(self.overflow_steps) >= self.overflow_backoffs
        if not (below_one or repeated) or step - self._last_overflow_finding < self.overflow_window:
            return None
        self._last_overflow_finding = step
        cause = None
        if overflow and ctx.closure is not None and record.loss_scale is not None:
            cause = diagnose_overflow(self.watch.model, ctx.closure, ctx.scratch.get("amp_rng"), record.loss_scale)
        return self._overflow_finding(step, record, below_one, cause)

    def _overflow_finding(self, step: int, record: "StepRecord", below_one: bool, cause: dict[str, Any] | None = None) -> Finding:
        scale = record.loss_scale
        layers = [name for name, _ in self._overflow_layers.most_common()] or list(record.nonfinite_layers)
        names = self.watch.index.names
        evidence: dict[str, Any] = {
            "backoffs_in_window": len(self.overflow_steps),
            "window": self.overflow_window,
            "overflow_steps": list(self.overflow_steps),
            "loss_scale": scale,
            "overflow_skips": self.watch.precision.overflow_skips,
            "nonfinite_layers": layers,
        }
        magnitudes = {}
        if self._last_finite_norms is not None and scale is not None:
            for name in layers[:5]:
                if name in names:
                    norm = float(self._last_finite_norms[names.index(name)])
                    magnitudes[name] = {"last_finite_grad_norm": norm, "scaled": norm * scale}
        if magnitudes:
            evidence["last_finite_grad_norms"] = magnitudes
        where = f" with non-finite unscaled gradients in {', '.join(layers[:3])}" if layers else ""
        location = {"module": layers[0]} if layers else {}
        if cause is not None:
            evidence["cause"] = cause
            if cause["kind"] == "nonfinite_source":
                location = dict(cause.get("location") or location)
                return Finding(
                    "fp16_overflow",
                    "error",
                    step,
                    f"The fp16 loss scaler backed off {len(self.overflow_steps)} times in the last "
                    f"{self.overflow_window} steps (scale {scale:g} on this step), but this is no range problem: replayed in "
                    f"float32 the step is non-finite as well, first at {cause['describe']}.",
                    evidence=evidence,
                    location=location,
                    fixes=[
                        "fix the non-finite op itself (see the location); a loss scale cannot",
                        "use the NaN root-cause finding of the same step for the op and source line",
                    ],
                )
            if cause["kind"] == "range" and cause.get("module") is not None:
                location = {"module": cause["module"]}
                where = f": {cause['describe']}"
        if below_one:
            message = (
                f"The fp16 loss scale fell to {scale:g} (below 1): float16 (max 65504) overflows even "
                f"without loss scaling{where}; loss scaling cannot fix this."
            )
            fixes = [
                "train in bf16 instead: Watch(precision='bf16') (float32's range, no loss scaling)",
                "find the overflowing values: the NaN root-cause replay of a skipped step names the op",
                "clip_norm=1.0 and a lower learning rate if the gradients grow over steps",
            ]
        else:
            message = (
                f"The fp16 loss scaler backed off {len(self.overflow_steps)} times in the last "
                f"{self.overflow_window} steps (scale {scale:g} on this step){where}: those steps were skipped."
            )
            fixes = [
                f"start the scaler lower: torch.amp.GradScaler(init_scale={max(1.0, (scale or 1.0)):g})",
                "clip_norm=1.0 to bound the update once a step goes through",
                "train in bf16 if overflows keep coming: Watch(precision='bf16')",
            ]
        return Finding(
            "fp16_overflow",
            "error" if below_one else "warning",
            step,
            message,
            evidence=evidence,
            location=location,
            fixes=fixes,
        )

    # ----- fp16 underflow and forecast ---------------------------------------------------
    def _forecast(self, ctx: StepContext, record: "StepRecord", hist: torch.Tensor) -> list[Finding]:
        step = ctx.step
        counts = ctx.scratch.pop("amp_counts", None)
        if counts is None:
            counts = hist.cpu().numpy()  # sampled steps only: one small extra transfer
        precision = self.watch.precision
        current = record.loss_scale if (precision.scaling and record.loss_scale) else 1.0
        forecast = self._make_forecast(step, counts, current)
        self.last_forecast = forecast
        if self.watch.writer is not None:
            self.watch.writer.append("events", forecast.to_event())
        if precision.mode != "fp16":
            return []  # fp32/bf16: the forecast is data (doctor, report), not a problem of this run
        all_zero = [forecast.layers[i] for i in np.flatnonzero(forecast.zero_share == 1.0)]
        true_counts = ctx.scratch.pop("amp_true_counts", None)  # from veto(): the float32 replay
        if true_counts is not None:
            replayed = self._make_forecast(step, true_counts, current)
            return self._underflow_finding(step, replayed, all_zero, source="fp32_replay")
        return self._underflow_finding(step, forecast, all_zero, source="fp16_gradients")

    def _make_forecast(self, step: int, counts: np.ndarray, current: float) -> Fp16Forecast:
        numel = counts.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            zero_share = counts[:, ranges.ZERO_SLOT] / numel
        return Fp16Forecast(
            step=step,
            precision=self.watch.precision.mode,
            layers=list(self.watch.index.names),
            current_scale=float(current),
            reference_scale=float(self.forecast_scale),
            at_current=ranges.fp16_shares(counts, current),
            at_reference=ranges.fp16_shares(counts, self.forecast_scale),
            zero_share=zero_share,
            advice=ranges.recommend_scale(counts, self.underflow_share),
            histogram=ranges.compact_histogram(counts),
        )

    def _underflow_finding(self, step: int, forecast: Fp16Forecast, all_zero: list[str], source: str) -> list[Finding]:
        shares = forecast.at_current
        below = shares.below_normal
        hit = [i for i in np.flatnonzero(np.nan_to_num(below) >= self.underflow_share)]
        new = [
            forecast.layers[i]
            for i in hit
            if forecast.layers[i] not in self._underflow_reported or (source == "fp32_replay" and forecast.layers[i] in all_zero)
        ]
        if not new:
            return []
        self._underflow_reported.update(new)
        worst = max(hit, key=lambda i: below[i])
        name = forecast.layers[worst]
        advice = forecast.advice
        per_layer = {
            forecast.layers[i]: {
                "flushed": float(shares.flushed[i]),
                "subnormal": float(shares.subnormal[i]),
                "zero_share": float(forecast.zero_share[i]),
                "scale_needed": float(advice.per_layer[i]),
            }
            for i in hit
        }
        if source == "fp32_replay":
            note = "; fp16 left the layer all zero" if name in all_zero else ""
            lead = (
                f"At loss scale {forecast.current_scale:g}, {_pct(below[worst])} of layer {name}'s "
                f"float32 gradient elements (measured by a float32 replay{note})"
            )
        else:
            lead = f"At loss scale {forecast.current_scale:g}, {_pct(below[worst])} of layer {name}'s non-zero gradient elements"
        zero_note = ""
        if source != "fp32_replay" and all_zero:
            zero_note = f" (layer(s) {', '.join(all_zero[:3])} have all-zero gradients: probably flushed whole)"
        message = (
            f"{lead} lie below float16's normal range 2^-14 ({_pct(shares.flushed[worst])} flushed to zero, "
            f"{_pct(shares.subnormal[worst])} subnormal)"
            + (f", and {len(hit) - 1} more layer(s)" if len(hit) > 1 else "")
            + f"; a loss scale of {_pow2(advice.per_layer[worst])} brings them into range{zero_note}."
        )
        if advice.fits:
            fixes = [
                f"scale the loss: torch.amp.GradScaler(init_scale={advice.recommended:g}) "
                "(Watch(precision='fp16') makes a default GradScaler; keep its growth on)",
            ]
        else:
            fixes = [
                "train in bf16: the gradients span more than float16's range "
                f"(they need a scale of {advice.needed:g}, but {advice.max_safe:g} already risks overflow)",
            ]
        fixes.append(
            "or make the gradients larger where they start small: a loss weighted far below 1, or a vanishing "
            "gradient (initialization, normalization, residual connections)"
        )
        return [
            Finding(
                "fp16_underflow",
                "warning",
                step,
                message,
                evidence={
                    "loss_scale": forecast.current_scale,
                    "layers": per_layer,
                    "all_zero_layers": all_zero,
                    "measured_from": source,
                    "recommended_scale": advice.recommended,
                    "max_safe_scale": advice.max_safe,
                    "fits": advice.fits,
                    "threshold": self.underflow_share,
                },
                location={"module": name},
                fixes=fixes,
            )
        ]

    # ----- bf16 lost updates -------------------------------------------------------------
    def _lost_updates(self, step: int, before: list[torch.Tensor], intended: list[Any] | None) -> list[Finding]:
        index = self.watch.index
        with torch.no_grad():
            counts = ranges.lost_update_counts(before, [local_tensor(p.detach()) for p in index.params], index.param_layer, len(index), intended)
        lost, wanted = counts.cpu().numpy()  # sampled steps only
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(wanted > 0, lost / np.maximum(wanted, 1), np.nan)
        bf16_weights = any(p.dtype == torch.bfloat16 for p in index.params)
        event = {
            "event": LOST_UPDATE_EVENT,
            "step": step,
            "weights": "bf16" if bf16_weights else "fp32",
            "layers": list(index.names),
            "lost_share": _round(share),
            "updates": wanted.tolist(),
        }
        self.last_lost_updates = event
        if self.watch.writer is not None:
            self.watch.writer.append("events", event)
        if self._lost_reported or not np.any(np.nan_to_num(share) >= self.lost_update_share):
            return []
        self._lost_reported = True
        worst = int(np.nanargmax(share))
        name = index.names[worst]
        per_layer = {index.names[i]: float(share[i]) for i in np.flatnonzero(np.nan_to_num(share) >= self.lost_update_share)}
        if bf16_weights:
            message = (
                f"{_pct(share[worst])} of layer {name}'s parameter updates were lost to bfloat16 rounding "
                "(w + dw == w: bf16 keeps 8 significant bits, so an update below ~2^-8 of the weight vanishes)."
            )
            fixes = [
                "keep fp32 master weights: model.float() and Watch(precision='bf16') (autocast computes in bf16)",
                "or an optimizer with fp32 master copies / stochastic rounding",
            ]
        else:
            message = (
                f"If the weights were kept in bfloat16 (model.to(torch.bfloat16)), {_pct(share[worst])} of layer "
                f"{name}'s parameter updates would be lost to rounding (w + dw == w); the fp32 master weights keep them."
            )
            fixes = ["keep fp32 master weights: do not call model.to(torch.bfloat16); Watch(precision='bf16') autocasts"]
        return [
            Finding(
                "bf16_lost_updates",
                "info",
                step,
                message,
                evidence={"lost_share": per_layer, "weights": event["weights"], "threshold": self.lost_update_share},
                location={"module": name},
                fixes=fixes,
            )
        ]


def diagnose_overflow(
    model: torch.nn.Module, closure: Any, rng_state: dict[str, Any] | None, loss_scale: float
) -> dict[str, Any]:
    """Replay an fp16 overflow step in float32 and say why it overflowed.

    Uses the NaN root-cause replay (:func:`gradwatch.nonfinite.replay.replay`) with
    autocast off and no loss scale, while forward hooks record the largest
    |output| of every module and tensor hooks the largest |gradient| reaching
    each module's output. The weights are never changed.

    Args:
        model: the model.
        closure: the step's closure (re-runnable).
        rng_state: the RNG state from before the step (None: the current one).
        loss_scale: the loss scale of the step that overflowed.

    Returns:
        ``{"kind": "nonfinite_source", "describe", "location", "op"}`` when the
        step is non-finite in float32 too (a real NaN/inf source);
        ``{"kind": "range", "module", "what", "magnitude", "describe"}`` when it is
        finite in float32 but a module's activations (``what="activations"``)
        or its scaled output gradients (``what="scaled_gradients"``) exceed
        float16's 65504; ``{"kind": "unknown", "reason"}`` otherwise.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> with torch.no_grad(): _ = model[0].weight.fill_(1e5)
        >>> x = torch.ones(1, 2)
        >>> out = diagnose_overflow(model, lambda: model(x).sum(), None, 1.0)
        >>> out["kind"], out["module"], out["what"], out["magnitude"] > 65504
        ('range', '0', 'activations', True)
    """
    try:
        from ..nonfinite.replay import replay
    except ImportError as exc:  # pragma: no cover
        return {"kind": "unknown", "reason": f"replay unavailable: {exc}"}
    act_max: dict[str, float] = {}
    grad_max: dict[str, float] = {}
    order: list[str] = []
    handles = []

    def grad_hook(path: str) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if grad.is_floating_point() and grad.numel():
                value = float(torch.nan_to_num(grad.detach().abs().float(), nan=0.0).max())
                grad_max[path] = max(grad_max.get(path, 0.0), value)

        return hook

    def forward_hook(path: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            tensors = [output] if isinstance(output, torch.Tensor) else [
                t for t in (output if isinstance(output, (tuple, list)) else ()) if isinstance(t, torch.Tensor)
            ]
            for t in tensors:
                if not t.is_floating_point() or t.numel() == 0:
                    continue
                with torch.no_grad():
                    value = float(torch.nan_to_num(t.detach().abs().float(), nan=0.0).max())
                if path not in act_max:
                    order.append(path)
                act_max[path] = max(act_max.get(path, 0.0), value)
                if t.requires_grad:
                    t.register_hook(grad_hook(path))

        return hook

    for name, module in model.named_modules():
        handles.append(module.register_forward_hook(forward_hook(name or "(root)")))
    try:
        outcome = replay(model, closure, rng_state, autocast_ctx=None, loss_scale=None)
    finally:
        for handle in handles:
            handle.remove()
    if outcome.localization is not None:
        where = outcome.localization
        return {"kind": "nonfinite_source", "describe": where.describe(), "location": where.location(), "op": where.op}
    if outcome.error is not None:
        return {"kind": "unknown", "reason": f"the float32 replay failed: {outcome.error}"}
    over = [path for path in order if act_max[path] > ranges.FP16_MAX]
    if over:
        path = over[0]  # forward hooks fire innermost first: the first module whose output is too large
        value = act_max[path]
        return {
            "kind": "range",
            "module": path,
            "what": "activations",
            "magnitude": value,
            "describe": f"activations of {value:.3g} in {path} exceed float16's 65504 (finite in float32)",
        }
    scaled = [(path, grad_max[path] * loss_scale) for path in reversed(order) if path in grad_max]
    scaled = [(path, v) for path, v in scaled if v > ranges.FP16_MAX]
    if scaled:
        path, value = scaled[0]  # backward order: the first module whose scaled output gradient is too large
        at = "the model's output" if path == "(root)" else f"the output of {path}"
        return {
            "kind": "range",
            "module": path,
            "what": "scaled_gradients",
            "magnitude": grad_max[path],
            "describe": (
                f"gradients of {grad_max[path]:.3g} at {at} times the loss scale {loss_scale:g} "
                f"= {value:.3g} exceed float16's 65504 (finite in float32)"
            ),
        }
    return {"kind": "range", "module": None, "what": None, "magnitude": None,
            "describe": "the step is finite in float32 (a float16 range overflow inside an op)"}


def fp32_gradient_histogram(watch: "Watch", closure: Any, rng_state: dict[str, Any] | None) -> np.ndarray | None:
    """Replay one step in float32 (autocast off, no loss scale) and histogram its true gradients.

    For an fp16 run whose gradients fp16 flushed to zero: the replay
    (:func:`gradwatch.nonfinite.replay.replay`) recomputes them in float32;
    parameter hooks copy each gradient as it arrives. Weights, gradients and
    buffers are left as they were. Returns the per-layer exponent histogram
    (host numpy, see :func:`~gradwatch.amp.ranges.exponent_histogram`), or None if
    the replay failed or produced no gradient.
    """
    try:
        from ..nonfinite.replay import replay
    except ImportError:  # pragma: no cover
        return None
    index = watch.index
    captured: dict[int, torch.Tensor] = {}

    def keep(i: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            g = grad.detach().float()
            captured[i] = captured[i] + g if i in captured else g.clone()

        return hook

    handles = [p.register_hook(keep(i)) for i, p in enumerate(index.params)]
    try:
        outcome = replay(watch.model, closure, rng_state, autocast_ctx=None, loss_scale=None)
    finally:
        for handle in handles:
            handle.remove()
    if outcome.error is not None or outcome.localization is not None or not captured:
        return None
    grads = [captured.get(i) for i in range(len(index.params))]
    with torch.no_grad():
        return ranges.exponent_histogram(grads, index.param_layer, len(index), watch.device).cpu().numpy()


def precision_plugin(watch: "Watch") -> PrecisionPlugin | None:
    """The :class:`PrecisionPlugin` of a Watch (None if there is none).

    Example:
        >>> import gradwatch as gw
        >>> model = torch.nn.Linear(2, 1)
        >>> watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> type(precision_plugin(watch)).__name__
        'PrecisionPlugin'
        >>> watch.close()
    """
    return next((p for p in watch.plugins if isinstance(p, PrecisionPlugin)), None)


# ----- factories ------------------------------------------------------------------------


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _share(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number between 0 and 1 (a share of elements), got {value!r}")
    return float(value)


def _make_plugin(watch: "Watch") -> PrecisionPlugin:
    """Always runs (diagnose or not): takes the options, validates them and the weights' dtype."""
    options = watch.options
    # fp16 runs sample often (underflow and overflow are live risks); fp32/bf16 runs only get the
    # forecast and the lost-update check, which change slowly: every 1000 steps keeps them ~1 us a step
    # on a 1 ms step (one pass costs ~1 ms on the 115k-parameter benchmark MLP).
    default_every = 50 if watch.precision.mode == "fp16" else 1000
    every = _positive_int("precision_every", options.pop("precision_every", default_every))
    underflow = _share("underflow_share", options.pop("underflow_share", 0.05))
    backoffs = _positive_int("overflow_backoffs", options.pop("overflow_backoffs", 3))
    window = _positive_int("overflow_window", options.pop("overflow_window", 100))
    forecast_scale = options.pop("forecast_scale", 65536.0)
    if isinstance(forecast_scale, bool) or not isinstance(forecast_scale, (int, float)) or not (
        math.isfinite(forecast_scale) and forecast_scale > 0
    ):
        raise ValueError(f"forecast_scale must be a positive number (a loss scale, e.g. 65536.0), got {forecast_scale!r}")
    lost = _share("lost_update_share", options.pop("lost_update_share", 0.1))
    if watch.precision.mode == "fp16" and any(p.dtype == torch.float16 for p in watch.index.params):
        raise ValueError(
            "precision='fp16' needs float32 master weights, but the model has float16 parameters "
            "(GradScaler cannot unscale fp16 gradients); call model.float() and let autocast compute in fp16"
        )
    plugin = PrecisionPlugin(every, underflow, backoffs, window, float(forecast_scale), lost)
    plugin.diagnose = watch.diagnose  # findings and sampling only with Watch(diagnose=True)
    return plugin


def _register() -> None:
    from ..watch import _PLUGIN_FACTORIES, register_default_plugin

    if not any(f is _make_plugin for f, _ in _PLUGIN_FACTORIES):
        register_default_plugin(_make_plugin, always=True)


_register()
