"""Rollback: a known-good snapshot of weights and optimizer state, and restoring it with an LR backoff.

``Watch(on_nonfinite="rollback")`` keeps a snapshot on the CPU (so it costs no
accelerator memory) of the model's ``state_dict`` (parameters and buffers, e.g.
BatchNorm running statistics) and the optimizer's ``state_dict``: before the
first step, then after every ``rollback_every``-th step whose update was
finite and whose weights are finite (their per-layer norms, already on the
host, say so: no extra check). On a non-finite step it restores the snapshot
and multiplies every param group's ``lr`` by ``rollback_lr_factor``.

Cost: one copy of the weights and the optimizer state to the CPU every
``rollback_every`` steps (a device-to-host transfer and a sync on a GPU); none
on other steps.

A learning-rate scheduler that recomputes ``lr`` from its ``base_lrs`` undoes
the backoff on its next step; scale ``scheduler.base_lrs`` too in that case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..repair.backoff import scale_lr_


def _check_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"rollback_every must be a positive int (steps between snapshots), got {value!r}")
    return value


def _check_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"rollback_lr_factor must be a number in (0, 1] (1 keeps the lr), got {value!r}")
    return float(value)


def _to_cpu(obj: Any) -> Any:
    """Deep copy with every tensor cloned to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


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
    """Known-good snapshots of a model and its optimizer, kept on the CPU.

    Args:
        model: the model (its ``state_dict``: parameters and buffers).
        optimizer: its optimizer (its ``state_dict``: state and param groups).
        every: take a snapshot after every this many good steps. Default: 100.
        lr_factor: multiply every param group's lr by this on a restore; 1 keeps
            it. Default: 0.5.

    Example:
        >>> model = nn.Linear(2, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> keeper = Rollback(model, opt, every=10)
        >>> keeper.snapshot(0)
        >>> with torch.no_grad(): _ = model.weight.fill_(float("nan"))
        >>> event = keeper.restore(step=5)
        >>> bool(torch.isfinite(model.weight).all()), event.lr_after
        (True, [0.05])
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int = 100, lr_factor: float = 0.5) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.every = _check_every(every)
        self.lr_factor = _check_factor(lr_factor)
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

    def snapshot(self, step: int) -> None:
        """Copy the weights, buffers and optimizer state to the CPU, as after ``step``."""
        with torch.no_grad():
            self._model_state = _to_cpu(dict(self.model.state_dict()))
            self._optim_state = _to_cpu(self.optimizer.state_dict())
        self.step = int(step)

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
