"""Findings from a probe's numbers (pure: a Probe in, Findings out).

Thresholds (module constants, each with its reason):

- ``vanishing_gradients`` when the predicted end-to-end gain is below 0.1 (the
  first block gets a tenth of the gradient: info), below 1e-2 (a hundredth:
  warning) or below 1e-3 (error: the first layers will barely move at any usable
  learning rate). Between 0.1 and 1e-2 it is only info: a 4-layer GELU MLP with
  PyTorch's default init predicts ~0.03 and trains well (the fault benchmark's
  healthy runs), while a 30-layer tanh net at 0.015 trains clearly worse than
  after the fix (tests/test_init.py) - depth, not the number alone, decides;
- ``exploding_gradients`` symmetrically above 10 / 1e2 / 1e3;
- ``missing_normalization`` with either of those, when a stack of at least 4
  blocks has no normalization layer (info when the flow finding is info);
- ``init_scale_too_large`` when a weight's std is more than 3x the larger of its
  Kaiming and Xavier expectations;
- ``dead_relu`` when more than half of a ReLU layer's units are <= 0 for every
  example (GELU/SiLU/Mish: their derivative is below 10% of its maximum for every
  example); ``saturated_activations`` when more than half of a sigmoid/tanh
  layer's values have a derivative below 10% of its maximum. Activations are
  judged whole (gradwatch.activation_fns): the tanh inside a tanh-approximated
  GELU is not a tanh layer.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from .. import theory
from ..findings import Finding

if TYPE_CHECKING:
    from .result import LayerRow, Probe

VANISH_INFO, VANISH_WARN, VANISH_ERROR = 0.1, 1e-2, 1e-3
EXPLODE_INFO, EXPLODE_WARN, EXPLODE_ERROR = 10.0, 1e2, 1e3
MIN_BLOCKS_FOR_NORM = 4
INIT_RATIO_MAX = 3.0
DEAD_MAX = 0.5
SATURATED_MAX = 0.5
STEP = 0  # probe findings are about step 0, before any update


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"


def dominant_activation(rows: "list[LayerRow]") -> str | None:
    """The most common nonlinearity after the layers (None when there is none)."""
    counts = Counter(r.activation for r in rows if r.activation is not None)
    return counts.most_common(1)[0][0] if counts else None


def _fixes(direction: str, act: str | None, has_norm: bool) -> list[str]:
    fixes: list[str] = []
    if direction == "vanishing":
        if act in ("relu", "leaky_relu", "gelu", "silu", "elu", "mish", "softplus"):
            fixes.append("gradwatch.init.kaiming_(model)  # He init, σw² = 2: χ1 = 1 for ReLU")
        elif act == "tanh":
            fixes.append("gradwatch.init.orthogonal_(model, gain='critical')  # orthogonal weights at the edge of chaos (χ1 = 1)")
            fixes.append("gradwatch.init.kaiming_(model, gain='critical')  # Gaussian weights with the critical σw²")
        elif act == "sigmoid":
            fixes.append("replace nn.Sigmoid with nn.Tanh or nn.ReLU between layers (sigmoid' <= 0.25, so χ1 = 0.056 at Xavier init)")
        else:
            fixes.append("gradwatch.init.orthogonal_(model)  # norm-preserving weights")
        if not has_norm and act == "sigmoid":
            fixes.append("add nn.LayerNorm after each nn.Sigmoid (it removes the 0.5 mean that otherwise sets the next layer's scale)")
        elif not has_norm:
            fixes.append("add nn.LayerNorm before each nonlinearity (or nn.BatchNorm for convolutions)")
        fixes.append("add residual connections (x + f(x)) so the gradient has a path around each block")
    else:
        fixes.append("gradwatch.init.xavier_(model)  # smaller, fan-balanced weights")
        if act == "tanh":
            fixes.append("gradwatch.init.orthogonal_(model, gain='critical')  # χ1 = 1 instead of > 1")
        if not has_norm:
            fixes.append("add nn.LayerNorm in each block")
        fixes.append("clip gradients: gradwatch.Watch(model, optimizer, clip_norm=1.0)")
    return fixes


def diagnose(probe: "Probe") -> list[Finding]:
    """All findings of one probe, most important first."""
    findings: list[Finding] = []
    rows = probe.layers
    act = dominant_activation(rows)
    has_norm = any(b.norm != "none" for b in probe.blocks)
    gains = probe.block_gains
    if len(gains) >= 2 and probe.predicted_gain is not None:
        predicted, basis, n = probe.predicted_gain, "predicted from the blocks' Jacobians", len(gains)
    elif probe.layer_gain is not None:
        predicted, basis, n = probe.layer_gain, "measured across layers", sum(1 for r in rows if r.act_grad_norm)
    else:
        predicted, basis, n = None, "", 0
    flow = None
    if predicted is not None and math.isfinite(predicted) and predicted > 0 and n >= 2:
        per_layer = predicted ** (1.0 / n)
        evidence = {
            "predicted_gain": predicted,
            "measured_gain": probe.measured_gain,
            "effective_per_layer_gain": per_layer,
            "blocks": n,
            "block_gains": gains,
            "activation": act,
            "theory_per_layer_gain": probe.theory_factor,
        }
        where = {"module": _span([b.name for b in probe.blocks]) if probe.blocks else _span([r.name for r in rows])}
        if predicted < VANISH_INFO:
            flow = "vanishing"
            severity = "error" if predicted < VANISH_ERROR else ("warning" if predicted < VANISH_WARN else "info")
            msg = (f"Gradients will vanish: each of {n} blocks scales the gradient by {per_layer:.3g} on average, "
                   f"so the first block gets {predicted:.2g} of the gradient at the last ({basis}).")
            findings.append(Finding("vanishing_gradients", severity, STEP, msg, evidence, where, _fixes("vanishing", act, has_norm)))
        elif predicted > EXPLODE_INFO:
            flow = "exploding"
            severity = "error" if predicted > EXPLODE_ERROR else ("warning" if predicted > EXPLODE_WARN else "info")
            msg = (f"Gradients will explode: each of {n} blocks scales the gradient by {per_layer:.3g} on average, "
                   f"so the first block gets {predicted:.3g}x the gradient at the last ({basis}).")
            findings.append(Finding("exploding_gradients", severity, STEP, msg, evidence, where, _fixes("exploding", act, has_norm)))
    if flow is not None and not has_norm and len(probe.blocks) >= MIN_BLOCKS_FOR_NORM:
        findings.append(Finding(
            "missing_normalization", "info" if severity == "info" else "warning", STEP,
            f"None of the {len(probe.blocks)} blocks has a normalization layer, and the probe predicts {flow} gradients.",
            {"blocks": len(probe.blocks), "predicted_gain": predicted},
            {"module": _span([b.name for b in probe.blocks])},
            ["add nn.LayerNorm before each nonlinearity (pre-norm), or nn.BatchNorm after each convolution"],
        ))
    big = [r for r in rows if r.init_ratio is not None and r.init_ratio > INIT_RATIO_MAX]
    if big:
        worst = max(big, key=lambda r: r.init_ratio or 0.0)
        findings.append(Finding(
            "init_scale_too_large", "warning", STEP,
            f"{len(big)} layer(s) have weights far above their fan-in scale: {worst.name} has std {worst.weight_std:.3g}, "
            f"{worst.init_ratio:.1f}x the Kaiming/Xavier expectation {max(worst.kaiming_std or 0, worst.xavier_std or 0):.3g} "
            f"for {worst.gain_for}.",
            {"layers": [r.name for r in big], "worst_ratio": worst.init_ratio, "weight_std": worst.weight_std,
             "kaiming_std": worst.kaiming_std, "xavier_std": worst.xavier_std},
            {"module": worst.name},
            [f"gradwatch.init.kaiming_(model)  # std = gain/sqrt(fan_in) on {_span([r.name for r in big])}",
             "gradwatch.init.lsuv_(model, batch)  # data-driven unit-variance init"],
        ))
    dead = [r for r in rows if r.dead_fraction is not None and r.dead_fraction > DEAD_MAX]
    if dead:
        worst = max(dead, key=lambda r: r.dead_fraction or 0.0)
        findings.append(Finding(
            "dead_relu", "warning", STEP,
            f"{worst.dead_fraction:.0%} of the {worst.activation} units after {worst.name} pass no gradient for any "
            "example in the batch (output zero, or derivative below 10% of its maximum)"
            + (f" ({len(dead)} layers above {DEAD_MAX:.0%})." if len(dead) > 1 else "."),
            {"layers": {r.name: r.dead_fraction for r in dead}},
            {"module": worst.name},
            ["gradwatch.init.kaiming_(model)  # and zero biases, so pre-activations are centred",
             "use nn.LeakyReLU(0.01) or nn.GELU instead of ReLU", "lower a large negative bias init"],
        ))
    sat = [r for r in rows if r.saturated_fraction is not None and r.saturated_fraction > SATURATED_MAX]
    if sat:
        worst = max(sat, key=lambda r: r.saturated_fraction or 0.0)
        findings.append(Finding(
            "saturated_activations", "warning", STEP,
            f"{worst.saturated_fraction:.0%} of the {worst.activation} values after {worst.name} sit in the flat tails"
            + (f" ({len(sat)} layers above {SATURATED_MAX:.0%})." if len(sat) > 1 else "."),
            {"layers": {r.name: r.saturated_fraction for r in sat}},
            {"module": worst.name},
            ["gradwatch.init.xavier_(model)  # smaller weights keep pre-activations in the linear range",
             "add nn.LayerNorm before the nonlinearity", "gradwatch.init.lsuv_(model, batch)"],
        ))
    return findings


def critical_gain(activation: str, sigma_b2: float = 0.0) -> float:
    """√(critical σw²) for an activation: the init gain at the edge of chaos (χ1 = 1).

    Example:
        >>> round(critical_gain("relu") ** 2, 6)
        2.0
    """
    return math.sqrt(theory.critical_sigma_w2(activation, sigma_b2))
