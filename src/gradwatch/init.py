"""``gradwatch.init``: initialization fixes that pick the gain from the nonlinearity after each layer.

- :func:`kaiming_` — Gaussian weights, std = gain/√fan_in (He et al. 2015);
- :func:`xavier_` — Gaussian weights, std = gain·√(2/(fan_in + fan_out)) (Glorot & Bengio 2010);
- :func:`orthogonal_` — (semi-)orthogonal weights times gain (Saxe et al. 2014);
- :func:`lsuv_` — layer-sequential unit variance (Mishkin & Matas 2016): orthonormal
  init, then each layer in execution order is rescaled until its output variance
  on the batch is 1 within ``tol``.

Each works on ``nn.Linear`` and ``nn.ConvNd`` (and transposed convs), infers the
nonlinearity that follows each layer (from ``nn.Sequential`` order, or, when a
``batch`` is given, by tracing one forward pass, which also sees functional
``F.relu``/``torch.tanh``), and returns an :class:`InitReport` of what it changed.
The gain is ``torch.nn.init.calculate_gain(nonlinearity)`` by default (GELU, SiLU
and the like borrow ReLU's), a number, or ``"critical"``: √ of the mean-field
critical σw² (χ1 = 1, :func:`gradwatch.theory.critical_sigma_w2`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from gradwatch import init
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    >>> report = init.kaiming_(model)
    >>> [(c.name, c.nonlinearity, round(c.gain, 4)) for c in report.layers]
    [('0', 'relu', 1.4142), ('2', 'linear', 1.0)]
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from . import theory
from .preflight.core import _split_batch, gain_name
from .preflight.trace import WEIGHT_LAYERS, ActivationTracer, structural_nonlinearities

BIAS_MODES = ("zero", "keep")


@dataclass
class LayerInit:
    """What an init function did to one layer."""

    name: str
    type: str
    nonlinearity: str
    source: str  # "traced" (seen in a forward pass), "structure" (Sequential order) or "default" (assumed linear)
    gain: float
    std_before: float
    std_after: float
    bias_zeroed: bool
    iterations: int | None = None  # LSUV rescaling rounds
    out_var: float | None = None  # LSUV: output variance on the batch after rescaling


@dataclass
class InitReport:
    """Per-layer changes made by one init function, in order."""

    method: str
    layers: list[LayerInit] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "layers": [asdict(c) for c in self.layers]}

    def __str__(self) -> str:
        lines = [f"{self.method}: {len(self.layers)} layer(s)"]
        for c in self.layers:
            extra = "" if c.out_var is None else f", out var {c.out_var:.3f} after {c.iterations} round(s)"
            lines.append(f"  {c.name} ({c.type}, {c.nonlinearity} from {c.source}): gain {c.gain:.4g}, "
                         f"std {c.std_before:.4g} -> {c.std_after:.4g}{', bias zeroed' if c.bias_zeroed else ''}{extra}")
        return "\n".join(lines)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Linear / ConvNd with a weight, in registration order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, WEIGHT_LAYERS) and isinstance(getattr(m, "weight", None), torch.Tensor)]


class _Restore:
    """Save buffers, train/eval flags and RNG; put them back on exit (weights are the point)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> "_Restore":
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.rng = torch.get_rng_state()
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for m, flag in self.flags:
            m.training = flag
        torch.set_rng_state(self.rng)


