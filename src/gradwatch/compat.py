"""Every use of a torch private API, in one place, each with why and a guard.

gradwatch prefers torch's public API. Where none does the job (a no-sync read
of the loss scale, the foreach kernels ``clip_grad_norm_`` itself uses, the
dispatch mode that locates a NaN), the private name is reached for here and
nowhere else: a torch upgrade that moves one of them breaks one function of
this module (and its test in tests/test_compat.py), never the step pipeline.
Each accessor falls back to a public (slower, or less precise) path when the
private name is missing, or says plainly what is unavailable.

Checked against torch 2.4 - 2.13 (``pyproject.toml`` requires ``torch>=2.4``).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ContextManager

import torch
from torch.overrides import TorchFunctionMode

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2] if part.isdigit())
MIN_TORCH = (2, 4)  # the accessors below were checked from this version on
if TORCH_VERSION < MIN_TORCH:  # pragma: no cover - pyproject.toml already requires it
    raise ImportError(f"gradwatch needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, found {torch.__version__}")


# ----- foreach kernels -------------------------------------------------------------------
# torch.nn.utils.clip_grad_norm_ and the optimizers use these fused multi-tensor kernels
# (one launch per (device, dtype) group instead of one per tensor). They are private
# (``torch._foreach_*``) but stable since torch 1.13; each wrapper falls back to the
# per-tensor public op when the kernel is missing or refuses the input (sparse tensors).
def foreach_norm(tensors: list[torch.Tensor], ord: float = 2.0, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per-tensor norms (0-d tensors) with the fused kernel; ``linalg.vector_norm`` per tensor otherwise.

    ``dtype`` accumulates (and returns) in that dtype: ``torch.float64`` gives the exact norm of
    float32 tensors whose sum of squares overflows float32 (about 30x slower on CPU: gradwatch
    uses it only to re-measure a step whose norm came back non-finite).

    Example:
        >>> [round(float(n), 3) for n in foreach_norm([torch.tensor([3.0, 4.0]), torch.ones(4)])]
        [5.0, 2.0]
        >>> float(foreach_norm([torch.full((100,), 1e20)], dtype=torch.float64)[0]) > 9.99e20  # float32: inf
        True
    """
    kernel = getattr(torch, "_foreach_norm", None)
    if kernel is not None:
        try:
            return list(kernel(tensors, ord) if dtype is None else kernel(tensors, ord, dtype=dtype))
        except (RuntimeError, NotImplementedError, TypeError):  # sparse layouts, no kernel, no dtype= (old torch)
            pass
    return [torch.linalg.vector_norm(_dense_values(t), ord, dtype=dtype) for t in tensors]


