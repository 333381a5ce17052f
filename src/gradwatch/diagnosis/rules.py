"""The diagnosis rules: one small class per finding code, each raising a finding once per episode.

Every rule reads host-side numbers only (the per-layer norms the Watch already
carried to the host, the recent ``watch.history``, and on sampled steps the
:class:`~gradwatch.diagnosis.sampler.ActivationSample`). A rule returns at most
one :class:`~gradwatch.findings.Finding` per call, and an :class:`Episode`
keeps it from repeating while the condition holds: it may fire again only after
the condition has been false on ``quiet`` consecutive checks.

Thresholds and their reasoning are in docs/diagnosis.md; the constants below
are the single source.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..activation_fns import ACTIVATIONS
from ..findings import Finding
from ..persist import record_class
from ..plugins import SkipReason
from .curve import DepthFit, fit_depth_curve, window_log_median
from .patterns import DIVERGED_GROWTH, HUGE_FIRST_NORM, norm_pattern
from .robust import EarlyLevel, robust_zscore
from .sampler import ActivationSample
from .trend import TREND_RATIO, TREND_WINDOW, LossTrend

# vanishing / exploding: the fitted gradient ratio over the whole stack, and how straight the line is.
VANISH_TOTAL = 1e-3  # first layer gets < 1/1000 of the last layer's gradient (healthy controls: > 0.02)
EXPLODE_TOTAL = 1e3  # first layer gets > 1000x the last layer's gradient (healthy controls: < 10)
MIN_R2 = 0.5  # the decay must be systematic, layer after layer, not one odd layer
MIN_CURVE_LAYERS = 4
AFFECTED_FACTOR = 1e-2  # "affected" layers: RMS below 1/100 (above 100x) of the last layer's
CURVE_WINDOW = 20  # steps in the weight-gradient window (geometric median per layer)
# init scale: a weight's std * sqrt(fan_in) above this many times Kaiming's ReLU value sqrt(2).
WEIGHT_SCALE_FACTOR = 2.5
# clipping
CLIP_MIN_STEPS = 50
CLIP_SHARE = 0.9
# loss spike: an order of magnitude above the recent median, and far outside the recent spread (in log space).
SPIKE_WINDOW = 50
SPIKE_MIN_HISTORY = 20
SPIKE_RATIO = 10.0
SPIKE_LOG_Z = 6.0
SPIKE_LINEAR_Z = 20.0  # for losses that can be negative (no ratio, no log)
SPIKE_BOUND_STEPS = 10  # steps decided by one comparison between two sorts of the window
# ... and the jump above the median must be at least 1% of the run's early loss level (median |loss| of the
# first SPIKE_MIN_HISTORY finite steps): a converged loss at 0 blipping to 3.7e-9 has an undefined ratio
# and a robust z of ~1e9, but moved by a billionth of where the run started.
SPIKE_MIN_JUMP = 0.01
# activations
DEAD_SHARE = 0.6  # "most units" dead for every example of the batch (healthy deep nets reach 0.3-0.5)
SATURATED_SHARE = 0.5  # "most outputs" of a sigmoid/tanh in the flat tails
# GELU/SiLU/Mish are ReLU-like: a healthy layer has about half of its inputs in the flat negative region
# (as ReLU has half at zero); only a layer with nearly all of them there is saturated.
SMOOTH_FLAT_SHARE = 0.9
MISSING_AFTER = 5  # steps with no gradient at all before a parameter is reported
# Update-to-weight ratio ||dw||/||w||: ~1e-3 per step is the usual healthy range; above 0.1 for three
# measurements in a row every step rewrites a tenth of the weights (healthy controls: < 0.03).
UPDATE_RATIO_MAX = 0.1
UPDATE_RATIO_RUNS = 3


@record_class
class Episode:
    """Once-per-episode bookkeeping for one rule and key.

    ``quiet`` counts checks, or steps when each check passes its ``step`` (a signal
    sampled at a changing cadence: the episode ends ``quiet`` steps after the last
    true check, however many checks fell in between).

    Example:
        >>> e = Episode(quiet=2)
        >>> [e.update(c) for c in (True, True, False, True, False, False, True)]
        [True, False, False, False, False, False, True]
        >>> e = Episode(quiet=50)
        >>> [e.update(c, step) for c, step in ((True, 10), (False, 11), (True, 40), (False, 90), (True, 95))]
        [True, False, False, False, True]
    """

    def __init__(self, quiet: int = 3) -> None:
        self.quiet = quiet
        self.active = False
        self._false = 0
        self._last_true: int | None = None

    def update(self, condition: bool, step: int | None = None) -> bool:
        """Feed the condition of this check (at ``step``, for a step-counted ``quiet``); True when a
        new episode starts (fire now)."""
        if condition:
            self._false = 0
            self._last_true = step
            if not self.active:
                self.active = True
                return True
            return False
        if self.active:
            self._false += 1
            since = self._false if step is None or self._last_true is None else step - self._last_true
            if since >= self.quiet:
                self.active = False
                self._false = 0
        return False


@dataclass(slots=True)
class RuleInput:
    """What the rules see on one step (all host-side)."""

    step: int
    record: Any  # StepRecord
    history: Sequence[Any]  # recent StepRecords, the current one last
    layer_names: list[str]  # curve layers, depth order
    curve_index: list[int]  # their slots in record.layer_grad_norms
    curve_numel: np.ndarray  # their trainable parameter counts
    sample: ActivationSample | None  # the latest activation sample (maybe from an earlier step)
    sampled_now: bool
    skipped_by: list[SkipReason] = field(default_factory=list)
    activation_kinds: set[str] = field(default_factory=set)


def _first_item(pair: tuple[float, int]) -> float:
    return pair[0]


def _median_sorted(ordered: Sequence[float]) -> float:
    """The median of an already sorted, non-empty sequence."""
    half = len(ordered) // 2
    return float(ordered[half]) if len(ordered) % 2 else 0.5 * (ordered[half - 1] + ordered[half])


def _span(names: Sequence[str]) -> str:
    if not names:
        return ""
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    return f"{x:.2g}" if 1e-2 <= abs(x) < 1e3 else f"{x:.1e}"


class DepthCurveRule:
    """``vanishing_gradients`` / ``exploding_gradients`` from the gradient-by-depth curve.

    Two curves are fitted: the weight-gradient RMS per layer (every check, the
    geometric median over the last ``CURVE_WINDOW`` finite steps) and the
    activation-gradient RMS ``||dL/dh_l||`` of the latest sampled step. The
    weight curve can hide vanishing (shrinking activations cancel the shrinking
    backward signal) and hides exploding from a too-large init the same way, so
    either curve crossing the threshold raises the finding, and the evidence
    carries both gains.
    """

    TRANSIENT = ("_activation_cache", "_scales")  # caches, rebuilt on demand

    def __init__(self, check_every: int = 50) -> None:
        self.check_every = check_every
        self.episodes = {"vanishing_gradients": Episode(), "exploding_gradients": Episode()}
        self._activation_cache: tuple[ActivationSample, DepthFit | None] | None = None
        self._scales: np.ndarray | None = None  # sqrt(numel) of the curve layers (fixed for a run)

    def _weight_fit(self, inp: RuleInput) -> DepthFit | None:
        history = inp.history
        recent = history[-CURVE_WINDOW:] if isinstance(history, list) else list(history)[-CURVE_WINDOW:]
        rows = [r.layer_grad_norms for r in recent if r.finite]
        if not rows or any(len(row) != len(rows[0]) for row in rows):
            return None
        medians = window_log_median(np.array(rows)[:, inp.curve_index])  # per curve layer, over the window
        if self._scales is None or len(self._scales) != len(medians):
            self._scales = np.sqrt(np.maximum(inp.curve_numel, 1.0))
        return fit_depth_curve(medians / self._scales, MIN_CURVE_LAYERS)  # RMS = norm / sqrt(numel)

    def _activation_fit(self, inp: RuleInput) -> DepthFit | None:
        if inp.sample is None:
            return None
        if self._activation_cache is not None and self._activation_cache[0] is inp.sample:
            return self._activation_cache[1]  # the sample of an earlier check: same fit
        rms = [inp.sample.grad_rms.get(name, math.nan) for name in inp.layer_names]
        fit = fit_depth_curve(rms, MIN_CURVE_LAYERS)
        self._activation_cache = (inp.sample, fit)
        return fit

    def check(self, inp: RuleInput) -> list[Finding]:
        if len(inp.layer_names) < MIN_CURVE_LAYERS or not inp.record.finite:
            return []
        if not (inp.sampled_now or inp.step % self.check_every == 0):
            return []
        fits = {"activation_grad": self._activation_fit(inp), "weight_grad": self._weight_fit(inp)}
        out: list[Finding] = []
        for code, bad in (("vanishing_gradients", lambda f: f.total <= VANISH_TOTAL),
                          ("exploding_gradients", lambda f: f.total >= EXPLODE_TOTAL)):
            hits = [(k, f) for k, f in fits.items() if f is not None and f.r2 >= MIN_R2 and bad(f)]
            if self.episodes[code].update(bool(hits)) and hits:
                out.append(self._finding(code, inp, hits[0][0], hits[0][1], fits))
        return out

    def _finding(self, code: str, inp: RuleInput, curve: str, fit: DepthFit, fits: dict[str, DepthFit | None]) -> Finding:
        names = inp.layer_names
        rms = np.array(fit.rms)
        ref = rms[-1] if np.isfinite(rms[-1]) and rms[-1] > 0 else np.nanmax(rms)
        vanishing = code == "vanishing_gradients"
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = rms / ref
        affected = [n for n, r in zip(names, rel) if np.isfinite(r) and (r <= AFFECTED_FACTOR if vanishing else r >= 1 / AFFECTED_FACTOR)]
        if not affected:
            affected = names[:-1]
        ratio = fit.first_last_ratio
        what = "activation gradients dL/dh" if curve == "activation_grad" else "weight gradients"
        evidence: dict[str, Any] = {
            "effective_gain_per_layer": round(fit.gain, 4),
            "fitted_first_last_ratio": fit.total,
            "first_last_ratio": ratio,
            "r2": round(fit.r2, 3),
            "curve": curve,
            "layers_in_fit": fit.n,
            "layers_affected": affected,
        }
        for key, other in fits.items():
            if other is not None:
                evidence[f"{key}_gain"] = round(other.gain, 4)
                evidence[f"{key}_first_last_ratio"] = other.first_last_ratio
        evidence["thresholds"] = {"total": VANISH_TOTAL if vanishing else EXPLODE_TOTAL, "r2": MIN_R2}
        location = {"layers": _span(affected), "last_layer": names[-1]}
        if vanishing:
            message = (
                f"Layers {_span(affected)} ({len(affected)} of {len(names)}) receive {what} about {_fmt(ratio)} times "
                f"those of {names[-1]}: each layer multiplies the gradient by about {fit.gain:.2f} on its way back "
                f"(effective gain {fit.gain:.2f}), so the early layers barely learn."
            )
            fixes = []
            if inp.activation_kinds & {"sigmoid", "tanh"}:
                fixes.append(f"replace sigmoid/tanh by ReLU and use kaiming_normal_(nonlinearity='relu') on {_span(names[:-1])}")
            else:
                fixes.append(f"kaiming_normal_(weight, nonlinearity='relu') on {_span(names[:-1])} (PyTorch's default init shrinks ReLU gradients by ~0.41 per layer)")
            fixes += ["add LayerNorm (or BatchNorm) after each hidden layer", "add residual connections (x + f(x)) so gradients bypass the stack"]
        else:
            message = (
                f"Layers {_span(affected)} ({len(affected)} of {len(names)}) receive {what} about {_fmt(ratio)} times "
                f"those of {names[-1]}: each layer multiplies the gradient by about {fit.gain:.2f} on its way back "
                f"(effective gain {fit.gain:.2f}), toward overflow."
            )
            fixes = [
                f"re-initialize {_span(names[:-1])} at fan-in scale: kaiming_normal_(weight, nonlinearity='relu') (or xavier_normal_ for tanh)",
                "add LayerNorm after each hidden layer",
            ]
            if inp.record.clip_threshold is None:
                fixes.insert(1, "clip_norm=1.0 keeps the steps bounded meanwhile")
        return Finding(code, "warning", inp.step, message, evidence=evidence, location=location, fixes=fixes)


class InitScaleRule:
    """``init_scale_too_large`` on step 1: a huge first norm, or weights far above their fan-in scale."""

    def __init__(self) -> None:
        self.done = False

    def check(self, inp: RuleInput, weight_scales: dict[str, float], clip: float | None,
              explained: bool = False) -> list[Finding]:
        """Findings of step 1; ``explained``: another rule already named the cause of a huge first norm."""
        if self.done:
            return []
        self.done = True
        if inp.step != 1:  # a resumed run (Watch.load_state_dict): the weights are trained, not initialized
            return []
        first = inp.record.grad_norm
        if not inp.record.finite:
            return []  # the NaN root-cause plugin reports non-finite steps (using norm_pattern too)
        huge = norm_pattern([first]) == "init_scale_too_large" and not explained
        big = {n: s for n, s in weight_scales.items() if s >= WEIGHT_SCALE_FACTOR}
        if not (huge or big):
            return []
        severity = "error" if huge and clip is None else "warning"
        parts = []
        if huge:
            parts.append(f"the very first gradient norm, before any update, is {_fmt(first)} (unclipped)")
        if big:
            worst = max(big, key=big.get)
            parts.append(f"{len(big)} layer(s) hold weights up to {big[worst]:.1f}x Kaiming's fan-in scale ({worst})")
        layers = sorted(big, key=lambda n: inp.layer_names.index(n) if n in inp.layer_names else 0) or inp.layer_names
        fixes = [f"re-initialize {_span(layers)}: kaiming_normal_(weight, nonlinearity='relu'), or xavier_normal_ for tanh/sigmoid"]
        if clip is None:
            fixes.append("clip_norm=1.0 to bound the first steps while you fix the init")
        return [Finding(
            "init_scale_too_large", severity, inp.step,
            "Initialization is too large: " + "; ".join(parts) + ".",
            evidence={"first_grad_norm": first, "huge_first_norm_threshold": HUGE_FIRST_NORM,
                      "weight_scale_vs_kaiming": {n: round(s, 3) for n, s in big.items()},
                      "weight_scale_threshold": WEIGHT_SCALE_FACTOR, "clip_norm": clip},
            location={"layers": _span(layers)},
            fixes=fixes,
        )]


@record_class
class UpdateRatioSignal:
    """The update-to-weight ratio half of :class:`LrRule`: each update rewrites a large share of the weights.

    Catches what the norm growth cannot: Adam at a far too high learning rate
    (the update size does not follow the gradient norm) and runs whose norms do not
    grow because the units died. Reads ``record.update_ratio`` (measured on each of
    the first ``update_ratio_every`` steps, then every ``update_ratio_every``); high
    when the median over layers is above ``UPDATE_RATIO_MAX`` on
    ``UPDATE_RATIO_RUNS`` measurements in a row.

    Example:
        >>> signal = UpdateRatioSignal()
        >>> [signal.observe(np.array(r)) for r in ([0.5, 0.2], [0.3, 0.4], [0.2, 0.3])]
        [False, False, True]
    """

    def __init__(self) -> None:
        self.medians: list[float] = []
        self.worst: tuple[int, float] | None = None  # (layer slot, ratio) of the latest measurement

    @property
    def high(self) -> bool:
        """Whether the latest ``UPDATE_RATIO_RUNS`` measurements were all above ``UPDATE_RATIO_MAX``."""
        return len(self.medians) == UPDATE_RATIO_RUNS and min(self.medians) > UPDATE_RATIO_MAX

    def observe(self, ratios: np.ndarray) -> bool:
        """Take one measurement (per-layer ratios, NaN for unmeasured layers); returns :attr:`high`."""
        # a few dozen layers: plain Python beats numpy here (np.nanargmax alone cost ~40 us in the step)
        finite = [(v, slot) for slot, v in enumerate(ratios.tolist()) if math.isfinite(v)]
        if finite:
            self.medians = (self.medians + [_median_sorted(sorted(v for v, _ in finite))])[-UPDATE_RATIO_RUNS:]
            value, slot = max(finite, key=_first_item)  # the first of equal maxima, as np.nanargmax
            self.worst = (slot, value)
        return self.high


class LrRule:
    """``lr_too_high`` on finite steps, from three signals, one finding per episode.

    - ``norm_growth`` (error): a sane first norm, then growth step over step after
      updates (:func:`~gradwatch.diagnosis.patterns.norm_pattern`), with the loss rising;
    - ``loss_trend`` (error): the loss climbs over a window after updates
      (:class:`~gradwatch.diagnosis.trend.LossTrend`), not only by one 10x jump;
    - ``update_ratio`` (warning): each update rewrites a large share of the weights
      (:class:`UpdateRatioSignal`).

    Whichever signal comes first raises the finding; its evidence carries all three
    (recent losses and their window, update-ratio medians, norms, the lr). The episode
    ends after ``quiet`` finite steps on which no signal holds.
    """

    def __init__(self) -> None:
        self.first: float | None = None
        self.episode = Episode(quiet=20)
        self.trend = LossTrend()
        self.ratio = UpdateRatioSignal()

    def check(self, inp: RuleInput, lr_of: Callable[[], float | None]) -> list[Finding]:
        """Findings of this step; ``lr_of`` reads the learning rate (only when a finding is made)."""
        record = inp.record
        if not record.finite:
            return []  # non-finite steps: the NaN root-cause plugin applies norm_pattern there
        trend_hit = self.trend.observe(record.loss)
        ratio_hit = self.ratio.observe(record.update_ratio) if record.update_ratio is not None else self.ratio.high
        ratio_hit = ratio_hit and not self._loss_falling(record.loss)
        if self.first is None:
            self.first = record.grad_norm
            return self._decide(inp, lr_of, None, trend_hit, ratio_hit)
        pattern = None
        if record.grad_norm >= DIVERGED_GROWTH * self.first:  # norm_pattern needs DIVERGED_GROWTH times the first norm
            window = list(inp.history)[-30:]
            norms = [self.first] + [r.grad_norm for r in window]
            pattern = norm_pattern(norms, [False] + [bool(r.skipped) for r in window])
            losses = [r.loss for r in window if r.finite]
            if not (len(losses) >= 3 and losses[-1] > 2.0 * min(losses)):
                pattern = None  # the norm grew but the loss did not rise
        return self._decide(inp, lr_of, pattern, trend_hit, ratio_hit)

    def check_update(self, inp: RuleInput, lr_of: Callable[[], float | None]) -> list[Finding]:
        """``observe()``: the step's update ratio arrived after :meth:`check` ran (the caller stepped)."""
        record = inp.record
        if record.update_ratio is None or not record.finite or not self.ratio.observe(record.update_ratio):
            return []
        if self._loss_falling(record.loss):
            return []
        if not self.episode.update(True):
            return []
        return [self._finding(inp, lr_of(), "update_ratio", None)]

    def _loss_falling(self, loss: float) -> bool:
        """Large updates on a loss that is below where it started are an aggressive lr that works
        (Adam at 1e-2 on a small model), not a failure: the update-ratio signal waits for the loss."""
        first = self.trend.first
        return first is not None and math.isfinite(loss) and loss < first

    def _decide(self, inp: RuleInput, lr_of: Callable[[], float | None], pattern: str | None,
                trend_hit: bool, ratio_hit: bool) -> list[Finding]:
        norm_hit = pattern == "lr_too_high"
        hit = norm_hit or trend_hit or ratio_hit
        if not hit and not self.episode.active:  # the usual step
            return []
        if not self.episode.update(hit) or not hit:
            return []
        signal = "norm_growth" if norm_hit else "loss_trend" if trend_hit else "update_ratio"
        return [self._finding(inp, lr_of(), signal, pattern)]

    def _finding(self, inp: RuleInput, lr: float | None, signal: str, pattern: str | None) -> Finding:
        record, trend, ratio = inp.record, self.trend, self.ratio
        first = self.first if self.first is not None else record.grad_norm
        growth = record.grad_norm / max(first, 1e-30)
        lr_text = f"from {lr:.3g} to {lr / 10:.3g}" if lr else "by 10x"
        norms = [float(r.grad_norm) for r in list(inp.history)[-8:]] if inp.history else [record.grad_norm]
        evidence: dict[str, Any] = {
            "signal": signal, "lr": lr, "loss": record.loss,
            "losses": trend.losses(), "loss_window": TREND_WINDOW, "loss_recent_median": trend.recent_median,
            "loss_best": trend.best, "loss_first": trend.first, "loss_trend_ratio": TREND_RATIO,
            "update_ratio_medians": list(ratio.medians), "update_ratio_threshold": UPDATE_RATIO_MAX,
            "first_grad_norm": first, "grad_norm": record.grad_norm, "growth": growth, "recent_grad_norms": norms,
        }
        if ratio.medians:
            evidence["update_ratio_median"] = ratio.medians[-1]
        location: dict[str, Any] = {}
        if signal == "norm_growth":
            severity = "error"
            message = (f"The learning rate is too high: the first gradient norm was sane ({_fmt(first)}), then it grew "
                       f"step over step after updates to {_fmt(record.grad_norm)} ({_fmt(growth)}x) while the loss rose "
                       f"to {_fmt(record.loss)}.")
        elif signal == "loss_trend":
            severity = "error"
            per = f"; each update changes the weights by {_fmt(ratio.medians[-1])} of their norm" if ratio.medians else ""
            message = (f"The learning rate is too high: the loss climbed after updates, from a median of "
                       f"{_fmt(trend.best)} over the first {TREND_WINDOW} steps to a median of {_fmt(trend.recent_median)} over the last {TREND_WINDOW} steps "
                       f"({_fmt(trend.recent_median / trend.best) + 'x' if trend.best > 0 else 'up'}){per}.")
        else:
            severity = "warning"
            worst_slot, worst_value = ratio.worst if ratio.worst is not None else (0, math.nan)
            worst_name = record.layer_names[worst_slot]
            location = {"layer": worst_name}
            message = (f"The learning rate is too high: each update changes the weights by {_fmt(ratio.medians[-1])} of "
                       f"their norm (median over layers, {UPDATE_RATIO_RUNS} measurements in a row; ~1e-3 is usual), so "
                       f"every step rewrites a large part of what was learned (worst: {worst_name}, {_fmt(worst_value)}).")
        fixes = [f"lower lr {lr_text}", "add a learning-rate warm-up"]
        if signal != "update_ratio":
            fixes.append("clip_norm=1.0 bounds each step")
        return Finding("lr_too_high", severity, inp.step, message, evidence=evidence, location=location, fixes=fixes)


