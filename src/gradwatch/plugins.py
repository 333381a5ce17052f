"""The seam between the step pipeline and what builds on it (diagnosis, NaN root cause, repair, ...).

A :class:`WatchPlugin` sees every step at fixed points. The pipeline calls every
hook inside its internal-error guard: a plugin that raises is reported once and
the step goes on. A plugin gets a :class:`WatchView` (what it may read of its
Watch) at :meth:`WatchPlugin.attach`, and one typed :class:`StepContext` per
step, which is also how plugins share what they found on that step.

Order of calls on step N (plugins in the order of ``Watch.plugins``: gradwatch's
own first, in the order ``gradwatch.defaults.default_plugins`` lists them, then
the user's)::

    prepare(N)              at the end of step N-1 (at attach for N = 1): arm hooks for
                            step N's forward (which may run before ``watch.step`` is called)
    before_forward(ctx)     before each micro-batch (before its closure runs, if any)
    after_forward(ctx)      a micro-batch's closure returned the loss, before its backward
    after_backward(ctx)     the step's gradients are in place (unscaled), before measuring
    veto(ctx, record)       after the one host sync, finite steps: True asks to skip the update
    before_update(ctx, record)  the decision is made (``ctx.skip_reasons``), the update not yet
                            applied: work that needs the step's own weights
    after_step(ctx, record) after the update (or skip): returns findings
    after_update(record)    ``observe()`` only: the caller's ``optimizer.step()`` ran and
                            ``record.update_ratio`` is now measured: returns findings
    abort(ctx)              instead of the rest, when the user's closure, backward or
                            optimizer raised: remove whatever was armed for this step
    close()

``before_forward``, ``after_forward``, ``after_backward``, ``veto`` and
``before_update`` are the *mid-step* hooks: a plugin whose ``quiet_step`` is
True is not called there (see :attr:`WatchPlugin.quiet_step`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .clipping import NoClip
    from .config import AmpConfig, DiagnosisConfig, NonFiniteConfig, RepairConfig
    from .errors import InternalErrorReporter
    from .findings import Finding
    from .layers import LayerIndex
    from .precision import Precision
    from .records import StepRecord
    from .rundir import RunWriter
    from .watch import Watch

Closure = Callable[[], torch.Tensor]

#: The hooks a quiet plugin is not called in.
MID_STEP_HOOKS = frozenset({"before_forward", "after_forward", "after_backward", "veto", "before_update"})


class SkipReason(str, enum.Enum):
    """Why a step's update was not applied (``StepRecord.skipped_by``; written as its value)."""

    NONFINITE = "nonfinite"  # the loss or a gradient is NaN/inf
    SCALER_OVERFLOW = "fp16_overflow"  # fp16: the loss scaler found inf/nan in the scaled gradients, loss finite
    SPIKE = "spike"  # on_spike="skip": the loss or the gradient norm is a robust outlier
    VETO = "veto"  # another plugin's veto


@dataclass(slots=True)
class MicroBatch:
    """One forward/backward of a step (several under gradient accumulation).

    ``rng_before`` is the RNG state from before the micro-batch's closure ran, kept by
    the NaN root-cause plugin when the closure draws random numbers (None otherwise:
    the current state then replays it); a replay of the micro-batch uses it.
    """

    closure: Closure | None
    batch: Any
    loss: torch.Tensor | None = None
    rng_before: dict[str, Any] | None = None


