"""The one tag scheme every logger path uses (TensorBoard, Lightning, the HF Trainer).

Every name starts with ``gradwatch/`` so it never collides with a user's own
tags (``loss``, ``grad_norm``)::

    gradwatch/loss                       the step's loss
    gradwatch/grad_norm                  global gradient norm before clipping
    gradwatch/clip_coef                  clip coefficient (1.0: not clipped)
    gradwatch/clip_threshold             the clip threshold, when clipping is on
    gradwatch/clipped                    1.0 on a clipped step
    gradwatch/clipped_share              clipped steps so far / steps so far
    gradwatch/skipped                    1.0 on a skipped (non-finite) step
    gradwatch/skipped_steps              skipped steps so far
    gradwatch/loss_scale                 fp16 loss scale, when there is one
    gradwatch/layer_grad_norm/<name>     per-layer gradient norm before clipping
    gradwatch/layer_update_ratio/<name>  per-layer update/weight ratio, when measured
    gradwatch/finding/<code>             a finding's severity level (scalar)
    gradwatch/findings                   findings as text (or their count, as a scalar)

The precursor signals (docs/precursors.md), on the steps that measured them only::

    gradwatch/adam_rms_max               the largest per-layer Adam RMS_t of the step
    gradwatch/layer_adam_rms/<name>      per-layer Adam RMS_t (steps whose signals.jsonl line lists every layer)
    gradwatch/attention_logit_max        the largest attention logit over every attention site
    gradwatch/attention_logit/<site>     the largest attention logit of one attention module
    gradwatch/log_z_mean                 mean log Z of the output softmax
    gradwatch/log_z_max                  the largest |log Z|
    gradwatch/output_rms_growth_max      the largest growth of a layer's output RMS since its first sample
    gradwatch/layer_output_rms/<name>    per-layer output RMS
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Sequence

PREFIX = "gradwatch/"
LOSS = PREFIX + "loss"
GRAD_NORM = PREFIX + "grad_norm"
CLIP_COEF = PREFIX + "clip_coef"
CLIP_THRESHOLD = PREFIX + "clip_threshold"
CLIPPED = PREFIX + "clipped"
CLIPPED_SHARE = PREFIX + "clipped_share"
SKIPPED = PREFIX + "skipped"
SKIPPED_STEPS = PREFIX + "skipped_steps"
LOSS_SCALE = PREFIX + "loss_scale"
LAYER_GRAD_NORM = PREFIX + "layer_grad_norm/"
LAYER_UPDATE_RATIO = PREFIX + "layer_update_ratio/"
FINDING = PREFIX + "finding/"
FINDINGS = PREFIX + "findings"
ADAM_RMS_MAX = PREFIX + "adam_rms_max"
LAYER_ADAM_RMS = PREFIX + "layer_adam_rms/"
ATTENTION_LOGIT_MAX = PREFIX + "attention_logit_max"
ATTENTION_LOGIT = PREFIX + "attention_logit/"
LOG_Z_MEAN = PREFIX + "log_z_mean"
LOG_Z_MAX = PREFIX + "log_z_max"
OUTPUT_RMS_GROWTH_MAX = PREFIX + "output_rms_growth_max"
LAYER_OUTPUT_RMS = PREFIX + "layer_output_rms/"


def layer_grad_norm(name: str) -> str:
    """The per-layer gradient norm tag of layer ``name``.

    Example:
        >>> layer_grad_norm("fc1")
        'gradwatch/layer_grad_norm/fc1'
    """
    return LAYER_GRAD_NORM + name


def layer_update_ratio(name: str) -> str:
    """The per-layer update ratio tag of layer ``name``.

    Example:
        >>> layer_update_ratio("fc1")
        'gradwatch/layer_update_ratio/fc1'
    """
    return LAYER_UPDATE_RATIO + name


def finding(code: str) -> str:
    """The scalar tag of a finding code (its severity level).

    Example:
        >>> finding("loss_spike")
        'gradwatch/finding/loss_spike'
    """
    return FINDING + code

def layer_adam_rms(name: str) -> str:
    """The per-layer Adam RMS_t tag of layer ``name``.

    Example:
        >>> layer_adam_rms("fc1")
        'gradwatch/layer_adam_rms/fc1'
    """
    return LAYER_ADAM_RMS + name


def attention_logit(site: str) -> str:
    """The max attention logit tag of one attention site (the module that ran the attention).

    Example:
        >>> attention_logit("h.0.attn")
        'gradwatch/attention_logit/h.0.attn'
    """
    return ATTENTION_LOGIT + site


def layer_metrics(names: Sequence[str], grad_norms: Iterable[float] | None = None,
                  update_ratios: Iterable[float] | None = None) -> dict[str, float]:
    """The per-layer tags of one step: ``layer_grad_norm/<name>`` and ``layer_update_ratio/<name>``
    for the finite values given (a layer not measured on this step, NaN, gets no tag).

    Example:
        >>> layer_metrics(["fc1", "fc2"], [0.5, 0.25], [1e-3, float("nan")])
        {'gradwatch/layer_grad_norm/fc1': 0.5, 'gradwatch/layer_grad_norm/fc2': 0.25, 'gradwatch/layer_update_ratio/fc1': 0.001}
    """
    out: dict[str, float] = {}
    for tag_of, values in ((layer_grad_norm, grad_norms), (layer_update_ratio, update_ratios)):
        if values is None:
            continue
        for name, value in zip(names, values):
            number = _finite(value)
            if number is not None:
                out[tag_of(name)] = number
    return out


_MLFLOW_UNSAFE = re.compile(r"[^\w./\- :]")  # MLflow accepts word characters, '.', '/', '-', ' ', ':'


def mlflow_name(tag: str) -> str:
    """``tag`` with every character MLflow rejects in a metric name replaced by ``_``.

    A layer named after the model's root (``(root)``) or an indexed submodule would
    otherwise make MLflow refuse the whole batch.

    Example:
        >>> mlflow_name("gradwatch/attention_logit/(root)")
        'gradwatch/attention_logit/_root_'
    """
    return _MLFLOW_UNSAFE.sub("_", tag)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)  # signals.jsonl writes a non-finite float as the string "nan" / "inf"
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def signal_metrics(entry: Mapping[str, Any] | None, per_layer: bool = True) -> dict[str, float]:
    """The tags of one step's precursor signals (a ``signals.jsonl`` line, or the precursor plugin's ``last``).

    Only what the step measured, finite values only: a step without signals gives ``{}``
    (no NaN or zero filler). ``per_layer=False`` leaves out the per-layer and per-site tags.

    Example:
        >>> signal_metrics({"step": 3, "adam_rms_max": 7.5, "adam_rms_layer": "fc1",
        ...                 "adam_rms": {"fc1": 7.5}, "log_z_max": "nan"})
        {'gradwatch/adam_rms_max': 7.5, 'gradwatch/layer_adam_rms/fc1': 7.5}
        >>> signal_metrics({"step": 4})
        {}
    """
    out: dict[str, float] = {}
    if not entry:
        return out

    def put(tag: str, value: Any) -> None:
        number = _finite(value)
        if number is not None:
            out[tag] = number

    put(ADAM_RMS_MAX, entry.get("adam_rms_max"))
    layers = entry.get("adam_rms")
    if per_layer and isinstance(layers, Mapping):
        for name, value in layers.items():
            put(layer_adam_rms(str(name)), value)
    sites = entry.get("attention_logit_max")
    if isinstance(sites, Mapping):
        values = [v for v in (_finite(v) for v in sites.values()) if v is not None]
        if values:
            out[ATTENTION_LOGIT_MAX] = max(values)
        if per_layer:
            for site, value in sites.items():
                put(attention_logit(str(site)), value)
    put(LOG_Z_MEAN, entry.get("log_z_mean"))
    put(LOG_Z_MAX, entry.get("log_z_max"))
    put(OUTPUT_RMS_GROWTH_MAX, entry.get("output_rms_growth_max"))
    outputs = entry.get("output_rms")
    if per_layer and isinstance(outputs, Mapping):
        for name, value in outputs.items():
            put(LAYER_OUTPUT_RMS + str(name), value)
    return out


# Per-layer tags are not under gradwatch/grad_norm/: a store that keeps one file per metric (MLflow's
# file store) cannot hold both a metric gradwatch/grad_norm and gradwatch/grad_norm/<layer>.