class MissingGradRule:
    """``missing_gradients``: trainable parameters that receive no gradient on any of the first steps."""

    def __init__(self, param_names: list[str], layer_of: dict[str, str]) -> None:
        self.never: set[str] | None = None
        self.param_names = param_names
        self.layer_of = layer_of
        self.steps = 0
        self.done = False

    def watch_more(self, param_names: list[str], layer_of: dict[str, str]) -> None:
        """Parameters measured from now on (unfrozen, added to the optimizer): watched for their first steps too."""
        new = [n for n in param_names if n not in set(self.param_names)]
        self.param_names, self.layer_of = list(param_names), dict(layer_of)
        if new:
            self.done = False
            self.steps = 0
            self.never = None

    def observe(self, missing_now: set[str]) -> None:
        """Called after backward with the names of parameters whose ``.grad`` is None."""
        self.steps += 1
        self.never = set(missing_now) if self.never is None else self.never & missing_now

    @property
    def watching(self) -> bool:
        return not self.done and (self.never is None or bool(self.never))

    def check(self, inp: RuleInput, ran_forward: set[str] | None = None,
              no_graph_output: set[str] | None = None) -> list[Finding]:
        """``ran_forward``: the layers that ran in the first step's forward (None: unknown);
        ``no_graph_output``: those of them whose output carried no autograd graph (None: unknown)."""
        if self.done:
            return []
        if self.never is not None and not self.never:  # every parameter had a gradient: nothing left to watch
            self.done = True
            return []
        if self.steps < MISSING_AFTER:
            return []
        self.done = True
        names = [n for n in self.param_names if n in self.never]
        layers = list(dict.fromkeys(self.layer_of.get(n, n) for n in names))
        ran = [n for n in layers if ran_forward is not None and n in ran_forward]
        cut = [n for n in ran if no_graph_output is None or n in no_graph_output]
        unused = [n for n in ran if n not in cut]
        fixes = ["look for .detach(), .data, torch.no_grad() or .item() between these layers and the loss",
                 "if the branch is unused on purpose, freeze it: requires_grad_(False)"]
        reasons = []
        if unused:  # their output was part of the graph, yet the loss does not depend on it
            reasons.append(f"{_span(unused)} ran in the forward pass and their output was part of the autograd graph, "
                           f"but the loss does not depend on it: an output computed and never used (a pooler or head "
                           f"whose result the loss ignores), or detached further on")
            fixes = ["if the module is not needed, build the model without it (transformers: e.g. "
                     "ViTModel(config, add_pooling_layer=False)) or freeze it: requires_grad_(False)",
                     "if it should train, make the loss use its output"] + fixes[:1]
        if cut:  # they computed something with no graph attached: the graph was cut inside or before them
            reasons.append(f"{_span(cut)} ran in the forward pass, so their output was cut from the graph before the "
                           f"loss: a .detach(), torch.no_grad(), or activation checkpointing with "
                           f"torch.utils.checkpoint(use_reentrant=True) whose inputs do not require grad (its output "
                           f"then carries no graph)")
            fixes = ["with activation checkpointing, pass use_reentrant=False to torch.utils.checkpoint.checkpoint "
                     "(or make its inputs require grad; transformers: "
                     "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))"] + fixes
        if len(ran) < len(layers):
            reasons.append(("The others are" if ran else "They are") + " not connected to the loss (a .detach(), an unused branch)")
        why = "; ".join(reasons)
        return [Finding(
            "missing_gradients", "warning", inp.step,
            f"{len(names)} trainable parameter(s) in {len(layers)} layer(s) received no gradient on any of the first "
            f"{self.steps} steps: {_span(layers)}. {why}.",
            evidence={"parameters": names, "layers": layers, "steps_observed": self.steps, "ran_forward": ran,
                      "output_unused": unused},
            location={"layers": ", ".join(layers[:10]) + (" ..." if len(layers) > 10 else "")},
            fixes=fixes,
        )]


