"""The Watch: per-layer gradient telemetry, clipping and skip-on-non-finite in one call per step.

``watch.step(closure)`` clears the measured gradients, runs the closure (under
autocast when asked), backward (scaled under fp16), unscale, per-layer norms
*before* clipping, clip, finite check, ``optimizer.step()`` or skip,
``zero_grad``, record, diagnose. The stages are in :mod:`gradwatch.pipeline`;
this module is the public API: arguments checked before anything touches the
disk, the order of calls enforced (:class:`~gradwatch.pipeline.StepState`),
state to resume from.

Cost on a healthy step: the fused norm pass (:mod:`gradwatch.norms`: one
foreach norm over the gradients *and* the weights; on CPU numpy reads the
weights' norms in place), one host sync (the skip decision, which carries the
loss and every per-tensor norm to the host in one small transfer, where they
are summed per layer), the clip multiply only when the coefficient, worked out
on the host, is below 1, and some Python. On the first ``update_ratio_every``
steps and every ``update_ratio_every`` steps after (default 10) a share of the
weights that fits ``update_ratio_budget`` (a rotating round of layers) is also
copied before the update to measure ``||dw|| / ||w||`` per layer
(:mod:`gradwatch.ratio`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import distributed as _distributed
from . import runpath as _runpath
from .clipping import make_clipper
from .config import (AmpConfig, DiagnosisConfig, NonFiniteConfig, PrecursorConfig, RepairConfig, Settings,
                     check_positive_int)
from .errors import InternalErrorReporter, NonFiniteError, logger
from .findings import Finding
from .layers import OUTSIDE_MODEL, LayerIndex
from .pipeline import CALLER_UPDATE, OWN_UPDATE, StepPipeline, StepState, check_loss
from .plugins import StepContext, WatchPlugin, WatchView
from .precision import Precision
from .records import StepRecord, StepResult
from .rundir import RunWriter

ON_NONFINITE = ("skip", "rollback", "raise")
ON_SPIKE = (None, "skip")
Closure = Callable[[], torch.Tensor]
STATE_VERSION = 2


def _needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` requires a closure (LBFGS re-evaluates the loss inside its step)."""
    try:
        parameter = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.default is inspect.Parameter.empty


