"""Activation sampler: activation statistics and activation gradients on sampled steps only.

On a sampled step (step 1 and every ``sample_every`` steps) the sampler

- hooks the output of every *curve layer* (a module owning a weight matrix or
  kernel, embeddings excepted) and registers a tensor hook on that output, so
  that backward delivers ``||dL/dh_l||`` for each layer (the activation
  gradient, which the weight-gradient norm can hide: Glorot & Bengio eq. 14);
- hooks activation *modules* (torch's ReLU, Sigmoid, Tanh, GELU, SiLU, Mish ...,
  Hugging Face's ``NewGELUActivation`` & co., recognised by
  :func:`gradwatch.activation_fns.module_activation`) and, while the closure's
  forward runs (``watch.step(closure)``), a :class:`torch.overrides.TorchFunctionMode`
  catches the *functional* forms (``F.relu``, ``F.gelu``, ``torch.sigmoid``,
  ``Tensor.tanh``, ...), named after the layer that ran just before them
  (``"relu after fc3"``); the mode is left before backward. A functional call
  *inside* a recognised activation module is part of that module (the
  ``torch.tanh`` inside a tanh-approximated GELU is not a tanh layer). The first
  sampled closure looks for functional activations; later sampled steps use the
  mode only if it found some (a model of activation modules alone then pays
  nothing for it);
- computes every statistic as a tensor (no host sync inside hooks), and
  carries them all to the host in one transfer in :meth:`collect`.

Every hook is removed after the backward pass; unsampled steps run with no
hook and no mode at all. Statistics are taken only while grad mode is on, so
evaluation passes under ``torch.no_grad()`` between steps are not counted.

Statistics (each activation judged by its own derivative, see
:mod:`gradwatch.activation_fns`):

- ReLU family: ``dead`` = share of units that are exactly zero for every
  example of the batch (a unit is a feature of a ``(B, D)`` output, a channel
  of ``(B, C, H, W)``, the last dimension of ``(B, T, D)``); judged only when
  at least ``MIN_EXAMPLES`` (16) values were reduced per unit (a live unit firing
  half the time looks dead in 16 independent examples with p = 1.5e-5).
- Sigmoid / tanh: ``saturated`` = share of outputs in the flat tails, where
  the derivative is below 10% of its maximum (sigmoid: y < 0.0257 or
  y > 0.9743; tanh: |y| > 0.9487).
- GELU, SiLU, Mish, QuickGELU (ReLU-like, smooth): ``flat`` = share of inputs
  where ``|f'|`` is below 10% of its maximum, and ``dead`` = share of units
  whose ``|f'|`` is that small for every example (same unit rules as ReLU).

Every site also carries ``label`` (``"GELU (tanh)"``) and ``after`` (the layer
that ran just before it, or None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..activation_fns import ACTIVATIONS, ActivationFn, function_activation, module_activation
from ..compat import OwnMode, no_torch_function, own_ops

MIN_EXAMPLES = 16


def activation_family(module: nn.Module) -> str | None:
    """The name of the activation function a module computes (``"relu"``, ``"tanh"``, ``"gelu_tanh"`` ...), else None.

    None also for activations recognised but not measured (LeakyReLU, ELU, ...).

    Example:
        >>> activation_family(nn.Tanh()), activation_family(nn.GELU()), activation_family(nn.Linear(2, 2))
        ('tanh', 'gelu', None)
    """
    fn = module_activation(module)
    return fn.name if fn is not None and fn.measured else None


def site_label(fn: ActivationFn, module: str | None, after: str | None) -> str:
    """How a person reads one activation site: the function once, where it is, the layer it follows.

    Example:
        >>> site_label(ACTIVATIONS["gelu_tanh"], "h.0.mlp.act", "h.0.mlp.c_fc")
        'GELU (tanh) h.0.mlp.act (after h.0.mlp.c_fc)'
        >>> site_label(ACTIVATIONS["relu"], None, "fc3")
        'ReLU after fc3'
    """
    if module is None:
        return f"{fn.label} after {after}" if after else fn.label
    return f"{fn.label} {module} (after {after})" if after else f"{fn.label} {module}"


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
    ``activations`` maps an activation site (a module name, or ``"relu after fc3"`` for a
    functional call) to ``{"kind", "label", "after", "dead" | "saturated" | "flat", ...}``.
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
_NoTorchFunction = no_torch_function  # gradwatch's own ops inside hooks, unseen by the sampling mode


class _FunctionalActivations(OwnMode):
    """Catches functional activations while the closure runs (only on sampled steps)."""

    def __init__(self, sampler: "ActivationSampler") -> None:
        super().__init__()
        self.sampler = sampler

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        sampler = self.sampler
        fn = function_activation(func, kwargs) if sampler._inside_act_module == 0 else None
        x = args[0] if fn is not None and args and isinstance(args[0], torch.Tensor) else None
        if x is not None and not fn.from_output and fn.family != "relu":  # judged on the input, before an in-place op
            sampler._found_functional = True
            with _NoTorchFunction():
                sampler._record_functional(fn, x)
        out = func(*args, **(kwargs or {}))
        if x is not None and (fn.from_output or fn.family == "relu") and isinstance(out, torch.Tensor):
            sampler._found_functional = True
            with _NoTorchFunction():
                sampler._record_functional(fn, out)
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
        >>> sorted(sample.grad_rms), sample.activations["1"]["kind"], sample.activations["1"]["label"]
        (['0', '2'], 'relu', 'ReLU 1 (after 0)')
    """

    def __init__(self, model: nn.Module, layer_names: list[str] | None = None) -> None:
        self.model = model
        modules = dict(model.named_modules())
        names = layer_names if layer_names is not None else [n for n, m in modules.items() if n and is_curve_layer(m)]
        self.curve_layers = {n: modules[n] for n in names if n in modules and n and is_curve_layer(modules[n])}
        #: every recognised activation module (measured or not: calls inside them are theirs)
        self._act_fns = {n: (m, fn) for n, m in modules.items() if (fn := module_activation(m)) is not None}
        #: the measured ones: name -> (module, activation name)
        self.act_modules = {n: (m, fn.name) for n, (m, fn) in self._act_fns.items() if fn.measured}
        self._handles: list[Any] = []
        self._mode: _FunctionalActivations | None = None
        #: whether the model calls functional activations: None until a whole sampled forward ran under the mode
        self.functional: bool | None = None
        self._found_functional = False
        # the hooks, made once (arm() only registers them): curve layers, then activation modules
        self._forward_hooks = [(m, self._layer_hook(n)) for n, m in self.curve_layers.items()]
        self._act_hooks = [(m, self._act_pre_hook(n, fn), self._act_hook(n, fn)) for n, (m, fn) in self._act_fns.items()]
        self._reset()

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def _reset(self) -> None:
        self._grad_norms: dict[str, list[torch.Tensor]] = {}  # layer -> ||dL/dh|| of each call
        self._grad_numel: dict[str, int] = {}
        self._peak: dict[str, tuple[str, torch.Tensor, int]] = {}  # site -> (kind, per-unit max, examples)
        self._sat: dict[str, tuple[str, torch.Tensor, int]] = {}  # site -> (kind, count flat, numel)
        self._where: dict[str, tuple[str | None, str | None]] = {}  # site -> (module, layer it follows)
        self._order: list[str] = []
        self._last_layer = ""
        self._inside_act_module = 0

    # ----- recording (inside hooks: tensors only, no host sync) ---------------------------
    def _record_functional(self, fn: ActivationFn, t: torch.Tensor) -> None:
        after = self._last_layer or None
        site = f"{fn.name} after {after}" if after else fn.name
        self._record(site, fn.name, t, where=(None, after))

    def _record(self, site: str, kind: str, t: torch.Tensor, where: tuple[str | None, str | None] = (None, None)) -> None:
        """Accumulate the statistics of one call of activation ``kind`` at ``site``.

        ``t`` is the output for the ReLU family and for tanh/sigmoid (their derivative
        is a function of the output), the input for the smooth ones (GELU, SiLU ...).
        """
        if not torch.is_grad_enabled() or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        fn = ACTIVATIONS[kind]
        y = t.detach()
        if site not in self._where:
            self._where[site] = where
            self._order.append(site)
        if fn.family == "relu":
            # ReLU-family outputs are >= 0: a unit's largest value over the batch says whether it is
            # alive (> 0, or NaN); one reduction here, the comparison on the host in collect()
            self._add_peak(site, kind, y)
            return
        if y.element_size() < 4:
            y = y.float()  # half precision: the derivative in float32
        flat = fn.flat(y)
        if fn.family == "smooth":  # a unit is alive while |f'| is not flat for some example (NaN: alive)
            self._add_peak(site, kind, (~flat).to(y.dtype))
        count = flat.sum()
        prev = self._sat.get(site)
        if prev is not None:
            count, numel = count + prev[1], prev[2] + y.numel()
        else:
            numel = y.numel()
        self._sat[site] = (kind, count, numel)

    def _add_peak(self, site: str, kind: str, y: torch.Tensor) -> None:
        dims = _unit_reduce_dims(y)
        if dims is None:
            return
        peak = y.amax(dim=dims)
        examples = y.numel() // max(1, peak.numel())
        prev = self._peak.get(site)
        if prev is not None and prev[1].shape == peak.shape:
            peak = torch.maximum(prev[1], peak)  # NaN propagates: counted alive
            examples += prev[2]
        self._peak[site] = (kind, peak, examples)

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
            with own_ops():
                if out.requires_grad and torch.is_grad_enabled():
                    out.register_hook(grad_hook)

        return hook

    def _act_pre_hook(self, name: str, fn: ActivationFn) -> Callable:
        on_input = fn.measured and fn.family == "smooth"

        def pre_hook(module: nn.Module, args: Any) -> None:
            # an activation module inside another one (or called from one) is the outer one's
            if self._inside_act_module == 0 and on_input and args and isinstance(args[0], torch.Tensor):
                with own_ops():  # before an in-place forward
                    self._record(name, fn.name, args[0], where=(name, self._last_layer or None))
            self._inside_act_module += 1  # functional activations inside an activation module are that module's

        return pre_hook

    def _act_hook(self, name: str, fn: ActivationFn) -> Callable:
        on_output = fn.measured and fn.family != "smooth"

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._inside_act_module = max(0, self._inside_act_module - 1)
            if on_output and self._inside_act_module == 0 and isinstance(output, torch.Tensor):
                with own_ops():
                    self._record(name, fn.name, output, where=(name, self._last_layer or None))

        return hook

    # ----- lifecycle ----------------------------------------------------------------------
    def arm(self) -> None:
        """Register the forward hooks for the next forward pass."""
        if self._handles:
            return
        self._reset()
        handles = self._handles
        for module, pre_hook, hook in self._act_hooks:
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(hook))
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
        stats: dict[str, dict[str, Any]] = {}
        if dead_sites:
            units = [self._peak[site][1].numel() for site in dead_sites]
            peaks = values[i : i + sum(units)]
            alive_flags = (~(peaks <= 0)).astype(np.float64)  # NaN counts as alive
            alive = np.add.reduceat(alive_flags, np.cumsum([0] + units[:-1])).tolist()
            i += len(peaks)
            for site, n_units, n_alive in zip(dead_sites, units, alive):
                stats[site] = {"dead": 1.0 - n_alive / n_units, "units": n_units, "examples": self._peak[site][2]}
        for site, count in zip(sat_sites, values[i:].tolist()):
            kind, _, numel = self._sat[site]
            key = "saturated" if ACTIVATIONS[kind].family == "saturating" else "flat"
            stats.setdefault(site, {}).update({key: count / max(1, numel), "numel": numel})
        for site in self._order:  # in the order the forward met them
            if site in stats:
                kind = (self._peak.get(site) or self._sat[site])[0]
                module, after = self._where[site]
                fn = ACTIVATIONS[kind]
                sample.activations[site] = {"kind": kind, "label": site_label(fn, module, after), "after": after,
                                            **stats[site]}
        self._reset()
        return sample
