"""Layers: which modules gradwatch measures, and in which order.

A *layer* is a module that owns parameters directly (``module._parameters``).
Its *depth* is the order in which it first runs forward, not the order in which
it was registered: a model that defines its head before its body still has its
body at depth 0. A parameter shared by several modules (tied embeddings) is
counted once, for the first module that registers it. Frozen parameters are
listed but not measured.

:class:`LayerIndex` owns this bookkeeping: it watches the first forward pass
with pre-hooks (removed as soon as the order is known) and then gives the flat,
depth-ordered list of trainable parameters and, for each, the index of its layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Layer:
    """One layer of the model, as listed in the run directory.

    ``depth`` is the execution order (0 = first to run forward); ``measured`` is
    False for a layer whose parameters are all frozen or that holds only a
    parameter shared with an earlier layer.
    """

    name: str
    type: str
    depth: int
    param_names: list[str]
    shapes: list[list[int]]
    numel: int
    trainable_numel: int
    measured: bool
    ran_forward: bool = True
    shared_with: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "depth": self.depth,
            "param_names": self.param_names,
            "shapes": self.shapes,
            "numel": self.numel,
            "trainable_numel": self.trainable_numel,
            "measured": self.measured,
            "ran_forward": self.ran_forward,
            "shared_with": self.shared_with,
        }


def _owner_and_leaf(qualified_name: str) -> tuple[str, str]:
    owner, _, leaf = qualified_name.rpartition(".")
    return owner, leaf


class LayerIndex:
    """Depth-ordered layers of a model and the flat list of parameters to measure.

    Call :meth:`start_order_tracking` before the first forward pass and
    :meth:`finish_order_tracking` after it; until then the order is registration
    order. After ``finish``, ``layers`` is sorted by execution order.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> index = LayerIndex(model)
        >>> index.start_order_tracking()
        >>> _ = model(torch.randn(3, 4))
        >>> index.finish_order_tracking()
        >>> [layer.name for layer in index.measured_layers]
        ['0', '2']
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._modules: dict[str, nn.Module] = dict(model.named_modules(remove_duplicate=False))
        first_owner: dict[int, str] = {}
        owned: dict[str, list[tuple[str, nn.Parameter]]] = {}
        shared: dict[str, dict[str, str]] = {}
        for qualified, param in model.named_parameters(remove_duplicate=False):
            owner, _ = _owner_and_leaf(qualified)
            key = id(param)
            if key in first_owner:
                shared.setdefault(owner, {})[qualified] = first_owner[key]
                continue
            first_owner[key] = qualified
            owned.setdefault(owner, []).append((qualified, param))
        self._owned = owned
        self._shared = shared
        self._order: list[str] = list(owned)  # registration order until tracked
        self._ran: set[str] = set(owned)
        self._handles: list[Any] = []
        self._seen: list[str] = []
        self._build()

    # ----- execution-order tracking -------------------------------------------------
    def start_order_tracking(self) -> None:
        """Register forward pre-hooks that record the order in which layers first run."""
        if self._handles:
            return
        self._seen = []
        seen_set: set[str] = set()

        def make_hook(name: str):
            def hook(module: nn.Module, args: Any) -> None:
                if name not in seen_set:
                    seen_set.add(name)
                    self._seen.append(name)

            return hook

        for name in self._owned:
            module = self._modules.get(name, self.model if name == "" else None)
            if module is not None:
                self._handles.append(module.register_forward_pre_hook(make_hook(name)))

    @property
    def tracking(self) -> bool:
        return bool(self._handles)

    def finish_order_tracking(self) -> None:
        """Remove the hooks and sort layers by first execution (unseen ones last)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not self._seen:
            return  # nothing ran forward under the hooks: keep registration order
        unseen = [name for name in self._owned if name not in set(self._seen)]
        self._order = list(self._seen) + unseen
        self._ran = set(self._seen)
        self._build()

    # ----- the index ---------------------------------------------------------------------
    def _build(self) -> None:
        layers: list[Layer] = []
        params: list[nn.Parameter] = []
        param_layer: list[int] = []
        param_names: list[str] = []
        measured_names: list[str] = []
        for depth, name in enumerate(self._order):
            entries = self._owned[name]
            module = self._modules.get(name, self.model)
            trainable = [(n, p) for n, p in entries if p.requires_grad]
            measured = bool(trainable)
            layer = Layer(
                name=name or "(root)",
                type=type(module).__name__,
                depth=depth,
                param_names=[n for n, _ in entries],
                shapes=[list(p.shape) for _, p in entries],
                numel=sum(p.numel() for _, p in entries),
                trainable_numel=sum(p.numel() for _, p in trainable),
                measured=measured,
                ran_forward=name in self._ran,
                shared_with=dict(self._shared.get(name, {})),
            )
            layers.append(layer)
            if measured:
                slot = len(measured_names)
                measured_names.append(layer.name)
                for n, p in trainable:
                    params.append(p)
                    param_layer.append(slot)
                    param_names.append(n)
        self.layers: list[Layer] = layers
        self.measured_layers: list[Layer] = [layer for layer in layers if layer.measured]
        self.names: list[str] = measured_names
        self.params: list[nn.Parameter] = params
        self.param_names: list[str] = param_names
        self.param_layer: list[int] = param_layer
        self.layer_numel: list[int] = [layer.trainable_numel for layer in self.measured_layers]
        self._param_layer_tensor: dict[torch.device, torch.Tensor] = {}

    def param_layer_tensor(self, device: torch.device) -> torch.Tensor:
        """``param_layer`` as a long tensor on ``device`` (cached)."""
        cached = self._param_layer_tensor.get(device)
        if cached is None:
            cached = torch.tensor(self.param_layer, dtype=torch.long, device=device)
            self._param_layer_tensor[device] = cached
        return cached

    def module(self, layer_name: str) -> nn.Module:
        """The module behind a layer name ('(root)' is the model itself)."""
        return self.model if layer_name == "(root)" else self._modules[layer_name]

    def __len__(self) -> int:
        return len(self.names)