@dataclass(slots=True)
class StepContext:
    """What one step carries between the pipeline and its plugins (typed: no free-form dicts).

    Attributes:
        step: the 1-based step number.
        micro: the step's micro-batches in order (one unless accumulating; one
            without a closure in the loss form and in ``observe()``).
        loss_known: False for ``observe()`` without a loss.
        skip_reasons: why the update is not applied (empty: applied).
        stepped: the optimizer has applied this step's update.
        quiet: every plugin was quiet when the step began (the mid-step hooks are skipped).
        spike: evidence of a spike that ``on_spike="skip"`` vetoed (set in ``veto``).
        rollback: the restore the NaN plugin made on this step (``on_nonfinite="rollback"``),
            read by the learning-rate backoff after it.
        nonfinite_ranks: torch.distributed, a non-finite step: the ranks whose local loss /
            local gradients were non-finite (``{"loss": [...], "gradients": [...]}``), set by the pipeline.
        bad_step: a non-finite step the NaN plugin explained: this rank's batch fingerprint,
            the replay's verdict and bundle (:class:`gradwatch.nonfinite.badbatches.BadStep`).
    """

    step: int
    micro: list[MicroBatch] = field(default_factory=list)
    loss_known: bool = True
    skip_reasons: list[SkipReason] = field(default_factory=list)
    stepped: bool = False
    quiet: bool = False
    spike: dict[str, Any] | None = None
    rollback: Any = None  # gradwatch.nonfinite.rollback.RollbackEvent
    nonfinite_ranks: dict[str, list[int]] | None = None
    bad_step: Any = None  # gradwatch.nonfinite.badbatches.BadStep

    @property
    def closure(self) -> Closure | None:
        """The closure of the step's last micro-batch (None in the loss form and in ``observe()``)."""
        return self.micro[-1].closure if self.micro else None

    @property
    def batch(self) -> Any:
        """The batch of the step's last micro-batch (what ``batch=`` was given)."""
        return self.micro[-1].batch if self.micro else None

    @property
    def loss(self) -> torch.Tensor | None:
        """The last micro-batch's loss tensor."""
        return self.micro[-1].loss if self.micro else None

    @property
    def current(self) -> MicroBatch:
        """The micro-batch being run (in ``before_forward`` / ``after_forward``)."""
        return self.micro[-1]


class WatchView:
    """What a plugin may read of its Watch: the model, the optimizer, the layers, the history, ...

    The model and the optimizer are the user's own objects (a repair plugin lowers the
    lr or restores weights through them); everything else is the Watch's and is not to
    be changed: plugins share per-step facts through the :class:`StepContext`.

    Example:
        >>> import gradwatch as gw
        >>> model = torch.nn.Linear(2, 1); watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> view = WatchView(watch)
        >>> view.layers.names, view.lr()
        (['(root)'], 0.1)
        >>> watch.close()
    """

    __slots__ = ("_watch",)

    def __init__(self, watch: "Watch") -> None:
        self._watch = watch

    @property
    def model(self) -> torch.nn.Module:
        """The model as given to the Watch (maybe wrapped: DDP, ``torch.compile``)."""
        return self._watch.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._watch.optimizer

    @property
    def device(self) -> torch.device:
        return self._watch.device

    @property
    def layers(self) -> "LayerIndex":
        """The layer index (names and slots of the per-layer arrays, measured parameters)."""
        return self._watch.index

    @property
    def history(self) -> list["StepRecord"]:
        """The recent step records, oldest first (the current one last once it is recorded)."""
        return self._watch.history

    @property
    def findings(self) -> list["Finding"]:
        return self._watch.findings

    @property
    def precision(self) -> "Precision":
        return self._watch.precision

    @property
    def clipper(self) -> "NoClip":
        return self._watch.clipper

    @property
    def writer(self) -> "RunWriter | None":
        """The run directory's writer (None when the Watch keeps everything in memory or this rank does not write)."""
        return self._watch.writer

    @property
    def rank(self) -> int | None:
        """This process's rank under torch.distributed (None in a single process)."""
        dist = self._watch._dist
        return dist.rank if dist is not None else None

    @property
    def keeps_bundles(self) -> bool:
        """Whether some rank writes a run directory (then non-finite steps get reproduction bundles)."""
        return self._watch.writer is not None or self._watch._bundles_elsewhere

    @property
    def errors(self) -> "InternalErrorReporter":
        """Report an internal error once: ``view.errors.report(where, exc)``."""
        return self._watch.errors

    @property
    def on_nonfinite(self) -> str:
        return self._watch.on_nonfinite

    @property
    def diagnose(self) -> bool:
        return self._watch.diagnose

    @property
    def diagnosis(self) -> "DiagnosisConfig":
        return self._watch.config.diagnosis

    @property
    def nonfinite(self) -> "NonFiniteConfig":
        return self._watch.config.nonfinite

    @property
    def repair(self) -> "RepairConfig":
        return self._watch.config.repair

    @property
    def amp(self) -> "AmpConfig":
        return self._watch.config.amp

    @property
    def steps_taken(self) -> int:
        return self._watch.steps_taken

    def signals(self, step: int) -> dict[str, Any]:
        """The precursor signals measured on ``step``: its ``signals.jsonl`` line (``{}`` when that step
        measured none, the precursors are off, or ``step`` is not the last step the precursor plugin saw).

        Read-only; complete once the precursor plugin's ``after_step`` has run (every plugin of
        the user's, the loggers included, runs after it).

        Example:
            >>> import gradwatch as gw
            >>> model = torch.nn.Linear(2, 1); opt = torch.optim.AdamW(model.parameters())
            >>> watch = gw.Watch(model, opt, precursors=gw.PrecursorConfig(rms_every=1))
            >>> for _ in range(2): result = watch.step(lambda: model(torch.ones(4, 2)).pow(2).mean())
            >>> sorted(WatchView(watch).signals(2))  # step 1: Adam has no second moment yet
            ['adam_rms', 'adam_rms_layer', 'adam_rms_max', 'step']
            >>> WatchView(watch).signals(1)
            {}
            >>> watch.close()
        """
        for plugin in self._watch.plugins:
            if plugin.name == "precursors":
                last = getattr(plugin, "last", None)
                if isinstance(last, dict) and last.get("step") == step and len(last) > 1:
                    return last
                return {}
        return {}

    def lr(self) -> float | None:
        """The first param group's learning rate as a float (None if unreadable)."""
        try:
            lr = self._watch.optimizer.param_groups[0]["lr"]
            return float(lr.detach().cpu()) if isinstance(lr, torch.Tensor) else float(lr)
        except (KeyError, IndexError, TypeError, ValueError):
            return None


