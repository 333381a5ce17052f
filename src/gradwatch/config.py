"""Typed settings of the Watch's plugins: every option visible in a signature, validated when made.

``gradwatch.Watch`` takes the decisions as its own keywords (``clip_norm``,
``precision``, ``on_nonfinite``, ``on_spike``, ...) and the tuning of each part
as one frozen dataclass, so ``help()`` and an IDE show every option with its
default, and a wrong value fails where it is written, before the Watch touches
the disk::

    watch = gw.Watch(model, opt, diagnosis=gw.DiagnosisConfig(sample_every=10),
                     repair=gw.RepairConfig(spike_threshold=8.0))

Each class checks its own fields in ``__post_init__`` (one clear error naming
the field, the value and what is allowed); the Watch checks the combinations
(e.g. rollback settings without ``on_nonfinite="rollback"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


# ----- checks (the one place for them) -------------------------------------------------------
def check_positive_int(name: str, value: Any, hint: str = "") -> int:
    """``value`` if it is an int >= 1, else a ValueError naming ``name``.

    Example:
        >>> check_positive_int("sample_every", 50)
        50
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}{hint}")
    return value


def check_count(name: str, value: Any) -> int:
    """``value`` if it is an int >= 0, else a ValueError naming ``name``.

    Example:
        >>> check_count("max_replays", 0)
        0
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


def check_fraction(name: str, value: Any, *, closed_high: bool = False, what: str = "a share") -> float:
    """``value`` as a float in (0, 1) (or (0, 1] with ``closed_high``), else a ValueError naming ``name``.

    Example:
        >>> check_fraction("underflow_share", 0.05)
        0.05
    """
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (0 < value < 1 or (closed_high and value == 1))):
        interval = "(0, 1]" if closed_high else "(0, 1)"
        raise ValueError(f"{name} must be a number in {interval} ({what}), got {value!r}")
    return float(value)


def check_positive_number(name: str, value: Any) -> float:
    """``value`` as a float if it is finite and > 0, else a ValueError naming ``name``.

    Example:
        >>> check_positive_number("spike_threshold", 6)
        6.0
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class _Config:
    """Shared behaviour: the fields that differ from the defaults, and a dict form (for meta.json)."""

    def changed(self) -> dict[str, Any]:
        """The fields set to something other than their default."""
        return {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) != f.default}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class DiagnosisConfig(_Config):
    """Settings of the diagnosis rules (``Watch(diagnose=True)``, the default).

    Args:
        sample_every: sample activation statistics and activation gradients on
            step 1 and every this many steps (hooks only on those steps). Default: 50.
        check_every: fit the gradient-by-depth curve every this many steps (and
            on every sampled step). Default: 50.
        stall_after: raise ``training_stalled`` after this many consecutive
            skipped steps (checked also with ``diagnose=False``). Default: 8.

    Example:
        >>> DiagnosisConfig(sample_every=10).sample_every
        10
    """

    sample_every: int = 50
    check_every: int = 50
    stall_after: int = 8

    def __post_init__(self) -> None:
        for name in ("sample_every", "check_every", "stall_after"):
            check_positive_int(name, getattr(self, name), f"; e.g. gradwatch.DiagnosisConfig({name}=50)")


#: ``NonFiniteConfig.rollback_device`` values (None: ``"cpu"``).
ROLLBACK_DEVICES = (None, "cpu", "params")


@dataclass(frozen=True)
class NonFiniteConfig(_Config):
    """Settings of the non-finite-step explanation (always on) and of ``on_nonfinite="rollback"``.

    Args:
        max_replays: replays of non-finite steps per run (a run that is NaN on
            every step must not triple its cost); later ones are classified
            without a replay. Default: 20.
        max_bundles: reproduction bundles saved per run. Default: 100.
        rollback_every: rollback mode only: steps between snapshots of the
            weights and optimizer state; None means 100. Default: None.
        rollback_lr_factor: rollback mode only: lr multiplier on each restore,
            in (0, 1] (1 keeps the lr); None means 0.5. Default: None.
        rollback_device: rollback mode only: where the snapshot lives:
            ``"cpu"`` (no accelerator memory; a device-to-host copy per snapshot)
            or ``"params"`` (each tensor on its own device: no transfer, but as
            much accelerator memory again as the weights and optimizer state);
            None means ``"cpu"``. Default: None.

    Example:
        >>> NonFiniteConfig(rollback_every=20).rollback_every
        20
    """

    max_replays: int = 20
    max_bundles: int = 100
    rollback_every: int | None = None
    rollback_lr_factor: float | None = None
    rollback_device: str | None = None

    def __post_init__(self) -> None:
        check_count("max_replays", self.max_replays)
        if self.rollback_device not in ROLLBACK_DEVICES:
            raise ValueError(f"rollback_device must be one of {ROLLBACK_DEVICES}, got {self.rollback_device!r} "
                             "('params' keeps each tensor's copy on its own device)")
        check_count("max_bundles", self.max_bundles)
        if self.rollback_every is not None:
            check_positive_int("rollback_every", self.rollback_every, " (steps between snapshots)")
        if self.rollback_lr_factor is not None:
            check_fraction("rollback_lr_factor", self.rollback_lr_factor, closed_high=True, what="1 keeps the lr")

    @property
    def snapshot_every(self) -> int:
        return 100 if self.rollback_every is None else self.rollback_every

    @property
    def lr_factor(self) -> float:
        return 0.5 if self.rollback_lr_factor is None else self.rollback_lr_factor

    @property
    def snapshot_device(self) -> str:
        return "cpu" if self.rollback_device is None else self.rollback_device


