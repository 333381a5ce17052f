"""Activation sampler: activation statistics and activation gradients on sampled steps only.

On a sampled step (step 1 and every ``sample_every`` steps) the sampler

- hooks the output of every *curve layer* (a module owning a weight matrix or
  kernel, embeddings excepted) and registers a tensor hook on that output, so
  that backward delivers ``||dL/dh_l||`` for each layer (the activation
  gradient, which the weight-gradient norm can hide: Glorot & Bengio eq. 14);
- hooks ReLU/ReLU6, Sigmoid and Tanh *modules* and, while the closure's
  forward runs (``watch.step(closure)``), a :class:`torch.overrides.TorchFunctionMode`
  catches the *functional* forms (``F.relu``, ``torch.sigmoid``,
  ``Tensor.tanh``, ...), named after the layer that ran just before them
  (``"relu after fc3"``); the mode is left before backward. The first sampled
  closure looks for them; later sampled steps use the mode only if it found
  some (a model of activation modules alone then pays nothing for it);
- computes every statistic as a tensor (no host sync inside hooks), and
  carries them all to the host in one transfer in :meth:`collect`.

Every hook is removed after the backward pass; unsampled steps run with no
hook and no mode at all. Statistics are taken only while grad mode is on, so
evaluation passes under ``torch.no_grad()`` between steps are not counted.

Statistics:

- ReLU family: ``dead`` = share of units that are exactly zero for every
  example of the batch (a unit is a feature of a ``(B, D)`` output, a channel
  of ``(B, C, H, W)``, the last dimension of ``(B, T, D)``); judged only when
  at least ``MIN_EXAMPLES`` (16) values were reduced per unit (a live unit firing
  half the time looks dead in 16 independent examples with p = 1.5e-5).
- Sigmoid / tanh: ``saturated`` = share of outputs in the flat tails, where
  the derivative is below 10% of its maximum (sigmoid: y < 0.0257 or
  y > 0.9743; tanh: |y| > 0.9487).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

MIN_EXAMPLES = 16
# Flat tails: derivative below 10% of its maximum.
SIGMOID_LOW = 0.5 - math.sqrt(0.25 - 0.025)  # s(1-s) = 0.025 -> s = 0.0257
TANH_HIGH = math.sqrt(0.9)  # 1 - t^2 = 0.1 -> |t| = 0.9487

_FAMILY = {"relu": "relu", "relu_": "relu", "relu6": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid",
           "tanh": "tanh", "tanh_": "tanh"}
_ACT_MODULES: tuple[tuple[type, str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"),
)


def activation_family(module: nn.Module) -> str | None:
    """``"relu"``, ``"sigmoid"``, ``"tanh"`` for an activation module, else None."""
    for kind, family in _ACT_MODULES:
        if isinstance(module, kind):
            return family
    return None


def is_curve_layer(module: nn.Module) -> bool:
    """A layer on the depth curve: owns a parameter with >= 2 dims and is not an embedding."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return False
    return any(p.dim() >= 2 and p.requires_grad for p in module._parameters.values() if p is not None)


_UNIT_REDUCE_DIMS = {2: (0,), 3: (0, 1), 4: (0, 2, 3), 5: (0, 2, 3, 4)}


def _unit_reduce_dims(out: torch.Tensor) -> tuple[int, ...] | None:
    """Dims reduced over for one value per unit: (B, D) features, (B, T, D) last dim, (B, C, ...) channels."""
    ndim = out.dim()
    if ndim < 2:
        return None
    dims = _UNIT_REDUCE_DIMS.get(ndim)
    return dims if dims is not None else tuple(d for d in range(ndim) if d != 1)


@dataclass
class ActivationSample:
    """What one sampled step measured (host-side numbers).

    ``grad_rms`` maps a curve layer to the RMS of ``dL/dh`` on its output;
    ``activations`` maps an activation site to ``{"kind", "dead" | "saturated", ...}``.
    """

    step: int
    grad_rms: dict[str, float] = field(default_factory=dict)
    grad_norm: dict[str, float] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "grad_rms": self.grad_rms, "grad_norm": self.grad_norm,
                "activations": self.activations}


#: Turns torch-function handling (modes included) off for the sampler's own ops; a new
#: instance per use (one instance entered twice would not restore the state).
_NoTorchFunction = torch._C.DisableTorchFunction
_NO_CONTEXT = contextlib.nullcontext()  # reusable: keeps no state