class WatchPlugin:
    """Base class: every hook is a no-op.

    Subclass it, override the hooks you need, and pass an instance in
    ``Watch(..., plugins=[...])``. Every hook runs inside someone's training loop
    on every step: keep the common path to a few attribute reads.

    Example:
        >>> class CountSkips(WatchPlugin):
        ...     name = "count_skips"
        ...     def __init__(self): self.skipped = 0
        ...     def after_step(self, ctx, record):
        ...         self.skipped += record.skipped
        ...         return []
    """

    name = "plugin"
    #: torch.distributed: True when ``veto`` depends only on the record and the history
    #: (the same on every rank), so the pipeline need not agree on it with an extra
    #: all-reduce and host sync. Leave False if it reads rank-local tensors.
    veto_is_global = False
    #: True while the plugin has nothing to do in the mid-step hooks (``MID_STEP_HOOKS``) of the
    #: coming step: the pipeline then does not call them (they would run on every step for
    #: nothing; per-step Python is the overhead budget). Set it in ``prepare`` or ``after_step``
    #: for the next step. Default: False.
    quiet_step = False

    def attach(self, view: WatchView) -> None:
        """Called once, when the Watch is ready (its run directory made)."""
        self.view = view

    def prepare(self, next_step: int) -> None:
        pass

    def before_forward(self, ctx: StepContext) -> None:
        pass

    def after_forward(self, ctx: StepContext) -> None:
        pass

    def after_backward(self, ctx: StepContext) -> None:
        pass

    def veto(self, ctx: StepContext, record: "StepRecord") -> bool:
        return False

    def before_update(self, ctx: StepContext, record: "StepRecord") -> None:
        pass

    def after_step(self, ctx: StepContext, record: "StepRecord") -> list["Finding"]:
        return []

    def after_update(self, record: "StepRecord") -> list["Finding"]:
        return []

    def abort(self, ctx: StepContext) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to decide as an uninterrupted one would (plain data and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
