"""TensorBoard export: per-layer gradient norms, global norm, loss, clip coefficient, findings.

Two ways in, both writing with TensorBoard's own event-file writer
(``tensorboard.summary.writer.event_file_writer.EventFileWriter``, which
writes on a background thread):

- live: ``Watch(model, opt, tensorboard="tb/exp1")`` adds a
  :class:`TensorBoardPlugin` that writes every step (or every
  ``tensorboard_every`` steps) as it happens;
- after the fact: :func:`export_tensorboard` (``gradwatch export --tensorboard
  RUN_DIR DIR``) writes a whole run directory.

Tags: the ``gradwatch/...`` scheme of :mod:`gradwatch.tags` (one event per
step carries all of them, so 200 layers cost one protobuf, not 200 writes);
nothing is written outside ``gradwatch/``, so a user's own ``loss`` never collides.
The precursor signals (:func:`gradwatch.tags.signal_metrics`) are written on the
steps that measured them, and only there (in the step's event when that step is
written, else in an event of their own).

``tensorboard=`` also takes a user's ``torch.utils.tensorboard.SummaryWriter``:
gradwatch writes through it and never closes it (only flushes).

The tensorboard package is imported only when a writer is made, never by
``import gradwatch``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from .findings import Finding
from .plugins import StepContext, WatchPlugin, WatchView
from .records import StepRecord
from . import tags

FINDINGS_TAG = tags.FINDINGS
LAYER_PREFIX = tags.LAYER_GRAD_NORM


def _require_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError("TensorBoard export needs the tensorboard package: pip install 'gradwatch[tensorboard]'")


def finding_markdown(finding: Finding) -> str:
    """A finding as the markdown TensorBoard's text tab shows.

    Example:
        >>> f = Finding("loss_spike", "warning", 7, "The loss jumped 40x.", fixes=["lower lr"])
        >>> print(finding_markdown(f))
        **warning** `loss_spike` at step 7: The loss jumped 40x.
        <BLANKLINE>
        - fix: lower lr
    """
    text = f"**{finding.severity}** `{finding.code}` at step {finding.step}: {finding.message}"
    lines = [text]
    if finding.location:
        lines.append("location: " + ", ".join(f"{k}={v}" for k, v in finding.location.items()))
    if finding.evidence:
        lines.append("evidence: " + ", ".join(f"{k}={v}" for k, v in finding.evidence.items()))
    body = "\n\n".join(lines)
    if finding.fixes:
        body += "\n\n" + "\n".join(f"- fix: {fix}" for fix in finding.fixes)
    return body


def is_summary_writer(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.utils.tensorboard.SummaryWriter`` (or quacks like one).

    Example:
        >>> is_summary_writer("tb/exp1")
        False
    """
    return not isinstance(obj, (str, os.PathLike)) and callable(getattr(obj, "_get_file_writer", None)) \
        and callable(getattr(obj, "get_logdir", None))


