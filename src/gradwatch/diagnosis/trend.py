"""A loss that trends up after updates: the streaming test behind ``lr_too_high``'s loss signal.

A single 10x jump is a ``loss_spike``; a learning rate far too high more often
shows as a loss that *climbs*: GPT-2 with Adam at lr 1.0 goes 4.6 -> 51 -> 58
-> 81 -> ... -> 150 in 40 steps, no jump reaching 10x and the gradient norm
growing only 70x. :class:`LossTrend` keeps the last ``TREND_WINDOW`` finite
losses and the best level the run has reached, and reports a rise when

- the median of the last ``TREND_WINDOW`` losses is at least ``TREND_RATIO``
  times the best level so far (the lowest median of any earlier window, or
  the loss of step 1, measured before any update): at least 5 of the last 8
  steps sit there, so a loss that rises for a step or two, and the batch noise
  of a healthy run, move it by at most a rank or two;
- and it rose above that best level by at least ``TREND_MIN_RISE`` of the
  run's first loss: a converged loss at 0.01 drifting to 0.03 tripled, but
  moved by a hundredth of where the run started, and is no divergence.

Losses that are zero or negative at their best (an ELBO, a reward) have no
ratio: there the rise alone must be at least the first loss's magnitude.

Cost: one sort of ``TREND_WINDOW`` floats a step, on the host.
"""

from __future__ import annotations

import math
from collections import deque

from ..persist import record_class

TREND_WINDOW = 8  # steps in the recent window (its median ignores 3 odd steps)
TREND_RATIO = 2.0  # the recent median is twice the best level (healthy controls: < 1.3, see benchmarks/divergence.py)
TREND_MIN_RISE = 0.25  # ... and above it by a quarter of the first loss


@record_class
class LossTrend:
    """Streaming test for a loss that climbs over a window (see the module docstring).

    Example:
        >>> trend = LossTrend()
        >>> [trend.observe(v) for v in [4.6, 4.5, 4.4, 4.5, 4.3, 4.4, 4.2, 4.3, 4.1]][-1]
        False
        >>> rising = LossTrend()
        >>> [rising.observe(v) for v in [4.6, 51, 58, 81, 85, 93, 103, 112, 113]][-1]
        True
        >>> rising.recent_median, rising.best
        (89.0, 4.6)
    """

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=TREND_WINDOW)
        self.first: float | None = None  # the first finite loss (step 1: before any update)
        self.best = math.inf  # the lowest level reached: the first loss, or a window's median
        self.recent_median = math.nan
        self.rising = False

    def observe(self, loss: float) -> bool:
        """Take the loss of one step (non-finite ones are ignored); True while the loss trends up."""
        if not math.isfinite(loss):
            return self.rising
        if self.first is None:
            self.first = self.best = float(loss)
        self.window.append(float(loss))
        if len(self.window) < TREND_WINDOW:
            return self.rising
        ordered = sorted(self.window)
        half = TREND_WINDOW // 2
        median = ordered[half] if TREND_WINDOW % 2 else 0.5 * (ordered[half - 1] + ordered[half])
        self.recent_median = median
        self.best = min(self.best, median)
        rise = median - self.best
        scale = abs(self.first)
        if self.best > 0:
            self.rising = median >= TREND_RATIO * self.best and rise >= TREND_MIN_RISE * scale
        else:
            self.rising = scale > 0 and rise >= scale
        return self.rising

    def losses(self) -> list[float]:
        """The losses of the recent window, oldest first."""
        return list(self.window)
