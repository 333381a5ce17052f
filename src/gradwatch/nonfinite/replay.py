"""Replay one training step and name the first op that produced a non-finite value.

A NaN is cheap to notice (it poisons the global gradient norm) and expensive to
locate, so gradwatch locates it only when it happens. On a healthy step the
Watch keeps the RNG states from before the step (:func:`capture_rng_state`, a
few microseconds) and a reference to the closure; nothing runs per op. On a
non-finite step, :func:`replay_step`:

1. saves the current gradients (set aside, not copied), the module buffers
   (BatchNorm running statistics: cloned) and the RNG states after the step;
2. restores the RNG states from before the step, so dropout draws the same masks;
3. re-runs the closure's forward and the backward under a ``TorchDispatchMode``
   that checks every floating output of every aten op, with module
   forward pre/post hooks for the module path and a ``TorchFunctionMode`` that
   tags each autograd node created in the forward with the module and the user
   source line that created it (read back in the backward through
   ``torch._C._current_autograd_node()``);
4. stops at the first op that *creates* a non-finite value from finite inputs,
   or a NaN from an intentional ``-inf`` constant (a softmax over a fully masked row)
   (an op whose inputs already held NaN/inf, e.g. an intentional ``-inf``
   attention mask, is only remembered as a fallback);
5. restores gradients, buffers and RNG states. The weights are never written and
   no optimizer steps.

Reusable by other parts of gradwatch (the mixed-precision diagnosis replays an
fp16 step with autocast off to tell a true non-finite source from fp16 range
overflow)::

    rng = capture_rng_state(device)             # before the step
    ...                                         # the step goes non-finite
    where = replay_step(model, closure, rng)     # autocast off: fp32 replay
    if where is None: ...                       # finite in fp32: fp16 range overflow
    where16 = replay_step(model, closure, rng, autocast_ctx=lambda: torch.autocast("cuda", torch.float16),
                          loss_scale=65536.0)   # where fp16 overflows, and in which module

The closure must be re-runnable: it must read its batch from the enclosing
scope (``lambda: loss_fn(model(x), y)``), not draw the next one from an iterator.
"""

from __future__ import annotations

import contextlib
import linecache
import math
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..compat import current_autograd_node, torch_dispatch_mode, tree_flatten

RngState = dict[str, Any]  # {"cpu": ByteTensor, "<device type>": [ByteTensor per device]}

PHASES = ("forward", "loss", "backward")
_TAG = "gradwatch"  # key of our entry in autograd nodes' metadata dicts

#: Ops whose output is uninitialized memory: never "non-finite" in a meaningful sense.
_UNINITIALIZED = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
    "resize_", "set_", "_efficientzerotensor",
})

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_GRADWATCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIR = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


# ----- RNG state --------------------------------------------------------------------------
def _accelerator_module(device_type: str) -> Any:
    if device_type == "cpu":
        return None
    try:
        module = torch.get_device_module(device_type)
    except (RuntimeError, AttributeError, ValueError):
        return None
    is_init = getattr(module, "is_initialized", None)
    if is_init is not None and not is_init():
        return None  # never initialize an accelerator just to read its RNG
    return module


def capture_rng_state(device: torch.device | str | None = None) -> RngState:
    """The CPU RNG state and, for an accelerator ``device``, that device type's RNG states.

    Cheap (a copy of ~5 KB on the CPU, a few bytes per GPU); this is all the Watch
    keeps per step for a later replay.

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(2); restore_rng_state(state); torch.equal(a, torch.rand(2))
        True
    """
    state: RngState = {"cpu": torch.default_generator.get_state()}  # what torch.get_rng_state() returns
    if device is None:
        return state
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if device_type == "cpu":  # the common case, on every step of a closure that draws random numbers
        return state
    module = _accelerator_module(device_type)
    if module is not None:
        if hasattr(module, "get_rng_state_all"):
            state[device_type] = list(module.get_rng_state_all())
        elif hasattr(module, "get_rng_state"):
            state[device_type] = [module.get_rng_state()]
    return state


