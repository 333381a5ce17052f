"""Trace one forward pass: which nonlinearity follows which layer, and what it did.

:class:`ActivationTracer` is a ``TorchFunctionMode`` active only while the probe
(or :mod:`gradwatch.init`) runs one forward pass. It sees module activations
(``nn.ReLU`` calls ``F.relu``) and functional ones (``F.relu``, ``torch.tanh``,
``x.sigmoid()``) alike, and normalization calls (``F.layer_norm`` ...). Each
activation call is attributed to the layer whose output it consumed (directly,
or else the layer that ran last) and summarized as plain numbers: mean, std,
the share of dead units, the share of saturated sigmoid/tanh values.

Given the model, the tracer also hooks its activation *modules* (recognised by
:func:`gradwatch.activation_fns.module_activation`: torch's, Hugging Face's
``NewGELUActivation`` & co.) and records each one as a whole: the functional
calls inside its forward (the ``torch.tanh`` inside a tanh-approximated GELU)
are not recorded separately. Dead units and saturation are judged by the
derivative of the whole function (:class:`gradwatch.activation_fns.ActivationFn`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..activation_fns import ACTIVATIONS, ActivationFn, module_activation
from ..compat import no_torch_function

#: function name -> activation name as torch.nn.init.calculate_gain spells it (or our own).
ACTIVATION_FUNCS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "relu6": "relu", "leaky_relu": "leaky_relu", "leaky_relu_": "leaky_relu",
    "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
    "gelu": "gelu", "silu": "silu", "elu": "elu", "elu_": "elu", "selu": "selu", "selu_": "selu",
    "celu": "elu", "softplus": "softplus", "mish": "mish", "hardtanh": "hardtanh", "hardswish": "silu",
}
DEAD_FAMILY = ("relu",)  # units whose output is exactly 0 where the input is <= 0
SATURATING = ("tanh", "sigmoid")
#: gradwatch.activation_fns name -> the name used here (calculate_gain's, or the theory module's)
_TRACE_NAME = {"relu6": "relu", "relu2": "relu", "gelu_tanh": "gelu", "quick_gelu": "gelu"}
NORM_FUNCS = ("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm")
NORM_MODULES: tuple[type, ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
#: a value counts as saturated where the derivative is below this share of its maximum.
SATURATION_SHARE = 0.1
#: module types whose nonlinearity is inferred from the modules that follow them.
WEIGHT_LAYERS: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_LAYERS: tuple[type, ...] = WEIGHT_LAYERS[1:]


@dataclass
class ActivationStats:
    """One nonlinearity applied after a layer, summarized over the batch."""

    activation: str  # e.g. "relu", "tanh"
    param: float | None  # leaky_relu negative slope
    layer: str | None  # the layer whose output it consumed (or that ran last)
    direct: bool  # True when its input was that layer's output tensor itself
    block: str | None
    mean: float
    std: float
    dead_fraction: float | None  # ReLU family: units <= 0 for every example and position; GELU/SiLU/Mish:
    # units whose derivative is below 10% of its maximum for every example and position
    saturated_fraction: float | None  # sigmoid/tanh: values whose derivative < 10% of its maximum


@dataclass
class TraceRecord:
    """What one traced forward pass saw."""

    activations: list[ActivationStats] = field(default_factory=list)
    norm_calls: list[tuple[str | None, int, str]] = field(default_factory=list)  # (block, event index, function)
    layer_calls: list[tuple[str | None, int, str]] = field(default_factory=list)  # (block, event index, layer)

    def first_activation(self) -> dict[str, ActivationStats]:
        """Layer name -> the first nonlinearity applied to its output."""
        out: dict[str, ActivationStats] = {}
        for stats in self.activations:
            if stats.layer is not None and stats.layer not in out:
                out[stats.layer] = stats
        return out


def _unit_dim(x: torch.Tensor, conv: bool) -> int:
    return 1 if conv and x.dim() >= 3 else x.dim() - 1


def summarize(name: str, x_in: torch.Tensor, y: torch.Tensor, conv: bool,
              fn: ActivationFn | None = None) -> tuple[float, float, float | None, float | None]:
    """(mean, std, dead_fraction, saturated_fraction) of one activation call: tensors in, numbers out.

    ``fn`` (from :data:`gradwatch.activation_fns.ACTIVATIONS`; default: looked up by
    ``name``) decides the tests: ReLU family, units <= 0 for every example; sigmoid/tanh,
    the share of outputs whose derivative is below 10% of its maximum; GELU/SiLU/Mish,
    units whose derivative is that small for every example.

    Example:
        >>> summarize("tanh", torch.zeros(2), torch.tensor([0.0, 0.99]), False)[3]
        0.5
    """
    fn = fn if fn is not None else ACTIVATIONS.get(name)
    y = y.detach().float()
    mean, std = float(y.mean()), float(y.std()) if y.numel() > 1 else 0.0
    dead = saturated = None
    if fn is None or not fn.measured or x_in.dim() < 1:
        return mean, std, dead, saturated
    dim = _unit_dim(x_in, conv)
    if fn.family == "relu":
        alive = (x_in.detach() > 0).movedim(dim, -1).reshape(-1, x_in.shape[dim]).any(dim=0)
        dead = float(1.0 - alive.float().mean())
    elif fn.family == "saturating":
        saturated = float(fn.flat(y).float().mean())
    else:  # smooth: judged on the input
        passing = ~fn.flat(x_in.detach().float())
        alive = passing.movedim(dim, -1).reshape(-1, x_in.shape[dim]).any(dim=0)
        dead = float(1.0 - alive.float().mean())
    return mean, std, dead, saturated


class ActivationTracer(TorchFunctionMode):
    """Record activation and normalization calls during one forward pass.

    ``tensor_owner`` maps ``id(tensor)`` of layer outputs to layer names (filled by
    the caller's forward hooks); ``current_block`` and ``last_layer`` are callables
    giving the block and layer running now. With ``model``, its activation modules are
    hooked while the tracer is entered and recorded whole (see the module docstring).

    Example:
        >>> tracer = ActivationTracer({}, lambda: None, lambda: "0")
        >>> with tracer:
        ...     _ = torch.tanh(torch.zeros(4, 3))
        >>> tracer.record.activations[0].activation, tracer.record.activations[0].saturated_fraction
        ('tanh', 0.0)
    """

    def __init__(
        self,
        tensor_owner: dict[int, str],
        current_block: Callable[[], str | None],
        last_layer: Callable[[], str | None],
        conv_layers: frozenset[str] = frozenset(),
        counter: Callable[[], int] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.tensor_owner = tensor_owner
        self.current_block = current_block
        self.last_layer = last_layer
        self.conv_layers = conv_layers
        self.counter = counter or (lambda: 0)
        self.record = TraceRecord()
        # activation modules measured whole (recognised-only ones, e.g. LeakyReLU, keep their functional call)
        self._act_modules = [(m, fn) for _, m in (model.named_modules() if model is not None else ())
                             if (fn := module_activation(m)) is not None and fn.measured]
        self._handles: list[Any] = []
        self._inside: list[tuple[torch.Tensor, torch.Tensor, str | None, bool]] = []  # (input, its copy, layer, direct)

    def __enter__(self) -> "ActivationTracer":
        for module, fn in self._act_modules:
            self._handles.append(module.register_forward_pre_hook(self._module_pre))
            self._handles.append(module.register_forward_hook(self._module_post(fn)))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._inside = []
        super().__exit__(*exc)

    def _module_pre(self, module: nn.Module, args: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        owner = self.tensor_owner.get(id(x)) if x is not None else None
        layer = owner if owner is not None else self.last_layer()
        with no_torch_function():  # an in-place forward overwrites its input: keep a copy
            x_in = x.detach().clone() if x is not None and getattr(module, "inplace", False) else x
        self._inside.append((x, x_in, layer, owner is not None))

    def _module_post(self, fn: ActivationFn) -> Callable[..., None]:
        act = _TRACE_NAME.get(fn.name, fn.name)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._inside:
                return
            x, x_in, layer, direct = self._inside.pop()
            if self._inside or x is None or not x.is_floating_point() or not isinstance(output, torch.Tensor):
                return  # an activation module inside another one is the outer one's
            with no_torch_function():
                mean, std, dead, sat = summarize(act, x_in, output, layer in self.conv_layers, fn)
            self.record.activations.append(ActivationStats(act, None, layer, direct, self.current_block(),
                                                           mean, std, dead, sat))

        return hook

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        fname = getattr(func, "__name__", "")
        act = ACTIVATION_FUNCS.get(fname) if not self._inside else None  # inside an activation module: its own
        if act is not None and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x = args[0]
            owner = self.tensor_owner.get(id(x))
            layer = owner if owner is not None else self.last_layer()
            x_in = x.detach().clone() if fname.endswith("_") or kwargs.get("inplace") else x
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                param = None
                if act == "leaky_relu":
                    param = float(args[1]) if len(args) > 1 else float(kwargs.get("negative_slope", 0.01))
                fn = ACTIVATIONS.get("gelu_tanh" if fname == "gelu" and kwargs.get("approximate") == "tanh" else act)
                mean, std, dead, sat = summarize(act, x_in, out, layer in self.conv_layers, fn)
                self.record.activations.append(
                    ActivationStats(act, param, layer, owner is not None, self.current_block(), mean, std, dead, sat)
                )
            return out
        if fname in NORM_FUNCS:
            self.record.norm_calls.append((self.current_block(), self.counter(), fname))
        return func(*args, **kwargs)


def structural_nonlinearities(model: nn.Module) -> dict[str, tuple[str, float | None]]:
    """Layer name -> (activation, param) read from module order inside ``nn.Sequential`` containers.

    A Linear/Conv child followed (possibly after dropout, normalization, reshapes)
    by an activation module gets that activation; one followed by another
    weight layer, or last, gets ``"linear"``. Layers outside a Sequential are absent.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2))
        >>> structural_nonlinearities(m)
        {'0': ('tanh', None), '2': ('linear', None)}
    """
    modules = {
        nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid",
        nn.GELU: "gelu", nn.SiLU: "silu", nn.ELU: "elu", nn.SELU: "selu", nn.Softplus: "softplus", nn.Mish: "mish",
        nn.Hardtanh: "hardtanh", nn.CELU: "elu", nn.Hardswish: "silu",
    }
    passthrough = (nn.Dropout, nn.Identity, nn.Flatten, nn.Unflatten) + NORM_MODULES + (
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    )
    found: dict[str, tuple[str, float | None]] = {}
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        for i, (name, child) in enumerate(children):
            if not isinstance(child, WEIGHT_LAYERS):
                continue
            act: tuple[str, float | None] = ("linear", None)
            for _, nxt in children[i + 1:]:
                kind = next((v for k, v in modules.items() if type(nxt) is k), None)
                if kind is not None:
                    act = (kind, float(nxt.negative_slope) if isinstance(nxt, nn.LeakyReLU) else None)
                    break
                if not isinstance(nxt, passthrough):
                    break
            found[f"{prefix}.{name}" if prefix else name] = act
    return found
