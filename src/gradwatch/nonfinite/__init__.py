"""NaN root cause: replay a non-finite step, localize the first non-finite op, classify why.

Importing this package registers :class:`NonFinitePlugin` as a default plugin of
every :class:`gradwatch.Watch` (always on: it also does ``on_nonfinite="rollback"``).

- :mod:`.batch`: pure checks of a (nested) batch: NaN/inf with the first index, zeros, constant examples.
- :mod:`.replay`: :func:`replay_step` re-runs one step under a checking ``TorchDispatchMode``.
- :mod:`.classify`: the finding code, message and fixes from the evidence.
- :mod:`.rollback`: CPU snapshots of weights + optimizer state, restore with an lr backoff.
- :mod:`.bundle`: reproduction bundles loadable with ``torch.load(path, weights_only=True)``.
"""

from .batch import BatchReport, TensorCheck, check_batch
from .bundle import describe_bundle, load_bundle, make_bundle
from .classify import StepFacts, classify
from .plugin import NonFinitePlugin
from .replay import Localization, ReplayOutcome, capture_rng_state, replay, replay_step, restore_rng_state
from .rollback import Rollback, RollbackEvent

__all__ = [
    "BatchReport",
    "Localization",
    "NonFinitePlugin",
    "ReplayOutcome",
    "Rollback",
    "RollbackEvent",
    "StepFacts",
    "TensorCheck",
    "capture_rng_state",
    "check_batch",
    "classify",
    "describe_bundle",
    "load_bundle",
    "make_bundle",
    "replay",
    "replay_step",
    "restore_rng_state",
]
