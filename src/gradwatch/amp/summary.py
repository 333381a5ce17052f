"""Read the mixed-precision events of a run directory back, as plain text (for doctor and the report).

The precision plugin writes two kinds of lines to ``events.jsonl`` (format in
docs/precision.md): ``{"event": "fp16_forecast", ...}`` on sampled steps and
``{"event": "bf16_lost_updates", ...}`` on sampled steps of bf16 runs. This
module turns the latest of each into a few lines a person reads.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from .plugin import FORECAST_EVENT, LOST_UPDATE_EVENT


def _events(run_or_events: Any) -> list[dict[str, Any]]:
    events = getattr(run_or_events, "events", run_or_events)
    if not isinstance(events, Iterable):
        raise TypeError("pass a gradwatch.Run (gw.load_run(path)) or its list of events")
    return [e for e in events if isinstance(e, dict)]


def latest_event(run_or_events: Any, kind: str = FORECAST_EVENT) -> dict[str, Any] | None:
    """The last event of ``kind`` (``"fp16_forecast"`` or ``"bf16_lost_updates"``), or None.

    Example:
        >>> latest_event([{"event": "fp16_forecast", "step": 1}, {"event": "fp16_forecast", "step": 50}])["step"]
        50
    """
    found = [e for e in _events(run_or_events) if e.get("event") == kind]
    return found[-1] if found else None


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.3g}%"


def _worst(layers: list[str], values: list[Any]) -> tuple[str, float] | None:
    pairs = [(name, float(v)) for name, v in zip(layers, values) if v is not None and math.isfinite(float(v))]
    return max(pairs, key=lambda p: p[1]) if pairs else None


def forecast_matters(event: dict[str, Any] | None, underflow_share: float = 0.05) -> bool:
    """Whether an ``fp16_forecast`` event says something a person should act on.

    Always for an fp16 run (the forecast is measured at the run's own scale). For
    an fp32 or bf16 run, only when switching to fp16 with a default GradScaler
    would hurt: at the reference scale (``forecast_scale``, GradScaler's initial
    65536) some layer has at least ``underflow_share`` of its non-zero gradient
    elements below float16's normal range (the ``fp16_underflow`` threshold,
    ``AmpConfig.underflow_share``), some element overflows, or no single scale
    fits every layer. Otherwise fp16 would simply work, and the report and
    ``doctor`` leave the forecast out.

    Example:
        >>> fine = {"precision": "fp32", "fits": True,
        ...         "reference": {"scale": 65536.0, "flushed": [0.007], "subnormal": [0.01], "overflow": [0.0]}}
        >>> forecast_matters(fine), forecast_matters({**fine, "fits": False}), forecast_matters({**fine, "precision": "fp16"})
        (False, True, True)
    """
    if not event:
        return False
    if event.get("precision") == "fp16" or event.get("fits") is False:
        return True
    block = event.get("reference") or {}

    def worst(key: str) -> float:
        values = [float(v) for v in (block.get(key) or []) if v is not None]
        return max((v for v in values if math.isfinite(v)), default=0.0)

    below = [float(f or 0.0) + float(s or 0.0) for f, s in zip(block.get("flushed") or [], block.get("subnormal") or [])]
    return max(below, default=0.0) >= underflow_share or worst("overflow") > 0


def forecast_lines(event: dict[str, Any] | None, top: int = 3) -> list[str]:
    """A few lines of text for one ``fp16_forecast`` event (empty for None).

    Example:
        >>> e = {"event": "fp16_forecast", "step": 50, "precision": "fp32", "layers": ["0", "2"],
        ...      "current": {"scale": 1.0, "flushed": [0.6, 0.0], "subnormal": [0.3, 0.01], "overflow": [0, 0]},
        ...      "reference": {"scale": 65536.0, "flushed": [0.0, 0.0], "subnormal": [0.02, 0.0], "overflow": [0, 0]},
        ...      "recommended_scale": 1024.0, "max_safe_scale": 65536.0, "fits": True}
        >>> print("\\n".join(forecast_lines(e)))
        fp16 forecast at step 50 (a fp32 run):
          at loss scale 1: layer 0 would lose 60% of its non-zero gradient elements to zero (flush), 30% subnormal
          at loss scale 65536: at most 0% flushed (layer 0), 0% overflow
          recommended loss scale: 1024 (torch.amp.GradScaler(init_scale=1024))
    """
    if not event:
        return []
    layers = list(event.get("layers") or [])
    head = f"fp16 forecast at step {event.get('step')} (a {event.get('precision', '?')} run):"
    lines = [head]
    for key in ("current", "reference"):
        block = event.get(key) or {}
        scale = block.get("scale")
        if scale is None:
            continue
        flushed = list(block.get("flushed") or [])
        subnormal = list(block.get("subnormal") or [])
        overflow = _worst(layers, list(block.get("overflow") or []))
        worst = _worst(layers, flushed)
        if key == "current" and worst is not None and worst[1] > 0:
            ranked = sorted(
                ((name, float(f), s) for name, f, s in zip(layers, flushed, subnormal) if f is not None and f > 0),
                key=lambda r: -r[1],
            )[:top]
            parts = [f"layer {name} would lose {_pct(f)} of its non-zero gradient elements to zero (flush), {_pct(s)} subnormal"
                     for name, f, s in ranked]
            lines.append(f"  at loss scale {scale:g}: " + "; ".join(parts))
        else:
            lines.append(
                f"  at loss scale {scale:g}: at most {_pct(worst[1] if worst else 0)} flushed"
                + (f" (layer {worst[0]})" if worst else "")
                + f", {_pct(overflow[1] if overflow else 0)} overflow"
                + (f" (layer {overflow[0]})" if overflow and overflow[1] > 0 else "")
            )
    recommended = event.get("recommended_scale")
    if recommended is not None:
        if event.get("fits", True):
            lines.append(f"  recommended loss scale: {recommended:g} (torch.amp.GradScaler(init_scale={recommended:g}))")
        else:
            lines.append(
                f"  no single fp16 loss scale fits: the gradients need {event.get('needed_scale'):g} but "
                f"{event.get('max_safe_scale'):g} already risks overflow; prefer bf16"
            )
    return lines


def lost_update_lines(event: dict[str, Any] | None, top: int = 3) -> list[str]:
    """A few lines of text for one ``bf16_lost_updates`` event (empty for None).

    Example:
        >>> e = {"event": "bf16_lost_updates", "step": 50, "weights": "fp32", "layers": ["0", "2"],
        ...      "lost_share": [0.4, 0.01]}
        >>> print("\\n".join(lost_update_lines(e)))
        bf16 lost updates at step 50 (weights in fp32, simulated in bf16):
          layer 0: 40% of updates lost to rounding; layer 2: 1% of updates lost to rounding
    """
    if not event:
        return []
    layers = list(event.get("layers") or [])
    shares = [(n, float(v)) for n, v in zip(layers, event.get("lost_share") or []) if v is not None]
    shares.sort(key=lambda p: -p[1])
    how = "in bf16" if event.get("weights") == "bf16" else "in fp32, simulated in bf16"
    return [
        f"bf16 lost updates at step {event.get('step')} (weights {how}):",
        "  " + "; ".join(f"layer {n}: {_pct(v)} of updates lost to rounding" for n, v in shares[:top]),
    ]


def precision_summary(run_or_events: Any) -> list[str]:
    """Text lines for the latest fp16 forecast and bf16 lost-update events of a run (what doctor prints).

    The forecast of an fp32 or bf16 run is left out unless it says something
    worth acting on (:func:`forecast_matters`), as in the report.

    Example:
        >>> precision_summary([])
        []
    """
    forecast = latest_event(run_or_events, FORECAST_EVENT)
    return forecast_lines(forecast if forecast_matters(forecast) else None) + lost_update_lines(
        latest_event(run_or_events, LOST_UPDATE_EVENT)
    )
