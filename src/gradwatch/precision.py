"""Precision: autocast and loss scaling around the Watch's step.

``Precision("fp32")`` is a complete no-op (STYLE 10: the loop needs no branches
for options). ``"bf16"`` runs the closure under ``torch.autocast`` with
bfloat16 and needs no scaler. ``"fp16"`` runs it under autocast with float16
and scales the loss with a :class:`torch.amp.GradScaler` (the user's own, or a
default one), in the standard order: scale, backward, unscale, measure, clip,
step or skip, update.

Host syncs: none of its own on a healthy step. ``GradScaler.step`` reads its
``found_inf`` flag with ``.item()``; the Watch has already decided on the host
(from the one sync of the step) that every unscaled gradient is finite, which
implies ``found_inf == 0``, so :meth:`Precision.step` with ``grads_finite=True``
calls ``optimizer.step()`` directly. The scale update (``GradScaler.update``)
runs on the device with the ``found_inf`` recorded by ``unscale_``, exactly as
in a hand-written GradScaler loop: same skipped steps, same scale sequence.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

from . import compat

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_NO_CONTEXT = contextlib.nullcontext()  # reusable: nullcontext keeps no state


class Precision:
    """Autocast and loss scaling for one precision mode.

    Args:
        mode: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device_type: the model's device type (``"cpu"``, ``"cuda"``, ...).
        scaler: fp16 only: a ``torch.amp.GradScaler``; None makes a default one.

    Example:
        >>> p = Precision("fp32", "cpu")
        >>> with p.autocast():
        ...     pass
        >>> p.loss_scale_tensor() is None
        True
    """

    def __init__(self, mode: str = "fp32", device_type: str = "cpu", scaler: "torch.amp.GradScaler | None" = None):
        if mode not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {mode!r}")
        if scaler is not None and mode != "fp16":
            raise ValueError(f"scaler= is only used with precision='fp16', got precision={mode!r}; drop scaler= or set precision='fp16'")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        scaler_device = compat.scaler_device(scaler, device_type) if scaler is not None else device_type
        if scaler is not None and scaler.is_enabled() and scaler_device != device_type:
            raise ValueError(
                f"scaler was made for device {scaler_device!r} but the model is on {device_type!r}; "
                f"make it with torch.amp.GradScaler({device_type!r})"
            )
        self.mode = mode
        self.device_type = device_type
        if mode == "fp16" and scaler is None:
            scaler = torch.amp.GradScaler(device_type)
        self.scaler = scaler
        self._unscaled = False
        #: steps skipped because the scaler found inf/nan gradients (each one halves
        #: the scale by ``backoff_factor``); counted by the step pipeline.
        self.overflow_skips = 0

    @property
    def scaling(self) -> bool:
        return self.scaler is not None and self.scaler.is_enabled()

    def autocast(self) -> ContextManager[Any]:
        """Context for the forward pass and the loss (nothing at all in fp32)."""
        if self.mode == "fp32":
            return _NO_CONTEXT
        return torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.mode])

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled under fp16."""
        if self.scaling:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def loss_scale_tensor(self) -> torch.Tensor | None:
        """The scale used for this step's backward, as a tensor (no sync), or None."""
        if not self.scaling:
            return None
        return compat.scaler_scale_tensor(self.scaler)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide gradients by the loss scale in place (fp16 only)."""
        if self.scaling:
            self.scaler.unscale_(optimizer)
            self._unscaled = True

    def step(self, optimizer: torch.optim.Optimizer, grads_finite: bool = False) -> None:
        """Apply the update (the scaler still skips it if it saw an inf).

        Args:
            optimizer: the optimizer.
            grads_finite: the caller has checked on the host that every unscaled
                gradient is finite (so the scaler's ``found_inf`` is 0): skip
                ``GradScaler.step``'s own ``.item()`` sync. Default: False.
        """
        if not self.scaling:
            optimizer.step()
        elif grads_finite and self._unscaled and not compat.optimizer_unscales_itself(optimizer):
            optimizer.step()  # what GradScaler.step does once found_inf is known to be 0
        else:
            self.scaler.step(optimizer)

    @property
    def unscaled(self) -> bool:
        """Whether this step's gradients were unscaled (``unscale_`` ran since the last ``update``)."""
        return self._unscaled

    def update(self) -> None:
        """Update the loss scale after a step (applied or skipped)."""
        if self.scaling and self._unscaled:
            self.scaler.update()
        self._unscaled = False

    def state_dict(self) -> dict:
        """Mode, the scaler's state (scale, growth tracker) and the overflow-skip count."""
        return {
            "mode": self.mode,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "overflow_skips": self.overflow_skips,
        }

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.overflow_skips = int(state.get("overflow_skips", 0))