def restore_rng_state(state: RngState) -> None:
    """Inverse of :func:`capture_rng_state`."""
    if not isinstance(state, dict) or "cpu" not in state:
        raise TypeError("rng_state must be the dict returned by gradwatch.nonfinite.capture_rng_state()")
    torch.set_rng_state(state["cpu"])
    for device_type, states in state.items():
        if device_type == "cpu":
            continue
        module = _accelerator_module(device_type)
        if module is None:
            continue
        if hasattr(module, "set_rng_state_all"):
            module.set_rng_state_all(states)
        elif hasattr(module, "set_rng_state"):
            module.set_rng_state(states[0])


# ----- where the user's code is ---------------------------------------------------------
def _is_user_file(filename: str) -> bool:
    if filename.startswith("<") and not filename.startswith("<stdin") and not filename.startswith("<doctest"):
        return False  # <frozen ...>, <string> from torch internals
    path = os.path.abspath(filename)
    return not (path.startswith(_TORCH_DIR) or path.startswith(_GRADWATCH_DIR) or path.startswith(_STDLIB_DIR))


def user_frame(frame: FrameType | None = None) -> FrameType | None:
    """The innermost frame outside torch, gradwatch and the standard library."""
    f = frame if frame is not None else sys._getframe(1)
    while f is not None:
        if _is_user_file(f.f_code.co_filename):
            return f
        f = f.f_back
    return None


def _short_path(filename: str) -> str:
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


def _source_of(frame: FrameType | None) -> dict[str, Any]:
    if frame is None:
        return {}
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    return {
        "source": f"{_short_path(filename)}:{lineno}",
        "function": frame.f_code.co_name,
        "code": linecache.getline(filename, lineno).strip() or None,
    }


# ----- the result -------------------------------------------------------------------------
@dataclass
class Localization:
    """Where the first non-finite value of a step came from.

    Attributes:
        phase: ``"forward"`` (inside the model, or in the closure before it ran),
            ``"loss"`` (after the model returned, outside it) or ``"backward"``.
        op: the aten op, e.g. ``"aten.log"``.
        kind: ``"nan"``, ``"inf"`` (some +inf), ``"-inf"`` (only -inf) or ``"nan+inf"``.
        created: True if the op made non-finite values from finite inputs (the
            origin); False if it is only the first op that *saw* them (a NaN in
            the batch, an intentional ``-inf`` mask that later leaked).
        module: module path inside the model (``"blocks.3.attn"``, ``"(root)"``);
            None outside the model. For the backward, the module whose forward
            created the autograd node.
        node: the autograd node running the op in the backward, e.g. ``"SqrtBackward0"``.
        source / function / code: the user source ``file:line``, function name and
            line text of the call that ran the op (forward), or of the forward call
            that created ``node`` (backward).
        before_model: the op ran in the closure before the model was called.
        nan / inf / numel / shape / dtype: the op's first non-finite output.
        first_index: index of its first non-finite element.
        nonfinite_rows: indices along dim 0 holding non-finite values (at most 64).
        max_abs_input: the largest finite magnitude among the op's tensor inputs
            (the argument of an ``exp`` that overflowed).
        ops_checked: how many ops ran before it in the replay (itself included).
        model_output_finite: whether every floating output of the model was finite
            (None if the model did not return before the op).
        loss: the replayed loss (None if the replay stopped before it).
    """

    phase: str
    op: str
    kind: str
    created: bool
    module: str | None = None
    node: str | None = None
    source: str | None = None
    function: str | None = None
    code: str | None = None
    before_model: bool = False
    nan: int = 0
    inf: int = 0
    numel: int = 0
    shape: list[int] = field(default_factory=list)
    dtype: str = ""
    first_index: list[int] | None = None
    nonfinite_rows: list[int] | None = None
    max_abs_input: float | None = None
    ops_checked: int = 0
    model_output_finite: bool | None = None
    loss: float | None = None
    facts: dict[str, Any] | None = None  # op-specific facts that explain the value (e.g. every target ignored)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe once passed through gradwatch's finding serializer)."""
        return asdict(self)

    def location(self) -> dict[str, Any]:
        """The ``Finding.location`` dict: phase, op, module, node, source (only known keys)."""
        keys = ("phase", "op", "module", "node", "source", "function", "code")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def describe(self) -> str:
        """``aten.log (-inf) in the loss at loss.py:42`` and the like."""
        what = f"{self.op} ({self.kind})"
        if self.phase == "backward":
            where = f"in the backward of {self.node or 'an autograd node'}"
            if self.module:
                where += f" (module {self.module})"
            if self.source:
                where += f", created by the forward call at {self.source}"
            return f"{what} {where}"
        if self.phase == "loss":
            where = "in the loss, outside the model"
        elif self.before_model:
            where = "in the closure before the model ran"
        else:
            where = f"in module {self.module}" if self.module else "in the forward pass"
        if self.source:
            where += f" at {self.source}"
        return f"{what} {where}"


