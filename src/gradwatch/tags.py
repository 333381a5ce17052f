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
"""

from __future__ import annotations

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

# Per-layer tags are not under gradwatch/grad_norm/: a store that keeps one file per metric (MLflow's
# file store) cannot hold both a metric gradwatch/grad_norm and gradwatch/grad_norm/<layer>.
