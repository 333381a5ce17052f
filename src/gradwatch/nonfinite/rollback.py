"""Rollback: a known-good snapshot of weights and optimizer state, and restoring it with an LR backoff.

``Watch(on_nonfinite="rollback")`` keeps a snapshot of the model's
``state_dict`` (parameters and buffers, e.g. BatchNorm running statistics; a
tensor shared by two names, as tied embeddings, once) and the optimizer's
``state_dict``, on the CPU by default (so it costs no accelerator memory) or,
with ``NonFiniteConfig(rollback_device="params")``, each tensor on its own
device (no transfer, but accelerator memory): before the
first step, then after every ``rollback_every``-th step whose update was
finite and whose weights are finite (their per-layer norms, already on the
host, say so: no extra check). On a non-finite step it restores the snapshot
and multiplies every param group's ``lr`` by ``rollback_lr_factor``.

Cost: memory for one copy of the weights and the optimizer state (with Adam
about 3x the parameter bytes: the weights and two moments), logged once when
the Watch is built (:func:`estimate_snapshot_bytes`); a restore briefly holds
one more copy of the optimizer state. Time: the copy every ``rollback_every``
steps (a device-to-host transfer and a sync on a GPU with ``"cpu"``); none on
other steps.

A learning-rate scheduler that recomputes ``lr`` from its ``base_lrs`` undoes
the backoff on its next step; scale ``scheduler.base_lrs`` too in that case.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..compat import foreach_norm
from ..repair.backoff import scale_lr_


def _check_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"rollback_every must be a positive int (steps between snapshots), got {value!r}")
    return value


def _check_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"rollback_lr_factor must be a number in (0, 1] (1 keeps the lr), got {value!r}")
    return float(value)


#: where a snapshot's tensors live: on the CPU, or each on the device of the tensor it copies
SNAPSHOT_DEVICES = ("cpu", "params")


def _tensor_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two views of the same memory with the same layout (tied weights in a state_dict)."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def _copy(obj: Any, device: str, seen: dict[tuple[Any, ...], torch.Tensor] | None = None) -> Any:
    """Deep copy with every tensor cloned, to the CPU (``device="cpu"``) or where it is (``"params"``);
    a tensor reached twice (tied weights) is copied once.

    Example:
        >>> w = torch.ones(3)
        >>> out = _copy({"a": w, "b": w, "n": 2}, "cpu")
        >>> out["a"] is out["b"], out["a"].data_ptr() != w.data_ptr(), out["n"]
        (True, True, 2)
    """
    if seen is None:
        seen = {}
    if isinstance(obj, torch.Tensor):
        key = _tensor_key(obj)
        done = seen.get(key)
        if done is None:
            target = "cpu" if device == "cpu" else obj.device
            done = seen[key] = obj.detach().to(target, copy=True)
        return done
    if isinstance(obj, dict):
        return {k: _copy(v, device, seen) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v, device, seen) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_copy(v, device, seen) for v in obj)
    return copy.deepcopy(obj)


def _tensor_bytes(obj: Any, seen: set[tuple[Any, ...]] | None = None) -> int:
    """Bytes of the distinct tensors in a nested state (each tensor once)."""
    if seen is None:
        seen = set()
    if isinstance(obj, torch.Tensor):
        key = _tensor_key(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


@dataclass(frozen=True)
class SnapshotCost:
    """What one rollback snapshot holds, in bytes: the model's tensors and the optimizer state.

    ``exact`` is False when the optimizer state was not created yet (before the first step)
    and was estimated from the optimizer's kind (:func:`estimate_snapshot_bytes`).
    """

    weights: int
    optimizer_state: int
    exact: bool
    device: str = "cpu"

    @property
    def total(self) -> int:
        """Bytes of the whole snapshot."""
        return self.weights + self.optimizer_state

    def describe(self) -> str:
        """One line for the log.

        Example:
            >>> SnapshotCost(4 << 20, 8 << 20, False).describe()[:86]
            "on_nonfinite='rollback' keeps a snapshot of the weights and optimizer state on the cpu"
        """
        mib = 1 << 20
        where = "on the cpu" if self.device == "cpu" else "on the parameters' devices"
        how = "" if self.exact else ", the optimizer state estimated from the optimizer's kind"
        return (f"on_nonfinite='rollback' keeps a snapshot of the weights and optimizer state {where}: "
                f"{self.total / mib:.1f} MiB (weights and buffers {self.weights / mib:.1f} MiB, optimizer state "
                f"{self.optimizer_state / mib:.1f} MiB{how}); NonFiniteConfig(rollback_device=...) chooses where")


# Per-parameter state tensors of torch's optimizers before their first step: (names of state
# tensors shaped like the parameter, number of 0-d float32 scalars such as "step").
def _known_state(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[int, int] | None:
    name = type(optimizer).__name__
    if name in ("Adam", "AdamW"):
        return 2 + bool(group.get("amsgrad")), 1
    if name == "SGD":
        return int(bool(group.get("momentum"))), 0
    if name == "RMSprop":
        return 1 + bool(group.get("momentum")) + bool(group.get("centered")), 1
    if name in ("Adamax", "RAdam", "Adadelta"):
        return 2, 1
    if name == "NAdam":
        return 2, 2  # step and mu_product
    if name == "Adagrad":
        return 1, 1
    return None


def estimate_snapshot_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, device: str = "cpu") -> SnapshotCost:
    """The bytes a rollback snapshot of ``model`` and ``optimizer`` takes.

    The weights and buffers are counted from the model's ``state_dict`` (a tensor under two
    names once); the optimizer state from the optimizer's ``state_dict`` when every parameter
    has its state, else from the optimizer's kind (Adam/AdamW: two tensors the size of each
    parameter and a ``step`` scalar; SGD with momentum: one; an optimizer it does not know:
    two, and ``exact`` is False).

    Example:
        >>> model = nn.Linear(100, 10)  # 1010 float32 parameters
        >>> cost = estimate_snapshot_bytes(model, torch.optim.Adam(model.parameters()))
        >>> cost.weights, cost.optimizer_state, cost.exact  # 2 moments + a 4-byte step per tensor
        (4040, 8088, False)
    """
    weights = _tensor_bytes(dict(model.state_dict()))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if params and all(p in optimizer.state and optimizer.state[p] for p in params):
        return SnapshotCost(weights, _tensor_bytes(optimizer.state_dict()["state"]), True, device)
    state = 0
    for group in optimizer.param_groups:
        known = _known_state(optimizer, group) or (2, 0)
        for p in group["params"]:
            if p in optimizer.state and optimizer.state[p]:
                state += _tensor_bytes(optimizer.state[p])
            else:
                state += known[0] * p.numel() * p.element_size() + known[1] * 4
    return SnapshotCost(weights, state, False, device)


def _clone(obj: Any) -> Any:
    """Deep copy with tensors cloned (so loading never aliases the snapshot)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class RollbackEvent:
    """One restore: to which step, and the lr before and after the backoff."""

    step: int
    restored_step: int
    lr_before: list[float]
    lr_after: list[float]
    factor: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "event": "rollback",
            "step": self.step,
            "restored_step": self.restored_step,
            "lr_before": self.lr_before,
            "lr_after": self.lr_after,
            "factor": self.factor,
        }


