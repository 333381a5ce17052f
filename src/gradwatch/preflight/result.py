"""Records of a probe: per-layer rows, per-block Jacobian estimates, the Probe itself."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..findings import Finding, _jsonable
from .jacobian import JacobianEstimate


@dataclass
class LayerRow:
    """One layer (a module owning parameters), in execution order.

    ``out_*`` describe the layer's output (a pre-activation for Linear/Conv);
    ``act_*`` the nonlinearity applied to it, when one was seen. ``act_grad_norm``
    is ||∂L/∂out||; ``backward_factor`` is ``act_grad_norm`` of the previous layer
    over this one's (the per-layer backward factor), ``theory_factor`` the
    mean-field √χ1 for this layer's σw², σb² and the previous layer's nonlinearity.
    """

    depth: int
    name: str
    type: str
    block: str | None
    out_mean: float | None = None
    out_std: float | None = None
    activation: str | None = None
    act_mean: float | None = None
    act_std: float | None = None
    dead_fraction: float | None = None
    saturated_fraction: float | None = None
    grad_rms: float | None = None
    act_grad_norm: float | None = None
    backward_factor: float | None = None
    theory_factor: float | None = None
    weight_std: float | None = None
    kaiming_std: float | None = None
    xavier_std: float | None = None
    init_ratio: float | None = None  # weight_std / max(kaiming_std, xavier_std)
    sigma_w2: float | None = None
    sigma_b2: float | None = None
    gain_for: str | None = None  # the nonlinearity whose calculate_gain the init audit used

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass
class BlockRow:
    """One block: its Jacobian estimate, the measured gain, its normalization."""

    index: int
    name: str
    jacobian: JacobianEstimate | None
    measured_gain: float | None  # ||∂L/∂input|| / ||∂L/∂output|| from the loss gradient
    norm: str  # "pre", "post" or "none"
    norm_layers: list[str] = field(default_factory=list)

    @property
    def gain(self) -> float | None:
        return None if self.jacobian is None else self.jacobian.gain

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "index": self.index, "name": self.name, "gain": self.gain,
            "jacobian": None if self.jacobian is None else self.jacobian.to_dict(),
            "measured_gain": self.measured_gain, "norm": self.norm, "norm_layers": self.norm_layers,
        })


@dataclass
class Probe:
    """Result of :func:`gradwatch.probe`: per-layer table, blocks, predicted vs measured gain, findings.

    ``predicted_gain`` is the product of the blocks' ``√(mean squared singular
    value)``; ``measured_gain`` the ratio ||∂L/∂(first block input)|| /
    ||∂L/∂(last block output)|| of the real loss gradient. ``layer_gain`` is
    ||∂L/∂h_first|| / ||∂L/∂h_last|| over layer outputs, ``per_layer_factor`` its
    geometric mean per layer, ``theory_factor`` the median mean-field √χ1 of the layers.
    """

    loss: float
    layers: list[LayerRow]
    blocks: list[BlockRow]
    predicted_gain: float | None
    measured_gain: float | None
    layer_gain: float | None
    per_layer_factor: float | None
    theory_factor: float | None
    end_to_end: JacobianEstimate | None = None
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def block_gains(self) -> list[float]:
        return [b.gain for b in self.blocks if b.gain is not None]

    def finding(self, code: str) -> Finding | None:
        """The first finding with this code, or None."""
        return next((f for f in self.findings if f.code == code), None)

    @property
    def has_error(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of everything (non-finite floats as strings)."""
        return _jsonable({
            "loss": self.loss,
            "predicted_gain": self.predicted_gain,
            "measured_gain": self.measured_gain,
            "layer_gain": self.layer_gain,
            "per_layer_factor": self.per_layer_factor,
            "theory_factor": self.theory_factor,
            "layers": [r.to_dict() for r in self.layers],
            "blocks": [b.to_dict() for b in self.blocks],
            "end_to_end": None if self.end_to_end is None else self.end_to_end.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "notes": self.notes,
        })

    def table(self) -> str:
        """The per-layer table, the gains and the findings as plain text."""
        block_gain = {b.name: b for b in self.blocks}
        lines = [f"{'depth':>5}  {'layer':<24} {'type':<12} {'act':<8} {'act std':>9} {'dead':>5} {'sat':>5} "
                 f"{'grad norm':>10} {'factor':>7} {'√χ1':>6} {'init×':>6}  block gain"]
        seen: set[str] = set()
        for r in self.layers:
            std = r.act_std if r.act_std is not None else r.out_std
            gain = ""
            if r.block is not None and r.block not in seen and r.block in block_gain:
                seen.add(r.block)
                b = block_gain[r.block]
                if b.jacobian is not None:
                    gain = f"{b.name}: {b.jacobian.gain:.3g} ± {_half_se(b.jacobian):.2g} (max {b.jacobian.largest_sv:.3g})"
            lines.append(
                f"{r.depth:>5}  {_cut(r.name, 24):<24} {_cut(r.type, 12):<12} {r.activation or '-':<8} {_f(std, 9)} "
                f"{_pct(r.dead_fraction)} {_pct(r.saturated_fraction)} {_f(r.act_grad_norm, 10)} "
                f"{_f(r.backward_factor, 7, '.3f')} {_f(r.theory_factor, 6, '.3f')} {_f(r.init_ratio, 6, '.2f')}  {gain}"
            )
        lines.append("")
        lines.append(f"predicted end-to-end gradient gain (product of {len(self.block_gains)} block gains): {_g(self.predicted_gain)}")
        lines.append(f"measured gain (first block input / last block output):            {_g(self.measured_gain)}")
        if self.layer_gain is not None:
            lines.append(f"first/last layer activation-gradient ratio: {_g(self.layer_gain)} "
                         f"(per layer {_g(self.per_layer_factor)}; mean-field √χ1 {_g(self.theory_factor)})")
        if self.end_to_end is not None and self.end_to_end.sq_sv_var is not None:
            e = self.end_to_end
            lines.append(f"end-to-end Jacobian: mean squared singular value {e.mean_sq_sv:.3g}, "
                         f"variance of squared singular values {e.sq_sv_var:.3g}")
        norms = [f"{b.name}:{b.norm}" for b in self.blocks]
        if norms:
            lines.append("normalization: " + ", ".join(norms))
        lines.extend(self.notes)
        lines.append("")
        lines.extend(str(f) for f in self.findings) if self.findings else lines.append("no findings")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        """One line: layers, blocks, loss, gains and the findings' codes."""
        from ..notebook import probe_repr

        return probe_repr(self)

    def _repr_html_(self) -> str:
        """The probe in a notebook: gains, findings and the per-layer table."""
        from ..notebook import probe_html

        return probe_html(self)


def _half_se(est: JacobianEstimate) -> float:
    """Standard error of the gain √m from that of m (delta method)."""
    return est.mean_sq_sv_se / (2 * est.gain) if est.gain > 0 and math.isfinite(est.mean_sq_sv_se) else float("nan")


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else "…" + text[-(n - 1):]


def _f(x: float | None, width: int, spec: str = ".3g") -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"


def _pct(x: float | None) -> str:
    return f"{'-':>5}" if x is None else f"{100 * x:>4.0f}%"


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