class Watch:
    """Watch a model's training: per-layer gradient norms, clipping, skip, diagnosis.

    Args:
        model: the ``nn.Module`` being trained (DDP and ``torch.compile`` wrappers too).
        optimizer: the optimizer that holds the model's trainable parameters.
        clip_norm: None measures only and never clips (a monitor changes nothing
            healthy unless asked); a positive float clips the global norm to it
            (``clip_grad_norm_``'s rule; 1.0 is the usual transformer value);
            ``"autoclip"`` (:class:`~gradwatch.AutoClip`), ``"zclip"``
            (:class:`~gradwatch.ZClip`) or a clipper object such as
            ``gw.AGC(0.01)`` (bound to this Watch). Default: None.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast, plus loss
            scaling for fp16). Default: ``"fp32"``.
        scaler: fp16 only: your own ``torch.amp.GradScaler``; None makes a default one.
        on_nonfinite: ``"skip"`` (the update is not applied; weights and optimizer
            state stay bit-identical), ``"rollback"`` (restore the last good
            snapshot, lower the lr) or ``"raise"``
            (:class:`~gradwatch.errors.NonFiniteError`). Default: ``"skip"``.
        run_dir: directory for the run's files (see :mod:`gradwatch.rundir`);
            None keeps everything in memory. ``watch.run_dir`` is the directory
            actually used (see ``run_dir_mode``). Default: None.
        run_dir_mode: what to do when ``run_dir`` already holds a run
            (:mod:`gradwatch.runpath`): ``"version"`` writes a new run in the
            next free ``run_dir/version_N`` (like Lightning's loggers; a
            re-run notebook cell gets a new version); ``"resume"`` continues
            the latest run there: after ``load_state_dict`` of a checkpoint's
            state, the records after the checkpoint's step are dropped, so the
            directory ends as an uninterrupted run's; ``"overwrite"`` removes
            that run's files first. A free ``run_dir`` is used as it is in
            every mode. Default: ``"version"``.
        on_spike: None, or ``"skip"``: do not apply a step whose loss or gradient
            norm is a robust outlier (tuned by ``repair``). Default: None.
        diagnose: run the diagnosis rules (vanishing, exploding, lr, spikes, ...;
            tuned by ``diagnosis`` and ``amp``). The non-finite explanation, the
            repairs and the telemetry run either way. Default: True.
        norm_type: p of the p-norm (``float('inf')`` for the max norm). Default: 2.0.
        update_ratio_every: measure ``||dw||/||w||`` per layer on each of the
            first this many steps and every this many steps after. Default: 10.
        update_ratio_budget: bytes the weight copies for the update ratio may
            take. Each measurement copies one round of layers (in depth order)
            that fits, the next measurement the next round, so every layer gets
            a ratio every ``k`` measurements and the others are NaN in between;
            a layer larger than the budget is measured on slices of its
            elements. None: 5% of the parameter bytes, at most 64 MiB (pass
            a larger budget, e.g. ``1 << 20``, to measure a small model whole
            at every measurement). Default: None.
        history: number of recent step records kept in memory for the rules. Default: 200.
        flush_every: write the run directory every this many steps. Default: 50.
        diagnosis: :class:`~gradwatch.DiagnosisConfig` (sampling intervals).
        nonfinite: :class:`~gradwatch.NonFiniteConfig` (replays, bundles, rollback snapshots).
        repair: :class:`~gradwatch.RepairConfig` (spike skipping, lr backoff).
        amp: :class:`~gradwatch.AmpConfig` (fp16/bf16 diagnosis).
        precursors: :class:`~gradwatch.PrecursorConfig` (signals that come before a loss spike: Adam's
            RMS_t, attention logits, log Z; docs/precursors.md); None: off.
        on_precursor: None (warn) or ``"clip_update"``: divide each Adam update by ``max(1, RMS_t)`` per
            tensor (StableAdamW's update clipping). Default: None.
        tensorboard: a TensorBoard log directory, or a ``torch.utils.tensorboard.SummaryWriter`` (written
            through, never closed), to write every step to live under ``gradwatch/...`` tags; None: none. Default: None.
        tensorboard_every: write every this many steps (and every skipped one). Default: 1.
        write_rank: under torch.distributed, the rank that writes ``run_dir``, or
            ``"all"`` (each rank writes ``run_dir/rank<k>``). Default: 0. See
            :mod:`gradwatch.distributed` (DDP and FSDP2 give the same numbers and
            the same skip decisions on every rank).
        distributed: None syncs with the process group when one is initialized;
            False keeps this Watch to its own rank (a Watch that only some ranks
            build must not wait for the others); True requires a process group. Default: None.
            Under DDP the Watch registers a communication hook that names the
            rank(s) whose local gradients were non-finite (a model with a comm
            hook of its own keeps it; see docs/distributed.md).
        agree_every: under torch.distributed (DDP), on step 1 and every this many
            steps, check with one small ``all_gather`` that the replicas hold the
            same weights (per-layer float64 checksums) and made the same clip
            decision: a ``rank_divergence`` finding if not. None: never. Default: 1000.
        skip_bad_batches: read the batch fingerprints of earlier non-finite steps
            from every ``bad_batches.jsonl`` under ``run_dir`` (all versions and
            ranks), so that :meth:`should_skip` tells a restarted run which
            batches to leave out. Default: False.
        plugins: your own :class:`~gradwatch.plugins.WatchPlugin` objects, called
            after gradwatch's own. Default: ().

    Raises:
        TypeError / ValueError: any argument that cannot work, before anything is
            written (no run directory is made, no thread started).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = Watch(model, opt, clip_norm=1.0)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> result = watch.step(lambda: nn.functional.mse_loss(model(x), y))
        >>> watch.layers, result.skipped
        (['0', '2'], False)
        >>> watch.close()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip_norm: Any = None,
        precision: str = "fp32",
        scaler: "torch.amp.GradScaler | None" = None,
        on_nonfinite: str = "skip",
        run_dir: str | os.PathLike[str] | None = None,
        *,
        run_dir_mode: str = "version",
        on_spike: str | None = None,
        diagnose: bool = True,
        norm_type: float = 2.0,
        update_ratio_every: int = 10,
        update_ratio_budget: int | None = None,
        history: int = 200,
        flush_every: int = 50,
        diagnosis: DiagnosisConfig = DiagnosisConfig(),
        nonfinite: NonFiniteConfig = NonFiniteConfig(),
        repair: RepairConfig = RepairConfig(),
        amp: AmpConfig = AmpConfig(),
        precursors: PrecursorConfig | None = PrecursorConfig(),
        on_precursor: str | None = None,
        tensorboard: str | os.PathLike[str] | None = None,
        tensorboard_every: int = 1,
        write_rank: int | str = 0,
        distributed: bool | None = None,
        agree_every: int | None = 1000,
        skip_bad_batches: bool = False,
        plugins: Sequence[WatchPlugin] = (),
    ) -> None:
        # ----- every check first: a refused Watch writes nothing and starts nothing -----
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if _needs_closure(optimizer):
            raise ValueError(
                f"{type(optimizer).__name__}.step() needs a closure that it evaluates several times per step "
                "(as torch.optim.LBFGS does); gradwatch measures one gradient per step and cannot drive it. "
                "Use a first-order optimizer (SGD, Adam, ...) with the Watch, or run this one without it")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        if on_spike not in ON_SPIKE:
            raise ValueError(f"on_spike must be one of {ON_SPIKE}, got {on_spike!r}")
        if on_precursor not in (None, "clip_update"):
            raise ValueError(f"on_precursor must be None or 'clip_update', got {on_precursor!r}")
        if precursors is not None and not isinstance(precursors, PrecursorConfig):
            raise TypeError(f"precursors must be a gradwatch.PrecursorConfig or None, got {type(precursors).__name__}")
        if not isinstance(diagnose, bool):
            raise TypeError(f"diagnose must be True or False, got {diagnose!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
            raise ValueError(f"norm_type must be a positive number or float('inf'), got {norm_type!r}")
        self.update_ratio_every = check_positive_int("update_ratio_every", update_ratio_every)
        self.update_ratio_budget = None if update_ratio_budget is None else check_positive_int(
            "update_ratio_budget", update_ratio_budget, " (bytes; None: 5% of the parameter bytes, within 1-64 MiB)")
        self.history_size = check_positive_int("history", history)
        flush_every = check_positive_int("flush_every", flush_every)
        tensorboard_every = check_positive_int("tensorboard_every", tensorboard_every)
        self.agree_every = None if agree_every is None else check_positive_int("agree_every", agree_every)
        if not isinstance(skip_bad_batches, bool):
            raise TypeError(f"skip_bad_batches must be True or False, got {skip_bad_batches!r}")
        if skip_bad_batches and run_dir is None:
            raise ValueError("skip_bad_batches=True reads the bad batches of an earlier run from run_dir; "
                             "pass the run_dir the interrupted run wrote")
        for name, value, kind in (("diagnosis", diagnosis, DiagnosisConfig), ("nonfinite", nonfinite, NonFiniteConfig),
                                  ("repair", repair, RepairConfig), ("amp", amp, AmpConfig)):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a gradwatch.{kind.__name__}, got {type(value).__name__}; "
                                f"e.g. gradwatch.Watch(..., {name}=gradwatch.{kind.__name__}())")
        if on_nonfinite != "rollback" and (nonfinite.rollback_every is not None or nonfinite.rollback_lr_factor is not None
                                           or nonfinite.rollback_device is not None):
            raise ValueError(
                "NonFiniteConfig(rollback_every=, rollback_lr_factor=, rollback_device=) only take effect with "
                "on_nonfinite='rollback'; "
                f"pass on_nonfinite='rollback' or drop them (on_nonfinite is {on_nonfinite!r})")
        if on_spike is None:
            changed = [f.name for f in dataclasses.fields(RepairConfig) if f.name.startswith("spike_")
                       and getattr(repair, f.name) != f.default]
            if changed:
                raise ValueError(
                    f"RepairConfig({', '.join(f'{n}=' for n in changed)}) only takes effect with on_spike='skip'; "
                    "pass on_spike='skip' or drop it")
        if tensorboard is not None and not isinstance(tensorboard, (str, os.PathLike)) and not (
                callable(getattr(tensorboard, "_get_file_writer", None)) and callable(getattr(tensorboard, "get_logdir", None))):
            raise TypeError("tensorboard must be a log directory path, a torch.utils.tensorboard.SummaryWriter or None, "
                            f"got {type(tensorboard).__name__}")
        plugins = list(plugins)
        bad = [p for p in plugins if not isinstance(p, WatchPlugin)]
        if bad:
            raise TypeError(f"plugins must be gradwatch.WatchPlugin instances, got {type(bad[0]).__name__}")
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir must be a path or None, got {type(run_dir).__name__}")
        run_dir_mode = _runpath.check_mode(run_dir_mode)
        if run_dir is not None and os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ValueError(f"run_dir {os.fspath(run_dir)!r} exists and is not a directory; pass a directory path")
        self._dist = _distributed.DistSync.detect(write_rank, enabled=distributed)  # None in a single process
        inner = _distributed.unwrap_model(model)  # names as in the eager, unwrapped model
        if any(p.is_meta for p in inner.parameters()):
            raise ValueError(
                "model has parameters on the meta device (built under torch.device('meta') or "
                "init_empty_weights()): they hold no values to train or measure; materialize them first, "
                "e.g. model.to_empty(device='cpu') and initialize or load the weights")
        index = LayerIndex(inner, optimizer)
        if not any(name != OUTSIDE_MODEL for name in index.measured_names):  # nothing of the model's own
            trainable = [p for p in inner.parameters() if p.requires_grad]
            if not trainable:
                raise ValueError(
                    "model has no trainable parameters (none with requires_grad=True); "
                    "gradwatch measures gradients, so unfreeze at least one parameter")
            if trainable:
                raise ValueError(
                    "optimizer does not hold any of the model's trainable parameters; "
                    "build it from this model, e.g. torch.optim.AdamW(model.parameters())")
        self.device = (index.params[0] if index.params else next(iter(inner.parameters()))).device
        self.precision = Precision(precision, self.device.type, scaler)
        if self.precision.mode == "fp16" and any(p.dtype == torch.float16 for p in index.params):
            raise ValueError(
                "precision='fp16' needs float32 master weights, but the model has float16 parameters "
                "(GradScaler cannot unscale fp16 gradients); call model.float() and let autocast compute in fp16")
        self.clipper = make_clipper(clip_norm)
        self.clipper.bind(self)
        # (threshold, "norm" | "value") of a clipping the caller's framework applies after observe()
        # (Lightning's gradient_clip_val): recorded as the step's clip threshold and flag, never applied here.
        self.external_clip: tuple[float, str] | None = None
        self.clip_norm = clip_norm
        self.on_nonfinite = on_nonfinite
        self.on_spike = on_spike
        self.norm_type = float(norm_type)
        self.diagnose = diagnose
        self.config = Settings(diagnosis=diagnosis, nonfinite=nonfinite, repair=repair, amp=amp)
        self.model = model
        self.optimizer = optimizer
        self.index = index

        from .defaults import default_plugins  # the plugin modules import the plugin base, not this module

        #: every plugin, in the order its hooks are called: gradwatch's own, then ``plugins``
        self.plugins: list[WatchPlugin] = default_plugins(
            clipper=self.clipper, on_nonfinite=on_nonfinite, on_spike=on_spike, diagnose=diagnose,
            settings=self.config, tensorboard=tensorboard, tensorboard_every=tensorboard_every,
            precursors=precursors, on_precursor=on_precursor) + plugins

        self.errors = InternalErrorReporter()
        self.findings: list[Finding] = []
        self.history: list[StepRecord] = []
        self._step = 0

        # ----- everything is checked: only now touch the disk -----
        from .nonfinite.badbatches import BadBatches, read_bad_batches

        #: the known bad batches (``skip_bad_batches=True``: read from ``run_dir`` before this run writes)
        self.bad_batches = BadBatches(read_bad_batches(run_dir) if skip_bad_batches else ())
        self.skip_bad_batches = skip_bad_batches
        #: batches :meth:`should_skip` told to leave out so far
        self.batches_skipped = 0
        self._bundles_elsewhere = run_dir is not None and self._dist is not None and not self._dist.writes
        if run_dir is not None and self._dist is not None:  # only write_rank writes (default: rank 0)
            run_dir = self._dist.run_dir(run_dir) if self._dist.writes else None
        self.run_dir_mode = run_dir_mode
        self._run_dir_base, self._flush_every = run_dir, flush_every
        self.writer: RunWriter | None = (
            _runpath.open_writer(run_dir, run_dir_mode, flush_every) if run_dir is not None else None)
        #: the directory this Watch writes (``run_dir`` itself, or the ``version_N`` / resumed run chosen in it)
        self.run_dir = self.writer.path if self.writer is not None else None
        self._pipeline = StepPipeline(self)
        self._install_comm_hook(model)
        view = WatchView(self)
        for plugin in self.plugins:
            plugin.attach(view)
        if self.writer is not None and not (self.writer.resumed and self.writer.last_step):
            self.writer.write_meta(self._meta())  # a resumed run keeps its meta.json
        self._pipeline.begin_run()

    # ----- public API -------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Names of the layers measured now (trainable and held by the optimizer), in depth (execution) order.

        ``result.record.layer_names`` lists every layer (frozen ones too), one slot each for the run.
        """
        return self.index.measured_names

    @property
    def layer_table(self) -> list[dict[str, Any]]:
        """Every layer (frozen ones too) with type, depth, shapes and parameter counts."""
        return [layer.to_dict() for layer in self.index.layers]

    @property
    def steps_taken(self) -> int:
        """Number of steps so far (calls of :meth:`step` and :meth:`observe` that measured)."""
        return self._step

    @property
    def state(self) -> StepState:
        """Where the Watch is between calls (:class:`~gradwatch.pipeline.StepState`)."""
        return self._pipeline.state

    def step(self, closure_or_loss: Closure | torch.Tensor | None = None, batch: Any = None, *,
             backward: bool | None = None) -> StepResult:
        """Run (or finish) one training step under the Watch.

        Forms:

        - ``watch.step(closure)``: clears the measured gradients (as ``zero_grad()``),
          runs the closure (under autocast), back-propagates the loss it returns
          (scaled under fp16), measures, clips and updates. The closure must not call
          ``backward()`` itself.
        - ``watch.step(loss)``: back-propagates ``loss`` (forward already done);
          the measured parameters must hold no gradient yet (else it is ambiguous
          whether those are earlier micro-batches or stale: a clear error).
        - ``watch.step(loss, backward=False)``: you ran every backward of the step
          yourself; the Watch measures, clips and updates the gradients in place
          (not under fp16, where the Watch owns loss scaling).
        - after :meth:`accumulate`: ``watch.step(last_closure_or_loss)`` adds the
          last micro-batch, ``watch.step()`` takes the micro-batches so far; the
          update uses the *mean* of the micro-batches' gradients and the recorded
          loss is the mean of their losses.

        Without a closure (loss forms) a non-finite step can be classified but not
        replayed to its op (the finding says so).

        Args:
            closure_or_loss: a closure returning the loss, the loss tensor, or None
                (only after :meth:`accumulate`).
            batch: the step's input batch, kept for diagnosing a non-finite step.
            backward: loss form only: False when the gradients are already in
                place. Default: None (the Watch back-propagates).

        Returns:
            a :class:`~gradwatch.records.StepResult`.

        Raises:
            TypeError / ValueError: the closure or loss is not a scalar tensor, or
                the call is ambiguous (see above).
            RuntimeError: the call came out of order (a closed Watch; ``step()``
                with nothing accumulated; a step started from inside a step).
            NonFiniteError: a non-finite step with ``on_nonfinite="raise"``.
            Any exception of your closure, backward or ``optimizer.step()``,
            unchanged (the step is then abandoned and its gradients cleared).

        Example:
            >>> model = nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> watch = Watch(model, opt)
            >>> loss = model(torch.randn(8, 3)).pow(2).mean()
            >>> watch.step(loss).grad_norm > 0
            True
        """
        started = time.perf_counter()
        closure, loss = self._split(closure_or_loss, "watch.step()")
        pipe = self._pipeline
        if closure is not None and backward is False:
            raise ValueError("backward=False is for the loss form; a closure's loss is always back-propagated "
                             "by the Watch (return the loss without calling backward())")
        accumulated = pipe.state is StepState.ACCUMULATING
        if closure is None and loss is None:
            self._expect(StepState.ACCUMULATING, "watch.step()", "without a closure or a loss it finishes "
                         "micro-batches from watch.accumulate(...), and there are none; pass the step's closure or loss")
        else:
            self._expect((StepState.READY, StepState.ACCUMULATING), "watch.step()")
        if backward is False:
            if accumulated:
                raise RuntimeError("watch.step(loss, backward=False) after watch.accumulate(): finish the "
                                   "accumulated step with watch.step(last_micro_batch) or watch.step()")
            if self.precision.scaling:
                raise ValueError("watch.step(loss, backward=False) under precision='fp16': the Watch owns loss "
                                 "scaling, so let it back-propagate each micro-batch (watch.accumulate(loss))")
        ctx = pipe.pending if accumulated else None
        pipe.state = StepState.IN_STEP
        try:
            if ctx is None:
                ctx = pipe.begin()
            if closure is not None or loss is not None:
                pipe.micro_batch(ctx, closure, loss, batch, backward is not False)
            pipe.pending = None
            return pipe.finish(ctx, OWN_UPDATE, started)
        except BaseException as exc:
            if not isinstance(exc, NonFiniteError):  # raised after the step was recorded: nothing to undo
                pipe.pending = None
                pipe.abandon(ctx)
            raise
        finally:
            pipe.state = StepState.READY

    def accumulate(self, closure_or_loss: Closure | torch.Tensor, batch: Any = None) -> None:
        """Back-propagate one micro-batch of gradient accumulation; no update.

        The first micro-batch of a step clears the measured gradients (as
        ``zero_grad()``); each runs its closure under autocast (or takes the
        loss) and back-propagates it, scaled under fp16. Finish the step with
        :meth:`step` (the last micro-batch, or none): one measurement, clip and
        update on the mean of the micro-batches' gradients::

            for i, (x, y) in enumerate(loader):
                closure = lambda: loss_fn(model(x), y)
                if (i + 1) % 4:
                    watch.accumulate(closure, batch=(x, y))
                else:
                    result = watch.step(closure, batch=(x, y))   # the mean over 4 micro-batches

        An exception in a micro-batch (e.g. out of memory) abandons the whole
        accumulated step: its gradients are cleared.

        Raises:
            TypeError / ValueError: as :meth:`step`.
            RuntimeError: the Watch is closed, or called from inside a step.

        Example:
            >>> model = nn.Linear(3, 1); watch = Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> x = torch.randn(8, 3)
            >>> watch.accumulate(lambda: model(x[:4]).pow(2).mean())
            >>> watch.step(lambda: model(x[4:]).pow(2).mean()).record.micro_batches
            2
        """
        closure, loss = self._split(closure_or_loss, "watch.accumulate()")
        if closure is None and loss is None:
            raise TypeError("watch.accumulate() takes a closure that returns the loss, or the loss tensor")
        self._expect((StepState.READY, StepState.ACCUMULATING), "watch.accumulate()")
        pipe = self._pipeline
        ctx = pipe.pending
        pipe.state = StepState.IN_STEP
        try:
            if ctx is None:
                ctx = pipe.pending = pipe.begin()
            pipe.micro_batch(ctx, closure, loss, batch, True)
            pipe.state = StepState.ACCUMULATING
        except BaseException:
            pipe.pending = None
            pipe.state = StepState.READY
            pipe.abandon(ctx)
            raise

    def observe(self, loss: torch.Tensor | float | None = None, batch: Any = None) -> StepResult:
        """Measure the gradients already in ``.grad`` for a loop that takes the optimizer step itself.

        For Lightning, the Hugging Face Trainer or your own loop: call it after
        backward (and after unscaling, under fp16), before ``optimizer.step()``.
        It records the per-layer norms *before* clipping, clips in place when
        ``clip_norm`` is set, decides whether the step must be skipped (the same
        decision on every rank under torch.distributed), records and diagnoses.
        It never calls ``optimizer.step()`` or ``zero_grad()``: on a step to skip
        it sets every gradient to None, so the ``optimizer.step()`` that follows
        leaves the weights and the optimizer state unchanged (torch optimizers
        pass over parameters without a gradient). The update ratio is measured
        when the caller's ``optimizer.step()`` has run, by a one-shot optimizer
        hook (not under torch.distributed on this path).

        Args:
            loss: the step's loss (tensor or float), for the record and the
                rules; None when unknown. Default: None.
            batch: the step's input batch, kept for diagnosis. Default: None.

        Returns:
            a :class:`~gradwatch.records.StepResult`; ``result.skipped`` says
            that the gradients were dropped.

        Raises:
            ValueError: the Watch was built with ``precision="fp16"`` (the caller
                owns loss scaling here: build it with ``precision="fp32"``).
            RuntimeError: called while micro-batches from :meth:`accumulate` wait.
            NonFiniteError: a non-finite step with ``on_nonfinite="raise"``.

        Example:
            >>> model = nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> watch = Watch(model, opt)
            >>> loss = model(torch.randn(8, 3)).pow(2).mean(); loss.backward()
            >>> result = watch.observe(loss)       # measure, record, diagnose
            >>> opt.step(); opt.zero_grad()        # the loop's own step
            >>> result.skipped, result.grad_norm > 0
            (False, True)
        """
        started = time.perf_counter()
        self._expect(StepState.READY, "watch.observe()",
                     "micro-batches from watch.accumulate() are waiting: finish them with watch.step()")
        if self.precision.scaling:
            raise ValueError(
                "watch.observe() measures gradients whose loss scaling the caller owns; "
                "build this Watch with precision='fp32' (or 'bf16') and unscale before calling observe()")
        known = loss is not None
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        elif loss is not None:
            check_loss(loss, "the loss passed to watch.observe() is")
        else:
            loss = torch.zeros((), dtype=torch.float64)
        pipe = self._pipeline
        pipe.ratio.drop_caller()  # still armed: no optimizer.step() followed the last observe()
        pipe.state = StepState.IN_STEP
        ctx: StepContext | None = None
        try:
            try:
                ctx = pipe.begin()
                ctx.loss_known = known
                pipe.micro_batch(ctx, None, loss, batch, False)
            except Exception as exc:  # nothing of the user's runs here: gradwatch's own error
                if pipe.is_users(exc):
                    raise
                self.errors.report("watch.observe", exc)
                return StepResult(step=self._step, loss=math.nan, grad_norm=math.nan, clipped=False, skipped=False,
                                  findings=[])
            return pipe.finish(ctx, CALLER_UPDATE, started)
        finally:
            pipe.state = StepState.READY

    def zero_grad(self) -> None:
        """Clear (set to None) the gradients of every parameter the Watch measures or the optimizer holds.

        For the loss form when another backward left gradients behind (a GAN's
        generator step fills the discriminator's ``.grad``).

        Example:
            >>> model = nn.Linear(2, 1); watch = Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> model(torch.ones(1, 2)).sum().backward(); watch.zero_grad(); model.weight.grad is None
            True
        """
        self._expect(StepState.READY, "watch.zero_grad()")
        self._pipeline.clear_grads()

    def _install_comm_hook(self, wrapper: Any) -> None:
        """Under torch.distributed: the comm hook that names the rank of a non-finite step, on ``wrapper``
        (the model, or the DDP wrapper an integration's trainer made around it); says once why not."""
        if self._dist is None or not isinstance(wrapper, nn.Module) or self._dist.hooked:
            return
        self._dist.report = self.errors.report
        why_not = self._dist.install_hook(wrapper)
        if why_not is not None:
            logger.warning("gradwatch: %s; a non-finite step names the rank(s) from their local loss only "
                           "(not from local gradients made non-finite in the backward)", why_not)

    def should_skip(self, batch: Any) -> bool:
        """Whether ``batch`` made an earlier run's step non-finite (``skip_bad_batches=True``): leave it out.

        Compares the batch's fingerprint (:func:`gradwatch.nonfinite.badbatches.fingerprint`:
        a hash of its bytes, computed only when some bad batch has the same dtypes
        and shapes) with those in the run directory's ``bad_batches.jsonl``. Under
        torch.distributed the ranks agree (one all-reduce of 1 number per call):
        when one rank's batch is a bad one, every rank skips its own, so the ranks
        stay in step. Always False with ``skip_bad_batches=False`` (no cost).

        Example:
            >>> import tempfile
            >>> run_dir = tempfile.mkdtemp()
            >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> bad = (torch.tensor([[1.0, float("nan")]]), torch.zeros(1, 1))
            >>> with Watch(model, opt, run_dir=run_dir) as watch:   # the run that hit it
            ...     _ = watch.step(lambda: nn.functional.mse_loss(model(bad[0]), bad[1]), batch=bad)
            >>> restarted = Watch(model, opt, run_dir=run_dir, skip_bad_batches=True)
            >>> restarted.should_skip(bad), restarted.should_skip((torch.ones(1, 2), torch.zeros(1, 1)))
            (True, False)
            >>> restarted.close()
        """
        if not self.skip_bad_batches:
            return False
        local = False
        try:
            local = self.bad_batches.contains(batch)
        except Exception as exc:  # a batch that cannot be hashed is not skipped
            self.errors.report("should_skip", exc)
        skip = self._dist.agree(local) if self._dist is not None else local
        if skip:
            self.batches_skipped += 1
            if self.batches_skipped == 1:
                logger.info("gradwatch: leaving out a batch that made an earlier run's step non-finite "
                            "(skip_bad_batches=True)")
        return skip

    def close(self) -> None:
        """Remove hooks, close plugins and flush the run directory. Idempotent."""
        pipe = self._pipeline
        if pipe.state is StepState.CLOSED:
            return
        if self._dist is not None:
            self._dist.release_hook()
        if pipe.pending is not None:
            pipe.abandon(pipe.pending)
            pipe.pending = None
        pipe.state = StepState.CLOSED
        pipe.ratio.drop_caller()
        self.index.finish_order_tracking()
        for plugin in self.plugins:
            try:
                plugin.close()
            except Exception as exc:
                self.errors.report(f"{plugin.name}.close", exc)
        if self.writer is not None:
            self.writer.close()

    @property
    def closed(self) -> bool:
        return self._pipeline.state is StepState.CLOSED

    def __enter__(self) -> "Watch":
        return self

    def __repr__(self) -> str:
        """One line: model, layers, steps, clip_norm, precision, run_dir and the findings' codes."""
        from .notebook import watch_repr

        return watch_repr(self)

    def _repr_html_(self) -> str:
        """The Watch in a notebook: options, the last step, layers and the latest findings."""
        from .notebook import watch_html

        return watch_html(self)

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to decide as an uninterrupted one: the step counter, the
        clipper, the precision (loss scaler), the recent history and every plugin's state.

        Plain data and tensors only: ``torch.save`` it with your checkpoint and ``torch.load(...,
        weights_only=True)`` reads it back. A closed Watch still gives its state (to resume in a new one).
        The run directory is written through ``step`` first (so a checkpoint never refers to steps that
        are not on disk), and ``run_dir`` names it.

        Example:
            >>> import torch, gradwatch as gw
            >>> model = torch.nn.Linear(2, 1)
            >>> watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> watch.state_dict()["step"]
            0
        """
        self._expect((StepState.READY, StepState.CLOSED), "watch.state_dict()")  # saving after close is fine
        if self.writer is not None:
            self.writer.flush(wait=True)
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "run_dir": str(self.run_dir) if self.run_dir is not None else None,
            "clipper": self.clipper.state_dict(),
            "precision": self.precision.state_dict(),
            "history": [record.to_state() for record in self.history],
            "plugins": {key: plugin.state_dict() for key, plugin in self._plugin_keys()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (into a Watch built like the one that saved it).

        The next step is ``state["step"] + 1``. With a run directory, every record of a later step is
        dropped from it (steps, matrix rows, findings, events, bundles): with ``run_dir_mode="resume"``
        those are the steps the interrupted run took after its checkpoint, which the resumed run takes again.

        Example:
            >>> import tempfile, torch, gradwatch as gw
            >>> model = torch.nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> watch = gw.Watch(model, opt, run_dir=tempfile.mkdtemp(), run_dir_mode="resume")
            >>> watch.load_state_dict({"step": 100})
            >>> watch.step(lambda: model(torch.ones(4, 2)).pow(2).mean()).step
            101
            >>> watch.close()
        """
        self._expect((StepState.READY,), "watch.load_state_dict()")
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("state must be a dict from Watch.state_dict()")
        self._step = int(state["step"])
        self._resume_named_run(state)
        if self.writer is not None:
            self.writer.supersede_from(self._step + 1)
        self.clipper.load_state_dict(state.get("clipper", {}))
        self.precision.load_state_dict(state.get("precision", {}))
        self.history[:] = [StepRecord.from_state(data) for data in state.get("history", [])]
        saved = state.get("plugins", {})
        for key, plugin in self._plugin_keys():
            if key in saved:
                plugin.load_state_dict(saved[key])
        self._pipeline.resumed()

    def _resume_named_run(self, state: dict[str, Any]) -> None:
        """run_dir_mode='resume': continue the run the state names (``run_dir`` or a version in it), if another."""
        writer = self.writer
        if writer is None or self.run_dir_mode != "resume" or self.history or self._run_dir_base is None:
            return
        target = _runpath.resume_dir(self._run_dir_base, state)
        if target is not None and target != writer.path and _runpath.holds_run(target):
            writer.close()
            self.writer = _runpath.open_exact(target, self._flush_every)
            self.run_dir = self.writer.path

    def _plugin_keys(self) -> list[tuple[str, WatchPlugin]]:
        keys: list[tuple[str, WatchPlugin]] = []
        counts: dict[str, int] = {}
        for plugin in self.plugins:
            n = counts.get(plugin.name, 0)
            counts[plugin.name] = n + 1
            keys.append((plugin.name if n == 0 else f"{plugin.name}#{n}", plugin))
        return keys

    def add_finding(self, finding: Finding) -> None:
        """Record a finding (in memory, in the run directory, and in the log)."""
        self.findings.append(finding)
        if self.writer is not None:
            self.writer.append_finding(finding)
        if finding.severity != "info":
            logger.warning("%s", finding)

    # ----- internals --------------------------------------------------------------------
    def _expect(self, states: StepState | tuple[StepState, ...], call: str, hint: str = "") -> None:
        """RuntimeError naming the call that came out of order (GradScaler's OptState habit)."""
        state = self._pipeline.state
        allowed = states if isinstance(states, tuple) else (states,)
        if state in allowed:
            return
        if state is StepState.CLOSED:
            raise RuntimeError(f"{call}: this Watch is closed; make a new gradwatch.Watch to keep measuring")
        if state is StepState.IN_STEP:
            raise RuntimeError(f"{call} was called while a step is running (from inside the closure, a hook or "
                               "a plugin); a step cannot start inside another")
        raise RuntimeError(f"{call} came out of order: {hint or 'the Watch is ' + state.value}")

    @staticmethod
    def _split(closure_or_loss: Any, call: str) -> tuple[Closure | None, torch.Tensor | None]:
        if closure_or_loss is None:
            return None, None
        if isinstance(closure_or_loss, torch.Tensor):
            return None, closure_or_loss
        if callable(closure_or_loss):
            return closure_or_loss, None
        raise TypeError(f"{call} takes a closure that returns the loss, or the loss tensor; "
                        f"got {type(closure_or_loss).__name__}")

    def _meta(self) -> dict[str, Any]:
        return {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": type(_distributed.unwrap_model(self.model)).__name__,
            "optimizer": type(self.optimizer).__name__,
            "clip_norm": self.clip_norm if isinstance(self.clip_norm, (int, float, str, type(None))) else repr(self.clip_norm),
            "precision": self.precision.mode,
            "on_nonfinite": self.on_nonfinite,
            "on_spike": self.on_spike,
            "norm_type": self.norm_type,
            "update_ratio_every": self.update_ratio_every,
            "update_ratio_budget": self.update_ratio_budget,
            "settings": {name: getattr(self.config, name).changed() for name in ("diagnosis", "nonfinite", "repair", "amp")},
            # the whole PrecursorConfig (its thresholds are drawn in the report), None when off
            "precursors": next((p.config.to_dict() for p in self.plugins
                                if p.name == "precursors" and isinstance(getattr(p, "config", None), PrecursorConfig)), None),
            "torch": torch.__version__,
            "device": str(self.device),
            **(self._dist.meta() if self._dist is not None else {}),
        }