@dataclass
class ReplayOutcome:
    """Everything a replay learned (:func:`replay` returns it; :func:`replay_step` its ``localization``).

    ``localization`` is None when the replay stayed finite (then the failure was
    not reproduced: a non-deterministic kernel, a closure that reads changing
    data, or - for an fp32 replay of an fp16 step - a pure fp16 range overflow).
    ``error`` holds the text of an exception the closure raised in the replay.
    """

    localization: Localization | None
    loss: float | None = None
    model_output_finite: bool | None = None
    grads_finite: bool | None = None
    ops_checked: int = 0
    error: str | None = None

    @property
    def reproduced(self) -> bool:
        return self.localization is not None


# ----- the machinery ------------------------------------------------------------------------
class _Stop(Exception):
    """Raised inside the replay to stop at the first non-finite op."""


def _floating(t: Any) -> bool:
    """A dense floating tensor with values to check (not sparse, not meta, not empty)."""
    return (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel() > 0
            and t.layout == torch.strided and t.device.type != "meta")


def _finite(t: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(t).all())
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor kind isfinite does not support
        return True


def _all_finite(values: list[Any]) -> bool:
    for v in values:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if _floating(v) and not _finite(v):
            return False
    return True


def _has_nan(t: torch.Tensor) -> bool:
    return bool(torch.isnan(t.detach()).any())


def _any_nan(values: list[Any]) -> bool:
    for v in values:
        if isinstance(v, float) and math.isnan(v):
            return True
        if _floating(v) and (v.is_complex() or _has_nan(v)):
            return True
    return False


def _neg_inf_only(values: list[Any]) -> bool:
    """Whether every non-finite value among these tensors is -inf (no NaN, no +inf)."""
    for v in values:
        if isinstance(v, float) and not math.isfinite(v) and v != float("-inf"):
            return False
        if _floating(v) and not v.is_complex() and not _finite(v):
            t = v.detach()
            if bool(torch.isnan(t).any()) or bool(torch.isposinf(t).any()):
                return False
        elif _floating(v) and v.is_complex() and not _finite(v):
            return False
    return True


def _read_inputs(func: Any, args: Any, kwargs: dict[str, Any]) -> list[Any]:
    """The op's inputs, without the arguments it writes (``x.div_(0)``, ``out=``): their values are new."""
    try:
        schema_args = list(func._schema.arguments)
        written = {a.name for a in schema_args if a.alias_info is not None and a.alias_info.is_write}
    except (AttributeError, RuntimeError):
        written = set()
    if not written:
        return tree_flatten((args, kwargs))[0]
    values = []
    positional = [a for a in schema_args if not a.kwarg_only]
    for i, value in enumerate(args):
        if i < len(positional) and positional[i].name in written:
            continue
        values.append(value)
    values.extend(v for k, v in kwargs.items() if k not in written)
    return tree_flatten(values)[0]


class _ModuleTracker:
    """Module forward pre/post hooks: the stack of module paths, and the model's outputs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = []
        self.model_returned = False
        self.model_output_finite: bool | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> "_ModuleTracker":
        for name, module in self.model.named_modules():
            path = name or "(root)"
            try:
                self.handles.append(module.register_forward_pre_hook(self._pre(path)))
                self.handles.append(module.register_forward_hook(self._post(path, module is self.model), always_call=True))
            except (RuntimeError, AttributeError, TypeError):  # a module that takes no hooks (scripted)
                continue
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _pre(self, path: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(path)

        return hook

    def _post(self, path: str, is_root: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.stack and self.stack[-1] == path:
                self.stack.pop()
            if is_root and not self.stack:
                self.model_returned = True
                finite = _all_finite(tree_flatten(output)[0]) if output is not None else None
                if finite is not None:
                    self.model_output_finite = finite if self.model_output_finite is None else (self.model_output_finite and finite)

        return hook

    @property
    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None


class _Tagger(TorchFunctionMode):
    """Forward only: tag every new autograd node with the module and user line that created it."""

    def __init__(self, tracker: _ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tag: dict[str, Any] | None = None
        for t in tree_flatten(out)[0]:
            node = t.grad_fn if isinstance(t, torch.Tensor) else None
            if node is None:
                continue
            if tag is None:
                tag = {"module": self.tracker.current, **_source_of(user_frame(sys._getframe(1)))}
            _tag_graph(node, tag)
        return out


def _tag_graph(node: Any, tag: dict[str, Any]) -> None:
    """Tag ``node`` and the untagged nodes below it (created by the same call, e.g. inside a composite)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if n is None:
            continue
        try:
            meta = n.metadata
        except (AttributeError, RuntimeError):
            continue
        if _TAG in meta or type(n).__name__ == "AccumulateGrad":
            continue
        meta[_TAG] = tag
        todo.extend(child for child, _ in n.next_functions)


