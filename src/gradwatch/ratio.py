"""The update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` per layer.

~1e-3 per step is the usual healthy range (Karpathy's rule of thumb); a ratio
near 1 means each update rewrites the weights. Measuring it needs the weights
from before the update: :class:`UpdateRatioMeter` copies them into a buffer kept
between measurements (one copy of the measured weights stays allocated once the
first measurement ran; fresh clones every time cost twice as much on small
models and the same memory at their peak), and after the update takes the
per-tensor norms of the difference, which come to the host in one small
transfer and are summed per layer there.

When: on each of the first ``every`` steps (divergence shows in the first
updates, before the norms have grown) and then every ``every`` steps.

Two ways the update happens:

- the Watch steps the optimizer (``watch.step``): :meth:`UpdateRatioMeter.snapshot`
  before, :meth:`UpdateRatioMeter.measure` after;
- the caller steps it (``watch.observe``): :meth:`UpdateRatioMeter.arm_caller`
  registers a one-shot ``register_step_post_hook`` on the optimizer the caller
  steps (unwrapped from accelerate's/Lightning's wrappers); if no
  ``optimizer.step()`` follows (a GradScaler that found inf), the next
  ``observe()`` removes it (:meth:`UpdateRatioMeter.drop_caller`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import compat
from . import norms as _norms

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DistSync
    from .layers import LayerIndex

Snapshot = list[torch.Tensor] | list[np.ndarray]


def hookable_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer whose step hooks fire for ``optimizer``: itself, or the one a wrapper
    (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer) steps; None if there is none.

    A wrapper that subclasses ``torch.optim.Optimizer`` without running its ``__init__``
    (accelerate's) has no hook tables: registering a hook on it fails, so its ``.optimizer``
    is tried next.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> hookable_optimizer(opt) is opt, hookable_optimizer(object())
        (True, None)
    """
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer):
            try:
                optimizer.register_step_post_hook(_no_op).remove()
                return optimizer
            except AttributeError:  # Optimizer.__init__ never ran: a wrapper
                pass
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def _no_op(*args: Any) -> None:
    return None


class UpdateRatioMeter:
    """Per-layer ``||dw|| / ||w||`` every ``every`` steps (and on each of the first ``every``).

    Args:
        every: the measurement interval in steps.

    Example:
        >>> meter = UpdateRatioMeter(10)
        >>> [s for s in range(1, 41) if meter.due(s)]
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40]
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._before: Snapshot | None = None
        self._caller_hook: Any = None

    def due(self, step: int) -> bool:
        """Whether step ``step`` measures the ratio."""
        return step <= self.every or step % self.every == 0

    # ----- before the update --------------------------------------------------------------
    def snapshot(self, index: "LayerIndex", host: _norms.HostWeights | None, dist: "DistSync | None") -> Snapshot:
        """The measured weights, copied into the buffer kept between measurements (on CPU with
        numpy views: one ``numpy.copyto`` per tensor; else one foreach copy)."""
        if host is not None and host.current():
            before = self._before
            self._before = host.copy_into(before if before and isinstance(before[0], np.ndarray) else None)
            return self._before
        with torch.no_grad():
            params = index.params if dist is None else dist.local_params(index.params)
            before = self._before
            if before is not None and len(before) == len(params) and isinstance(before[0], torch.Tensor) and all(
                    b.shape == p.shape and b.dtype == p.dtype and b.device == p.device for b, p in zip(before, params)):
                compat.foreach_copy_(before, [p.detach() for p in params])
                return before
            self._before = [p.detach().clone() for p in params]
            return self._before

    # ----- after the update -----------------------------------------------------------------
    def measure(self, before: Snapshot, index: "LayerIndex", host: _norms.HostWeights | None,
                dist: "DistSync | None", device: torch.device, weight_norms: np.ndarray) -> np.ndarray | None:
        """Per layer ||w_after - w_before|| / ||w_before|| (NaN for an all-zero or unmeasured layer).

        ``weight_norms`` are the step's per-layer weight norms (host values, before the update).
        None when numpy took the snapshot and a weight can no longer be read by numpy after the
        update (it left the CPU or changed its dtype inside the optimizer step).
        """
        with torch.no_grad():
            params = index.params if dist is None else dist.local_params(index.params)
            if isinstance(before[0], np.ndarray):  # numpy copied the weights: numpy takes the difference
                if host is None or not host.current():
                    return None
                tensor_squares = host.delta_squares(before)
            else:
                compat.foreach_sub_(before, [p.detach() for p in params])  # before := before - after = -dw
                if dist is not None:  # sharded: sum the local parts across ranks (one collective)
                    layer_squares = dist.layer_sq_norms(index, before, device).cpu().tolist()
                    return _ratios(layer_squares, weight_norms)
                tensor_squares = [n * n for n in _norms._tensor_norms(before, 2.0).cpu().tolist()]
        squares = [0.0] * len(index)
        for slot, square in zip(index.param_layer, tensor_squares):
            squares[slot] += square
        return _ratios(squares, weight_norms)

    # ----- observe(): the caller's optimizer.step() makes the update ------------------------
    def arm_caller(self, optimizer: torch.optim.Optimizer, before: Snapshot,
                   on_update: Callable[[Snapshot], None]) -> None:
        """Call ``on_update(before)`` once, right after the caller's next ``optimizer.step()``."""
        self.drop_caller()

        def hook(stepped: Any, args: Any, kwargs: Any) -> None:
            self.drop_caller()
            on_update(before)

        self._caller_hook = optimizer.register_step_post_hook(hook)

    def drop_caller(self) -> None:
        """Remove a hook armed by :meth:`arm_caller` whose ``optimizer.step()`` never came."""
        handle, self._caller_hook = self._caller_hook, None
        if handle is not None:
            handle.remove()


def _ratios(squares: list[float], weight_norms: np.ndarray) -> np.ndarray:
    return np.array([math.sqrt(d) / w if w > 0 else math.nan for d, w in zip(squares, weight_norms.tolist())])
