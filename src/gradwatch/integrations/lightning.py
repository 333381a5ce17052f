"""gradwatch in a Lightning Trainer: ``GradwatchCallback``.

Needs ``pip install gradwatch[lightning]``. Usage::

    from gradwatch.integrations.lightning import GradwatchCallback
    trainer = lightning.Trainer(callbacks=[GradwatchCallback(run_dir="runs/exp1")],
                                gradient_clip_val=1.0, precision="bf16-mixed")

Where it hooks in (Lightning 2.x, automatic optimization):

- ``on_train_start``: builds a :class:`gradwatch.Watch` on the LightningModule
  and its optimizer (the process group of a DDP/FSDP strategy exists by then).
- ``on_before_backward``: keeps the loss (summed over accumulated batches).
- ``on_before_optimizer_step``: runs after Lightning's unscale (fp16) and
  before Lightning's own gradient clipping, so the per-layer norms are those
  before clipping; calls :meth:`Watch.observe`, logs ``gradwatch/*`` metrics
  through the LightningModule's loggers and writes the run directory. On a
  non-finite step every gradient is set to None: ``optimizer.step()`` then
  changes nothing.
- ``on_train_batch_end``: after a skipped step, rewinds the step-interval LR
  schedulers that Lightning stepped anyway (no schedule drift).
- ``state_dict`` / ``load_state_dict``: the Watch's state goes into checkpoints.
  ``Trainer.fit(ckpt_path=...)`` restores it and, by default, resumes the run
  directory the checkpoint names: the steps the interrupted run recorded after
  the checkpoint are dropped, so the directory ends as an uninterrupted run's.

Lightning's ``global_step`` still counts a skipped step (it counts optimizer
calls); ``watch.history`` marks it ``skipped``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - the standalone package
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.callbacks import Callback  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError(
            "gradwatch.integrations.lightning needs Lightning: pip install 'gradwatch[lightning]'"
        ) from exc

from ..plugins import WatchView
from ..precursors.plugin import PrecursorPlugin
from ..runpath import check_mode
from ..watch import Watch
from .. import tags
from . import SchedulerRewind, severity_level

__all__ = ["GradwatchCallback"]

_log = logging.getLogger("gradwatch")
_ON_NONFINITE = ("skip", "raise")


class GradwatchCallback(Callback):
    """Per-layer gradient telemetry, diagnosis and skip-on-non-finite for a Lightning Trainer.

    Args:
        run_dir: run directory (written by rank 0 under DDP/FSDP); None keeps
            everything in memory. Default: None.
        clip_norm: clip the global norm to this value inside gradwatch; None
            leaves clipping to ``Trainer(gradient_clip_val=...)``. Default: None.
        on_nonfinite: ``"skip"`` (drop the step's gradients, rewind the LR
            scheduler) or ``"raise"`` (:class:`gradwatch.NonFiniteError` stops
            training). Default: ``"skip"``.
        log_layers: also log the per-layer numbers, ``gradwatch/layer_grad_norm/<layer>`` and, on
            the steps that measure it, ``gradwatch/layer_update_ratio/<layer>``: True on every step,
            an int ``N`` on step 1 and every ``N`` steps, False never. Default: False (a metric per
            layer can be many). The precursor signals (``gradwatch/adam_rms_max``, ...) are logged on
            the steps that measure them; their per-layer and per-site tags only when this is not False.
        run_dir_mode: ``"version"``, ``"resume"`` or ``"overwrite"`` (see
            :class:`gradwatch.Watch`); None: ``"resume"`` when the fit restores
            a checkpoint that holds gradwatch's state (``fit(ckpt_path=...)``),
            continuing the run directory it names (``run_dir`` or a
            ``version_N`` in it), else ``"version"``. Default: None.
        **watch_options: other :class:`gradwatch.Watch` keywords
            (``norm_type``, ``diagnose``, ``write_rank``, ...).

    Attributes:
        watch: the :class:`gradwatch.Watch` (None before training starts).

    Example:
        >>> cb = GradwatchCallback(run_dir=None, log_layers=True)
        >>> cb.watch is None
        True
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        clip_norm: float | None = None,
        on_nonfinite: str = "skip",
        log_layers: bool | int = False,
        run_dir_mode: str | None = None,
        **watch_options: Any,
    ) -> None:
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {_ON_NONFINITE} in the Lightning callback, got {on_nonfinite!r}"
            )
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir must be a path or None, got {type(run_dir).__name__}")
        if not isinstance(log_layers, (bool, int)) or (not isinstance(log_layers, bool) and log_layers < 1):
            raise TypeError(f"log_layers must be True, False or a positive int (every N steps), got {log_layers!r}")
        if run_dir_mode is not None:
            check_mode(run_dir_mode)
        for reserved in ("precision", "scaler"):
            if reserved in watch_options:
                raise ValueError(
                    f"{reserved}= is Lightning's job here: set Trainer(precision=...); gradwatch measures after its unscale"
                )
        self.run_dir = run_dir
        self.clip_norm = clip_norm
        self.on_nonfinite = on_nonfinite
        self.log_layers = log_layers
        self.run_dir_mode = run_dir_mode
        self.watch_options = watch_options
        self.watch: Watch | None = None
        self._loss: torch.Tensor | None = None
        self._batch: Any = None
        self._rewind = SchedulerRewind()
        self._pending_state: dict[str, Any] | None = None
        self.last_result = None
        self._ratio_record = None  # this step's record, whose update ratio is logged at batch end

    # ----- set-up / tear-down ----------------------------------------------------------
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.watch is not None and not self.watch.closed:
            return
        if not trainer.optimizers:
            raise ValueError("GradwatchCallback needs an optimizer: configure_optimizers() returned none")
        run_dir, mode = self.run_dir, self.run_dir_mode or "version"
        if self.watch is not None:  # a second fit(): the first run directory is complete; keep counting steps
            _log.warning("gradwatch: fit() again: this fit's telemetry stays in memory (the run directory %s is closed)", run_dir)
            self._pending_state = self.watch.state_dict()
            run_dir = None
        elif self._pending_state is not None and self.run_dir_mode is None and run_dir is not None:
            mode = "resume"  # fit(ckpt_path=...): load_state_dict below picks the run the checkpoint names
        self.watch = Watch(
            pl_module,
            trainer.optimizers[0],
            clip_norm=self.clip_norm,
            on_nonfinite=self.on_nonfinite,
            run_dir=run_dir,
            run_dir_mode=mode,
            **self.watch_options,
        )
        wrapper = getattr(trainer.strategy, "model", None)  # Lightning's DDP wrapper around pl_module
        if wrapper is not None and wrapper is not pl_module:
            self.watch._install_comm_hook(wrapper)  # names the rank of a non-finite step from its local gradients
        if self._pending_state is not None:
            self.watch.load_state_dict(self._pending_state)
            self._pending_state = None
        self.watch.external_clip = _trainer_clip(trainer) if self.clip_norm is None else None

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.watch is not None:
            self.watch.close()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if self.watch is not None:
            self.watch.close()

    def state_dict(self) -> dict[str, Any]:
        return {"watch": self.watch.state_dict()} if self.watch is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("watch")
        if state is None:
            return
        if self.watch is not None:
            self.watch.load_state_dict(state)
        else:
            self._pending_state = state

    # ----- every step ------------------------------------------------------------------
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        self._batch = batch
        self._precursor_window("open_window")  # training_step's own F.cross_entropy: log Z on sampled steps

    def _precursor_window(self, method: str) -> None:
        watch = self.watch
        if watch is None or watch.closed:
            return
        for plugin in watch.plugins:
            if isinstance(plugin, PrecursorPlugin):
                try:
                    getattr(plugin, method)()
                except Exception as exc:  # never break the loop for a signal
                    watch.errors.report(f"precursors.{method}", exc)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._precursor_window("close_window")  # the user's training_step raised: leave no mode on

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        self._precursor_window("close_window")  # the forward calls are done; backward runs without the mode
        # Lightning passes the loss divided by accumulate_grad_batches: the sum is the mean loss.
        try:
            value = loss.detach().float()
            self._loss = value if self._loss is None else self._loss + value
        except Exception:  # never break the loop for a number we only record
            self._loss = None

    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        watch = self.watch
        if watch is None or watch.closed or optimizer is not watch.optimizer:
            return
        loss, self._loss = self._loss, None
        result = watch.observe(loss, batch=self._batch)  # internal errors are reported inside, never raised
        self.last_result = result
        self._ratio_record = result.record
        if result.skipped:
            configs = [c for c in trainer.lr_scheduler_configs if c.interval == "step"]
            self._rewind.save([c.scheduler for c in configs], optimizer)
        try:
            self._log(trainer, pl_module, result)
        except Exception as exc:
            watch.errors.report("lightning logging", exc)

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        try:
            self._log_update_ratio(trainer)
        except Exception as exc:
            if self.watch is not None:
                self.watch.errors.report("lightning logging", exc)
        if self._rewind.pending:  # Lightning stepped the schedulers after a skipped update: undo it
            try:
                self._rewind.restore()
            except Exception as exc:
                if self.watch is not None:
                    self.watch.errors.report("lightning scheduler rewind", exc)

    # ----- logging ---------------------------------------------------------------------
    def _layers_due(self, step: int) -> bool:
        """Whether the per-layer numbers of ``step`` are logged (``log_layers``: True, False or every N)."""
        every = self.log_layers
        if isinstance(every, bool):
            return every
        return step == 1 or step % every == 0

    def _log_update_ratio(self, trainer: "pl.Trainer") -> None:
        """The per-layer update ratios of this step, measured inside Lightning's ``optimizer.step()``.

        Sent to each logger directly (``log_metrics``), under the global step the step's other numbers
        were logged with: ``log_dict`` after the step's metrics were flushed would repeat them on the next.
        """
        record, self._ratio_record = self._ratio_record, None  # logged once
        if record is None or record.update_ratio is None or not self._layers_due(record.step):
            return
        if not trainer.loggers or not trainer.is_global_zero:
            return
        metrics = tags.layer_metrics(record.layer_names, update_ratios=record.update_ratio.tolist())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=max(trainer.global_step - 1, 0))

    def _log_signals(self, trainer: "pl.Trainer", step: int) -> None:
        """The precursor signals of ``step``, when it measured some, sent to each logger directly under the
        global step the step's other numbers are logged with: ``log_dict`` would send a key's last value again
        on every later step, and the signals are measured on some steps only."""
        signals = tags.signal_metrics(WatchView(self.watch).signals(step), per_layer=self.log_layers is not False)
        if not signals or not trainer.loggers or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(signals, step=trainer.global_step)

    def _log(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", result: Any) -> None:
        metrics = {
            tags.GRAD_NORM: float(result.grad_norm),
            tags.SKIPPED: float(result.skipped),
            tags.CLIPPED: float(result.clipped),
        }
        record = result.record
        if record is not None and record.clip_threshold is not None:
            metrics[tags.CLIP_THRESHOLD] = float(record.clip_threshold)
            metrics[tags.CLIP_COEF] = float(record.clip_coef)
        if result.record is not None and self._layers_due(result.record.step):
            for name, value in result.layer_grad_norms.items():
                metrics[tags.layer_grad_norm(name)] = float(value)
        for finding in result.findings:
            metrics[tags.finding(finding.code)] = severity_level(finding.severity)
        if trainer.loggers:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        if record is not None:
            self._log_signals(trainer, record.step)
        for finding in result.findings:
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                add_text = getattr(experiment, "add_text", None)
                if callable(add_text) and trainer.is_global_zero:  # TensorBoard
                    add_text(tags.FINDINGS + "/" + finding.code, str(finding), trainer.global_step)


def _trainer_clip(trainer: Any) -> tuple[float, str] | None:
    """``(gradient_clip_val, "norm" | "value")`` of a Lightning Trainer that clips, else None.

    Example:
        >>> class T: gradient_clip_val, gradient_clip_algorithm = 0.5, "norm"
        >>> _trainer_clip(T())
        (0.5, 'norm')
    """
    val = getattr(trainer, "gradient_clip_val", None)
    try:
        val = float(val) if val is not None else None
    except (TypeError, ValueError):
        return None
    if val is None or not val > 0 or val != val:
        return None
    algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
    algorithm = algorithm.split(".")[-1]  # GradClipAlgorithmType.NORM -> norm
    return (val, "value" if algorithm == "value" else "norm")
