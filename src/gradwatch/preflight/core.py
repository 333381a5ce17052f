"""``gradwatch.probe``: a pre-flight check of gradient flow on one batch, before training.

One forward pass with hooks and an :class:`~gradwatch.preflight.trace.ActivationTracer`
gives per-layer activation statistics; one ``torch.autograd.grad`` of the loss
gives parameter-gradient RMS and ||∂L/∂h|| per layer and per block boundary
(``.grad`` is never written). Each block is then re-run alone on its recorded
input and its Jacobian estimated (:mod:`gradwatch.preflight.jacobian`). The model is
left exactly as it was: weights, buffers, ``.grad``, train/eval flags, RNG state.

Cost with the defaults (8 probes, 5 power iterations): about 20-30
forward+backward equivalents of the model (``benchmarks/probe_cost.py``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..layers import LayerIndex
from .. import theory
from .blocks import BlockSpec, resolve_blocks
from .diagnose import diagnose
from .jacobian import estimate_jacobian
from .result import BlockRow, LayerRow, Probe
from .trace import CONV_LAYERS, NORM_MODULES, WEIGHT_LAYERS, ActivationTracer, ActivationStats, TraceRecord

#: nonlinearities torch.nn.init.calculate_gain knows; the others borrow ReLU's gain.
GAIN_NAMES = ("linear", "sigmoid", "tanh", "relu", "leaky_relu", "selu")


class ModelState:
    """Everything a probe could disturb, saved to be put back exactly.

    Example:
        >>> m = nn.BatchNorm1d(3); state = ModelState(m)
        >>> _ = m(torch.randn(8, 3)); _ = m.eval()
        >>> state.restore(); m.training, float(m.running_mean.abs().sum())
        (True, 0.0)
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [(p, p.detach().clone(), p.grad) for p in model.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.flags = [(m, m.training) for m in model.modules()]
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved, grad in self.params:
                p.copy_(saved)
                p.grad = grad
            for b, saved in self.buffers:
                b.copy_(saved)
        for m, flag in self.flags:
            m.training = flag
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) or hasattr(value, "keys"):
        if "logits" in value and isinstance(value["logits"], torch.Tensor):
            return value["logits"]
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _split_batch(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any], Any, bool]:
    """(args, kwargs, target, has_target) for ``model(*args, **kwargs)``."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None, False
    if isinstance(batch, dict):
        return (), dict(batch), None, False
    if isinstance(batch, (list, tuple)) and batch:
        if len(batch) == 1:
            return (batch[0],), {}, None, False
        return (batch[0],), {}, batch[1], True
    raise TypeError(
        f"batch must be a tensor, a (input, target) tuple or a dict of model keyword arguments, got {type(batch).__name__}"
    )


def _projection_loss(out: torch.Tensor, seed: int) -> torch.Tensor:
    """THEORY.md's probe loss: (out · R).sum() / B with a fixed Gaussian R."""
    gen = torch.Generator().manual_seed(seed + 1)
    r = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(device=out.device, dtype=out.dtype)
    return (out * r).sum() / (out.shape[0] if out.dim() >= 1 and out.shape[0] > 0 else 1)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _mean_sq(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean())