#: ``RepairConfig.lr_backoff`` values that are not a factor.
LR_BACKOFF_MODES = ("auto", None)


@dataclass(frozen=True)
class RepairConfig(_Config):
    """Settings of spike skipping (``Watch(on_spike="skip")``) and of the learning-rate backoff.

    Args:
        spike_threshold: a robust z-score of the loss or log gradient norm above
            this is a spike. Default: 6.0 (OLMo's).
        spike_window: recent finite steps in the spike baseline. Default: 128.
        spike_warmup: finite steps needed before any step can be a spike. Default: 32.
        lr_backoff: ``"auto"`` (on with ``on_spike="skip"`` or
            ``on_nonfinite="rollback"``), a factor in (0, 1) (always on), or None
            (off): after ``lr_backoff_after`` lost steps within
            ``lr_backoff_window`` steps, multiply the lr by it (0.5 for "auto"). Default: "auto".
        lr_backoff_after: lost steps that trigger a backoff. Default: 5.
        lr_backoff_window: the lost steps must fall within this many steps. Default: 50.

    Example:
        >>> RepairConfig(lr_backoff=0.5).lr_backoff
        0.5
    """

    spike_threshold: float = 6.0
    spike_window: int = 128
    spike_warmup: int = 32
    lr_backoff: float | str | None = "auto"
    lr_backoff_after: int = 5
    lr_backoff_window: int = 50

    def __post_init__(self) -> None:
        check_positive_number("spike_threshold", self.spike_threshold)
        if isinstance(self.spike_window, bool) or not isinstance(self.spike_window, int) or self.spike_window < 2:
            raise ValueError(f"spike_window must be an int >= 2, got {self.spike_window!r}")
        if isinstance(self.spike_warmup, bool) or not isinstance(self.spike_warmup, int) or self.spike_warmup < 2:
            raise ValueError(f"spike_warmup must be an int >= 2, got {self.spike_warmup!r}")
        if self.spike_warmup > self.spike_window:
            raise ValueError(f"spike_warmup ({self.spike_warmup}) must not exceed spike_window ({self.spike_window})")
        if self.lr_backoff not in LR_BACKOFF_MODES:
            check_fraction("lr_backoff", self.lr_backoff, what="a factor; or None (off) or 'auto'")
        check_positive_int("lr_backoff_after", self.lr_backoff_after)
        check_positive_int("lr_backoff_window", self.lr_backoff_window)
        if self.lr_backoff_after > self.lr_backoff_window:
            raise ValueError(
                f"lr_backoff_after ({self.lr_backoff_after}) must not exceed lr_backoff_window ({self.lr_backoff_window})")


@dataclass(frozen=True)
class AmpConfig(_Config):
    """Settings of the mixed-precision diagnosis (fp16 overflow/underflow, the fp16 forecast, bf16 lost updates).

    Args:
        every: sample gradient exponents every this many steps (and step 1);
            None means 50 in fp16 runs (underflow and overflow are live risks) and
            1000 in fp32/bf16 runs (only the forecast, which changes slowly).
            Default: None.
        underflow_share: a layer underflows when at least this share of its
            non-zero gradient elements lies below fp16's normal range at the
            current scale. Default: 0.05.
        overflow_backoffs: ``fp16_overflow`` when the scaler backs off this many
            times within ``overflow_window`` steps. Default: 3.
        overflow_window: see ``overflow_backoffs``. Default: 100.
        forecast_scale: the loss scale of the fp16 forecast. Default: 65536.0
            (GradScaler's initial scale).
        lost_update_share: ``bf16_lost_updates`` when at least this share of a
            layer's updates would be lost in bf16. Default: 0.1.

    Example:
        >>> AmpConfig(every=10).sample_every("fp32")
        10
    """

    every: int | None = None
    underflow_share: float = 0.05
    overflow_backoffs: int = 3
    overflow_window: int = 100
    forecast_scale: float = 65536.0
    lost_update_share: float = 0.1

    def __post_init__(self) -> None:
        if self.every is not None:
            check_positive_int("every", self.every, "; e.g. gradwatch.AmpConfig(every=50)")
        check_fraction("underflow_share", self.underflow_share, what="a share of elements")
        check_positive_int("overflow_backoffs", self.overflow_backoffs)
        check_positive_int("overflow_window", self.overflow_window)
        if isinstance(self.forecast_scale, bool) or not isinstance(self.forecast_scale, (int, float)) or not (
            math.isfinite(self.forecast_scale) and self.forecast_scale > 0
        ):
            raise ValueError(
                f"forecast_scale must be a positive number (a loss scale, e.g. 65536.0), got {self.forecast_scale!r}")
        check_fraction("lost_update_share", self.lost_update_share, what="a share of updates")

    def sample_every(self, precision: str) -> int:
        """The sampling interval for a run in ``precision``."""
        if self.every is not None:
            return self.every
        return 50 if precision == "fp16" else 1000