def infer_nonlinearities(model: nn.Module, batch: Any = None) -> dict[str, tuple[str, float | None, str]]:
    """Layer name -> (nonlinearity, leaky slope or None, source) for every Linear/ConvNd.

    Without a batch the order inside ``nn.Sequential`` containers is read; with a
    batch one forward pass is traced (module and functional activations alike).
    Layers neither reveals are assumed ``"linear"`` (source ``"default"``).

    Example:
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.a = nn.Linear(4, 4); self.b = nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.b(torch.tanh(self.a(x)))
        >>> infer_nonlinearities(Net(), torch.randn(3, 4))
        {'a': ('tanh', None, 'traced'), 'b': ('linear', None, 'traced')}
    """
    layers = weight_layers(model)
    found: dict[str, tuple[str, float | None, str]] = {n: ("linear", None, "default") for n, _ in layers}
    for name, (act, param) in structural_nonlinearities(model).items():
        if name in found:
            found[name] = (act, param, "structure")
    if batch is None:
        return found
    args, kwargs, _, _ = _split_batch(batch)
    owner: dict[int, str] = {}
    keep: list[torch.Tensor] = []
    ran: list[str] = []
    last: list[str | None] = [None]

    def make(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            last[0] = name
            if isinstance(output, torch.Tensor):
                owner[id(output)] = name
                keep.append(output)
                ran.append(name)
        return hook

    handles = [m.register_forward_hook(make(n)) for n, m in layers]
    tracer = ActivationTracer(owner, lambda: None, lambda: last[0], model=model)
    try:
        with _Restore(model), torch.no_grad(), tracer:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    traced = tracer.record.first_activation()
    for name in set(ran):
        stats = traced.get(name)
        if stats is not None and stats.direct:
            found[name] = (stats.activation, stats.param, "traced")
        elif name not in traced or not traced[name].direct:
            found[name] = ("linear", None, "traced") if found[name][2] == "default" else found[name]
    return found


@lru_cache(maxsize=64)
def _critical_gain(activation: str, sigma_b2: float, slope: float) -> float:
    return math.sqrt(theory.critical_sigma_w2(activation, sigma_b2, negative_slope=slope))


def _gain(act: str, param: float | None, gain: Any, sigma_b2: float) -> float:
    if gain is None:
        gname = gain_name(act)
        return float(nn.init.calculate_gain(gname, (param if param is not None else 0.01) if gname == "leaky_relu" else None))
    if isinstance(gain, str):
        if gain != "critical":
            raise ValueError(f"gain must be None, a positive number or 'critical', got {gain!r}")
        tname = act if act in theory.ACTIVATIONS or act in ("relu", "leaky_relu") else "relu"
        try:
            return _critical_gain(tname, round(sigma_b2, 6), param if param is not None else 0.01)
        except ValueError:  # no edge of chaos for this activation: fall back to torch's gain
            return _gain(act, param, None, sigma_b2)
    if isinstance(gain, bool) or not isinstance(gain, (int, float)) or not gain > 0 or not math.isfinite(gain):
        raise ValueError(f"gain must be None, a positive number or 'critical', got {gain!r}")
    return float(gain)


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def _check_model(model: Any, bias: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    layers = weight_layers(model)
    if not layers:
        raise ValueError("model has no nn.Linear or nn.ConvNd layer to initialize")
    return layers


def _apply(
    method: str, model: nn.Module, batch: Any, gain: Any, bias: str,
    fill: Callable[[torch.Tensor, float, int, int], None],
) -> InitReport:
    layers = _check_model(model, bias)
    if gain is not None and not isinstance(gain, str):
        _gain("linear", None, gain, 0.0)  # validate before touching any weight
    elif isinstance(gain, str) and gain != "critical":
        raise ValueError(f"gain must be None, a positive number or 'critical', got {gain!r}")
    acts = infer_nonlinearities(model, batch)
    report = InitReport(method)
    with torch.no_grad():
        for name, module in layers:
            w = module.weight
            b = getattr(module, "bias", None)
            has_bias = isinstance(b, torch.Tensor) and b.numel() > 0
            zero = has_bias and bias == "zero"
            sigma_b2 = 0.0 if not has_bias or zero else float(b.detach().double().pow(2).mean())
            act, param, source = acts[name]
            g = _gain(act, param, gain, sigma_b2)
            before = float(w.detach().double().std()) if w.numel() > 1 else 0.0
            fan_in, fan_out = _fans(w)
            fill(w, g, fan_in, fan_out)
            if zero:
                b.zero_()
            after = float(w.detach().double().std()) if w.numel() > 1 else 0.0
            report.layers.append(LayerInit(name, type(module).__name__, act, source, g, before, after, bool(zero)))
    return report


def kaiming_(model: nn.Module, batch: Any = None, *, gain: Any = None, mode: str = "fan_in", bias: str = "zero") -> InitReport:
    """He init on every Linear/ConvNd: ``W ~ N(0, gain²/fan)``; biases zeroed.

    Args:
        model: the model, changed in place.
        batch: optional example batch, traced once to find functional activations.
        gain: None (calculate_gain of the inferred nonlinearity), a number, or
            ``"critical"`` (√ of the mean-field critical σw²). Default: None.
        mode: ``"fan_in"`` (preserve forward variance) or ``"fan_out"``. Default: ``"fan_in"``.
        bias: ``"zero"`` or ``"keep"``. Default: ``"zero"``.

    Returns:
        An :class:`InitReport`.

    Example:
        >>> m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
        >>> round(kaiming_(m).layers[0].std_after * 16, 1)   # √2/√256 · 16
        1.4
    """
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")

    def fill(w: torch.Tensor, g: float, fan_in: int, fan_out: int) -> None:
        w.normal_(0.0, g / math.sqrt(fan_in if mode == "fan_in" else fan_out))

    return _apply("kaiming_", model, batch, gain, bias, fill)


def xavier_(model: nn.Module, batch: Any = None, *, gain: Any = None, bias: str = "zero") -> InitReport:
    """Glorot init on every Linear/ConvNd: ``W ~ N(0, gain²·2/(fan_in + fan_out))``; biases zeroed.

    Arguments as :func:`kaiming_`.

    Example:
        >>> m = nn.Sequential(nn.Linear(100, 300), nn.Tanh(), nn.Linear(300, 1))
        >>> xavier_(m).layers[0].gain == nn.init.calculate_gain("tanh")
        True
    """

    def fill(w: torch.Tensor, g: float, fan_in: int, fan_out: int) -> None:
        w.normal_(0.0, g * math.sqrt(2.0 / (fan_in + fan_out)))

    return _apply("xavier_", model, batch, gain, bias, fill)


def orthogonal_(model: nn.Module, batch: Any = None, *, gain: Any = None, bias: str = "zero") -> InitReport:
    """(Semi-)orthogonal weights times gain on every Linear/ConvNd; biases zeroed.

    Every singular value of a square weight becomes ``gain`` (ConvNd weights are
    flattened to ``(out, in·k)`` first). Arguments as :func:`kaiming_`.

    Example:
        >>> m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
        >>> _ = orthogonal_(m)
        >>> torch.allclose(torch.linalg.svdvals(m[0].weight), torch.ones(32), atol=1e-5)
        True
    """

    def fill(w: torch.Tensor, g: float, fan_in: int, fan_out: int) -> None:
        nn.init.orthogonal_(w, gain=g)

    return _apply("orthogonal_", model, batch, gain, bias, fill)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _execution_order(model: nn.Module, layers: list[tuple[str, nn.Module]], args: tuple, kwargs: dict) -> list[str]:
    order: list[str] = []
    handles = []
    for name, module in layers:
        def hook(m: nn.Module, inputs: Any, n: str = name) -> None:
            if n not in order:
                order.append(n)
        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_var(model: nn.Module, module: nn.Module, args: tuple, kwargs: dict) -> float:
    seen: list[float] = []

    def hook(m: nn.Module, inputs: Any, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) else output[0]
        seen.append(float(out.detach().double().var()))
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("lsuv_: a layer did not run forward on the batch; pass a batch that reaches every layer")
    return seen[0]


def lsuv_(model: nn.Module, batch: Any, *, tol: float = 0.1, max_iters: int = 10, bias: str = "zero") -> InitReport:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016).

    Orthonormal init of every Linear/ConvNd (biases zeroed), then, layer by layer
    in execution order, ``W ← W / √Var(out)`` until ``|Var(out) − 1| < tol`` or
    ``max_iters`` rounds. Buffers (e.g. BatchNorm statistics), train/eval flags and
    the RNG state after the orthonormal draw are left as they were.

    Args:
        model: the model, changed in place.
        batch: an example batch (tensor, ``(input, target)`` or dict of kwargs).
        tol: tolerance on the output variance. Default: 0.1.
        max_iters: rescaling rounds per layer. Default: 10.
        bias: ``"zero"`` or ``"keep"``. Default: ``"zero"``.

    Returns:
        An :class:`InitReport` with each layer's rounds and final output variance.

    Example:
        >>> m = nn.Sequential(nn.Linear(20, 50), nn.Tanh(), nn.Linear(50, 5))
        >>> report = lsuv_(m, torch.randn(64, 20))
        >>> all(abs(c.out_var - 1) < 0.1 for c in report.layers)
        True
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    layers = _check_model(model, bias)
    args, kwargs, _, _ = _split_batch(batch)
    report = orthogonal_(model, batch, gain=1.0, bias=bias)
    report.method = "lsuv_"
    by_name = {c.name: c for c in report.layers}
    modules = dict(layers)
    with _Restore(model):
        order = _execution_order(model, layers, args, kwargs)
        for name in order:
            module, change = modules[name], by_name[name]
            var = _output_var(model, module, args, kwargs)
            rounds = 0
            while abs(var - 1.0) >= tol and rounds < max_iters:
                if not var > 0 or not math.isfinite(var):
                    break  # a constant or non-finite output cannot be rescaled to unit variance
                with torch.no_grad():
                    module.weight.div_(math.sqrt(var))
                rounds += 1
                var = _output_var(model, module, args, kwargs)
            change.iterations, change.out_var = rounds, var
            change.std_after = float(module.weight.detach().double().std())
    return report
