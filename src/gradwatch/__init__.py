"""gradwatch: keep deep-network training healthy.

Measures gradient magnitude layer by layer on every step, diagnoses vanishing,
exploding and non-finite gradients in plain words, and applies the standard
fixes. Two lines in a plain PyTorch loop::

    import gradwatch as gw
    watch = gw.Watch(model, optimizer, clip_norm=1.0, run_dir="runs/exp1")   # clip_norm=None: measure only
    for x, y in loader:
        result = watch.step(lambda: loss_fn(model(x), y), batch=(x, y))

Importing gradwatch imports torch and numpy only: plotting, TensorBoard and the
framework integrations load when used.
"""

from __future__ import annotations

from typing import Any

from .errors import GradwatchWarning, NonFiniteError
from .findings import CODES, Finding
from .config import AmpConfig, DiagnosisConfig, NonFiniteConfig, PrecursorConfig, RepairConfig
from .plugins import MicroBatch, SkipReason, StepContext, WatchPlugin, WatchView
from .records import StepRecord, StepResult
from .rundir import Run, load_run
from .pipeline import StepState
from .watch import Watch
from .diagnosis import DiagnosisPlugin
from .clipping import AGC, AutoClip, ZClip
from .report import report  # gw.report(run_dir); matplotlib loads only when called
from . import init, theory  # gradwatch.init (kaiming_/xavier_/orthogonal_/lsuv_), gw.theory (issue 5)
from .preflight import Probe, probe  # gw.probe(model, batch): pre-flight check (issue 5)

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AmpConfig",
    "PrecursorConfig",
    "AutoClip",
    "CODES",
    "DiagnosisConfig",
    "DiagnosisPlugin",
    "MicroBatch",
    "NonFiniteConfig",
    "RepairConfig",
    "SkipReason",
    "StepState",
    "WatchView",
    "Finding",
    "GradwatchWarning",
    "NonFiniteError",
    "Run",
    "StepContext",
    "StepRecord",
    "StepResult",
    "Watch",
    "WatchPlugin",
    "ZClip",
    "load_run",
    "Probe",
    "init",
    "probe",
    "report",
    "theory",
    "__version__",
]