class _FunctionalActivations(TorchFunctionMode):
    """Catches functional activations while the closure runs (only on sampled steps)."""

    def __init__(self, sampler: "ActivationSampler") -> None:
        super().__init__()
        self.sampler = sampler

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        family = _FAMILY.get(getattr(func, "__name__", ""))
        if family is not None and self.sampler._inside_act_module == 0 and isinstance(out, torch.Tensor):
            self.sampler._found_functional = True
            site = f"{func.__name__.rstrip('_')} after {self.sampler._last_layer}" if self.sampler._last_layer else func.__name__.rstrip("_")
            with _NoTorchFunction():
                self.sampler._record(site, family, out)
        return out


class ActivationSampler:
    """Arms hooks for one sampled step, then removes them. See the module docstring.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        >>> sampler = ActivationSampler(model)
        >>> sampler.arm(); sampler.enter_mode()
        >>> model(torch.randn(32, 4)).pow(2).mean().backward()
        >>> sampler.disarm()
        >>> sample = sampler.collect(1)
        >>> sorted(sample.grad_rms), sample.activations["1"]["kind"]
        (['0', '2'], 'relu')
    """

    def __init__(self, model: nn.Module, layer_names: list[str] | None = None) -> None:
        self.model = model
        modules = dict(model.named_modules())
        names = layer_names if layer_names is not None else [n for n, m in modules.items() if n and is_curve_layer(m)]
        self.curve_layers = {n: modules[n] for n in names if n in modules and n and is_curve_layer(modules[n])}
        self.act_modules = {n: (m, activation_family(m)) for n, m in modules.items() if activation_family(m)}
        self._handles: list[Any] = []
        self._mode: _FunctionalActivations | None = None
        #: whether the model calls functional activations: None until a whole sampled forward ran under the mode
        self.functional: bool | None = None
        self._found_functional = False
        # the forward hooks, made once (arm() only registers them): curve layers, then activation modules
        self._forward_hooks = [(m, self._layer_hook(n)) for n, m in self.curve_layers.items()]
        self._forward_hooks += [(m, self._act_hook(n, kind)) for n, (m, kind) in self.act_modules.items()]
        self._reset()

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def _reset(self) -> None:
        self._grad_norms: dict[str, list[torch.Tensor]] = {}  # layer -> ||dL/dh|| of each call
        self._grad_numel: dict[str, int] = {}
        self._peak: dict[str, tuple[str, torch.Tensor, int]] = {}  # site -> (kind, per-unit max, examples)
        self._sat: dict[str, tuple[str, torch.Tensor, int]] = {}  # site -> (kind, count in tails, numel)
        self._order: list[str] = []
        self._last_layer = ""
        self._inside_act_module = 0

    # ----- recording (inside hooks: tensors only, no host sync) ---------------------------
    def _record(self, site: str, kind: str, out: torch.Tensor) -> None:
        if not torch.is_grad_enabled() or not out.is_floating_point():
            return
        y = out.detach()
        if kind == "relu":
            dims = _unit_reduce_dims(y)
            if dims is None:
                return
            # ReLU-family outputs are >= 0: a unit's largest value over the batch says whether it is
            # alive (> 0, or NaN); one reduction here, the comparison on the host in collect()
            peak = y.amax(dim=dims)
            examples = y.numel() // max(1, peak.numel())
            prev = self._peak.get(site)
            if prev is not None and prev[1].shape == peak.shape:
                peak = torch.maximum(prev[1], peak)  # NaN propagates: counted alive
                examples += prev[2]
            elif site not in self._order:
                self._order.append(site)
            self._peak[site] = (kind, peak, examples)
        else:
            if kind == "sigmoid":
                tails = (y < SIGMOID_LOW) | (y > 1.0 - SIGMOID_LOW)
            else:
                tails = y.abs() > TANH_HIGH
            count = tails.sum()
            prev = self._sat.get(site)
            if prev is not None:
                count = count + prev[1]
                numel = prev[2] + y.numel()
            else:
                numel = y.numel()
                self._order.append(site)
            self._sat[site] = (kind, count, numel)

    def _grad_hook(self, name: str) -> Callable:
        """The tensor hook that takes ``||dL/dh||`` of layer ``name``'s output."""

        def grad_hook(grad: torch.Tensor) -> None:
            g = grad.detach()  # half precision is measured in float32 (its square would overflow)
            norm = torch.linalg.vector_norm(g, dtype=torch.float32) if g.element_size() < 4 else torch.linalg.vector_norm(g)
            self._grad_norms.setdefault(name, []).append(norm)
            self._grad_numel[name] = self._grad_numel.get(name, 0) + grad.numel()

        return grad_hook

    def _layer_hook(self, name: str) -> Callable:
        grad_hook = self._grad_hook(name)  # made once with the layer's forward hook (in __init__)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._last_layer = name
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, torch.Tensor):
                return
            # our own tensor calls must not go through the functional-activation mode (when it is on)
            with _NoTorchFunction() if self._mode is not None else _NO_CONTEXT:
                if out.requires_grad and torch.is_grad_enabled():
                    out.register_hook(grad_hook)

        return hook

    def _act_pre_hook(self, module: nn.Module, args: Any) -> None:
        self._inside_act_module += 1  # functional activations inside an activation module are that module's

    def _act_hook(self, name: str, kind: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._inside_act_module = max(0, self._inside_act_module - 1)
            if isinstance(output, torch.Tensor):
                with _NoTorchFunction() if self._mode is not None else _NO_CONTEXT:
                    self._record(name, kind, output)

        return hook

    # ----- lifecycle ----------------------------------------------------------------------
    def arm(self) -> None:
        """Register the forward hooks for the next forward pass."""
        if self._handles:
            return
        self._reset()
        handles = self._handles
        if self.functional is not False:  # the pre-hook only keeps the mode from counting a module twice
            handles += [module.register_forward_pre_hook(self._act_pre_hook) for module, _ in self.act_modules.values()]
        handles += [module.register_forward_hook(hook) for module, hook in self._forward_hooks]

    def enter_mode(self) -> None:
        """Catch functional activations until :meth:`exit_mode` (call around the closure's forward only).

        Does nothing once a whole forward under the mode found no functional activation.
        """
        if self._mode is None and self._handles and self.functional is not False:
            self._found_functional = False
            self._mode = _FunctionalActivations(self)
            self._mode.__enter__()

    def exit_mode(self, forward_complete: bool = False) -> None:
        """Leave the mode; ``forward_complete``: the forward ran to its end, so what it found is final."""
        if self._mode is not None:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)
            if forward_complete:
                self.functional = bool(self.functional) or self._found_functional

    def disarm(self) -> None:
        """Leave the mode and remove every hook (tensor hooks already fired in backward)."""
        self.exit_mode()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect(self, step: int) -> ActivationSample:
        """Carry every statistic to the host in one transfer and clear them.

        On the device only the stacking: the squares, the units alive (max > 0,
        or NaN) and the shares are worked out on the host in float64.
        """
        sample = ActivationSample(step=step)
        grad_names = list(self._grad_norms)
        norms = [n for name in grad_names for n in self._grad_norms[name]]  # ||dL/dh|| of every call, layer by layer
        dead_sites = [s for s in self._order if s in self._peak and self._peak[s][2] >= MIN_EXAMPLES
                      and self._peak[s][1].numel() > 0]
        sat_sites = [s for s in self._order if s in self._sat]
        parts: list[torch.Tensor] = [torch.stack(norms)] if norms else []
        parts += [self._peak[site][1] for site in dead_sites]  # 1-D: one value per unit
        if sat_sites:
            parts.append(torch.stack([self._sat[site][1] for site in sat_sites]))
        values = np.empty(0)
        if parts:
            try:
                packed = torch.cat(parts) if len(parts) > 1 else parts[0]  # promotes to the widest float dtype
            except RuntimeError:  # statistics on several devices
                packed = torch.cat([p.to(parts[0].device) for p in parts])
            if packed.dtype == torch.bfloat16:  # numpy has no bfloat16
                packed = packed.float()
            values = packed.cpu().numpy().astype(np.float64)  # the one transfer
        norm_values = values[: len(norms)].tolist()
        i = 0
        for name in grad_names:
            calls = len(self._grad_norms[name])
            sq = sum(v * v for v in norm_values[i : i + calls])  # ||dL/dh||^2 summed over the layer's calls
            i += calls
            sample.grad_norm[name] = math.sqrt(sq) if sq >= 0 else math.nan
            sample.grad_rms[name] = math.sqrt(sq / max(1, self._grad_numel[name])) if sq >= 0 else math.nan
        if dead_sites:
            units = [self._peak[site][1].numel() for site in dead_sites]
            peaks = values[i : i + sum(units)]
            alive_flags = (~(peaks <= 0)).astype(np.float64)  # NaN counts as alive
            alive = np.add.reduceat(alive_flags, np.cumsum([0] + units[:-1])).tolist()
            i += len(peaks)
            for site, n_units, n_alive in zip(dead_sites, units, alive):
                kind, _, examples = self._peak[site]
                sample.activations[site] = {"kind": kind, "dead": 1.0 - n_alive / n_units, "units": n_units,
                                            "examples": examples}
        for site, count in zip(sat_sites, values[i:].tolist()):
            kind, _, numel = self._sat[site]
            sample.activations[site] = {"kind": kind, "saturated": count / max(1, numel), "numel": numel}
        self._reset()
        return sample