class ClippingRule:
    """``clipping_always_active``: the clip coefficient is below 1 on >= 90% of >= 50 recent steps.

    Only for a fixed threshold: adaptive clippers (AutoClip, ZClip) clip a set
    share of steps by design, and there is no single ``clip_norm`` to raise.
    """

    def __init__(self, fixed_threshold: bool = True) -> None:
        self.fixed_threshold = fixed_threshold
        self.episode = Episode(quiet=CLIP_MIN_STEPS)
        self.flags: deque[bool] = deque(maxlen=CLIP_MIN_STEPS)  # clipped? on recent finite steps
        self.norms: deque[float] = deque(maxlen=CLIP_MIN_STEPS)
        self.clipped_count = 0  # sum(self.flags), kept as the window slides

    def check(self, inp: RuleInput) -> list[Finding]:
        record, flags = inp.record, self.flags
        if not self.fixed_threshold or record.clip_threshold is None or not record.finite:
            return []
        clipped = bool(record.clipped)
        full = len(flags) == CLIP_MIN_STEPS
        if full:
            self.clipped_count -= flags[0]
        flags.append(clipped)
        self.clipped_count += clipped
        self.norms.append(record.grad_norm)
        if len(flags) < CLIP_MIN_STEPS:
            return []
        share = self.clipped_count / len(flags)
        hit = share >= CLIP_SHARE
        if not hit and not self.episode.active:  # the usual step: nothing to report, no episode to close
            return []
        if not self.episode.update(hit) or not hit:
            return []
        recent = self.flags
        norms = np.array(self.norms)
        threshold = inp.record.clip_threshold
        suggest = float(np.quantile(norms, 0.9))
        median = float(np.median(norms))
        if median > HUGE_FIRST_NORM:  # huge gradients: raising the threshold would hide a problem, not tune a knob
            fixes = ["the gradients are huge: fix their cause (see the other findings: init, "
                     "learning rate, normalization) rather than raising clip_norm"]
        else:
            fixes = [f"raise clip_norm from {threshold:g} to about {suggest:.2g} (the 90th percentile of recent norms)",
                     "or lower the learning rate if the norms are large because training is unstable"]
        return [Finding(
            "clipping_always_active", "info", inp.step,
            f"The clip threshold {threshold:g} engaged on {share:.0%} of the last {len(recent)} steps (median pre-clip "
            f"norm {_fmt(float(np.median(norms)))}): every step is rescaled, so the learning rate alone no longer sets the step size.",
            evidence={"share_clipped": share, "steps": len(recent), "clip_norm": threshold,
                      "median_grad_norm": float(np.median(norms)), "p90_grad_norm": suggest},
            location={},
            fixes=fixes,
        )]


