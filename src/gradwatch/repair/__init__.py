"""Repair: keep a failing run alive (issue 10).

- :class:`SpikeSkip` (``Watch(on_spike="skip")``): skip a step whose loss or
  gradient norm is a robust outlier; report it as ``loss_spike``.
- :class:`LRBackoff` (on with ``on_spike="skip"`` or ``on_nonfinite="rollback"``,
  or ``lr_backoff=0.5``): after k lost steps within a window, lower the lr and
  say so (``lr_too_high``).
- The adaptive clippers (``clip_norm="autoclip"``, ``"zclip"``, ``gradwatch.AGC``)
  live in :mod:`gradwatch.clipping`; AGC's hooks that find the final classifier
  are armed here.

The Watch makes these plugins from its keywords and ``RepairConfig`` (see
:func:`gradwatch.defaults.default_plugins`).
"""

from __future__ import annotations

from ..clipping import AGC
from ..plugins import WatchPlugin, WatchView
from .backoff import LRBackoff, scale_lr_
from .spike import ON_SPIKE, SpikeDetector, SpikeSkip

__all__ = ["AGCTracker", "LRBackoff", "SpikeDetector", "SpikeSkip", "scale_lr_"]

class AGCTracker(WatchPlugin):
    """Arms AGC's forward hooks (which Linear runs last) until its first clip; removes them on close."""

    name = "agc_tracker"

    def __init__(self, agc: AGC) -> None:
        self.agc = agc

    def attach(self, view: WatchView) -> None:
        super().attach(view)
        self.agc.track(view.layers.model)

    def close(self) -> None:
        self.agc.untrack()