@dataclass(frozen=True)
class PrecursorConfig(_Config):
    """Settings of the precursor signals (``Watch(precursors=...)``; on by default, ``precursors=None``: off).

    Args:
        adam_rms: measure each layer's RMS_t = sqrt(mean(g^2 / v_hat)) from an Adam-family
            optimizer's second moment (skipped for optimizers without ``exp_avg_sq``). Default: True.
        attention_logits: on sampled steps, the max attention logit of every
            ``F.scaled_dot_product_attention`` call (a second matmul of q and k per call). Default: True.
        log_z: on sampled steps, log Z of the logits given to ``F.cross_entropy``. Default: True.
        output_rms: on sampled steps, the RMS of each layer's output (its growth relative to the
            layer's first sampled value; recorded, no finding). Default: True.
        rms_every: measure RMS_t every this many steps, on every step while the last
            measurement was above half of ``rms_threshold``, and on the step after one whose
            global gradient norm rose above ``rms_threshold / 2`` times its running RMS (an EMA
            of its square with the optimizer's beta2; host-side, free) (five foreach passes over the
            gradients: ~0.2-0.6 ms for the 16 tensors of a 7-layer MLP on 2 CPU threads). Default: 50.
        sample_every: the sampling interval of attention logits, log Z and output RMS in steps (and
            each of the first ``sample_every`` steps; with ``dense_sampling``, every step while the
            last sampled attention logit was above half its threshold). Default: 50.
        dense_sampling: sample every step while a sampled attention logit is above half of
            ``attention_logit_threshold`` (a growth caught between two sampled steps is followed
            step by step). Default: True.
        rms_threshold: a layer whose RMS_t is above this on ``rms_consecutive`` measurements in a
            row raises ``update_spike_precursor``. Default: 8.0 (healthy runs reach 6-9 on single layers now and then:
            a 4-layer ViT held 6.3 on two steps, BERT 9.3 on one; the lag benchmark reaches 12-13).
        rms_consecutive: see ``rms_threshold``. Default: 2.
        rms_warmup: not judged before Adam's step count reaches this. Default: 50.
        attention_logit_threshold: ``attention_logit_growth`` above this max logit. Default: 50.0.
        log_z_threshold: ``output_logit_divergence`` when ``|mean log Z|`` is above this, unless the
            cross-entropy of those logits is below 0.01 (targets predicted with near-certainty: log Z is
            then the target logit, a confidence, not a drift). Default: 30.0.
        quiet_steps: an episode ends this many steps after the last measurement above the
            threshold (one finding per episode). Default: 50.

    Example:
        >>> PrecursorConfig(rms_threshold=8.0).rms_threshold
        8.0
    """

    adam_rms: bool = True
    attention_logits: bool = True
    log_z: bool = True
    output_rms: bool = True
    dense_sampling: bool = True
    rms_every: int = 50
    sample_every: int = 50
    rms_threshold: float = 8.0
    rms_consecutive: int = 2
    rms_warmup: int = 50
    attention_logit_threshold: float = 50.0
    log_z_threshold: float = 30.0
    quiet_steps: int = 50

    def __post_init__(self) -> None:
        for name in ("adam_rms", "attention_logits", "log_z", "output_rms", "dense_sampling"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("rms_every", "sample_every", "rms_consecutive", "quiet_steps"):
            check_positive_int(name, getattr(self, name), f"; e.g. gradwatch.PrecursorConfig({name}=10)")
        check_count("rms_warmup", self.rms_warmup)
        for name in ("rms_threshold", "attention_logit_threshold", "log_z_threshold"):
            check_positive_number(name, getattr(self, name))
        if self.rms_threshold <= 1.0:
            raise ValueError(f"rms_threshold must be above 1 (RMS_t is 1 when Adam's second moment tracks g^2), "
                             f"got {self.rms_threshold!r}")


@dataclass(frozen=True)
class Settings:
    """The four settings objects of one Watch (what its plugins read through ``WatchView``)."""

    diagnosis: DiagnosisConfig
    nonfinite: NonFiniteConfig
    repair: RepairConfig
    amp: AmpConfig
