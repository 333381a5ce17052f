"""Diagnosis: streaming rules that turn per-layer numbers into findings (issue 3).

Importing this package registers :class:`DiagnosisPlugin` as a default plugin of
every :class:`gradwatch.Watch` (``diagnose=True``).
"""

from .curve import DepthFit, fit_depth_curve
from .patterns import norm_pattern
from .plugin import DiagnosisPlugin
from .robust import median_mad, robust_zscore

__all__ = ["DepthFit", "DiagnosisPlugin", "fit_depth_curve", "median_mad", "norm_pattern", "robust_zscore"]
