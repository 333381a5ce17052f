"""Repair: keep a failing run alive (issue 10).

- :class:`SpikeSkip` (``Watch(on_spike="skip")``): skip a step whose loss or
  gradient norm is a robust outlier; report it as ``loss_spike``.
- :class:`LRBackoff` (on with ``on_spike="skip"`` or ``on_nonfinite="rollback"``,
  or ``lr_backoff=0.5``): after k lost steps within a window, lower the lr and
  say so (``lr_too_high``).
- The adaptive clippers (``clip_norm="auto"``, ``"zclip"``, ``gradwatch.AGC``)
  live in :mod:`gradwatch.clipping`; AGC's hooks that find the final classifier
  are armed here.

Importing this module registers the default plugin factories with the Watch;
each pops and validates its own keyword options.
"""

from __future__ import annotations

from typing import Any

from ..clipping import AGC
from ..plugins import WatchPlugin
from ..watch import Watch, register_default_plugin
from .backoff import LRBackoff, scale_lr_
from .spike import ON_SPIKE, SpikeDetector, SpikeSkip

__all__ = ["LRBackoff", "SpikeDetector", "SpikeSkip", "scale_lr_"]

_UNSET: Any = object()


@register_default_plugin(always=True)
def _make_spike_skip(watch: Watch) -> SpikeSkip | None:
    on_spike = watch.options.pop("on_spike", None)
    tuning = {
        key: watch.options.pop(f"spike_{key}", _UNSET) for key in ("threshold", "window", "warmup")
    }
    given = {k: v for k, v in tuning.items() if v is not _UNSET}
    if on_spike not in ON_SPIKE:
        raise ValueError(f"on_spike must be one of {ON_SPIKE}, got {on_spike!r}")
    if on_spike is None:
        if given:
            raise ValueError(
                f"{', '.join('spike_' + k for k in given)} only take effect with on_spike='skip'; "
                "pass on_spike='skip' or drop them"
            )
        return None
    return SpikeSkip(**given)


# The NaN root-cause plugin (which does on_nonfinite="rollback") must run its after_step before
# LR backoff's, so that a rollback on this step is seen: register it first.
from .. import nonfinite as _nonfinite  # noqa: E402,F401


@register_default_plugin(always=True)
def _make_lr_backoff(watch: Watch) -> LRBackoff | None:
    factor = watch.options.pop("lr_backoff", "auto")
    after = watch.options.pop("lr_backoff_after", 5)
    window = watch.options.pop("lr_backoff_window", 50)
    if factor is None or factor is False:
        return None
    if factor == "auto" or factor is True:
        plugin = LRBackoff(0.5, after, window)
        plugin.auto = factor == "auto"
        return plugin
    return LRBackoff(factor, after, window)


class _AGCTracker(WatchPlugin):
    """Arms AGC's forward hooks (which Linear runs last) until its first clip; removes them on close."""

    name = "agc_tracker"

    def __init__(self, agc: AGC) -> None:
        self.agc = agc

    def attach(self, watch: Any) -> None:
        super().attach(watch)
        self.agc.track(watch.model)

    def close(self) -> None:
        self.agc.untrack()


@register_default_plugin(always=True)
def _make_agc_tracker(watch: Watch) -> _AGCTracker | None:
    return _AGCTracker(watch.clipper) if isinstance(watch.clipper, AGC) else None
