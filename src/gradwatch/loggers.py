"""Logger plugins: a Watch's numbers and findings sent to Weights & Biases, MLflow or any ``log(metrics, step)``.

Every number is named by :mod:`gradwatch.tags`. Per step: ``gradwatch/loss``,
``gradwatch/grad_norm``, ``gradwatch/skipped``, ``gradwatch/skipped_steps`` and,
when clipping is on, ``gradwatch/clip_threshold``, ``gradwatch/clip_coef``,
``gradwatch/clipped``, ``gradwatch/clipped_share`` (clipped steps so far / steps);
``gradwatch/loss_scale`` under fp16. On step 1 and every ``layers_every`` steps:
``gradwatch/layer_grad_norm/<name>`` and, when measured,
``gradwatch/layer_update_ratio/<name>``. On the steps that measured them, the
precursor signals (:func:`gradwatch.tags.signal_metrics`: ``gradwatch/adam_rms_max``,
``gradwatch/attention_logit_max``, ``gradwatch/log_z_mean``, ``gradwatch/log_z_max``
and, unless ``layers_every=None``, ``gradwatch/layer_adam_rms/<name>`` and
``gradwatch/attention_logit/<site>``). Findings go to ``text(finding)``.
wandb and mlflow are imported only when their logger is made.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from . import tags
from .findings import Finding
from .plugins import StepContext, WatchPlugin, WatchView
from .records import StepRecord


class MetricsLogger(WatchPlugin):
    """Sends each step's numbers to ``log(metrics, step)`` and each finding to ``text(finding)``.

    Args:
        log: called with a ``{tag: float}`` dict and the step.
        text: called once per finding (None: findings are not sent). Default: None.
        layers_every: per-layer numbers on step 1 and every this many steps; None: never. Default: 50.

    Example:
        >>> sent = []
        >>> logger = MetricsLogger(lambda metrics, step: sent.append((step, metrics)))
        >>> logger.layers_every
        50
    """

    name = "metrics_logger"

    def __init__(self, log: Callable[[dict[str, float], int], Any],
                 text: Callable[[Finding], Any] | None = None, layers_every: int | None = 50) -> None:
        if layers_every is not None and (isinstance(layers_every, bool) or not isinstance(layers_every, int)
                                         or layers_every < 1):
            raise ValueError(f"layers_every must be a positive int or None, got {layers_every!r}")
        self.log, self.text, self.layers_every = log, text, layers_every
        self._steps = self._clipped = self._skipped = 0
        self._findings_sent = 0
        self._broken = False

    def attach(self, view: WatchView) -> None:
        super().attach(view)

    def metrics(self, record: StepRecord) -> dict[str, float]:
        """The step's ``{tag: value}`` (finite numbers only)."""
        self._steps += 1
        self._clipped += bool(record.clipped)
        self._skipped += bool(record.skipped)
        out: dict[str, float] = {tags.LOSS: record.loss, tags.GRAD_NORM: record.grad_norm,
                                 tags.SKIPPED: float(record.skipped), tags.SKIPPED_STEPS: float(self._skipped)}
        if record.clip_threshold is not None:
            out[tags.CLIP_THRESHOLD] = record.clip_threshold
            out[tags.CLIP_COEF] = record.clip_coef
            out[tags.CLIPPED] = float(record.clipped)
            out[tags.CLIPPED_SHARE] = self._clipped / self._steps
        if record.loss_scale is not None:
            out[tags.LOSS_SCALE] = record.loss_scale
        every = self.layers_every
        if every and (record.step == 1 or record.step % every == 0):
            ratios = None if record.update_ratio is None else record.update_ratio.tolist()
            out.update(tags.layer_metrics(record.layer_names, record.layer_grad_norms.tolist(), ratios))
        view = getattr(self, "view", None)
        if view is not None:  # the precursor signals of this step, when it measured some
            out.update(tags.signal_metrics(view.signals(record.step), per_layer=every is not None))
        return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}

    def after_step(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        if self._broken:
            return []
        try:
            self.log(self.metrics(record), int(record.step))
            self._send_findings()
        except Exception as exc:  # a logger's failure never stops training: reported once, then off
            self._broken = True
            errors = getattr(getattr(self, "view", None), "errors", None)
            if errors is not None and hasattr(errors, "report"):
                errors.report(f"{self.name} logging", exc)
        return []

    def _send_findings(self) -> None:
        findings = self.view.findings if hasattr(self, "view") else []
        if self.text is not None:
            for finding in findings[self._findings_sent:]:
                self.text(finding)
        self._findings_sent = len(findings)

    def close(self) -> None:
        if not self._broken:
            try:
                self._send_findings()
            except Exception:
                pass


def WandbLogger(run: Any = None, layers_every: int | None = 50) -> MetricsLogger:
    """A :class:`MetricsLogger` into a Weights & Biases run (``run.log(metrics, step=step)``); findings as
    ``gradwatch/findings`` text entries (an ``wandb.Html`` is not needed: plain strings log as text).

    Example:
        >>> import wandb  # doctest: +SKIP
        >>> watch = Watch(model, opt, plugins=[WandbLogger(wandb.init(mode="offline"))])  # doctest: +SKIP
    """
    import wandb

    run = run if run is not None else wandb.run
    if run is None:
        raise ValueError("WandbLogger needs a run: wandb.init(...) first or pass run=")
    logger = MetricsLogger(lambda metrics, step: run.log(metrics, step=step),
                           lambda f: run.log({tags.FINDINGS: str(f)}), layers_every)
    logger.name = "wandb"
    return logger


def MlflowLogger(client: Any = None, run_id: str | None = None, layers_every: int | None = 50) -> MetricsLogger:
    """A :class:`MetricsLogger` into an MLflow run: ``log_metrics`` per step; findings as text artifacts
    (``gradwatch/findings/<step>_<code>.md``) and a ``gradwatch.finding.<code>`` tag.

    Example:
        >>> import mlflow  # doctest: +SKIP
        >>> with mlflow.start_run():  # doctest: +SKIP
        ...     watch = Watch(model, opt, plugins=[MlflowLogger()])
    """
    import mlflow

    if client is None:
        client = mlflow.MlflowClient()
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise ValueError("MlflowLogger needs a run: mlflow.start_run() first or pass run_id=")
        run_id = active.info.run_id

    def log(metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(tags.mlflow_name(k), v, now, step) for k, v in metrics.items()])

    def text(f: Finding) -> None:
        client.log_text(run_id, str(f), f"gradwatch/findings/{f.step}_{f.code}.md")
        client.set_tag(run_id, f"gradwatch.finding.{f.code}", f.severity)

    logger = MetricsLogger(log, text, layers_every)
    logger.name = "mlflow"
    return logger