class LossSpikeRule:
    """``loss_spike``: an order of magnitude above a robust recent baseline (NaN/inf never enter it).

    The baseline is the median of the finite losses among the last ``SPIKE_WINDOW``
    steps. A spike is at least ``SPIKE_RATIO`` times it and ``SPIKE_LOG_Z`` robust
    deviations above it in log space (losses that can be zero or negative: ``SPIKE_LINEAR_Z``
    deviations, no ratio), and its jump above the median is at least ``SPIKE_MIN_JUMP``
    of the run's early loss level (:class:`~gradwatch.diagnosis.robust.EarlyLevel`), so a
    converged loss at 0 with 1e-9 blips is quiet.

    Most steps are decided by one comparison: whenever the window is sorted
    (at least every ``SPIKE_BOUND_STEPS`` steps) the rule keeps a value that no median
    of the next ``SPIKE_BOUND_STEPS`` windows can fall below (each step replaces at
    most one value), and a loss under ``SPIKE_RATIO`` times it, or less than the jump
    floor above it, cannot be a spike; only the other steps sort the window (the same
    decision either way).
    """

    TRANSIENT = ("_clear_below", "_clear_steps")  # a fresh rule sorts its window on the next step

    def __init__(self) -> None:
        self.losses: deque[float] = deque(maxlen=SPIKE_WINDOW)  # the last SPIKE_WINDOW losses (non-finite ones too)
        self.episode = Episode(quiet=1)
        self.early = EarlyLevel(SPIKE_MIN_HISTORY)
        self._clear_below = -math.inf  # a finite loss below this is no spike, for ...
        self._clear_steps = 0  # ... this many more steps

    def _ordered(self) -> list[float]:
        """The finite losses of the window, sorted."""
        return sorted(v for v in self.losses if math.isfinite(v))

    def _push(self, value: float) -> None:
        self.losses.append(value)
        self.early.observe(value)
        self._clear_steps -= 1

    def _bound(self) -> None:
        """Sort the window (this step's loss in it) and set the bound for the next SPIKE_BOUND_STEPS steps.

        The window before step j (1 <= j <= SPIKE_BOUND_STEPS) keeps all but at most
        j - 1 of these n values and adds at most j - 1 new ones, so its median is at
        least the value of rank (n - 2 (SPIKE_BOUND_STEPS - 1)) // 2 - 1 here (0-based).
        The jump floor only grows (0 until the early level is known), so a bound made
        with today's floor stays valid.
        """
        ordered = self._ordered()
        rank = (len(ordered) - 2 * (SPIKE_BOUND_STEPS - 1)) // 2 - 1
        low = ordered[rank] if rank >= 0 and len(ordered) >= SPIKE_MIN_HISTORY else math.nan
        by_ratio = SPIKE_RATIO * low if low > 0 else -math.inf  # NaN: no bound
        floor = self.early.floor(SPIKE_MIN_JUMP)
        by_jump = low + floor if floor > 0 and math.isfinite(low) else -math.inf
        self._clear_below = max(by_ratio, by_jump)
        self._clear_steps = SPIKE_BOUND_STEPS

    def check(self, inp: RuleInput) -> list[Finding]:
        record = inp.record
        value = record.loss
        if (self._clear_steps > 0 and -math.inf < value < self._clear_below and record.grad_norm < math.inf
                and not inp.skipped_by):  # the usual step: no sort, nothing to report
            self._push(value)
            if self.episode.active:
                self.episode.update(False)
            return []
        try:
            return self._check_sorted(inp, record, value)
        finally:
            self._bound()

    def _check_sorted(self, inp: RuleInput, record: Any, value: float) -> list[Finding]:
        ordered = self._ordered()  # the window before this step (value joins it on the way out)
        handled = SkipReason.SPIKE in inp.skipped_by  # on_spike="skip" vetoed it and reported it
        if not record.finite or handled:
            self._push(value)
            return []
        n = len(ordered)
        if n < SPIKE_MIN_HISTORY:
            self._push(value)
            if self.episode.active:
                self.episode.update(False)
            return []
        median = _median_sorted(ordered)
        floor = self.early.floor(SPIKE_MIN_JUMP)
        if (median > 0 and value < SPIKE_RATIO * median) or value - median < floor:  # no spike, no MAD needed
            self._push(value)
            if self.episode.active:
                self.episode.update(False)
            return []
        finite = list(ordered)
        self._push(value)
        ratio: float | None
        if median > 0 and ordered[0] > 0:
            ratio = value / median
            z = robust_zscore(np.log(finite), math.log(value)) if value > 0 else -math.inf
            hit = ratio >= SPIKE_RATIO and z >= SPIKE_LOG_Z
        else:
            ratio = None  # no ratio to a median that is zero or negative, or to a window that reaches it
            z = robust_zscore(finite, value)
            hit = z >= SPIKE_LINEAR_Z
        if not self.episode.update(hit) or not hit:
            return []
        if ratio is not None:
            how = f"{_fmt(ratio)}x the median of the last {len(finite)} steps ({_fmt(median)})"
        else:
            how = f"up from a median of {_fmt(median)} over the last {len(finite)} steps ({_fmt(z)} robust deviations above it)"
        return [Finding(
            "loss_spike", "warning", inp.step,
            f"The loss jumped to {_fmt(value)}, {how}.",
            evidence={"loss": value, "baseline_median": median, "ratio": ratio, "robust_z": z,
                      "window": len(finite), "grad_norm": record.grad_norm, "early_loss_level": self.early.level,
                      "min_jump": floor},
            location={},
            fixes=["look at this step's batch (pass batch= to watch.step to keep it)",
                   "Watch(on_spike='skip') skips such steps", "lower the learning rate or add warm-up"],
        )]


