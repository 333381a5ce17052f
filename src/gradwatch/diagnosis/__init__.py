"""Diagnosis: streaming rules that turn per-layer numbers into findings (issue 3)."""

from .patterns import norm_pattern
from .robust import median_mad, robust_zscore

__all__ = ["median_mad", "norm_pattern", "robust_zscore"]
