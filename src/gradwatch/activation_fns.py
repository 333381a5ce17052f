"""Activation functions judged by what they are: which function a module or call is, and its derivative.

A tanh-approximated GELU (transformers' ``NewGELUActivation``) calls
``torch.tanh`` inside its forward; that tanh is not the network's nonlinearity
and must not be judged as one. Here a whole activation function is recognised
(torch modules, the functional forms, Hugging Face's activation classes by class
name and module, so ``transformers`` stays optional) and judged by *its own*
derivative ``f'``:

- a value sits in the function's *flat region* where ``|f'| < FLAT_SHARE * max |f'|``
  (10%: tanh ``|y| > 0.9487``, sigmoid ``y < 0.0257`` or ``> 0.9743``; GELU
  ``x < -1.73`` and ``-1.16 < x < -0.53`` around ``x = -0.75`` where ``f'``
  crosses zero; SiLU ``x < -0.88`` ...);
- *families* decide what a flat region means:

  ``"relu"``       ReLU, ReLU6, ReLU²: the flat region is exactly zero output;
                   a unit is dead when it outputs 0 for every example.
  ``"saturating"`` sigmoid, tanh: bounded; most values in the flat tails is
                   saturation.
  ``"smooth"``     GELU (exact and tanh), QuickGELU, SiLU/Swish, Mish: ReLU-like;
                   about half of the values of a healthy layer may lie in the flat
                   negative region (as for ReLU), so a unit is dead when ``|f'|``
                   is flat for every example, and a layer is saturated only when
                   nearly all of its values are flat.

Recognised but not measured (``measured=False``): activations that never go
flat (LeakyReLU, PReLU, ELU, SELU, CELU, Hardswish, Hardtanh, Softplus, HF's
Laplace, xIELU ...). Functional calls inside any recognised module belong to
that module and are not recorded separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .compat import no_torch_function

#: a value is flat where |f'| is below this share of the function's largest |f'|.
FLAT_SHARE = 0.1

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_K = 0.044715
_QUICK_GELU_A = 1.702


def _gelu_slope(x: torch.Tensor) -> torch.Tensor:
    """GELU'(x) = Phi(x) + x phi(x) (exact GELU)."""
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _gelu_tanh_slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx 0.5 x (1 + tanh(c (x + k x^3)))."""
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_K * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_K * x * x)


def _quick_gelu_slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx x sigmoid(a x) = s + a x s (1 - s)."""
    s = torch.sigmoid(_QUICK_GELU_A * x)
    return s + _QUICK_GELU_A * x * s * (1.0 - s)