class ActivationRule:
    """``dead_relu`` and ``saturated_activations`` from sampled activation statistics.

    One finding per code and episode lists every affected site (six saturated tanh
    layers are one finding naming six layers); the episode ends when no site is
    affected on a sampled step. Each activation is judged by its own derivative
    (:mod:`gradwatch.activation_fns`): ``dead`` (ReLU family and GELU/SiLU/Mish:
    units flat for every example), ``saturated`` (sigmoid/tanh: outputs in the flat
    tails) and ``flat`` (GELU/SiLU/Mish: inputs where ``|f'|`` is flat; about half
    of them may be, as for ReLU, so only ``SMOOTH_FLAT_SHARE`` counts).
    """

    CODES = ("dead_relu", "saturated_activations")

    def __init__(self) -> None:
        self.episodes: dict[str, Episode] = {code: Episode(quiet=1) for code in self.CODES}

    @staticmethod
    def _hits(activations: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, dict[str, Any], float]]]:
        hits: dict[str, list[tuple[str, dict[str, Any], float]]] = {code: [] for code in ActivationRule.CODES}
        for site, stats in activations.items():
            for key, code, limit in (("dead", "dead_relu", DEAD_SHARE), ("saturated", "saturated_activations", SATURATED_SHARE),
                                     ("flat", "saturated_activations", SMOOTH_FLAT_SHARE)):
                share = stats.get(key)
                if share is not None and math.isfinite(share) and share >= limit:
                    hits[code].append((site, stats, share))
        return hits

    def check(self, inp: RuleInput) -> list[Finding]:
        if not inp.sampled_now or inp.sample is None or not inp.record.finite:  # a NaN forward says nothing of units
            return []
        out: list[Finding] = []
        for code, sites in self._hits(inp.sample.activations).items():
            if self.episodes[code].update(bool(sites)) and sites:
                out.append(self._finding(code, inp.step, sites))
        return out

    @staticmethod
    def _finding(code: str, step: int, sites: list[tuple[str, dict[str, Any], float]]) -> Finding:
        labels = [stats.get("label", site) for site, stats, _ in sites]
        shares = [share for _, _, share in sites]
        worst = max(range(len(sites)), key=lambda k: shares[k])
        listed = "; ".join(f"{label} ({share:.0%})" for label, share in zip(labels, shares))
        kinds = sorted({stats["kind"] for _, stats, _ in sites})
        where = f"{len(sites)} activation layers" if len(sites) > 1 else "1 activation layer"
        # layers the fixes act on: the layer each activation follows (else the site itself)
        before = [stats.get("after") or site for site, stats, _ in sites]
        evidence: dict[str, Any] = {"layers": dict(zip(labels, shares)), "sites": [s for s, _, _ in sites],
                                    "kinds": kinds}
        if code == "dead_relu":
            message = (f"In {where}, most units pass no gradient for every example in the batch (their "
                       f"derivative is zero, or below 10% of its maximum): {listed}. They no longer learn.")
            relu_only = all(ACTIVATIONS[k].family == "relu" for k in kinds)
            fixes = [f"use LeakyReLU(0.01) or GELU at {_span(labels)}"] if relu_only else [
                f"normalize the inputs of {_span(labels)} (LayerNorm before them)"]
            fixes += ["lower the learning rate (large updates kill units)",
                      f"kaiming_normal_ init and zero biases for {_span(before)}"]
            evidence.update(dead_share=shares[worst], units=sites[worst][1].get("units"),
                            examples=sites[worst][1].get("examples"), threshold=DEAD_SHARE)
        else:
            message = (f"In {where}, most values sit where the activation's derivative is below 10% of its maximum "
                       f"(its flat region), so little gradient passes: {listed}.")
            fixes = [f"normalize the inputs of {_span(labels)} (LayerNorm/BatchNorm before them)",
                     f"xavier_normal_ init for {_span(before)}"]
            if set(kinds) & {"sigmoid", "tanh"}:
                fixes.append("use ReLU/GELU instead of sigmoid/tanh between layers")
            evidence.update(saturated_share=shares[worst], kind=sites[worst][1]["kind"],
                            threshold=SMOOTH_FLAT_SHARE if "flat" in sites[worst][1] and "saturated" not in sites[worst][1]
                            else SATURATED_SHARE)
        location = {"module": sites[0][0], "modules": [s for s, _, _ in sites]}
        return Finding(code, "warning", step, message, evidence=evidence, location=location, fixes=fixes)
