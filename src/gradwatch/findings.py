"""Findings: what gradwatch tells a person, as records.

A :class:`Finding` is one diagnosis: a stable ``code`` (see ``CODES``), a
severity, the step it was raised on, one plain sentence, the numbers behind it
(``evidence``), where it happened (``location``) and ordered, concrete
``fixes``. Findings are plain data: they serialize to JSON and back.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]
SEVERITIES: tuple[str, ...] = ("info", "warning", "error")

#: Finding codes of the public contract (DESIGN.md), with their meaning.
CODES: dict[str, str] = {
    "vanishing_gradients": "early layers receive gradients orders of magnitude smaller than late layers",
    "exploding_gradients": "gradient norms grow with depth or over steps toward overflow",
    "init_scale_too_large": "the very first gradient is huge, or weights are far above their fan-in scale",
    "lr_too_high": "first gradients were sane, then the norm grew step over step after updates",
    "degenerate_batch": "the input batch itself is non-finite, all zeros, or constant",
    "loss_numerics": "the model's output is finite but the loss is not",
    "nonfinite_forward": "a module produced the first non-finite value in the forward pass",
    "nonfinite_backward": "the forward pass is finite, the backward pass produced the first non-finite value",
    "fp16_overflow": "scaled gradients or activations overflow float16",
    "fp16_underflow": "a share of gradients would flush to zero in float16 at the current loss scale",
    "dead_relu": "most units of a ReLU layer output zero for every example",
    "saturated_activations": "most sigmoid/tanh units sit in their flat tails",
    "loss_spike": "the loss jumps by orders of magnitude between batches",
    "missing_gradients": "parameters that require grad never receive one",
    "clipping_always_active": "the clip threshold engages on nearly every step",
    "missing_normalization": "a deep stack with no normalization layer, in a regime that will not train",
    "training_stalled": "several steps in a row were skipped (non-finite, overflow, spikes): the run is not learning",
    "rank_divergence": "data-parallel replicas hold different parameters or made different decisions",
    # Not in DESIGN.md's table: gradwatch reporting on itself (an internal error, reported once).
    "internal_error": "gradwatch itself failed; training went on without it for this step",
    # Not in DESIGN.md's table (proposed, issue 6): bf16 weights lose small updates to rounding.
    "bf16_lost_updates": "updates too small for bfloat16 weights are lost to rounding (w + dw == w)",
}


def _jsonable(value: Any) -> Any:
    """Turn numbers, tensors and containers into JSON-safe values (non-finite floats as strings)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(value.tolist())
    return str(value)


def json_line(record: dict[str, Any]) -> str:
    """One JSONL line; non-finite floats become strings ('nan', 'inf'), as :func:`_jsonable` writes them.

    A record of plain finite numbers is encoded in one ``json.dumps`` call;
    only one that needs converting walks through ``_jsonable``.

    Example:
        >>> json_line({"step": 1, "loss": float("nan")})
        '{"step":1,"loss":"nan"}\\n'
    """
    try:
        return json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
    except (TypeError, ValueError):
        return json.dumps(_jsonable(record), separators=(",", ":")) + "\n"


@dataclass
class Finding:
    """One diagnosis, with the numbers behind it and what to change.

    Example:
        >>> f = Finding("clipping_always_active", "warning", 120,
        ...             "The clip threshold engaged on 98% of the last 50 steps.",
        ...             evidence={"share_clipped": 0.98}, fixes=["raise clip_norm from 1.0 to 5.0"])
        >>> Finding.from_dict(f.to_dict()) == f
        True
    """

    code: str
    severity: Severity
    step: int
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    location: dict[str, Any] = field(default_factory=dict)
    fixes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}; known codes: {sorted(CODES)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats become the strings 'nan', 'inf', '-inf')."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Finding":
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        return cls(
            code=data["code"],
            severity=data["severity"],
            step=int(data["step"]),
            message=data["message"],
            evidence=dict(data.get("evidence") or {}),
            location=dict(data.get("location") or {}),
            fixes=list(data.get("fixes") or []),
        )

    def __repr__(self) -> str:
        """One line: severity, code, step and the message cut to 100 characters."""
        from .notebook import finding_repr

        return finding_repr(self)

    def _repr_html_(self) -> str:
        """The finding in a notebook: message, location, evidence and fixes (escaped)."""
        from .notebook import finding_html

        return finding_html(self)

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.location.items())
        text = f"[{self.severity}] step {self.step} {self.code}: {self.message}"
        if where:
            text += f" ({where})"
        for fix in self.fixes:
            text += f"\n    fix: {fix}"
        return text