class Rollback:
    """Known-good snapshots of a model and its optimizer, kept on the CPU (or where the tensors are).

    Args:
        model: the model (its ``state_dict``: parameters and buffers).
        optimizer: its optimizer (its ``state_dict``: state and param groups).
        every: take a snapshot after every this many good steps. Default: 100.
        lr_factor: multiply every param group's lr by this on a restore; 1 keeps
            it. Default: 0.5.
        device: ``"cpu"``, or ``"params"``: each tensor's copy on its own device. Default: ``"cpu"``.

    Example:
        >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> keeper = Rollback(model, opt, every=10)
        >>> keeper.snapshot(0)
        >>> with torch.no_grad(): _ = model.weight.fill_(float("nan"))
        >>> event = keeper.restore(step=5)
        >>> bool(torch.isfinite(model.weight).all()), event.lr_after
        (True, [0.05])
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int = 100, lr_factor: float = 0.5,
                 device: str = "cpu") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.every = _check_every(every)
        self.lr_factor = _check_factor(lr_factor)
        if device not in SNAPSHOT_DEVICES:
            raise ValueError(f"device must be one of {SNAPSHOT_DEVICES}, got {device!r}")
        self.device = device
        self.step: int | None = None  # the step after which the snapshot was taken (0: before training)
        self._model_state: dict[str, torch.Tensor] | None = None
        self._optim_state: dict[str, Any] | None = None
        self.events: list[RollbackEvent] = []

    @property
    def has_snapshot(self) -> bool:
        return self._model_state is not None

    @property
    def group_count(self) -> int | None:
        """How many param groups the snapshot's optimizer had (None before the first snapshot)."""
        return None if self._optim_state is None else len(self._optim_state["param_groups"])

    @property
    def nbytes(self) -> int:
        """Bytes of the snapshot held now (0 before the first)."""
        return _tensor_bytes([self._model_state, self._optim_state])

    def cost(self) -> SnapshotCost:
        """What a snapshot of the model and optimizer takes now (:func:`estimate_snapshot_bytes`)."""
        return estimate_snapshot_bytes(self.model, self.optimizer, self.device)

    def snapshot(self, step: int) -> None:
        """Copy the weights, buffers and optimizer state (to the CPU by default), as after ``step``."""
        self._model_state = self._optim_state = None  # the old copy goes before the new one is made
        with torch.no_grad():
            self._model_state = _copy(dict(self.model.state_dict()), self.device)
            self._optim_state = _copy(self.optimizer.state_dict(), self.device)
        self.step = int(step)

    def weights_finite(self) -> bool:
        """Whether every floating-point parameter of the model is finite now (a snapshot of non-finite
        weights would restore them). One fused max-abs pass, on snapshot steps only.

        Example:
            >>> model = nn.Linear(2, 1); keeper = Rollback(model, torch.optim.SGD(model.parameters(), lr=0.1))
            >>> keeper.weights_finite()
            True
            >>> with torch.no_grad():
            ...     _ = model.bias.fill_(float("nan"))
            >>> keeper.weights_finite()
            False
        """
        with torch.no_grad():
            floats = [p.detach() for p in self.model.parameters() if p.is_floating_point() and p.numel()]
            if not floats:
                return True
            peaks = foreach_norm(floats, math.inf)  # NaN and inf propagate through max |w|
            device = peaks[0].device  # one host sync for them all, not one per tensor
            return bool(torch.isfinite(torch.stack([t.float().to(device) for t in peaks])).all())

    def due(self, step: int) -> bool:
        """Whether a snapshot should be taken after ``step`` (every ``every`` steps)."""
        return step % self.every == 0

    def restore(self, step: int) -> RollbackEvent:
        """Load the snapshot into the model and optimizer (keeping every param group's current
        hyperparameters), then multiply the lr by ``lr_factor``.

        Args:
            step: the failing step (for the event record).

        Raises:
            RuntimeError: no snapshot was taken yet.
        """
        if self._model_state is None or self._optim_state is None or self.step is None:
            raise RuntimeError("Rollback.restore() called before any snapshot(); call snapshot(step) first")
        # The hyperparameters in use now (lr, betas, momentum, ...: a scheduler may have moved them since the
        # snapshot) are kept: a rollback restores what the steps learnt, not the schedule.
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        with torch.no_grad():
            self.model.load_state_dict(self._model_state)  # copies into the existing tensors
        self.optimizer.load_state_dict(_clone(self._optim_state))
        for group, values in zip(self.optimizer.param_groups, hyper):
            group.update(values)
        before, after = scale_lr_(self.optimizer, self.lr_factor)
        event = RollbackEvent(step=int(step), restored_step=self.step, lr_before=before, lr_after=after, factor=self.lr_factor)
        self.events.append(event)
        return event

    def state_dict(self) -> dict[str, Any]:
        """The snapshot and the settings (CPU tensors), e.g. to checkpoint with the run."""
        return {
            "every": self.every,
            "lr_factor": self.lr_factor,
            "step": self.step,
            "model": self._model_state,
            "optimizer": self._optim_state,
            "events": [e.to_dict() for e in self.events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.every = _check_every(state["every"])
        self.lr_factor = _check_factor(state["lr_factor"])
        self.step = state.get("step")
        self._model_state = state.get("model")
        self._optim_state = state.get("optimizer")
        self.events = [
            RollbackEvent(e["step"], e["restored_step"], list(e["lr_before"]), list(e["lr_after"]), e["factor"])
            for e in state.get("events", [])
        ]
