"""Clipping strategies: which threshold applies on this step.

A clipper answers one question per step, ``threshold()``: the max norm to clip
to (None: measure only), and learns from ``observe(grad_norm)`` after the step.
Non-finite norms never enter any statistic.
"""

from __future__ import annotations

import math
from typing import Any


class NoClip:
    """Measure only, never clip."""

    name = "none"

    def threshold(self) -> float | None:
        return None

    def observe(self, grad_norm: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedClip(NoClip):
    """Clip the global norm to a fixed ``max_norm`` (torch.nn.utils.clip_grad_norm_'s rule)."""

    name = "fixed"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)

    def threshold(self) -> float | None:
        return self.max_norm


def make_clipper(clip_norm: Any) -> NoClip:
    """Build the clipper for ``Watch(clip_norm=...)``.

    Args:
        clip_norm: None (measure only) or a positive finite float.

    Raises:
        ValueError / TypeError: for a negative, zero, non-finite or unknown value.

    Example:
        >>> make_clipper(1.0).threshold(), make_clipper(None).threshold()
        (1.0, None)
    """
    if clip_norm is None:
        return NoClip()
    if isinstance(clip_norm, NoClip):
        return clip_norm
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)):
        raise TypeError(f"clip_norm must be None or a positive float, got {clip_norm!r}")
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ValueError(f"clip_norm must be a positive finite float (or None to measure only), got {clip_norm!r}")
    return FixedClip(float(clip_norm))