def _dense_values(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.layout == torch.strided:
        return tensor
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce().values()
    return tensor.values()


def _fused(name: str, *args: Any) -> bool:
    """Run ``torch._foreach_<name>`` if this torch has it and it takes these tensors; False otherwise.

    Why: the ``_foreach_*`` kernels are private (no stability promise) but launch one fused
    kernel per device and dtype instead of one per tensor; the callers fall back to a loop.
    """
    return foreach_chain([(name, args)]) is not None


def foreach_chain(steps: list[tuple[str, tuple[Any, ...]]]) -> Any:
    """Run ``torch._foreach_<name>(*args)`` for each ``(name, args)`` in turn; the last one's result, or
    None when a kernel is missing or refuses the tensors (the caller then loops per tensor). An argument
    ``...`` (Ellipsis) stands for the previous step's result.

    Example:
        >>> out = foreach_chain([("mul", ([torch.ones(2)], 3.0)), ("add_", (..., 1.0)), ("norm", (...,))])
        >>> [round(float(n), 3) for n in out]  # ||(4, 4)||
        [5.657]
    """
    result: Any = None
    for name, args in steps:
        kernel = getattr(torch, f"_foreach_{name}", None)
        if kernel is None:
            return None
        args = tuple(result if a is Ellipsis else a for a in args)
        try:
            out = kernel(*args)
        except (RuntimeError, NotImplementedError, TypeError):
            return None
        result = args[0] if name.endswith("_") else list(out)
    return result


def foreach_mul_(tensors: list[torch.Tensor], scalar: float | torch.Tensor) -> None:
    """``t.mul_(scalar)`` for every tensor (one fused kernel where available).

    Example:
        >>> ts = [torch.ones(2), torch.ones(1)]; foreach_mul_(ts, 0.5); [t.tolist() for t in ts]
        [[0.5, 0.5], [0.5]]
    """
    if not _fused("mul_", tensors, scalar):
        for tensor in tensors:
            tensor.mul_(scalar)


def foreach_copy_(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    """``target.copy_(source)`` pairwise (one fused kernel where available).

    Example:
        >>> a = [torch.zeros(2)]; foreach_copy_(a, [torch.ones(2)]); a[0].tolist()
        [1.0, 1.0]
    """
    if not _fused("copy_", targets, sources):
        for target, source in zip(targets, sources):
            target.copy_(source)


def foreach_sub_(targets: list[torch.Tensor], others: list[torch.Tensor]) -> None:
    """``target.sub_(other)`` pairwise (one fused kernel where available).

    Example:
        >>> a = [torch.ones(2)]; foreach_sub_(a, [torch.ones(2)]); a[0].tolist()
        [0.0, 0.0]
    """
    if not _fused("sub_", targets, others):
        for target, other in zip(targets, others):
            target.sub_(other)


# ----- GradScaler --------------------------------------------------------------------------
def scaler_scale_tensor(scaler: "torch.amp.GradScaler") -> torch.Tensor | None:
    """The scale the last ``scaler.scale(loss)`` used, as a tensor, with no host sync; None before the first.

    The public ``GradScaler.get_scale()`` returns a float, which costs a device sync on
    every step; the scale tensor itself is only reachable through a private accessor
    (``_get_scale_async``, torch >= 2.0; ``_scale`` before).

    Example:
        >>> s = torch.amp.GradScaler("cpu", init_scale=8.0); _ = s.scale(torch.ones(()))
        >>> float(scaler_scale_tensor(s))
        8.0
    """
    getter = getattr(scaler, "_get_scale_async", None)
    scale = getter() if callable(getter) else getattr(scaler, "_scale", None)
    return scale.detach().reshape(()) if isinstance(scale, torch.Tensor) else None


def scaler_device(scaler: "torch.amp.GradScaler", default: str) -> str:
    """The device type a GradScaler was made for (``GradScaler("cuda")``); ``default`` if unknown.

    GradScaler keeps it in a private attribute (``_device``); there is no public accessor.

    Example:
        >>> scaler_device(torch.amp.GradScaler("cpu"), "cuda")
        'cpu'
    """
    device = getattr(scaler, "_device", None)
    return device if isinstance(device, str) else default


def optimizer_unscales_itself(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` handles GradScaler's scale itself (fused Adam's private flag).

    ``GradScaler.step`` reads ``_step_supports_amp_scaling`` to hand such an optimizer the
    scale instead of unscaling; gradwatch must then leave the step to the scaler.

    Example:
        >>> optimizer_unscales_itself(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
        False
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


# ----- distributed tensors -------------------------------------------------------------
def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` (None when torch is built without distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return None
    return DTensor


def dtensor_local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, sharing its storage (public ``to_local()`` under no_grad).

    Outside grad mode ``DTensor.to_local()`` returns the local tensor itself (no autograd
    node), so in-place ops on the result change the DTensor (gradwatch clips FSDP2
    gradients that way).
    """
    with torch.no_grad():
        return tensor.to_local()


# ----- compiled modules ----------------------------------------------------------------------
def compiled_inner_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The eager module inside ``torch.compile(model)`` (its private ``_orig_mod``), else None.

    Example:
        >>> compiled_inner_module(torch.nn.Linear(2, 2)) is None
        True
    """
    if type(model).__name__ != "OptimizedModule":
        return None
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None


# ----- dispatch and function modes, autograd internals (the NaN replay and the sampler) -------
def fsdp_reduce_scatter_comms(module: torch.nn.Module) -> list[Any] | None:
    """The reduce-scatter comms an FSDP2 module uses now, one per param group (None if they cannot be read).

    Why private: FSDP2 has a public setter (``FSDPModule.set_custom_reduce_scatter``)
    but no getter; gradwatch wraps the comm in place (it delegates to it, so a
    custom one keeps working). Fallback: None, and the ranks are named from the loss.
    A module without parameters of its own has no group (an empty list).

    Example:
        >>> fsdp_reduce_scatter_comms(torch.nn.Linear(2, 2)) is None   # not an FSDP2 module
        True
    """
    getter = getattr(module, "_get_fsdp_state", None)
    if getter is None or not hasattr(module, "set_custom_reduce_scatter"):
        return None
    try:
        return [group._reduce_scatter_comm for group in getter()._fsdp_param_groups]
    except (AttributeError, TypeError, RuntimeError):
        return None


def torch_dispatch_mode() -> type:
    """``TorchDispatchMode``: the base class of a mode that sees every aten op (forward and backward).

    It lives in ``torch.utils._python_dispatch`` (documented in "Extending PyTorch", but
    the module is private); there is no other place to get it.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_flatten(tree: Any) -> tuple[list[Any], Any]:
    """``torch.utils._pytree.tree_flatten`` (a public ``torch.utils.pytree`` where torch has one).

    Example:
        >>> tree_flatten({"a": [1, 2], "b": 3})[0]
        [1, 2, 3]
    """
    try:
        from torch.utils import pytree as _pytree  # type: ignore[attr-defined]  # newer torch
    except ImportError:
        from torch.utils import _pytree  # the same functions, private module
    return _pytree.tree_flatten(tree)


def current_autograd_node() -> Any:
    """The autograd node being run by the backward pass (None outside backward or when unavailable).

    Only ``torch._C._current_autograd_node`` answers this; the NaN replay uses it to name the
    forward op (and source line) behind a backward op. Without it the replay still finds the
    backward op, without its forward origin.
    """
    getter = getattr(torch._C, "_current_autograd_node", None)
    return getter() if getter is not None else None


def no_torch_function() -> ContextManager[Any]:
    """Run ops with every ``TorchFunctionMode`` (and subclass handling) turned off, for gradwatch's own
    ops inside hooks while its sampling mode is on (``torch._C.DisableTorchFunction``; a new context per use).

    Example:
        >>> with no_torch_function():
        ...     _ = torch.ones(1) + 1
    """
    disable: Callable[[], ContextManager[Any]] | None = getattr(torch._C, "DisableTorchFunction", None)
    return disable() if disable is not None else contextlib.nullcontext()


# ----- gradwatch's own TorchFunctionModes -------------------------------------------------
_own_modes = threading.local()  # how many of gradwatch's sampling modes this thread has entered


class OwnMode(TorchFunctionMode):
    """Base of gradwatch's sampling modes: counts, per thread, how many are entered, so that the
    hooks running beside them (:func:`own_ops`) keep their own tensor calls out of them.

    Example:
        >>> class Quiet(OwnMode):
        ...     def __torch_function__(self, func, types, args=(), kwargs=None):
        ...         return func(*args, **(kwargs or {}))
        >>> with Quiet():
        ...     inside = in_own_mode()
        >>> inside, in_own_mode()
        (True, False)
    """

    def __enter__(self) -> "OwnMode":
        _own_modes.depth = getattr(_own_modes, "depth", 0) + 1
        try:
            return super().__enter__()
        except BaseException:
            _own_modes.depth -= 1
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            _own_modes.depth = max(0, getattr(_own_modes, "depth", 1) - 1)


def in_own_mode() -> bool:
    """Whether one of gradwatch's sampling modes (:class:`OwnMode`) is on in this thread."""
    return getattr(_own_modes, "depth", 0) > 0


_NO_CONTEXT = contextlib.nullcontext()  # reusable: keeps no state


def own_ops() -> ContextManager[Any]:
    """The context for gradwatch's own tensor calls inside a forward hook: torch functions off while one
    of its sampling modes is on (each call would otherwise pass through that mode's Python handler, a few
    microseconds apiece: 122 of the 154 calls it handled on a sampled step of the benchmark MLP), nothing otherwise (a user's
    own mode or tensor subclass is left as it is).

    Example:
        >>> with own_ops():
        ...     _ = torch.ones(1) + 1
    """
    return no_torch_function() if in_own_mode() else _NO_CONTEXT