def _silu_slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx x sigmoid(x) = s (1 + x (1 - s))."""
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _mish_slope(x: torch.Tensor) -> torch.Tensor:
    """d/dx x tanh(softplus(x)) = t + x (1 - t^2) sigmoid(x)."""
    t = torch.tanh(torch.nn.functional.softplus(x))
    return t + x * (1.0 - t * t) * torch.sigmoid(x)


def _tanh_slope_of_output(y: torch.Tensor) -> torch.Tensor:
    return 1.0 - y * y


def _sigmoid_slope_of_output(y: torch.Tensor) -> torch.Tensor:
    return y * (1.0 - y)


@dataclass(frozen=True)
class ActivationFn:
    """One activation function: how to name it and how to take its derivative.

    Attributes:
        name: short stable name (``"gelu_tanh"``), used in site keys and evidence.
        label: how a person reads it (``"GELU (tanh)"``).
        family: ``"relu"``, ``"saturating"``, ``"smooth"`` or ``"other"`` (see the module docstring).
        slope: ``f'`` as a function of the input, or of the output when ``from_output``; None: not measured.
        from_output: the derivative is a function of the output (monotone functions: tanh, sigmoid).
    """

    name: str
    label: str
    family: str
    slope: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_output: bool = False

    @property
    def measured(self) -> bool:
        """Whether gradwatch takes statistics of this function (False: recognised only)."""
        return self.family == "relu" or self.slope is not None

    @property
    def max_slope(self) -> float:
        """The largest ``|f'|`` (numerically, on a fine grid; 1.0 for the ReLU family)."""
        return _MAX_SLOPES[self.name]

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the values in the flat region (``|f'| < FLAT_SHARE * max |f'|``).

        ``t`` is the function's input, or its output when ``from_output``. NaN is not flat.

        Example:
            >>> ACTIVATIONS["tanh"].flat(torch.tensor([0.0, 0.9, 0.96])).tolist()
            [False, False, True]
            >>> ACTIVATIONS["gelu"].flat(torch.tensor([-4.0, -0.75, -1.4, 0.0, 3.0])).tolist()
            [True, True, False, False, False]
        """
        if self.slope is None:
            raise ValueError(f"{self.label} is recognised but not measured: it has no flat region to test")
        return self.slope(t).abs() < FLAT_SHARE * self.max_slope


ACTIVATIONS: dict[str, ActivationFn] = {
    fn.name: fn
    for fn in (
        ActivationFn("relu", "ReLU", "relu"),
        ActivationFn("relu6", "ReLU6", "relu"),
        ActivationFn("relu2", "ReLU²", "relu"),
        ActivationFn("tanh", "tanh", "saturating", _tanh_slope_of_output, from_output=True),
        ActivationFn("sigmoid", "sigmoid", "saturating", _sigmoid_slope_of_output, from_output=True),
        ActivationFn("gelu", "GELU", "smooth", _gelu_slope),
        ActivationFn("gelu_tanh", "GELU (tanh)", "smooth", _gelu_tanh_slope),
        ActivationFn("quick_gelu", "QuickGELU", "smooth", _quick_gelu_slope),
        ActivationFn("silu", "SiLU", "smooth", _silu_slope),
        ActivationFn("mish", "Mish", "smooth", _mish_slope),
        ActivationFn("other", "activation", "other"),
    )
}


def _max_slope(name: str) -> float:
    fn = ACTIVATIONS[name]
    if fn.slope is None:
        return 1.0
    grid = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    if fn.from_output:  # outputs of tanh / sigmoid over the same inputs
        grid = torch.tanh(grid) if name == "tanh" else torch.sigmoid(grid)
    with no_torch_function():  # never seen by a TorchFunctionMode the caller may have on
        return float(fn.slope(grid).abs().max())


#: worked out once at import (~ms): read inside forward hooks, where torch.compile traces the
#: hook and must see a constant, not a cached function call
_MAX_SLOPES: dict[str, float] = {name: _max_slope(name) for name in ACTIVATIONS}


# ----- recognising modules -----------------------------------------------------------------------
_TORCH_MODULES: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"),
    (nn.SiLU, "silu"), (nn.Mish, "mish"),
)
_TORCH_OTHER: tuple[type, ...] = (
    nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.GLU,
)
#: Hugging Face transformers' activation classes (transformers/activations.py), by class name.
HF_ACTIVATIONS: dict[str, str] = {
    "NewGELUActivation": "gelu_tanh", "FastGELUActivation": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "GELUPytorchTanh": "gelu_tanh",
    "GELUActivation": "gelu", "ClippedGELUActivation": "gelu", "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu", "MishActivation": "mish", "ReLUSquaredActivation": "relu2",
    "LinearActivation": "other", "LaplaceActivation": "other", "XIELUActivation": "other",
    "SqrtSoftplusActivation": "other",
}
#: The same functions written in other codebases (minGPT's NewGELU, timm's GELUTanh/QuickGELU/Swish ...),
#: by lower-cased class name.
_GENERIC_NAMES: dict[str, str] = {
    "newgelu": "gelu_tanh", "gelunew": "gelu_tanh", "gelutanh": "gelu_tanh", "fastgelu": "gelu_tanh",
    "quickgelu": "quick_gelu", "swish": "silu", "silu": "silu", "mish": "mish", "gelu": "gelu",
}


def module_activation(module: nn.Module) -> ActivationFn | None:
    """The activation function a module computes, or None when it is not an activation module.

    Recognises torch's modules (``nn.GELU`` by its ``approximate``), Hugging Face's
    activation classes by class name within a ``transformers`` module (without
    importing transformers), and common re-implementations by class name.

    Example:
        >>> module_activation(nn.GELU(approximate="tanh")).label
        'GELU (tanh)'
        >>> module_activation(nn.LeakyReLU()).measured, module_activation(nn.Linear(2, 2)) is None
        (False, True)
    """
    if isinstance(module, nn.GELU):
        return ACTIVATIONS["gelu_tanh" if getattr(module, "approximate", "none") == "tanh" else "gelu"]
    for kind, name in _TORCH_MODULES:
        if isinstance(module, kind):
            return ACTIVATIONS[name]
    if isinstance(module, _TORCH_OTHER):
        return ACTIVATIONS["other"]
    for cls in type(module).__mro__:
        if cls is nn.Module or cls.__module__.startswith("torch."):
            break
        if cls.__module__.split(".")[0] == "transformers" and cls.__name__ in HF_ACTIVATIONS:
            return ACTIVATIONS[HF_ACTIVATIONS[cls.__name__]]
        generic = _GENERIC_NAMES.get(cls.__name__.lower().removesuffix("activation"))
        if generic is not None:
            name = "gelu_tanh" if generic == "gelu" and getattr(module, "approximate", None) == "tanh" else generic
            return ACTIVATIONS[name]
    return None


# ----- recognising functional calls --------------------------------------------------------------
_FUNCTIONS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "relu6": "relu6", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "tanh": "tanh", "tanh_": "tanh", "gelu": "gelu", "silu": "silu", "mish": "mish",
}


def function_activation(func: Any, kwargs: dict[str, Any] | None = None) -> ActivationFn | None:
    """The activation a functional call computes (``F.gelu(x, approximate="tanh")``, ``torch.tanh``, ...), or None.

    Example:
        >>> function_activation(torch.nn.functional.gelu, {"approximate": "tanh"}).name
        'gelu_tanh'
        >>> function_activation(torch.exp) is None
        True
    """
    name = _FUNCTIONS.get(getattr(func, "__name__", ""))
    if name is None:
        return None
    if name == "gelu" and (kwargs or {}).get("approximate") == "tanh":
        name = "gelu_tanh"
    return ACTIVATIONS[name]
