"""Mixed precision: float16/bfloat16 range diagnosis for gradwatch.

:mod:`gradwatch.amp.ranges` is the pure core (per-layer fp16 flush / subnormal /
overflow shares at any loss scale, the recommended scale, bf16 lost updates);
:mod:`gradwatch.amp.plugin` runs it inside the Watch (findings ``fp16_overflow``,
``fp16_underflow``, ``bf16_lost_updates``; the fp16 forecast in ``events.jsonl``).
See docs/precision.md.
"""

from __future__ import annotations

from .plugin import FORECAST_EVENT, LOST_UPDATE_EVENT, Fp16Forecast, PrecisionPlugin, precision_plugin
from .summary import forecast_lines, forecast_matters, latest_event, lost_update_lines, precision_summary
from .ranges import (
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    Fp16Shares,
    ScaleAdvice,
    exponent_histogram,
    fp16_shares,
    lost_update_counts,
    recommend_scale,
)

__all__ = [
    "FORECAST_EVENT",
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP16_MIN_SUBNORMAL",
    "Fp16Forecast",
    "Fp16Shares",
    "LOST_UPDATE_EVENT",
    "PrecisionPlugin",
    "ScaleAdvice",
    "exponent_histogram",
    "forecast_lines",
    "forecast_matters",
    "latest_event",
    "lost_update_lines",
    "precision_summary",
    "fp16_shares",
    "lost_update_counts",
    "precision_plugin",
    "recommend_scale",
]
