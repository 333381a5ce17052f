"""Mean-field theory of signal and gradient propagation in deep MLP-like stacks.

For a stack ``h_l = W_l φ(h_{l-1}) + b_l`` with ``W_ij ~ N(0, σw²/fan_in)`` and
``b_i ~ N(0, σb²)``, the pre-activation variance follows the length map
``q_l = σw² E_z[φ(√q_{l-1} z)²] + σb²`` (z ~ N(0, 1)) to a fixed point ``q*``, and
the squared gradient norm is multiplied by

    χ1 = σw² · E_z[φ'(√q* z)²]

per layer: ``||∂L/∂h_l||² ∝ χ1^(L-l)``. χ1 < 1 vanishes (ordered phase), χ1 > 1
explodes (chaotic phase); ``1/|ln χ1|`` layers change the squared gradient by a
factor e. References: Poole et al. 2016, Schoenholz et al. 2017 ("Deep
Information Propagation"), Pennington et al. 2017.

Expectations use Gauss-Hermite quadrature (201 nodes by default); ReLU,
leaky ReLU and the identity use their closed forms (ReLU: χ1 = σw²/2 exactly).
Everything here is pure: numbers in, numbers out.

Example:
    >>> from gradwatch import theory
    >>> round(theory.mean_field("relu", sigma_w2=2.0).chi1, 6)
    1.0
    >>> round(theory.critical_sigma_w2("tanh", sigma_b2=0.05), 3)
    1.761
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Callable, Union

import numpy as np
import torch

Activation = Union[str, Callable[[torch.Tensor], torch.Tensor]]

#: Activations known by name (aliases of torch's functional forms).
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "identity": lambda x: x,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
    "elu": torch.nn.functional.elu,
    "selu": torch.nn.functional.selu,
    "softplus": torch.nn.functional.softplus,
    "mish": torch.nn.functional.mish,
    "hardtanh": torch.nn.functional.hardtanh,
}

_CLOSED_FORM = ("linear", "identity", "relu", "leaky_relu")
DEFAULT_NODES = 201  # Gauss-Hermite nodes; the issue asks for >= 101


@dataclass(frozen=True)
class MeanField:
    """The mean-field prediction for one (activation, σw², σb²).

    ``q_star`` is ``inf`` when the length map diverges (e.g. ReLU with σw² ≥ 2 and
    σb² > 0); ``per_layer_gain`` is √χ1, the factor by which the gradient *norm*
    changes per layer; ``depth_scale`` is ``1/|ln χ1|`` (``inf`` at criticality);
    ``regime`` is ``"ordered"`` (vanishing), ``"critical"`` or ``"chaotic"`` (exploding).
    """

    activation: str
    sigma_w2: float
    sigma_b2: float
    q_star: float
    chi1: float
    per_layer_gain: float
    depth_scale: float
    regime: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_variance(name: str, value: Any, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _resolve(activation: Activation, negative_slope: float) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """(name, torch function or None for closed forms)."""
    if isinstance(activation, str):
        name = activation.lower()
        if name in _CLOSED_FORM:
            return name, None
        if name not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; known: {sorted(set(ACTIVATIONS) | set(_CLOSED_FORM))}, "
                "or pass a torch function such as torch.tanh"
            )
        return name, ACTIVATIONS[name]
    if callable(activation):
        return getattr(activation, "__name__", "custom"), activation
    raise TypeError(f"activation must be a name or a callable, got {type(activation).__name__}")


@lru_cache(maxsize=8)
def _hermite(nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, w = np.polynomial.hermite.hermgauss(nodes)
    # E_z[f(z)] = (1/√π) Σ w_i f(√2 x_i)
    z = torch.as_tensor(x * math.sqrt(2.0), dtype=torch.float64)
    weights = torch.as_tensor(w / math.sqrt(math.pi), dtype=torch.float64)
    return z, weights


def gaussian_moments(phi: Callable[[torch.Tensor], torch.Tensor], q: float, nodes: int = DEFAULT_NODES) -> tuple[float, float]:
    """``(E[φ(√q z)²], E[φ'(√q z)²])`` for z ~ N(0, 1), by Gauss-Hermite quadrature.

    Example:
        >>> m2, d2 = gaussian_moments(torch.tanh, 0.0)
        >>> round(m2, 6), round(d2, 6)
        (0.0, 1.0)
    """
    z, w = _hermite(nodes)
    with torch.enable_grad():  # callers may sit inside torch.no_grad()
        x = (math.sqrt(q) * z).requires_grad_(True)
        y = phi(x)
        (dy,) = torch.autograd.grad(y.sum(), x)
    return float((w * y.detach() ** 2).sum()), float((w * dy**2).sum())


def _second_moment(phi: Callable[[torch.Tensor], torch.Tensor], q: float, nodes: int) -> float:
    """E[φ(√q z)²] alone (no derivative): the length map's expectation."""
    z, w = _hermite(nodes)
    with torch.no_grad():
        return float((w * phi(math.sqrt(q) * z) ** 2).sum())


def _moments(name: str, phi: Any, q: float, negative_slope: float, nodes: int) -> tuple[float, float]:
    if name in ("linear", "identity"):
        return q, 1.0
    if name in ("relu", "leaky_relu"):
        s2 = 0.0 if name == "relu" else negative_slope**2
        return q * (1.0 + s2) / 2.0, (1.0 + s2) / 2.0
    return gaussian_moments(phi, q, nodes)


def fixed_point(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    negative_slope: float = 0.01,
    nodes: int = DEFAULT_NODES,
    q0: float = 1.0,
    max_iter: int = 200,
    rtol: float = 1e-12,
) -> float:
    """The fixed point q* of the length map ``q = σw² E[φ(√q z)²] + σb²`` (``inf`` if it diverges).

    Example:
        >>> round(fixed_point("tanh", 1.0, 0.05), 3)
        0.194
    """
    sigma_w2 = _check_variance("sigma_w2", sigma_w2, allow_zero=False)
    sigma_b2 = _check_variance("sigma_b2", sigma_b2, allow_zero=True)
    name, phi = _resolve(activation, negative_slope)
    if name in _CLOSED_FORM:
        slope = 1.0 if name in ("linear", "identity") else (1.0 + (0.0 if name == "relu" else negative_slope**2)) / 2.0
        rate = sigma_w2 * slope  # q -> rate * q + σb²
        if rate < 1.0:
            return sigma_b2 / (1.0 - rate)
        return 0.0 if sigma_b2 == 0.0 and rate == 1.0 else math.inf
    def length_map(q: float) -> float:
        return sigma_w2 * _second_moment(phi, q, nodes) + sigma_b2

    q = float(q0)
    for _ in range(max_iter):
        new = length_map(q)
        if not math.isfinite(new) or new > 1e12:
            return math.inf
        if abs(new - q) <= rtol * max(abs(q), 1e-300):
            return new
        q = new
    # Slow convergence (near criticality): solve map(q) = q by bisection on a bracket
    # around the current iterate, the stable root being where map(q) - q turns negative.
    def excess(x: float) -> float:
        return length_map(x) - x

    lo, hi = q, q
    while excess(lo) <= 0.0 and lo > 1e-14:
        lo /= 4.0
    if excess(lo) <= 0.0:  # contracting all the way to 0 (σb² = 0): q* = 0
        return 0.0 if sigma_b2 == 0.0 else lo
    while excess(hi) >= 0.0:
        hi *= 4.0
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if excess(mid) > 0.0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= rtol * hi:
            break
    return 0.5 * (lo + hi)


def chi1(activation: Activation, sigma_w2: float, sigma_b2: float = 0.0, *, negative_slope: float = 0.01, nodes: int = DEFAULT_NODES) -> float:
    """χ1 = σw² · E[φ'(√q* z)²], the per-layer factor of the squared gradient norm.

    Example:
        >>> round(chi1("relu", 1.0), 3)   # Xavier on ReLU: σw² = 1
        0.5
    """
    return mean_field(activation, sigma_w2, sigma_b2, negative_slope=negative_slope, nodes=nodes).chi1


def mean_field(
    activation: Activation,
    sigma_w2: float,
    sigma_b2: float = 0.0,
    *,
    negative_slope: float = 0.01,
    nodes: int = DEFAULT_NODES,
) -> MeanField:
    """Fixed point, χ1, per-layer gain √χ1, depth scale and regime for one stack.

    Args:
        activation: a name (``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"gelu"``,
            ``"leaky_relu"``, ``"linear"`` ...) or a torch function.
        sigma_w2: weight variance times fan-in (Xavier on a square layer: 1; He: 2;
            PyTorch's nn.Linear default: 1/3).
        sigma_b2: bias variance. Default: 0.
        negative_slope: leaky ReLU slope. Default: 0.01 (torch's).
        nodes: Gauss-Hermite nodes (at least 101). Default: 201.

    Example:
        >>> mf = mean_field("tanh", 4.0, 0.05)
        >>> round(mf.chi1, 2), mf.regime
        (1.34, 'chaotic')
    """
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 101:
        raise ValueError(f"nodes must be an int >= 101 (Gauss-Hermite accuracy), got {nodes!r}")
    name, phi = _resolve(activation, negative_slope)
    q = fixed_point(activation, sigma_w2, sigma_b2, negative_slope=negative_slope, nodes=nodes)
    if name in _CLOSED_FORM:
        d2 = _moments(name, phi, 1.0, negative_slope, nodes)[1]  # E[φ'²] does not depend on q
    elif math.isfinite(q):
        d2 = _moments(name, phi, q, negative_slope, nodes)[1]
    else:
        d2 = float("nan")
    c = float(sigma_w2) * d2
    if not math.isfinite(c):
        regime, scale = "unknown", float("nan")
    elif abs(c - 1.0) < 1e-9:
        regime, scale = "critical", math.inf
    else:
        regime, scale = ("ordered" if c < 1.0 else "chaotic"), 1.0 / abs(math.log(c)) if c > 0 else 0.0
    return MeanField(name, float(sigma_w2), float(sigma_b2), q, c, math.sqrt(c) if c >= 0 else float("nan"), scale, regime)


def local_chi(activation: Activation, sigma_w2: float, q: float, *, negative_slope: float = 0.01, nodes: int = DEFAULT_NODES) -> float:
    """σw² · E[φ'(√q z)²] at a given pre-activation variance q (χ1 when q = q*).

    The probe uses it with the measured q of each layer, so it also applies before
    the length map has converged (the first layers of a stack).

    Example:
        >>> round(local_chi("tanh", 1.0, 0.194), 3)   # at the tanh fixed point for σb² = 0.05
        0.759
    """
    sigma_w2 = _check_variance("sigma_w2", sigma_w2, allow_zero=False)
    q = _check_variance("q", q, allow_zero=True)
    name, phi = _resolve(activation, negative_slope)
    return sigma_w2 * _moments(name, phi, q, negative_slope, nodes)[1]


def depth_scale(chi: float) -> float:
    """Layers over which the squared gradient changes by a factor e: ``1/|ln χ1|``.

    Example:
        >>> round(depth_scale(0.5), 3)
        1.443
    """
    chi = _check_variance("chi", chi, allow_zero=False)
    return math.inf if chi == 1.0 else 1.0 / abs(math.log(chi))


def critical_sigma_w2(
    activation: Activation,
    sigma_b2: float = 0.0,
    *,
    negative_slope: float = 0.01,
    nodes: int = DEFAULT_NODES,
    tol: float = 1e-6,
) -> float:
    """The σw² at which χ1 = 1 (the edge of chaos) for a given σb², by bisection.

    Raises ValueError when χ1 never reaches 1 for σw² in (0, 1e4].

    Example:
        >>> critical_sigma_w2("relu")
        2.0
    """
    sigma_b2 = _check_variance("sigma_b2", sigma_b2, allow_zero=True)
    name, _ = _resolve(activation, negative_slope)
    if name in _CLOSED_FORM:
        return 1.0 / _moments(name, None, 1.0, negative_slope, nodes)[1]

    def excess(s: float) -> float:
        return chi1(activation, s, sigma_b2, negative_slope=negative_slope, nodes=nodes) - 1.0

    lo, hi = 1e-3, 1.0
    while excess(hi) < 0.0:
        lo, hi = hi, hi * 2.0
        if hi > 1e4:
            raise ValueError(f"chi1 of {name} stays below 1 for sigma_w2 up to 1e4 at sigma_b2={sigma_b2}: no critical point")
    if excess(lo) > 0.0:
        raise ValueError(f"chi1 of {name} is above 1 already at sigma_w2={lo}: no critical point found")
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if excess(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
