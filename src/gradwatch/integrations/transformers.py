"""gradwatch in a Hugging Face ``transformers.Trainer``: ``GradwatchCallback``.

Needs ``pip install gradwatch[transformers]``. Usage::

    from gradwatch.integrations.transformers import GradwatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradwatchCallback(run_dir="runs/exp1")])

Where it hooks in (transformers 4.4x / 5.x):

- ``on_train_begin``: builds a :class:`gradwatch.Watch` on the Trainer's model
  and optimizer. The Trainer clips *before* its ``on_pre_optimizer_step``
  event, which would hide the pre-clip per-layer norms, so with
  ``clip_norm="trainer"`` (default) gradwatch takes the clipping over: it clips to
  ``args.max_grad_norm`` itself and sets ``args.max_grad_norm = 0`` for the run
  (restored at ``on_train_end``). The Trainer's logged ``grad_norm`` stays the
  pre-clip norm.
- a forward hook on the model keeps ``outputs.loss`` of each training
  micro-batch (the mean over micro-batches, or their sum when the Trainer
  passes ``num_items_in_batch``, i.e. partial losses).
- ``on_pre_optimizer_step``: gradients are unscaled by then (the Trainer's
  norm computation unscales under fp16); calls :meth:`Watch.observe`. On a
  non-finite step every gradient is set to None (``optimizer.step()`` changes
  nothing) and the LR scheduler's state is saved.
- ``on_step_end``: after a skipped step, the scheduler step the Trainer took
  anyway is rewound (no schedule drift).
- ``on_save``: the Watch's state goes into the checkpoint folder as
  ``gradwatch_state.pt``. ``train(resume_from_checkpoint=...)`` restores it
  (from ``output_dir/checkpoint-<global_step>``; without that file the step
  counter alone continues from ``global_step``) and, by default, resumes the
  run directory: the steps the interrupted run recorded after the checkpoint
  are dropped, so the directory ends as an uninterrupted run's.
- ``on_log``: adds ``gradwatch/*`` numbers to the logs dict (seen by reporting
  callbacks that come after this one); findings are also appended to
  ``state.log_history`` as ``{"gradwatch_finding": code, ...}`` entries, the
  run directory and the ``gradwatch`` Python logger.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        "gradwatch.integrations.transformers needs transformers: pip install 'gradwatch[transformers]'"
    ) from exc

from ..plugins import WatchView
from ..runpath import check_mode
from ..watch import Watch
from .. import tags
from . import SchedulerRewind

__all__ = ["GradwatchCallback"]

_ON_NONFINITE = ("skip", "raise")
#: the Watch's state in each checkpoint folder
STATE_FILE = "gradwatch_state.pt"


def _saved_state(args: Any, global_step: int) -> dict[str, Any]:
    """The Watch state saved with the checkpoint of ``global_step``; the step counter alone when there is none."""
    path = os.path.join(args.output_dir, f"checkpoint-{global_step}", STATE_FILE)
    if os.path.isfile(path):
        try:
            state = torch.load(path, weights_only=True)
            if isinstance(state, dict) and "step" in state:
                return state
        except Exception:  # unreadable: continue the step count from the Trainer's
            pass
    return {"step": int(global_step)}


class GradwatchCallback(TrainerCallback):
    """Per-layer gradient telemetry, diagnosis and skip-on-non-finite for a ``transformers.Trainer``.

    Args:
        run_dir: run directory (written by rank 0 under torch.distributed);
            None keeps everything in memory. Default: None.
        clip_norm: ``"trainer"`` (clip to ``args.max_grad_norm`` inside gradwatch,
            so the recorded norms are pre-clip), a float, or None (leave the
            Trainer's own clipping alone; the recorded norms are then post-clip).
            Default: ``"trainer"``. (``"autoclip"`` is not offered here: the
            Trainer's ``max_grad_norm`` is the clipping a Trainer user asked for.)
        on_nonfinite: ``"skip"`` or ``"raise"``. Default: ``"skip"``.
        run_dir_mode: ``"version"``, ``"resume"`` or ``"overwrite"`` (see
            :class:`gradwatch.Watch`); None: ``"resume"`` when the Trainer
            resumes from a checkpoint (``state.global_step > 0`` when training
            begins), continuing the run the checkpoint's ``gradwatch_state.pt``
            names, else ``"version"``. Default: None.
        layers_every: log the per-layer gradient norms (``gradwatch/layer_grad_norm/<name>``) and, on
            the steps that measure them, the update ratios (``gradwatch/layer_update_ratio/<name>``) to the
            ``report_to`` backends on step 1 and every this many steps (at a logging step); None: never.
            Default: 50. The precursor signals (``gradwatch/adam_rms_max``, ...) measured since the last
            logging step are added at the next one (of each tag, its latest value); their per-layer and
            per-site tags unless this is None.
        **watch_options: other :class:`gradwatch.Watch` keywords
            (``norm_type``, ``diagnose``, ``write_rank``, ...).

    Attributes:
        watch: the :class:`gradwatch.Watch` (None before training starts).

    Example:
        >>> cb = GradwatchCallback(run_dir=None)
        >>> cb.watch is None
        True
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        clip_norm: float | str | None = "trainer",
        on_nonfinite: str = "skip",
        run_dir_mode: str | None = None,
        layers_every: int | None = 50,
        **watch_options: Any,
    ) -> None:
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(
                f"on_nonfinite must be one of {_ON_NONFINITE} in the transformers callback, got {on_nonfinite!r}"
            )
        if clip_norm == "auto":
            raise ValueError(
                "clip_norm='auto' was renamed: use clip_norm='trainer' (clip to TrainingArguments.max_grad_norm "
                "inside gradwatch, the default), a positive float, or None"
            )
        if isinstance(clip_norm, str) and clip_norm != "trainer":
            raise ValueError(f"clip_norm must be 'trainer', a positive float or None, got {clip_norm!r}")
        if clip_norm is not None and not isinstance(clip_norm, str):
            if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not (
                math.isfinite(clip_norm) and clip_norm > 0
            ):
                raise ValueError(f"clip_norm must be 'trainer', a positive float or None, got {clip_norm!r}")
        if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
            raise TypeError(f"run_dir must be a path or None, got {type(run_dir).__name__}")
        if run_dir_mode is not None:
            check_mode(run_dir_mode)
        for reserved in ("precision", "scaler"):
            if reserved in watch_options:
                raise ValueError(
                    f"{reserved}= is the Trainer's job here: set TrainingArguments(bf16=/fp16=); "
                    "gradwatch measures after its unscale"
                )
        self.run_dir = run_dir
        self.clip_norm = clip_norm
        self.on_nonfinite = on_nonfinite
        self.run_dir_mode = run_dir_mode
        self.watch_options = watch_options
        self.watch: Watch | None = None
        self.last_result = None
        self._rewind = SchedulerRewind()
        self._saved_max_grad_norm: float | None = None
        self._hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._partial = False
        self.skipped_steps = 0
        if layers_every is not None and (isinstance(layers_every, bool) or not isinstance(layers_every, int)
                                         or layers_every < 1):
            raise ValueError(f"layers_every must be a positive int or None, got {layers_every!r}")
        self.layers_every = layers_every
        self._logged_step = -1
        self._signals: dict[str, float] = {}  # precursor tags measured since the last logging step

    # ----- set-up / tear-down ----------------------------------------------------------
    def _move_first(self) -> None:
        """Put this callback just ahead of the ``report_to`` callbacks (TensorBoard, W&B, MLflow, ...: those of
        ``transformers.integrations``) in the Trainer's list, so its ``on_log`` adds the gradwatch/* numbers
        before they send the logs on. Other callbacks keep their order.

        The Trainer hands callbacks no reference to their handler, so the list is found as the
        ``callbacks`` attribute of the object holding this callback. Moving an item from position k to 0
        to j < k while the handler iterates at k neither repeats nor skips a callback.
        """
        import gc

        for holder in gc.get_referrers(self):
            if not isinstance(holder, list) or not holder:
                continue
            owners = gc.get_referrers(holder)  # the handler itself, or its __dict__ (Python < 3.12)
            if not any((d.get("callbacks") if isinstance(d, dict) else getattr(d, "callbacks", None)) is holder
                       for d in owners):
                continue
            reporters = [i for i, cb in enumerate(holder)
                         if type(cb).__module__.startswith("transformers.integrations")]
            mine = holder.index(self)
            if reporters and reporters[0] < mine:
                holder.remove(self)
                holder.insert(reporters[0], self)

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            self._move_first()
        except Exception:  # never break the Trainer for the order of its callbacks
            pass

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        try:
            self._move_first()  # a callback added with trainer.add_callback after __init__
        except Exception:
            pass
        if self.watch is not None and not self.watch.closed:
            return
        if model is None or optimizer is None:
            raise ValueError("GradwatchCallback needs the Trainer's model and optimizer (transformers >= 4.40)")
        clip = self.clip_norm
        if clip == "trainer":
            clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
            if clip is not None:  # take the clipping over: the Trainer clips before any callback sees the grads
                self._saved_max_grad_norm = args.max_grad_norm
                args.max_grad_norm = 0.0
        run_dir, mode, saved = self.run_dir, self.run_dir_mode or "version", None
        if self.watch is not None:  # train() again: the first run directory is complete; keep counting steps
            saved, run_dir = self.watch.state_dict(), None
        elif state.global_step > 0:  # train(resume_from_checkpoint=...)
            saved = _saved_state(args, state.global_step)
            mode = self.run_dir_mode or "resume"
        self.watch = Watch(model, optimizer, clip_norm=clip, on_nonfinite=self.on_nonfinite, run_dir=run_dir,
                           run_dir_mode=mode, **self.watch_options)
        if saved is not None:
            self.watch.load_state_dict(saved)
        self._hook = model.register_forward_hook(self._keep_loss, with_kwargs=True)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Save the Watch's state into the checkpoint folder the Trainer has just written."""
        watch = self.watch
        if watch is None or not getattr(args, "should_save", True):
            return
        try:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                torch.save(watch.state_dict(), os.path.join(folder, STATE_FILE))
        except Exception as exc:  # a checkpoint without gradwatch's state still resumes (the step counter)
            watch.errors.report("transformers checkpoint", exc)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._saved_max_grad_norm is not None:
            args.max_grad_norm = self._saved_max_grad_norm
            self._saved_max_grad_norm = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.watch is not None:
            self.watch.close()

    # ----- every step ------------------------------------------------------------------
    def _keep_loss(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if not module.training:
            return
        try:
            loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                self._losses.append(loss.detach().float().reshape(()))
                self._partial = kwargs.get("num_items_in_batch") is not None
        except Exception:  # a number we only record must never break the forward pass
            pass

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._losses = []

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None, **kwargs: Any
    ) -> None:
        watch = self.watch
        if watch is None or watch.closed:
            return
        losses, self._losses = self._losses, []
        loss = None
        if losses:
            stacked = torch.stack(losses)
            loss = stacked.sum() if self._partial else stacked.mean()
        result = watch.observe(loss)  # internal errors are reported inside, never raised
        self.last_result = result
        try:  # this step's precursor signals wait for the next logging step (the latest value of each tag)
            entry = WatchView(watch).signals(result.step)
            if entry:
                self._signals.update(tags.signal_metrics(entry, per_layer=self.layers_every is not None))
        except Exception as exc:  # never break the loop for a number we only log
            watch.errors.report("transformers signals", exc)
        if result.skipped:
            self.skipped_steps += 1
            self._rewind.save([lr_scheduler], optimizer)
        for finding in result.findings:
            entry = {"gradwatch_finding": finding.code, "severity": finding.severity,
                     "message": finding.message, "step": state.global_step + 1}
            state.log_history.append(entry)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._rewind.pending:  # the Trainer stepped the scheduler after a skipped update: undo it
            try:
                self._rewind.restore()
            except Exception as exc:
                if self.watch is not None:
                    self.watch.errors.report("transformers scheduler rewind", exc)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or self.watch is None or not self.watch.history:
            return
        record = self.watch.history[-1]
        if record.step == self._logged_step:  # the end-of-training summary: this step's numbers are already sent
            return
        self._logged_step = record.step
        logs[tags.GRAD_NORM] = float(record.grad_norm)
        logs[tags.SKIPPED_STEPS] = float(self.skipped_steps)
        logs[tags.FINDINGS] = float(len(self.watch.findings))
        logs[tags.LOSS] = float(record.loss)
        if record.clip_threshold is not None:
            logs[tags.CLIP_THRESHOLD] = float(record.clip_threshold)
            logs[tags.CLIP_COEF] = float(record.clip_coef)
            logs[tags.CLIPPED] = float(record.clipped)
        if record.loss_scale is not None:
            logs[tags.LOSS_SCALE] = float(record.loss_scale)
        every = self.layers_every
        if every and (record.step % every == 0 or record.step == 1):
            ratios = None if record.update_ratio is None else record.update_ratio.tolist()  # NaN: not measured
            logs.update(tags.layer_metrics(record.layer_names, record.layer_grad_norms.tolist(), ratios))
        # the precursor signals measured since the last logging step (of each tag its latest value)
        logs.update(self._signals)
        self._signals = {}
