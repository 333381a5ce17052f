"""Robust statistics for streaming rules: a median/MAD baseline that NaN and inf never enter.

A loss spike is judged against the *median* of recent values and their *median
absolute deviation* (MAD), not their mean and standard deviation: one NaN makes
a mean NaN forever, one spike inflates a standard deviation for a whole window
(prior tools lose all detection after one NaN). Here non-finite values are
dropped before the baseline is computed, and a spike moves a median by at most
one rank.

Pure functions: sequences of floats in, floats out.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: MAD of a normal distribution is 0.6745 sigma: scale it to estimate sigma.
MAD_TO_SIGMA = 1.4826


def finite_values(values: Sequence[float]) -> np.ndarray:
    """The finite entries of ``values`` as a float64 array (NaN and +-inf dropped).

    Example:
        >>> finite_values([1.0, float("nan"), 3.0, float("inf")]).tolist()
        [1.0, 3.0]
    """
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]


def median_mad(values: Sequence[float]) -> tuple[float, float]:
    """Median and median absolute deviation of the finite entries (NaN, NaN if none).

    Example:
        >>> median_mad([1.0, 2.0, 3.0, 100.0, float("nan")])
        (2.5, 1.0)
    """
    array = finite_values(values)
    if array.size == 0:
        return math.nan, math.nan
    median = float(np.median(array))
    return median, float(np.median(np.abs(array - median)))


def robust_zscore(history: Sequence[float], value: float) -> float:
    """How many robust standard deviations ``value`` lies above the baseline of ``history``.

    ``(value - median) / (1.4826 * MAD)`` over the *finite* entries of
    ``history`` only: NaN and inf never enter the baseline. A MAD of zero (a
    constant history) is floored at ``1e-6 * max(|median|, 1e-12)`` so that any
    real departure gives a large, finite score.

    Args:
        history: recent values (may contain NaN/inf, which are ignored).
        value: the new value to score.

    Returns:
        the robust z-score: positive above the median, negative below; NaN when
        ``value`` is NaN or ``history`` holds no finite value; +-inf when
        ``value`` is +-inf.

    Example:
        >>> robust_zscore([1.0, 1.1, 0.9, 1.0, float("nan"), 50.0], 1.0)
        0.0
        >>> robust_zscore([1.0, 1.1, 0.9, 1.0, float("nan"), 50.0], 10.0) > 20
        True
    """
    value = float(value)
    if math.isnan(value):
        return math.nan
    median, mad = median_mad(history)
    if math.isnan(median):
        return math.nan
    if math.isinf(value):
        return value
    scale = max(MAD_TO_SIGMA * mad, 1e-6 * max(abs(median), 1e-12))
    return (value - median) / scale


class EarlyLevel:
    """The typical size of a signal early in the run: the median ``|x|`` of its first ``n`` finite values.

    Spike rules compare a jump with it: a converged loss that sits at 0 and
    blips to 3.7e-9 has a MAD of 0 (so a huge robust z-score) and an undefined
    ratio, yet moved by a billionth of where the run started. Fixed once ``n``
    finite values were seen (None before).

    Args:
        n: finite values that set the level. Default: 20.

    Example:
        >>> early = EarlyLevel(n=3)
        >>> for v in (2.3, float("nan"), -2.1, 2.5, 0.0):
        ...     early.observe(v)
        >>> early.level, early.floor(0.01)
        (2.3, 0.023)
    """

    PERSIST = True  # plain attributes: gradwatch.persist saves and restores them

    def __init__(self, n: int = 20) -> None:
        self.n = n
        self.level: float | None = None
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        """Feed one value (non-finite ones are ignored; nothing changes once the level is set)."""
        if self.level is None and math.isfinite(value):
            self.values.append(abs(float(value)))
            if len(self.values) >= self.n:
                self.level = float(np.median(self.values))
                self.values = []

    def floor(self, share: float) -> float:
        """``share`` times the level: the smallest jump that counts (0 while the level is unknown or 0)."""
        return share * self.level if self.level else 0.0

    def state_dict(self) -> dict[str, object]:
        return {"n": self.n, "level": self.level, "values": list(self.values)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.n = int(state.get("n", self.n))  # type: ignore[arg-type]
        level = state.get("level")
        self.level = None if level is None else float(level)  # type: ignore[arg-type]
        self.values = [float(v) for v in state.get("values", [])]  # type: ignore[union-attr]
