"""The gradient-by-depth curve: fit log(RMS) against depth, read off the effective per-layer gain.

Backpropagation multiplies one Jacobian per layer, so the typical gradient at
depth ``d`` of an ``n``-layer stack scales like ``sigma ** (n - 1 - d)``: a
straight line in ``log(rms)`` against ``d``. The least-squares slope ``b`` of
that line gives the *effective per-layer gain* ``sigma = exp(-b)``: the factor
by which each layer multiplies the gradient on its way back towards the input
(below 1: vanishing; above 1: exploding). Over the whole stack the fitted
attenuation is ``sigma ** (n - 1)``; the measured first/last ratio is reported
next to it.

RMS (``norm / sqrt(numel)``), not the norm, so that layers of different sizes
compare. Pure functions: arrays in, numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class DepthFit:
    """A fitted gradient-by-depth curve.

    Attributes:
        gain: effective per-layer gain ``exp(-slope)`` (gradient factor per layer, going backward).
        slope: slope of ``ln(rms)`` against depth index.
        total: fitted gain over the stack, ``gain ** (n - 1)`` (first layer relative to last).
        first_last_ratio: measured ``rms[first] / rms[last]``.
        r2: coefficient of determination of the line (1: a perfect exponential).
        n: number of layers in the fit.
        rms: the per-layer RMS values used (depth order).
    """

    gain: float
    slope: float
    total: float
    first_last_ratio: float
    r2: float
    n: int
    rms: list[float] = field(default_factory=list)


def rms_from_norms(norms: Sequence[float], numel: Sequence[int] | Sequence[float]) -> np.ndarray:
    """Per-layer RMS ``norm / sqrt(numel)`` (NaN where numel < 1).

    Example:
        >>> rms_from_norms([2.0, 3.0], [4, 9]).tolist()
        [1.0, 1.0]
    """
    norms_a = np.asarray(norms, dtype=np.float64)
    numel_a = np.asarray(numel, dtype=np.float64)
    if norms_a.shape != numel_a.shape:
        raise ValueError(f"norms has shape {norms_a.shape} but numel has shape {numel_a.shape}; pass one count per layer")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(numel_a >= 1, norms_a / np.sqrt(np.maximum(numel_a, 1.0)), np.nan)


def fit_depth_curve(rms: Sequence[float], min_layers: int = 3) -> DepthFit | None:
    """Fit ``ln(rms)`` against depth (0 = first layer) by least squares.

    Layers with a non-finite or non-positive RMS (no gradient, dead) are left
    out of the fit; their depth index keeps its place.

    Args:
        rms: per-layer gradient RMS in depth order.
        min_layers: fewest usable layers for a fit. Default: 3.

    Returns:
        a :class:`DepthFit`, or None with fewer than ``min_layers`` usable layers.

    Example:
        >>> fit = fit_depth_curve([0.25 ** 4, 0.25 ** 3, 0.25 ** 2, 0.25, 1.0])
        >>> round(fit.gain, 6), round(fit.total, 8), round(fit.r2, 6)
        (0.25, 0.00390625, 1.0)
    """
    # Plain Python: a fit runs every few dozen steps on a handful of numbers, inside the training
    # loop, where numpy's per-call cost (with caches cold from the training step) dominates.
    values = [float(v) for v in (rms.reshape(-1).tolist() if isinstance(rms, np.ndarray) else rms)]
    xs: list[float] = []
    ys: list[float] = []
    for depth, value in enumerate(values):
        if 0.0 < value < math.inf:  # NaN fails both comparisons
            xs.append(float(depth))
            ys.append(math.log(value))
    n = len(xs)
    if n < max(2, min_layers):
        return None
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sxy = syy = 0.0  # centred sums, one pass
    for x, y in zip(xs, ys):
        dx, dy = x - mean_x, y - mean_y
        sxx += dx * dx
        sxy += dx * dy
        syy += dy * dy
    slope = sxy / sxx
    ss_res = max(0.0, syy - slope * sxy)  # sum of squared residuals of the least-squares line
    r2 = 1.0 - ss_res / syy if syy > 0 else 1.0
    span = xs[-1] - xs[0]
    first_last = math.exp(ys[0] - ys[-1])
    return DepthFit(gain=math.exp(-slope), slope=slope, total=math.exp(-slope * span), first_last_ratio=first_last,
                    r2=r2, n=n, rms=values)


def column_geometric_medians(columns: Sequence[Sequence[float]]) -> list[float]:
    """Per column, ``exp(median(ln v))`` over its finite positive values (NaN for none); plain Python.

    The same numbers as :func:`window_log_median` on the transposed array: the
    median of the logs is the log of the middle value, or of the geometric mean
    of the two middle values.

    Example:
        >>> column_geometric_medians([[1.0, 100.0, 1.0], [10.0, 10.0, float("nan")], [-1.0, 0.0]])
        [1.0, 10.0, nan]
    """
    out = []
    for column in columns:
        ordered = sorted(v for v in column if 0 < v < math.inf)
        half = len(ordered) // 2
        if not ordered:
            out.append(math.nan)
        elif len(ordered) % 2:
            out.append(ordered[half])
        else:
            out.append(math.sqrt(ordered[half - 1] * ordered[half]))
    return out


def window_log_median(rows: np.ndarray) -> np.ndarray:
    """Per-layer geometric median over steps: ``exp(median(ln rows))`` over finite positive entries.

    One sort of the window when every entry is finite and positive (the usual
    window: a handful of numpy calls), else :func:`column_geometric_medians`.

    Args:
        rows: steps x layers array of RMS values.

    Example:
        >>> window_log_median(np.array([[1.0, 10.0], [100.0, 10.0], [1.0, float("nan")]])).round(6).tolist()
        [1.0, 10.0]
    """
    rows = np.asarray(rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        return np.full(rows.shape[-1] if rows.ndim else 0, np.nan)
    ordered = np.sort(rows, axis=0)
    if min(ordered[0].tolist()) > 0 and all(v < math.inf for v in ordered[-1].tolist()):  # all finite, > 0 (NaN sorts last)
        half = ordered.shape[0] // 2
        return ordered[half].copy() if ordered.shape[0] % 2 else np.sqrt(ordered[half - 1] * ordered[half])
    return np.array(column_geometric_medians(rows.T.tolist()))  # some entries left out: column by column
