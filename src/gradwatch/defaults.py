"""gradwatch's own plugins, listed in one place, in the order their hooks are called.

The order matters where one plugin reads what another found on the same step:
the NaN root-cause plugin rolls back (``ctx.rollback``) before the learning-rate
backoff counts the lost step; spike skipping vetoes (``ctx.spike``) before the
diagnosis rules decide not to report the same spike twice.
"""

from __future__ import annotations

import os

from .clipping import AGC, NoClip
from .config import PrecursorConfig, Settings
from .plugins import WatchPlugin


def default_plugins(*, clipper: NoClip, on_nonfinite: str, on_spike: str | None, diagnose: bool,
                    settings: Settings, tensorboard: str | os.PathLike[str] | None = None,
                    tensorboard_every: int = 1, precursors: PrecursorConfig | None = None,
                    on_precursor: str | None = None) -> list[WatchPlugin]:
    """The plugins a Watch with these settings runs, in call order (nothing is attached or written yet).

    Example:
        >>> from gradwatch.config import AmpConfig, DiagnosisConfig, NonFiniteConfig, RepairConfig
        >>> settings = Settings(DiagnosisConfig(), NonFiniteConfig(), RepairConfig(), AmpConfig())
        >>> [p.name for p in default_plugins(clipper=NoClip(), on_nonfinite="skip", on_spike="skip",
        ...                                  diagnose=True, settings=settings)]
        ['nonfinite', 'spike_skip', 'lr_backoff', 'stall', 'precision', 'diagnosis']
    """
    from .amp.plugin import PrecisionPlugin
    from .diagnosis.plugin import DiagnosisPlugin
    from .nonfinite.plugin import NonFinitePlugin
    from .repair import AGCTracker, LRBackoff, SpikeSkip
    from .stall import StallPlugin

    repair = settings.repair
    plugins: list[WatchPlugin] = []
    if isinstance(clipper, AGC):  # finds the final classifier on the first forward
        plugins.append(AGCTracker(clipper))
    plugins.append(NonFinitePlugin(settings.nonfinite))  # explains every non-finite step; rolls back
    if on_spike == "skip":
        plugins.append(SpikeSkip(repair.spike_threshold, repair.spike_window, repair.spike_warmup))
    backoff = repair.lr_backoff
    if backoff == "auto":  # on when the Watch already loses steps on purpose (spikes, rollbacks)
        backoff = 0.5 if (on_spike == "skip" or on_nonfinite == "rollback") else None
    if backoff is not None:
        plugins.append(LRBackoff(float(backoff), repair.lr_backoff_after, repair.lr_backoff_window))
    plugins.append(StallPlugin(settings.diagnosis.stall_after))  # after every plugin that skips or vetoes
    if diagnose:
        plugins.append(PrecisionPlugin(settings.amp))
        plugins.append(DiagnosisPlugin(settings.diagnosis.sample_every, settings.diagnosis.check_every))
    if precursors is not None or on_precursor is not None:  # after every plugin that may skip the step
        from .precursors.plugin import PrecursorPlugin

        plugins.append(PrecursorPlugin(precursors if precursors is not None else PrecursorConfig(), on_precursor))
    if tensorboard is not None:
        from .tensorboard import make_tensorboard_plugin

        plugins.append(make_tensorboard_plugin(tensorboard, tensorboard_every))
    return plugins
