"""Pre-flight probe: predict vanishing or exploding gradients before training.

(The package is ``gradwatch.preflight`` so that the function ``gradwatch.probe``
does not shadow it: ``import gradwatch.preflight.core`` always works.)

``gradwatch.probe(model, batch)`` measures, on one batch at initialization, per
layer activation statistics and gradient magnitudes, per block Jacobian gains
(randomized estimates from vector-Jacobian and Jacobian-vector products), audits
initialization and normalization, and returns findings with concrete fixes.
See :func:`gradwatch.preflight.core.probe` and docs/probe.md.
"""

from __future__ import annotations

from .blocks import BlockSpec, detect_blocks
from .core import probe
from .jacobian import JacobianEstimate, estimate_jacobian
from .result import BlockRow, LayerRow, Probe

__all__ = [
    "BlockRow",
    "BlockSpec",
    "JacobianEstimate",
    "LayerRow",
    "Probe",
    "detect_blocks",
    "estimate_jacobian",
    "probe",
]
