"""Randomized estimates of a Jacobian's singular values from autograd products.

Given ``y = f(x)`` with its graph, without ever forming the Jacobian J = ∂y/∂x:

- vector-Jacobian products ``Jᵀu`` are one backward each (``torch.autograd.grad``);
- Jacobian-vector products ``Jv`` use the double-backward trick: ``g(u) = Jᵀu`` is
  linear in ``u``, so its own VJP with ``v`` is ``Jv``. The graph of ``g`` is built
  once per map (one backward with ``create_graph=True``) and reused.

Estimates (Hutchinson 1990; power iteration):

- mean squared singular value ``tr(JJᵀ)/n_out = E||Jᵀu||²/n_out`` for Rademacher
  ``u`` (exact for an orthogonal J), with the standard error over probes. It is
  the expected squared gain of an isotropic output gradient, and equals the mean
  of the squared singular values when J is square;
- second moment ``tr((JJᵀ)²)/n_out = E||JJᵀu||²/n_out`` (optional), hence the
  spread (variance) of the squared singular values;
- the largest singular value by power iteration on JᵀJ.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class JacobianEstimate:
    """Singular-value estimates of one map's Jacobian (see module docstring)."""

    n_in: int
    n_out: int
    probes: int
    mean_sq_sv: float
    mean_sq_sv_se: float
    largest_sv: float  # nan when double backward is unsupported by an op of the map
    power_iters: int
    second_moment: float | None = None  # tr((JJᵀ)²)/n_out
    sq_sv_var: float | None = None  # second_moment - mean_sq_sv²: spread of the squared singular values

    @property
    def gain(self) -> float:
        """√(mean squared singular value): the typical factor on a gradient's norm."""
        return math.sqrt(max(self.mean_sq_sv, 0.0))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gain"] = self.gain
        return out


def _rademacher(shape: torch.Size, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    r = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (r.to(like.dtype) * 2 - 1).to(like.device)


def _vjp(y: torch.Tensor, x: torch.Tensor, u: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    (g,) = torch.autograd.grad(y, x, u, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def estimate_jacobian(
    y: torch.Tensor,
    x: torch.Tensor,
    *,
    probes: int = 8,
    power_iters: int = 5,
    second_moment: bool = False,
    generator: torch.Generator | None = None,
) -> JacobianEstimate:
    """Estimate the singular values of ``∂y/∂x`` (``y`` computed from ``x`` with a graph).

    Args:
        y: output tensor (floating point, part of ``x``'s graph).
        x: input tensor with ``requires_grad=True``.
        probes: Rademacher probes for the Hutchinson estimate. Default: 8.
        power_iters: power-iteration steps for the largest singular value (0: skip). Default: 5.
        second_moment: also estimate ``tr((JJᵀ)²)/n_out`` and the spread of the squared
            singular values (one JVP per probe). Default: False.
        generator: CPU generator for the probes. Default: a fresh one seeded 0.

    Returns:
        A :class:`JacobianEstimate`. The graph of ``y`` is retained.

    Example:
        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> est = estimate_jacobian(2.0 * x, x, probes=4, power_iters=2)
        >>> round(est.mean_sq_sv, 6), round(est.largest_sv, 4)
        (4.0, 2.0)
    """
    if not isinstance(x, torch.Tensor) or not x.requires_grad:
        raise ValueError("x must be a tensor with requires_grad=True from which y was computed")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        raise ValueError("y must be a floating-point tensor computed from x")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive int, got {probes!r}")
    if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
        raise ValueError(f"power_iters must be an int >= 0, got {power_iters!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    n_out, n_in = y.numel(), x.numel()
    if not y.requires_grad:  # y does not depend on x at all
        zeros = float(0.0)
        return JacobianEstimate(n_in, n_out, probes, zeros, zeros, zeros, power_iters,
                                zeros if second_moment else None, zeros if second_moment else None)

    jvp_graph: tuple[torch.Tensor, torch.Tensor] | None = None

    def jvp(v: torch.Tensor) -> torch.Tensor:
        nonlocal jvp_graph
        if jvp_graph is None:
            w = torch.zeros_like(y, requires_grad=True)
            jvp_graph = (w, _vjp(y, x, w, create_graph=True))
        w, g = jvp_graph
        if not g.requires_grad:  # J does not depend on anything differentiable: g is constant 0
            return torch.zeros_like(y)
        (out,) = torch.autograd.grad(g, w, v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(y) if out is None else out

    samples, moments = [], []
    first: torch.Tensor | None = None
    for _ in range(probes):
        u = _rademacher(y.shape, y, gen)
        g = _vjp(y, x, u)
        samples.append(float(g.double().pow(2).sum()) / n_out)
        if first is None:
            first = g.detach()
        if second_moment:
            moments.append(float(jvp(g.detach()).double().pow(2).sum()) / n_out)
    mean = sum(samples) / probes
    se = (math.sqrt(sum((s - mean) ** 2 for s in samples) / (probes - 1)) / math.sqrt(probes)) if probes > 1 else float("nan")

    largest = float("nan")
    if power_iters > 0:
        try:
            v = first if first is not None and float(first.norm()) > 0 else _rademacher(x.shape, x, gen)
            v = v / v.norm()
            for _ in range(power_iters):
                jv = jvp(v)
                largest = float(jv.norm())
                if largest == 0.0:
                    break
                v = _vjp(y, x, jv / largest).detach()
                norm = float(v.norm())
                if norm == 0.0:
                    break
                v = v / norm
            if largest != 0.0:
                largest = float(jvp(v).norm())
        except RuntimeError:  # an op without double backward: leave the largest unknown
            largest = float("nan")
    m2 = var = None
    if second_moment:
        m2 = sum(moments) / probes
        var = m2 - mean * mean
    return JacobianEstimate(n_in, n_out, probes, mean, se, largest, power_iters, m2, var)
