"""Patterns in the sequence of global gradient norms: bad initialization vs too-high learning rate.

Both end in huge or non-finite gradients; they differ in *when* the norm is
huge:

- ``init_scale_too_large``: the very first step, before any update has
  happened, is already huge (or non-finite). Nothing the optimizer did can be
  the cause: the weights as initialized amplify the signal.
- ``lr_too_high``: the first steps were sane, then the norm grows step over
  step *after updates* until it is non-finite or has grown by orders of
  magnitude. Each update overshoots and makes the next gradient larger.

Thresholds (see docs/diagnosis.md for the reasoning):

- ``HUGE_FIRST_NORM = 1e3``: a well-initialized network with a standard loss
  (cross-entropy, MSE on normalized targets) has a first global gradient norm
  of order 0.1-10; 1e3 is two orders of magnitude above the largest of these.
- ``NONFINITE_GROWTH = 10``: a run of at least ``MIN_RISES`` consecutive
  increases that grew tenfold and then ended in inf/NaN is divergence; a NaN
  after a flat norm is a numerics bug (log(0), sqrt at 0), not this pattern.
- ``DIVERGED_GROWTH = 1e3``: without a non-finite value yet, a run of
  consecutive increases must have grown a thousandfold, and to a value
  ``DIVERGED_GROWTH`` times the first step's norm, to count: healthy warm-up
  (a zero-initialized head) rarely grows the norm more than 10-100x.

Pure functions: floats in, a code or None out.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

HUGE_FIRST_NORM = 1e3
NONFINITE_GROWTH = 10.0
DIVERGED_GROWTH = 1e3
MIN_RISES = 2

Pattern = Literal["init_scale_too_large", "lr_too_high"]


def _rising_run(norms: Sequence[float]) -> tuple[int, float, float]:
    """Trailing run of strict increases: (number of rises, value at its start, last value).

    A non-finite last value counts as one more rise.
    """
    n = len(norms)
    if n < 2:
        return 0, norms[0] if norms else math.nan, norms[-1] if norms else math.nan
    last = norms[-1]
    i = n - 1
    rises = 0
    if not math.isfinite(last):
        rises = 1
        i = n - 2
    while i > 0 and math.isfinite(norms[i - 1]) and math.isfinite(norms[i]) and norms[i] > norms[i - 1]:
        rises += 1
        i -= 1
    return rises, norms[i], last


def norm_pattern(grad_norms: Sequence[float], skipped: Sequence[bool] | None = None) -> Pattern | None:
    """Classify the pre-clip global gradient norms of steps 1..N.

    Args:
        grad_norms: pre-clip global norms of steps 1, 2, ..., N in order
            (``grad_norms[0]`` must be step 1, before any update); the last may be
            non-finite.
        skipped: per step, whether the update was not applied. Skipped steps
            other than the last are left out of the growth run (no update
            followed them), but step 1 is always step 1. Default: none skipped.

    Returns:
        ``"init_scale_too_large"`` if step 1 is non-finite or above
        ``HUGE_FIRST_NORM``; ``"lr_too_high"`` if step 1 was sane and the norm
        then rose step over step (at least ``MIN_RISES`` rises) until it was
        non-finite after growing ``NONFINITE_GROWTH``-fold, or grew
        ``DIVERGED_GROWTH``-fold while finite; else None.

    Raises:
        ValueError: ``skipped`` has a different length than ``grad_norms``.

    Example:
        >>> norm_pattern([3e5, float("inf")])
        'init_scale_too_large'
        >>> norm_pattern([1.2, 1.0, 4.0, 40.0, 900.0, float("inf")])
        'lr_too_high'
        >>> norm_pattern([1.2, 1.0, 1.1, 0.9, float("nan")]) is None
        True
    """
    norms = [float(v) for v in grad_norms]
    if skipped is not None:
        flags = [bool(s) for s in skipped]
        if len(flags) != len(norms):
            raise ValueError(
                f"skipped has {len(flags)} entries but grad_norms has {len(norms)}; pass one flag per step"
            )
    else:
        flags = [False] * len(norms)
    if not norms:
        return None
    first = norms[0]
    if not math.isfinite(first) or first > HUGE_FIRST_NORM:
        return "init_scale_too_large"
    # Steps whose update was skipped did not move the weights: drop them (but keep step 1 and the last).
    kept = [v for i, (v, s) in enumerate(zip(norms, flags)) if i == 0 or i == len(norms) - 1 or not s]
    rises, start, last = _rising_run(kept)
    if rises < MIN_RISES or not start > 0:
        return None
    if not math.isfinite(last):
        before = kept[-2]  # the last finite value of the run
        return "lr_too_high" if before / start >= NONFINITE_GROWTH else None
    if last / start >= DIVERGED_GROWTH and last / max(first, 1e-30) >= DIVERGED_GROWTH:
        return "lr_too_high"
    return None
