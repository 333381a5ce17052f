"""A loss that trends up after updates: the streaming test behind ``lr_too_high``'s loss signal.

A single 10x jump is a ``loss_spike``; a learning rate far too high more often
shows as a loss that *climbs*: GPT-2 with Adam at lr 1.0 goes 4.6 -> 51 -> 58
-> 81 -> ... -> 150 in 40 steps, no jump reaching 10x and the gradient norm
growing only 70x. :class:`LossTrend` keeps the last ``TREND_WINDOW`` finite
losses and the best level the run has reached, and reports a rise when

- the median of the last ``TREND_WINDOW`` losses is at least ``TREND_RATIO``
  times the run's starting level, the median of its first full window (never
  one step's loss: a lucky first batch at a third of the usual loss is common
  on noisy data; and not the lowest window so far either: on small noisy
  batches the lowest of hundreds of window medians sits far below the usual
  level, and a ratio to it fired on 85 of 200 simulated pure-noise runs at 3x,
  against 2 of 200 for the starting level): at least 5 of the last 8
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
TREND_RATIO = 3.0  # the recent median is 3x the starting level (healthy controls: < 1.3, see benchmarks/divergence.py)
TREND_MIN_RISE = 0.25  # ... and above it by a quarter of the first loss


@record_class
class LossTrend:
    """Streaming test for a loss that climbs over a window (see the module docstring).

    Example:
        >>> trend = LossTrend()
        >>> [trend.observe(v) for v in [4.6, 4.5, 4.4, 4.5, 4.3, 4.4, 4.2, 4.3, 4.1]][-1]
        False
        >>> rising = LossTrend()
        >>> [rising.observe(v) for v in [4.6, 51, 58, 81, 85, 93, 103, 112, 150, 200, 250, 300, 350]][-1]
        False
        >>> [rising.observe(v) for v in [400, 450]][-1]  # the median of the last 8 reaches 3x the start
        True
        >>> rising.recent_median, rising.best
        (275.0, 83.0)
        >>> lucky = LossTrend()  # a lucky first batch, then the usual noise: no trend
        >>> any(lucky.observe(v) for v in [0.26, 0.97, 1.11, 0.9, 0.34, 0.64, 1.09, 0.83, 1.51, 1.05, 0.46])
        False
    """

    def __init__(self) -> None:
        self.window: deque[float] = deque(maxlen=TREND_WINDOW)
        self.first: float | None = None  # the first finite loss (step 1: before any update)
        self.best = math.inf  # the starting level: the median of the first full window
        self.recent_median = math.nan
        self.rising = False

    def observe(self, loss: float) -> bool:
        """Take the loss of one step (non-finite ones are ignored); True while the loss trends up."""
        if not math.isfinite(loss):
            return self.rising
        if self.first is None:
            self.first = float(loss)
        self.window.append(float(loss))
        if len(self.window) < TREND_WINDOW:
            return self.rising
        ordered = sorted(self.window)
        half = TREND_WINDOW // 2
        median = ordered[half] if TREND_WINDOW % 2 else 0.5 * (ordered[half - 1] + ordered[half])
        self.recent_median = median
        if self.best == math.inf:  # the first full window sets the starting level: no trend on that step
            self.best = median
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
