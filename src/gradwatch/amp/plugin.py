"""Mixed-precision diagnosis inside the Watch: overflow, underflow, fp16 forecast, bf16 lost updates.

The telemetry is the step pipeline's: a step the fp16 scaler skipped because a
gradient was inf/nan has ``SkipReason.SCALER_OVERFLOW`` in ``record.skipped_by``
(``"overflow_skip": true`` in ``steps.jsonl``) and the running count
``record.overflow_skips`` (``watch.precision.overflow_skips``); the layers whose
unscaled gradients were non-finite are in ``record.nonfinite_layers``, read from
the per-layer norms of the step: no extra pass.

:class:`PrecisionPlugin` (``Watch(diagnose=True)``, the default; settings
:class:`gradwatch.AmpConfig`) adds the findings ``fp16_overflow`` and
``fp16_underflow``, the float16 forecast of fp32 and bf16 runs and the bf16
lost-update check (finding ``bf16_lost_updates``, info).

Cost: nothing on an unsampled step (a few Python comparisons after the step).
Every ``AmpConfig.every`` steps (default 50 in fp16 runs, 1000 in fp32 and bf16 runs,
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

from ..config import AmpConfig
from ..distributed import local_tensor
from ..findings import Finding
from ..plugins import StepContext, WatchPlugin, WatchView
from . import ranges

if TYPE_CHECKING:  # pragma: no cover
    from ..records import StepRecord

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

    Made by gradwatch for every Watch with ``diagnose=True`` (settings:
    :class:`gradwatch.AmpConfig`); find it with :func:`precision_plugin`.

    Args:
        config: the settings (sampling interval, shares, overflow window, forecast scale).

    Example:
        >>> import gradwatch as gw
        >>> model = torch.nn.Linear(4, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = gw.Watch(model, opt, amp=gw.AmpConfig(every=10))
        >>> _ = watch.step(lambda: model(torch.randn(8, 4)).pow(2).mean())
        >>> precision_plugin(watch).last_forecast.reference_scale
        65536.0
        >>> watch.close()
    """

    name = "precision"

    TRANSIENT = ("_hist", "_before", "_intended", "_counts", "_true_counts", "_last_finite_norms")

    def __init__(self, config: AmpConfig = AmpConfig()) -> None:
        if not isinstance(config, AmpConfig):
            raise TypeError(f"config must be a gradwatch.AmpConfig, got {type(config).__name__}")
        self.config = config
        self.every = 50  # set from the run's precision at attach
        self.underflow_share = config.underflow_share
        self.overflow_backoffs = config.overflow_backoffs
        self.overflow_window = config.overflow_window
        self.forecast_scale = float(config.forecast_scale)
        self.lost_update_share = config.lost_update_share
        # this step's samples (plugin-owned, between after_backward and after_step)
        self._hist: torch.Tensor | None = None
        self._before: list[torch.Tensor] | None = None
        self._intended: list[Any] | None = None
        self._counts: np.ndarray | None = None
        self._true_counts: np.ndarray | None = None
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
    def attach(self, view: WatchView) -> None:
        super().attach(view)
        self.every = self.config.sample_every(view.precision.mode)

    def _sampled(self, step: int) -> bool:
        return step == 1 or step % self.every == 0

    def _bf16_check(self) -> bool:
        view = self.view
        return view.precision.mode == "bf16" or any(p.dtype == torch.bfloat16 for p in view.layers.params)

    def prepare(self, next_step: int) -> None:
        # the mid-step hooks work on sampled steps only
        self.quiet_step = not self._sampled(next_step)

    def after_backward(self, ctx: StepContext) -> None:
        if not self._sampled(ctx.step):
            return
        index = self.view.layers
        with torch.no_grad():
            grads = [local_tensor(p.grad) for p in index.params]  # unscaled, not yet clipped (FSDP2: this rank's shard)
            self._hist = ranges.exponent_histogram(grads, index.param_layer, len(index), self.view.device)
            if self._bf16_check():
                self._before = [local_tensor(p.detach()).clone() for p in index.params]
                self._intended = [(g != 0) if g is not None else None for g in grads]

    def before_update(self, ctx: StepContext, record: "StepRecord") -> None:
        # fp16, sampled, finite: what fp16 flushed is exact zeros by now. A layer whose gradient is
        # entirely zero may have been flushed whole: measure the true (float32) gradients with a
        # replay here, after the step's one sync and *before* its update (the step's own weights).
        hist = self._hist
        micro = ctx.micro[-1] if ctx.micro else None
        if hist is None or self.view.precision.mode != "fp16" or micro is None or micro.closure is None:
            return
        counts = hist.cpu().numpy()  # sampled steps only: one small extra transfer
        self._counts = counts
        with np.errstate(invalid="ignore", divide="ignore"):
            all_zero = counts[:, ranges.ZERO_SLOT] == counts.sum(axis=1)
        names = self.view.layers.names
        measured = set(self.view.layers.measured_slots)
        untried = {names[i] for i in np.flatnonzero(all_zero) if i in measured} - self._underflow_reported
        if untried:
            self._underflow_reported.update(untried)  # one replay per all-zero layer and run
            self._true_counts = fp32_gradient_histogram(self.view, micro.closure, micro.rng_before)

    def after_step(self, ctx: StepContext, record: "StepRecord") -> list[Finding]:
        precision = self.view.precision
        if precision.mode == "fp32" and self._hist is None:
            return []  # an unsampled fp32 step: nothing to look at (this runs on every step)
        findings: list[Finding] = []
        overflow = precision.scaling and not math.isfinite(record.grad_norm)
        if precision.scaling:
            finding = self._check_overflow(ctx, record, overflow)
            if finding is not None:
                findings.append(finding)
        if record.finite and precision.scaling:  # read by the fp16 overflow finding only
            self._last_finite_norms = record.layer_grad_norms  # a fresh host array each step, never written to
        hist, before, intended = self._hist, self._before, self._intended
        self._hist = self._before = self._intended = None
        if hist is not None and record.finite:
            findings.extend(self._forecast(ctx, record, hist))
        # Only once the update is in the weights: under observe() the caller's optimizer.step() comes
        # after this hook, so comparing the weights now would count every update as lost.
        if before is not None and not record.skipped and ctx.stepped:
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
        micro = ctx.micro[-1] if ctx.micro else None
        if overflow and micro is not None and micro.closure is not None and record.loss_scale is not None:
            cause = diagnose_overflow(self.view.model, micro.closure, micro.rng_before, record.loss_scale)
        return self._overflow_finding(step, record, below_one, cause)

    def _overflow_finding(self, step: int, record: "StepRecord", below_one: bool, cause: dict[str, Any] | None = None) -> Finding:
        scale = record.loss_scale
        layers = [name for name, _ in self._overflow_layers.most_common()] or list(record.nonfinite_layers)
        names = self.view.layers.names
        evidence: dict[str, Any] = {
            "backoffs_in_window": len(self.overflow_steps),
            "window": self.overflow_window,
            "overflow_steps": list(self.overflow_steps),
            "loss_scale": scale,
            "overflow_skips": self.view.precision.overflow_skips,
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
        counts, self._counts = self._counts, None
        if counts is None:
            counts = hist.cpu().numpy()  # sampled steps only: one small extra transfer
        precision = self.view.precision
        current = record.loss_scale if (precision.scaling and record.loss_scale) else 1.0
        forecast = self._make_forecast(step, counts, current)
        self.last_forecast = forecast
        if self.view.writer is not None:
            self.view.writer.append("events", forecast.to_event())
        if precision.mode != "fp16":
            return []  # fp32/bf16: the forecast is data (doctor, report), not a problem of this run
        all_zero = [forecast.layers[i] for i in np.flatnonzero(forecast.zero_share == 1.0)]
        true_counts, self._true_counts = self._true_counts, None  # from before_update(): the float32 replay
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
            precision=self.view.precision.mode,
            layers=list(self.view.layers.names),
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
        index = self.view.layers
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
        if self.view.writer is not None:
            self.view.writer.append("events", event)
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


def fp32_gradient_histogram(watch: WatchView, closure: Any, rng_state: dict[str, Any] | None) -> np.ndarray | None:
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
    index = watch.layers
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


def precision_plugin(watch: Any) -> PrecisionPlugin | None:
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