_NLL = frozenset({"nll_loss_forward", "nll_loss2d_forward", "nll_loss", "nll_loss2d"})


_VARIANCE = frozenset({"var", "std", "var_mean", "std_mean"})


def _op_facts(func: Any, args: Any, kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Facts about the op's inputs that explain a non-finite output (None when there is nothing to add).

    - Cross-entropy / NLL with ``reduction="mean"`` over a batch whose every target is
      ``ignore_index`` divides 0 by 0 targets: a NaN with perfectly finite logits.
    - A variance or standard deviation over ``n`` values with Bessel's correction ``c >= n``
      (``x.std(0)`` of a batch of one example) divides by ``n - c <= 0``.
    """
    name = func.overloadpacket.__name__
    if name in _VARIANCE:
        return _variance_facts(args, kwargs or {})
    if name not in _NLL or len(args) < 5:
        return None
    target, reduction, ignore_index = args[1], args[3], args[4]
    if not isinstance(target, torch.Tensor) or reduction != 1 or target.numel() == 0:
        return None
    with torch.no_grad():
        ignored = int((target == ignore_index).sum())
    if ignored != target.numel():
        return None
    return {"all_targets_ignored": True, "ignore_index": int(ignore_index), "targets": int(target.numel())}


def _variance_facts(args: Any, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    correction = kwargs.get("correction")
    correction = 1 if correction is None else correction
    dims = [] if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    count = x.numel() if not dims else math.prod(x.shape[d] for d in dims)
    if count - correction > 0:
        return None
    return {"too_few_for_variance": True, "count": int(count), "correction": float(correction), "dims": dims}


class _Checker(torch_dispatch_mode()):  # type: ignore[misc]
    """Check every floating output of every aten op; stop at the first one that creates NaN/inf."""

    def __init__(self, tracker: _ModuleTracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.phase = "forward"
        self.count = 0
        self.found: Localization | None = None
        self.first_seen: Localization | None = None  # first non-finite output of any kind (fallback)
        self.first_seen_intentional = False  # ... made from finite tensors by a non-finite constant (-inf mask)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.found is not None:
            return out
        self.count += 1
        if func.overloadpacket.__name__ in _UNINITIALIZED:
            return out
        outputs = [t for t in tree_flatten(out)[0] if _floating(t)]
        bad = next((t for t in outputs if not _finite(t)), None)
        if bad is None:
            return out
        inputs = _read_inputs(func, args, kwargs)
        made_here = _all_finite(inputs)
        if _neg_inf_only([bad]) and _neg_inf_only(inputs):
            # -inf and nothing else: log(0), a masked_fill(mask, -inf), an additive -inf attention mask.
            # Often on purpose (T5 casts its log(0) away; a mask is meant to be -inf), so it is
            # remembered as the fallback answer (the step may still end non-finite because of it)
            # and the replay goes on. A mask's -inf (a non-finite constant or input) is "intentional":
            # a NaN it turns into later (a softmax over a fully masked row) is the failure.
            if self.first_seen is None or (self.first_seen_intentional and made_here):  # log(0) beats a mask
                self.first_seen = self._locate(func, bad, inputs, made_here)
                self.first_seen.facts = _op_facts(func, args, kwargs)
                self.first_seen_intentional = not made_here
            return out
        # Created here: from finite inputs; or a NaN from inputs without NaN after an intentional -inf.
        created = made_here or (self.first_seen_intentional and _has_nan(bad) and not _any_nan(inputs))
        if not created and self.first_seen is not None:
            return out
        where = self._locate(func, bad, inputs, created)
        where.facts = _op_facts(func, args, kwargs)
        if created:
            self.found = where
            raise _Stop(where.op)
        self.first_seen = where
        self.first_seen_intentional = False
        return out

    def _locate(self, func: Any, bad: torch.Tensor, inputs: list[Any], created: bool) -> Localization:
        with torch.no_grad():
            flat = bad.detach().reshape(-1)
            if flat.is_complex():
                flat = torch.view_as_real(flat).reshape(-1)
            nan_mask = torch.isnan(flat)
            inf_mask = torch.isinf(flat)
            nan, inf = int(nan_mask.sum()), int(inf_mask.sum())
            first = int(torch.argmax((nan_mask | inf_mask).to(torch.uint8)))
            first_index = [int(i) for i in torch.unravel_index(torch.tensor(first), bad.shape)] if bad.ndim and not bad.is_complex() else None
            rows = None
            if bad.ndim >= 1 and not bad.is_complex():
                per_row = (~torch.isfinite(bad.detach())).reshape(bad.shape[0], -1).any(dim=1)
                rows = torch.nonzero(per_row).reshape(-1)[:64].tolist()
            max_abs = None
            finite_inputs = [t for t in inputs if _floating(t) and not t.is_complex()]
            if finite_inputs:
                mags = [torch.nan_to_num(t.detach().abs().float(), nan=0.0, posinf=0.0).max() for t in finite_inputs]
                max_abs = float(torch.stack(mags).max())
        neg = int(torch.isneginf(flat).sum()) if inf else 0
        kind = "nan+inf" if nan and inf else ("nan" if nan else ("-inf" if neg == inf else "inf"))
        op = f"aten.{func.overloadpacket.__name__}"
        where = Localization(
            phase=self.phase, op=op, kind=kind, created=created, nan=nan, inf=inf, numel=bad.numel(),
            shape=list(bad.shape), dtype=str(bad.dtype).replace("torch.", ""), first_index=first_index,
            nonfinite_rows=rows, max_abs_input=max_abs, ops_checked=self.count,
            model_output_finite=self.tracker.model_output_finite,
        )
        if self.phase == "backward":
            node = current_autograd_node()
            if node is not None:
                where.node = node.name()
                tag = node.metadata.get(_TAG) if hasattr(node, "metadata") else None
                if tag:
                    where.module = tag.get("module")
                    where.source, where.function, where.code = tag.get("source"), tag.get("function"), tag.get("code")
        else:
            module = self.tracker.current
            where.module = module
            if module is None:
                if self.tracker.model_returned:
                    where.phase = "loss"
                else:
                    where.before_model = True
            src = _source_of(user_frame(sys._getframe(2)))
            where.source, where.function, where.code = src.get("source"), src.get("function"), src.get("code")
        return where


def _enter(ctx: ContextManager[Any] | Callable[[], ContextManager[Any]] | None) -> ContextManager[Any]:
    if ctx is None:
        return contextlib.nullcontext()
    if hasattr(ctx, "__enter__"):
        return ctx  # type: ignore[return-value]
    if callable(ctx):
        return ctx()
    raise TypeError("autocast_ctx must be None, a context manager, or a function returning one")


@contextlib.contextmanager
def _preserved(model: nn.Module, rng_devices: list[str]) -> Iterator[None]:
    """Set aside gradients, clone buffers and the RNG state; put everything back afterwards."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    buffers = [(module, name, b, b.detach().clone())  # a forward may replace a buffer rather than update it
               for module in model.modules() for name, b in module._buffers.items() if b is not None]
    rng_after = capture_rng_state()
    for device_type in rng_devices:
        module = _accelerator_module(device_type)
        if module is not None and hasattr(module, "get_rng_state_all"):
            rng_after[device_type] = list(module.get_rng_state_all())
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g
            for module, name, b, saved in buffers:
                module._buffers[name] = b
                b.copy_(saved)
        restore_rng_state(rng_after)


