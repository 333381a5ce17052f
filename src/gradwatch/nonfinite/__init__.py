"""NaN root cause: replay a non-finite step, localize the first non-finite op, classify why."""

from .batch import BatchReport, TensorCheck, check_batch
from .replay import Localization, ReplayOutcome, capture_rng_state, replay, replay_step, restore_rng_state

__all__ = [
    "BatchReport",
    "Localization",
    "ReplayOutcome",
    "TensorCheck",
    "capture_rng_state",
    "check_batch",
    "replay",
    "replay_step",
    "restore_rng_state",
]