def probe(
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    *,
    blocks: Sequence[Any] | None = None,
    probes: int = 8,
    power_iters: int = 5,
    end_to_end: bool = False,
    seed: int = 0,
) -> Probe:
    """Check gradient flow on one batch before training; leave the model untouched.

    Args:
        model: the ``nn.Module`` to check (in the mode it will train in).
        batch: the input tensor, an ``(input, target)`` tuple, or a dict of keyword
            arguments for the model.
        loss_fn: ``loss_fn(output, target)`` (or ``loss_fn(output)`` without a
            target). Default: ``(output · R).sum() / B`` for a fixed Gaussian R, a
            target-free loss whose gradient is isotropic.
        blocks: module names (or modules) whose Jacobians to estimate. Default:
            automatic (see :mod:`gradwatch.preflight.blocks`).
        probes: Rademacher probes per block for the mean squared singular value. Default: 8.
        power_iters: power iterations per block for the largest singular value. Default: 5.
        end_to_end: also estimate the spectrum (mean and variance of the squared
            singular values) of the Jacobian from the first block's input to the last
            block's output. Default: False.
        seed: seed of the probe vectors and of the default loss. Default: 0.

    Returns:
        A :class:`~gradwatch.preflight.result.Probe`; ``print(probe)`` shows the table.

    Raises:
        TypeError / ValueError: a bad argument, or a loss that is not a scalar tensor.

    Example:
        >>> import gradwatch as gw
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(10):
        ...     layers += [nn.Linear(64, 64), nn.Sigmoid()]
        >>> model = nn.Sequential(*layers)
        >>> result = gw.probe(model, torch.randn(32, 64))
        >>> result.finding("vanishing_gradients").severity
        'error'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(output, target) or None, got {type(loss_fn).__name__}")
    _check_count("probes", probes, 2)
    _check_count("power_iters", power_iters, 0)
    _check_count("seed", seed, 0)
    args, kwargs, target, has_target = _split_batch(batch)
    specs = resolve_blocks(model, blocks)
    state = ModelState(model)
    try:
        with _math_attention(), torch.enable_grad():
            return _probe(model, args, kwargs, target, has_target, loss_fn, specs, probes, power_iters, end_to_end, seed)
    finally:
        state.restore()


@contextlib.contextmanager
def _math_attention():
    """Route scaled_dot_product_attention to its math kernel (it has a double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


class _Recorder:
    """Hooks of one probe forward pass (removed by :meth:`remove`)."""

    def __init__(self, model: nn.Module, index: LayerIndex, specs: list[BlockSpec]) -> None:
        self.handles: list[Any] = []
        self.layer_out: dict[str, torch.Tensor] = {}
        self.owner: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # keeps ids in `owner` valid
        self.block_stack: list[str] = []
        self.block_in: dict[str, torch.Tensor] = {}
        self.block_out: dict[str, torch.Tensor] = {}
        self.block_call: dict[str, tuple[int, tuple[Any, ...], dict[str, Any]]] = {}
        self.block_ran: set[str] = set()
        self.last_layer: str | None = None
        self.events = 0
        self.layer_calls: list[tuple[str | None, int, str]] = []
        for spec in specs:  # block hooks first: a layer that opens a block runs inside it
            self.handles.append(spec.first.register_forward_pre_hook(self._block_pre(spec.name), with_kwargs=True))
        for layer in index.layers:
            module = index.module(layer.name)
            self.handles.append(module.register_forward_pre_hook(self._layer_pre(layer.name)))
            self.handles.append(module.register_forward_hook(self._layer_post(layer.name)))
        for spec in specs:  # ... and closes after the layer's own output hook
            self.handles.append(spec.last.register_forward_hook(self._block_post(spec.name)))
        # normalization modules count as normalization even when they call no functional norm
        for name, module in model.named_modules():
            if isinstance(module, NORM_MODULES):
                self.handles.append(module.register_forward_pre_hook(self._norm_pre(name)))
        self.norm_modules: list[tuple[str | None, int, str]] = []

    def tick(self) -> int:
        self.events += 1
        return self.events

    def current_block(self) -> str | None:
        return self.block_stack[-1] if self.block_stack else None

    def _layer_pre(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self.last_layer = name
            self.layer_calls.append((self.current_block(), self.tick(), name))
        return hook

    def _layer_post(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if name in self.layer_out or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                first = _first_tensor(output)
                if name not in self.layer_out and first is not None and first.is_floating_point():
                    self.layer_out[name] = first
                    self.owner[id(first)] = name
                return None
            self.layer_out[name] = output
            if not output.requires_grad:
                return None
            alias = output.clone()  # later in-place ops (ReLU(inplace=True)) hit the clone, not `output`
            self.owner[id(alias)] = name
            self.owner[id(output)] = name
            self.keep.append(alias)
            return alias
        return hook

    def _block_pre(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            self.block_stack.append(name)
            self.block_ran.add(name)
            if name in self.block_call or not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            self.block_call[name] = (self.events, (x.detach(),) + tuple(args[1:]), dict(kwargs))
            if not x.is_floating_point():
                return None
            alias = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            self.block_in[name] = alias
            return (alias,) + tuple(args[1:]), kwargs
        return hook

    def _block_post(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.block_stack and self.block_stack[-1] == name:
                self.block_stack.pop()
            first = _first_tensor(output)
            if name not in self.block_out and first is not None and first.is_floating_point():
                self.block_out[name] = first
        return hook

    def _norm_pre(self, name: str):
        def hook(module: nn.Module, args: Any) -> None:
            self.norm_modules.append((self.current_block(), self.tick(), name))
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _probe(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    target: Any,
    has_target: bool,
    loss_fn: Callable[..., torch.Tensor] | None,
    specs: list[BlockSpec],
    probes: int,
    power_iters: int,
    end_to_end: bool,
    seed: int,
) -> Probe:
    index = LayerIndex(model)
    conv_names = frozenset(l.name for l in index.layers if isinstance(index.module(l.name), CONV_LAYERS))
    rec = _Recorder(model, index, specs)
    index.start_order_tracking()
    tracer = ActivationTracer(rec.owner, rec.current_block, lambda: rec.last_layer, conv_names, rec.tick, model=model)
    try:
        with tracer:
            output = model(*args, **kwargs)
    finally:
        index.finish_order_tracking()
        rec.remove()
    out = _first_tensor(output)
    if loss_fn is None:
        if out is None or not out.is_floating_point():
            raise ValueError("the model's output has no floating-point tensor; pass loss_fn=... that returns a scalar loss")
        loss = _projection_loss(out, seed)
    else:
        loss = loss_fn(output, target) if has_target else loss_fn(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                         + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""))
    loss = loss.reshape(())
    notes: list[str] = []

    # ---- one backward: parameter grads and activation grads, .grad untouched -------------
    wanted: list[torch.Tensor] = []
    slot: dict[int, int] = {}

    def want(t: torch.Tensor | None) -> None:
        if t is not None and t.requires_grad and id(t) not in slot:
            slot[id(t)] = len(wanted)
            wanted.append(t)

    for p in index.params:
        want(p)
    for t in list(rec.layer_out.values()) + list(rec.block_in.values()) + list(rec.block_out.values()):
        want(t)
    grads: list[torch.Tensor | None] = [None] * len(wanted)
    if wanted and loss.requires_grad:
        grads = list(torch.autograd.grad(loss, wanted, retain_graph=end_to_end, allow_unused=True))
    else:
        notes.append("the loss does not depend on any parameter or activation: no gradients to measure")

    def grad_of(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None or id(t) not in slot else grads[slot[id(t)]]

    def norm_of(t: torch.Tensor | None) -> float | None:
        g = grad_of(t)
        return None if g is None else math.sqrt(float(g.detach().double().pow(2).sum()))

    # ---- per-layer rows -----------------------------------------------------------------------
    trace: TraceRecord = tracer.record
    follows = trace.first_activation()
    block_of_layer = {}
    for blk, _, layer in rec.layer_calls:
        block_of_layer.setdefault(layer, blk)
    for spec in specs:  # layers inside a block's modules belong to it even if hooks missed the call
        for mod_name in spec.names:
            for layer in index.layers:
                if (layer.name == mod_name or layer.name.startswith(mod_name + ".")) and block_of_layer.get(layer.name) is None:
                    block_of_layer[layer.name] = spec.name
    param_sq: dict[int, float] = {}
    param_n: dict[int, int] = {}
    for p, layer_slot in zip(index.params, index.param_layer):
        g = grad_of(p)
        param_n[layer_slot] = param_n.get(layer_slot, 0) + p.numel()
        if g is not None:
            param_sq[layer_slot] = param_sq.get(layer_slot, 0.0) + float(g.detach().double().pow(2).sum())
    rows: list[LayerRow] = []
    for layer in index.layers:
        module = index.module(layer.name)
        row = LayerRow(layer.depth, layer.name, layer.type, block_of_layer.get(layer.name))
        h = rec.layer_out.get(layer.name)
        if h is not None:
            hd = h.detach().float()
            row.out_mean, row.out_std = float(hd.mean()), (float(hd.std()) if hd.numel() > 1 else 0.0)
            row.act_grad_norm = norm_of(h)
        act: ActivationStats | None = follows.get(layer.name)
        if act is not None:
            row.activation = act.activation
            row.act_mean, row.act_std = act.mean, act.std
            row.dead_fraction, row.saturated_fraction = act.dead_fraction, act.saturated_fraction
        if layer.measured:
            s = index.names.index(layer.name)
            if s in param_sq:
                row.grad_rms = math.sqrt(param_sq[s] / max(param_n[s], 1))
        _audit_init(row, module, act)
        rows.append(row)
    prev_q = {name: _mean_sq(h) for name, h in rec.layer_out.items()}
    _theory_columns(rows, follows, prev_q)

    measured_rows = [r for r in rows if r.act_grad_norm is not None and r.act_grad_norm > 0]
    weight_rows = [r for r in measured_rows if r.sigma_w2 is not None]  # Linear/Conv outputs (pre-activations)
    if len(weight_rows) >= 2:
        measured_rows = weight_rows
    layer_gain = per_layer = None
    if len(measured_rows) >= 2:
        layer_gain = measured_rows[0].act_grad_norm / measured_rows[-1].act_grad_norm
        per_layer = layer_gain ** (1.0 / (len(measured_rows) - 1))
    theory_vals = sorted(r.theory_factor for r in rows if r.theory_factor is not None)
    theory_mid = theory_vals[len(theory_vals) // 2] if theory_vals else None

    # ---- blocks: measured gain, normalization audit, Jacobian estimates -------------------------
    norm_events = [(b, i, n) for b, i, n in rec.norm_modules] + [(b, i, f) for b, i, f in trace.norm_calls]
    block_rows: list[BlockRow] = []
    gen = torch.Generator().manual_seed(seed)
    for i, spec in enumerate(specs):
        g_in, g_out = norm_of(rec.block_in.get(spec.name)), norm_of(rec.block_out.get(spec.name))
        measured = g_in / g_out if g_in is not None and g_out not in (None, 0.0) else None
        norm_kind, norm_names = _norm_audit(spec, norm_events, rec.layer_calls)
        est = None
        call = rec.block_call.get(spec.name)
        if call is not None and call[1][0].is_floating_point():
            try:
                est = _block_jacobian(spec, call[1], call[2], probes, power_iters, gen)
            except RuntimeError as exc:  # e.g. an op with no backward
                notes.append(f"block {spec.name}: Jacobian not estimated ({str(exc).splitlines()[0]})")
        elif spec.name not in rec.block_ran:
            notes.append(f"block {spec.name} did not run forward on this batch")
        else:
            notes.append(f"block {spec.name}: its input is not a positional floating-point tensor; Jacobian not estimated")
        block_rows.append(BlockRow(i, spec.name, est, measured, norm_kind, norm_names))
    gains = [b.gain for b in block_rows if b.gain is not None]
    predicted = math.prod(gains) if gains else None
    measured_total = None
    if specs:
        g_first = norm_of(rec.block_in.get(specs[0].name))
        g_last = norm_of(rec.block_out.get(specs[-1].name))
        if g_first is not None and g_last not in (None, 0.0):
            measured_total = g_first / g_last

    e2e = None
    if end_to_end and specs:
        x0, y1 = rec.block_in.get(specs[0].name), rec.block_out.get(specs[-1].name)
        if x0 is not None and y1 is not None and y1.requires_grad:
            e2e = estimate_jacobian(y1, x0, probes=probes, power_iters=power_iters, second_moment=True, generator=gen)
    result = Probe(
        loss=float(loss.detach()),
        layers=rows,
        blocks=block_rows,
        predicted_gain=predicted,
        measured_gain=measured_total,
        layer_gain=layer_gain,
        per_layer_factor=per_layer,
        theory_factor=theory_mid,
        end_to_end=e2e,
        notes=notes,
    )
    result.findings = diagnose(result)
    return result


def _block_jacobian(
    spec: BlockSpec, args: tuple[Any, ...], kwargs: dict[str, Any], probes: int, power_iters: int, gen: torch.Generator
):
    x = args[0].detach().clone().requires_grad_(True)
    y: Any = spec.first(x, *args[1:], **kwargs)
    for module in spec.modules[1:]:
        y = module(y)
    y = _first_tensor(y)
    if y is None or not y.is_floating_point():
        raise RuntimeError("the block's output has no floating-point tensor")
    return estimate_jacobian(y, x, probes=probes, power_iters=power_iters, generator=gen)


def _norm_audit(
    spec: BlockSpec, norm_events: list[tuple[str | None, int, str]], layer_calls: list[tuple[str | None, int, str]]
) -> tuple[str, list[str]]:
    """("pre" | "post" | "none", normalization names) for one block.

    Pre-norm: a normalization runs before the block's first weight layer that is
    not itself a normalization; post-norm: only after it.
    """
    norms = [(i, n) for b, i, n in norm_events if b == spec.name]
    if not norms:
        return "none", []
    names = sorted({n for _, n in norms})
    norm_layer_names = {n for _, n in norms}
    firsts = [i for b, i, layer in layer_calls if b == spec.name and layer not in norm_layer_names]
    first_norm = min(i for i, _ in norms)
    if not firsts:
        return "pre", names
    return ("pre" if first_norm < min(firsts) else "post"), names


def _fans(weight: torch.Tensor) -> tuple[int, int]:
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def gain_name(activation: str | None) -> str:
    """The calculate_gain name used for an activation (ReLU-like ones borrow 'relu')."""
    if activation is None:
        return "linear"
    if activation in GAIN_NAMES:
        return activation
    return "linear" if activation == "hardtanh" else "relu"


def _audit_init(row: LayerRow, module: nn.Module, act: ActivationStats | None) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(module, WEIGHT_LAYERS) or not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return
    fan_in, fan_out = _fans(weight)
    name = gain_name(act.activation if act is not None and act.direct else None)
    slope = act.param if act is not None and act.param is not None else 0.01
    gain = float(nn.init.calculate_gain(name, slope if name == "leaky_relu" else None))
    w = weight.detach().double()
    row.gain_for = name
    row.weight_std = float(w.std()) if w.numel() > 1 else 0.0
    row.kaiming_std = gain / math.sqrt(fan_in)
    row.xavier_std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    row.init_ratio = row.weight_std / max(row.kaiming_std, row.xavier_std)
    row.sigma_w2 = float(w.pow(2).mean()) * fan_in
    bias = getattr(module, "bias", None)
    row.sigma_b2 = _mean_sq(bias) if isinstance(bias, torch.Tensor) and bias.numel() > 0 else 0.0


_THEORY_ACTS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "elu", "selu", "softplus", "mish", "linear")


def _theory_columns(rows: list[LayerRow], follows: dict[str, ActivationStats], prev_q: dict[str, float]) -> None:
    """Measured backward factor and mean-field √χ1 where a plain layer → φ → layer chain applies.

    χ1 = σw²(layer l) · E[φ'(√q z)²] with φ the nonlinearity after layer l-1 and q
    the measured mean square of layer l-1's output (q* once the stack has converged).
    """
    for prev, row in zip(rows, rows[1:]):
        if prev.act_grad_norm and row.act_grad_norm and prev.sigma_w2 is not None and row.sigma_w2 is not None:
            row.backward_factor = prev.act_grad_norm / row.act_grad_norm  # consecutive Linear/Conv layers
        act = follows.get(prev.name)
        if row.sigma_w2 is None or prev.sigma_w2 is None or act is None or not act.direct:
            continue
        name = act.activation
        if name not in _THEORY_ACTS:
            continue
        slope = act.param if act.param is not None else 0.01
        q = prev_q.get(prev.name)
        if q is None:
            continue
        try:
            chi = theory.local_chi(name, row.sigma_w2, q, negative_slope=slope)
        except ValueError:
            continue
        if math.isfinite(chi) and chi >= 0:
            row.theory_factor = math.sqrt(chi)