class TensorBoardWriter:
    """Writes gradwatch's step numbers and findings as TensorBoard events.

    Args:
        logdir: the TensorBoard log directory (created if missing).
        flush_secs: flush the event file at least this often. Default: 10
            (so a live TensorBoard shows new steps within seconds).

    Example:
        >>> import tempfile, numpy as np
        >>> tb = TensorBoardWriter(tempfile.mkdtemp())
        >>> tb.add_step(1, loss=0.5, grad_norm=2.0, clip_coef=0.5, layer_names=["fc1", "fc2"],
        ...             layer_norms=np.array([0.1, 1.9]))
        >>> tb.close()
    """

    def __init__(self, logdir: Any, flush_secs: int = 10) -> None:
        _require_tensorboard()
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = Event, Summary
        self.owned = not is_summary_writer(logdir)
        if self.owned:
            self.logdir = Path(logdir)
            self.logdir.mkdir(parents=True, exist_ok=True)
            self._writer: Any = EventFileWriter(str(self.logdir), flush_secs=flush_secs)
        else:  # a user's SummaryWriter: write through its file writer, never close it
            self.logdir = Path(logdir.get_logdir())
            self._writer = logdir._get_file_writer()
        self._text_metadata: Any = None
        self._closed = False

    def add_step(self, step: int, *, loss: float, grad_norm: float, clip_coef: float,
                 layer_names: Sequence[str], layer_norms: Sequence[float], skipped: bool = False,
                 loss_scale: float | None = None, wall_time: float | None = None,
                 clip_threshold: float | None = None, clipped: bool = False,
                 update_ratios: Sequence[float] | None = None, skipped_steps: int | None = None,
                 clipped_share: float | None = None, signals: Mapping[str, float] | None = None) -> None:
        """Write one step's scalars (one event, every tag); a NaN update ratio (layer not measured) is left out.

        ``signals``: the step's precursor signals as ``{tag: value}`` (:func:`gradwatch.tags.signal_metrics`).
        """
        value = self._Summary.Value
        values = [
            value(tag=tags.LOSS, simple_value=float(loss)),
            value(tag=tags.GRAD_NORM, simple_value=float(grad_norm)),
            value(tag=tags.CLIP_COEF, simple_value=float(clip_coef)),
            value(tag=tags.SKIPPED, simple_value=1.0 if skipped else 0.0),
        ]
        if clip_threshold is not None and math.isfinite(clip_threshold):
            values.append(value(tag=tags.CLIP_THRESHOLD, simple_value=float(clip_threshold)))
            values.append(value(tag=tags.CLIPPED, simple_value=1.0 if clipped else 0.0))
            if clipped_share is not None:
                values.append(value(tag=tags.CLIPPED_SHARE, simple_value=float(clipped_share)))
        if loss_scale is not None and math.isfinite(loss_scale) and loss_scale > 0:
            values.append(value(tag=tags.LOSS_SCALE, simple_value=float(loss_scale)))
        if skipped_steps is not None:
            values.append(value(tag=tags.SKIPPED_STEPS, simple_value=float(skipped_steps)))
        values.extend(value(tag=LAYER_PREFIX + name, simple_value=float(norm))
                      for name, norm in zip(layer_names, layer_norms))
        if update_ratios is not None:
            values.extend(value(tag=tags.layer_update_ratio(name), simple_value=float(ratio))
                          for name, ratio in zip(layer_names, update_ratios) if math.isfinite(ratio))
        if signals:
            values.extend(value(tag=tag, simple_value=float(v)) for tag, v in signals.items())
        self._writer.add_event(self._Event(wall_time=wall_time if wall_time is not None else time.time(),
                                           step=int(step), summary=self._Summary(value=values)))

    def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        """Write ``{tag: value}`` at ``step`` as one event (nothing when empty).

        Example:
            >>> import tempfile
            >>> tb = TensorBoardWriter(tempfile.mkdtemp())
            >>> tb.add_scalars(50, {"gradwatch/adam_rms_max": 1.3}); tb.close()
        """
        if not scalars:
            return
        value = self._Summary.Value
        values = [value(tag=tag, simple_value=float(v)) for tag, v in scalars.items()]
        self._writer.add_event(self._Event(wall_time=wall_time if wall_time is not None else time.time(),
                                           step=int(step), summary=self._Summary(value=values)))

    def add_finding(self, finding: Finding, wall_time: float | None = None) -> None:
        """Write one finding as text under the ``findings`` tag, at the finding's step."""
        import numpy as np
        from tensorboard.util import tensor_util

        if self._text_metadata is None:
            from tensorboard.plugins.text import metadata

            self._text_metadata = metadata.create_summary_metadata(
                display_name="gradwatch findings", description="Findings raised by gradwatch, one per entry."
            )
        tensor = tensor_util.make_tensor_proto(np.array(finding_markdown(finding), dtype=object))
        summary = self._Summary(value=[self._Summary.Value(tag=FINDINGS_TAG, metadata=self._text_metadata, tensor=tensor)])
        self._writer.add_event(self._Event(wall_time=wall_time if wall_time is not None else time.time(),
                                           step=int(finding.step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file. Idempotent."""
        if not self._closed:
            self._closed = True
            if self.owned:
                self._writer.close()
            else:
                self._writer.flush()


def export_tensorboard(run_dir: str | os.PathLike[str], logdir: str | os.PathLike[str], every: int = 1) -> Path:
    """Write a run directory as TensorBoard event files under ``logdir``.

    Args:
        run_dir: a run directory written by :class:`gradwatch.Watch`.
        logdir: where to write the event files (created if missing).
        every: write every this many steps, and every skipped step (findings and
            the precursor signals of ``signals.jsonl`` are always all written). Default: 1.

    Returns:
        ``logdir`` as a Path.

    Example:
        >>> export_tensorboard("runs/exp1", "tb/exp1")  # doctest: +SKIP
        PosixPath('tb/exp1')
        >>> # then: tensorboard --logdir tb
    """
    import numpy as np

    from .rundir import load_run

    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    run = load_run(run_dir)
    writer = TensorBoardWriter(logdir, flush_secs=120)
    try:
        s = run.steps
        names = run.layer_names
        scales = s["loss_scale"]
        rows = np.flatnonzero((np.arange(s["step"].size) % every == 0) | s["skipped"])  # skipped steps always
        signals = {}
        for entry in run.signals:  # a step's line, the last one if a resumed run wrote it twice
            if isinstance(entry.get("step"), int):
                signals[entry["step"]] = tags.signal_metrics(entry)
        for i in rows.tolist():
            scale = float(scales[i])
            step = int(s["step"][i])
            writer.add_step(step, loss=s["loss"][i], grad_norm=s["grad_norm"][i],
                            clip_coef=s["clip_coef"][i], layer_names=names,
                            layer_norms=s["layer_grad_norms"][i].tolist(), skipped=bool(s["skipped"][i]),
                            loss_scale=scale if math.isfinite(scale) else None,
                            clip_threshold=_threshold(s, i), clipped=bool(s["clipped"][i]),
                            signals=signals.pop(step, None))
        for step, metrics in sorted(signals.items()):  # signals of steps not written above
            writer.add_scalars(step, metrics)
        for finding in run.findings:
            writer.add_finding(finding)
    finally:
        writer.close()
    return Path(logdir)


def _threshold(steps: dict[str, Any], i: int) -> float | None:
    column = steps.get("clip_threshold")
    if column is None:
        return None
    try:
        value = float(column[i])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class TensorBoardPlugin(WatchPlugin):
    """Writes each step to TensorBoard while the Watch runs (``Watch(..., tensorboard=DIR)``).

    Findings are written one step late (the Watch records them after the
    plugins' ``after_step``) and at ``close()``, each at its own step.

    Example:
        >>> watch = Watch(model, opt, tensorboard="tb/exp1", tensorboard_every=10)  # doctest: +SKIP
    """

    name = "tensorboard"

    def __init__(self, logdir: Any, every: int = 1) -> None:
        self.logdir = logdir
        self.every = every
        self.writer: TensorBoardWriter | None = None
        self._findings_written = 0
        self._skipped_steps = self._clipped_steps = self._steps = 0

    def attach(self, view: WatchView) -> None:
        super().attach(view)
        self.writer = TensorBoardWriter(self.logdir)

    def after_step(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        if self.writer is None:
            return []
        self._skipped_steps += bool(record.skipped)
        self._clipped_steps += bool(record.clipped)
        self._steps += 1
        signals = tags.signal_metrics(self.view.signals(record.step))
        if record.step % self.every == 0 or record.skipped:
            ratios = record.update_ratio.tolist() if record.update_ratio is not None else None
            self.writer.add_step(record.step, loss=record.loss, grad_norm=record.grad_norm,
                                 clip_coef=record.clip_coef, layer_names=record.layer_names,
                                 layer_norms=record.layer_grad_norms.tolist(), skipped=record.skipped,
                                 loss_scale=record.loss_scale, clip_threshold=record.clip_threshold,
                                 clipped=record.clipped, update_ratios=ratios, skipped_steps=self._skipped_steps,
                                 clipped_share=self._clipped_steps / self._steps, signals=signals)
        elif signals:  # a step between tensorboard_every's: its precursor signals still go out
            self.writer.add_scalars(record.step, signals)
        self._write_new_findings()
        return []

    def _write_new_findings(self) -> None:
        findings = self.view.findings
        for finding in findings[self._findings_written:]:
            self.writer.add_finding(finding)  # type: ignore[union-attr]
        self._findings_written = len(findings)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self._write_new_findings()
            finally:
                self.writer.close()


def make_tensorboard_plugin(logdir: str | os.PathLike[str], every: int = 1) -> TensorBoardPlugin:
    """``Watch(tensorboard=DIR)``'s plugin, with the directory checked before anything is written.

    Raises:
        ValueError: ``logdir`` exists and is not a directory.
        ImportError: the tensorboard package is not installed.
    """
    if is_summary_writer(logdir):
        _require_tensorboard()
        return TensorBoardPlugin(logdir, every)
    if Path(logdir).exists() and not Path(logdir).is_dir():
        raise ValueError(f"tensorboard={str(logdir)!r} exists and is not a directory; pass a log directory")
    _require_tensorboard()
    return TensorBoardPlugin(logdir, every)