def replay(
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    rng_state: RngState | None,
    *,
    autocast_ctx: ContextManager[Any] | Callable[[], ContextManager[Any]] | None = None,
    scaler: "torch.amp.GradScaler | None" = None,
    loss_scale: float | None = None,
    backward: bool = True,
) -> ReplayOutcome:
    """Replay one step and report the first non-finite op (full outcome).

    See :func:`replay_step` for the arguments; this returns a :class:`ReplayOutcome`
    that also says whether the replayed loss, model output and gradients were finite.
    Never raises for an error inside the closure: it is returned in ``outcome.error``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(closure):
        raise TypeError(f"closure must be a function that returns the loss, got {type(closure).__name__}")
    if rng_state is not None and (not isinstance(rng_state, dict) or "cpu" not in rng_state):
        raise TypeError("rng_state must be None or the dict returned by gradwatch.nonfinite.capture_rng_state()")
    if loss_scale is not None and (isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not loss_scale > 0):
        raise ValueError(f"loss_scale must be a positive number or None, got {loss_scale!r}")
    tracker = _ModuleTracker(model)
    checker = _Checker(tracker)
    outcome = ReplayOutcome(localization=None)
    devices = [k for k in (rng_state or {}) if k != "cpu"]
    versions = [p._version for p in model.parameters()]
    with _preserved(model, devices), tracker, torch.enable_grad():
        if rng_state is not None:
            restore_rng_state(rng_state)
        try:
            with checker:
                with _Tagger(tracker), _enter(autocast_ctx):
                    loss = closure()
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"the closure returned a {type(loss).__name__}, not the loss tensor")
                outcome.loss = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else None
                if backward and outcome.loss is not None and math.isfinite(outcome.loss) and loss.requires_grad:
                    checker.phase = "backward"
                    if loss_scale is not None:
                        loss = loss * loss_scale
                    elif scaler is not None and scaler.is_enabled():
                        loss = scaler.scale(loss)
                    loss.backward()
                    grads = [p.grad for p in model.parameters() if p.grad is not None]
                    outcome.grads_finite = _all_finite(grads)
        except _Stop:
            pass
        except Exception as exc:  # the user's closure failed in the replay: report, never raise
            if checker.found is None:
                outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.model_output_finite = tracker.model_output_finite
    if any(p._version != v for p, v in zip(model.parameters(), versions)):  # pragma: no cover - a model writing its weights
        outcome.error = (outcome.error or "") + " (the closure modified parameters in place during the replay)"
    outcome.ops_checked = checker.count
    where = checker.found or (checker.first_seen if not _replay_finite(outcome) else None)
    if where is not None:
        where.loss = outcome.loss
        if where.model_output_finite is None:
            where.model_output_finite = outcome.model_output_finite
    outcome.localization = where
    return outcome


def _replay_finite(outcome: ReplayOutcome) -> bool:
    loss_ok = outcome.loss is not None and math.isfinite(outcome.loss)
    return loss_ok and outcome.grads_finite is not False


def replay_step(
    model: nn.Module,
    closure: Callable[[], torch.Tensor],
    rng_state: RngState | None,
    *,
    autocast_ctx: ContextManager[Any] | Callable[[], ContextManager[Any]] | None = None,
    scaler: "torch.amp.GradScaler | None" = None,
    loss_scale: float | None = None,
) -> Localization | None:
    """Re-run one step's forward and backward and name the first op that went non-finite.

    The weights are never changed and no optimizer steps; gradients, module
    buffers and the RNG state are as they were afterwards.

    Args:
        model: the model (its modules give the module path).
        closure: the step's closure; it must return the loss and be re-runnable.
        rng_state: from :func:`capture_rng_state` before the step (restored first so
            dropout draws the same masks); None replays with the current RNG.
        autocast_ctx: a context manager (or a function returning a fresh one) the
            closure runs under, e.g. ``lambda: torch.autocast("cuda", torch.float16)``.
            None: no autocast of its own (an fp32 replay of an fp16 step).
            Default: None.
        scaler: a ``torch.amp.GradScaler`` whose current scale multiplies the loss
            before backward, as in fp16 training. Default: None.
        loss_scale: multiply the loss by this before backward instead (the scale
            the failing step used; it wins over ``scaler``). Default: None.

    Returns:
        a :class:`Localization`, or None if the replay stayed finite.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> x = torch.zeros(4, 3)
        >>> closure = lambda: torch.log(model(x).pow(2) * 0).mean()  # log(0) = -inf
        >>> where = replay_step(model, closure, capture_rng_state())
        >>> where.phase, where.op, where.kind
        ('loss', 'aten.log', '-inf')
    """
    return replay(model, closure, rng_state, autocast_ctx=autocast_ctx, scaler=scaler, loss_scale=loss_scale).localization
