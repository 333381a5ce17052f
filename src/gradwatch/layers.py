"""Layers: which modules gradwatch measures, in which order, and which of their parameters right now.

A *layer* is a module that owns parameters directly (``named_parameters(recurse=False)``).
Its *depth* is the order in which it first runs forward, not the order in which
it was registered: a model that defines its head before its body still has its
body at depth 0. A parameter shared by several modules (tied embeddings) is
counted once, for the first module that registers it. Parameters the optimizer
holds that are not in the model (a learnable temperature, a second model's
head) form one more layer, ``"(outside model)"``.

Every layer keeps one *slot* for the whole run: the per-layer arrays of a step
record (norms, update ratios) have one entry per layer, frozen layers
included (NaN while frozen), so a layer unfrozen later, or a parameter group
added with ``add_param_group``, never shifts another layer's numbers. The
*measured* parameters are those that require grad and that the optimizer holds
(every trainable parameter when there is no optimizer): they are measured,
clipped and checked. A trainable parameter of the model that the optimizer does
not hold is listed in ``unheld`` (its gradient is never used by the update).

:class:`LayerIndex` owns this bookkeeping: it watches the first forward pass
with pre-hooks (removed as soon as the order is known), gives the flat
depth-ordered list of measured parameters with the slot of each, and tells
cheaply (:meth:`LayerIndex.stale`: a few integer compares, plus one C-level
pass over the flags of frozen parameters) when the optimizer's parameters or a
frozen parameter's ``requires_grad`` changed, so that :meth:`refresh` rebuilds it.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

OUTSIDE_MODEL = "(outside model)"
ROOT = "(root)"
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


@dataclass
class Layer:
    """One layer of the model, as listed in the run directory.

    ``depth`` is the execution order (0 = first to run forward); ``measured`` is
    True while some parameter of the layer is measured (requires grad and is
    held by the optimizer); ``in_optimizer`` is False for a layer none of whose
    trainable parameters the optimizer holds.
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
    in_optimizer: bool = True

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
            "in_optimizer": self.in_optimizer,
        }


def _owner_and_leaf(qualified_name: str) -> tuple[str, str]:
    owner, _, leaf = qualified_name.rpartition(".")
    return owner, leaf


def optimizer_signature(optimizer: Any) -> tuple[int, int]:
    """(number of param groups, number of parameters in them): what changes when groups are added or grow.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        >>> optimizer_signature(opt)
        (1, 2)
    """
    groups = optimizer.param_groups
    return len(groups), sum(len(group["params"]) for group in groups)


class LayerIndex:
    """Depth-ordered layers of a model and the flat list of parameters to measure.

    Args:
        model: the model.
        optimizer: the optimizer that steps it (None: measure every trainable
            parameter, as the probe does). Default: None.

    Call :meth:`start_order_tracking` before the first forward pass and
    :meth:`finish_order_tracking` after it; until then the order is registration
    order.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> index = LayerIndex(model)
        >>> index.start_order_tracking()
        >>> _ = model(torch.randn(3, 4))
        >>> index.finish_order_tracking()
        >>> index.names, len(index.params)
        (['0', '2'], 4)
    """

    def __init__(self, model: nn.Module, optimizer: Any = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.version = 0  # bumped by every rebuild that changes what is measured or the layer list
        self._order: list[str] = []
        self._ran: set[str] = set()
        #: layers that ran with grad mode off on the tracked forward pass (under torch.no_grad() or a
        #: reentrant checkpoint's forward): their output carried no graph, so no gradient can come back.
        #: None until the first forward pass was tracked.
        self.no_graph_output: set[str] | None = None
        self._tracked = False
        self._handles: list[Any] = []
        self._seen: list[str] = []
        self._scan()
        self._order = list(self._owned)  # registration order until tracked
        self._ran = set(self._owned)
        self._build()

    # ----- what the model and the optimizer hold ---------------------------------------
    def _scan(self) -> None:
        """Walk the model (and the optimizer) for the owner of every parameter."""
        model = self.model
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
        self._held: set[int] | None = None
        if self.optimizer is not None:
            self._held = set()
            outside: list[tuple[str, nn.Parameter]] = []
            for g, group in enumerate(self.optimizer.param_groups):
                for i, param in enumerate(group["params"]):
                    self._held.add(id(param))
                    if id(param) not in first_owner:
                        first_owner[id(param)] = f"param_groups[{g}][{i}]"
                        outside.append((f"param_groups[{g}][{i}]", param))
            if outside:
                owned[OUTSIDE_MODEL] = outside
            self._signature = optimizer_signature(self.optimizer)
        self._owned = owned
        self._shared = shared

    # ----- execution-order tracking -------------------------------------------------
    def start_order_tracking(self) -> None:
        """Register forward pre-hooks that record the order in which layers first run."""
        if self._handles or self._tracked:
            return
        self._seen = []
        seen_set: set[str] = set()
        self._graph_outputs: tuple[set[str], set[str]] = (set(), set())  # (with a graph, without one)
        with_graph, without_graph = self._graph_outputs

        def make_hook(name: str):
            def hook(module: nn.Module, args: Any) -> None:
                # grad mode off (torch.no_grad(), a reentrant checkpoint's forward): its output carries no graph
                (with_graph if torch.is_grad_enabled() else without_graph).add(name)
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
        """Remove the hooks and sort layers by first execution (unseen ones last, the outside-model layer last)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        with_graph, without_graph = getattr(self, "_graph_outputs", (set(), set()))
        self.no_graph_output = without_graph - with_graph  # any call that carried a graph could get gradients
        if not self._seen:
            return  # nothing ran forward under the hooks: keep registration order
        self._tracked = True
        seen = set(self._seen)
        unseen = [name for name in self._owned if name not in seen and name != OUTSIDE_MODEL]
        self._order = list(self._seen) + unseen + ([OUTSIDE_MODEL] if OUTSIDE_MODEL in self._owned else [])
        self._ran = seen
        self._build()

    # ----- parameters that change ------------------------------------------------------
    def stale(self) -> bool:
        """Whether a parameter group was added or grew, or a frozen parameter was unfrozen, since the last build.

        Cheap enough for every step: two integer compares and one C-level pass over
        the ``requires_grad`` flags of the frozen parameters (none on a fully trainable model).
        """
        if self.optimizer is not None and optimizer_signature(self.optimizer) != self._signature:
            return True
        return bool(self._frozen) and any(map(_REQUIRES_GRAD, self._frozen))

    def measured_frozen(self) -> bool:
        """Whether a measured parameter no longer requires grad (checked when gradients are missing)."""
        return not all(map(_REQUIRES_GRAD, self.params))

    def refresh(self) -> bool:
        """Rebuild from the model and the optimizer as they are now. Returns True when the layer list grew.

        Known layers keep their slots; layers seen for the first time (a module added
        to the model, parameters outside it added to the optimizer) are appended.
        """
        before = list(self.names)
        self._scan()
        known = set(self._order)
        self._order = [n for n in self._order if n in self._owned] + [n for n in self._owned if n not in known]
        if OUTSIDE_MODEL in self._order and self._order[-1] != OUTSIDE_MODEL and OUTSIDE_MODEL not in before:
            self._order.remove(OUTSIDE_MODEL)
            self._order.append(OUTSIDE_MODEL)
        self._build()
        return self.names[: len(before)] != before or len(self.names) != len(before)

    # ----- the index ---------------------------------------------------------------------
    def _build(self) -> None:
        held = self._held
        layers: list[Layer] = []
        params: list[nn.Parameter] = []
        param_layer: list[int] = []
        param_names: list[str] = []
        frozen: list[nn.Parameter] = []
        unheld: list[tuple[str, nn.Parameter]] = []
        for slot, name in enumerate(self._order):
            entries = self._owned[name]
            module = self.model if name == OUTSIDE_MODEL else self._modules.get(name, self.model)
            trainable = [(n, p) for n, p in entries if p.requires_grad]
            measured = [(n, p) for n, p in trainable if held is None or id(p) in held]
            frozen += [p for _, p in entries if not p.requires_grad]
            unheld += [(n, p) for n, p in trainable if held is not None and id(p) not in held]
            layer = Layer(
                name=name or ROOT,
                type="(optimizer)" if name == OUTSIDE_MODEL else type(module).__name__,
                depth=slot,
                param_names=[n for n, _ in entries],
                shapes=[list(p.shape) for _, p in entries],
                numel=sum(p.numel() for _, p in entries),
                trainable_numel=sum(p.numel() for _, p in measured),
                measured=bool(measured),
                ran_forward=name in self._ran or name == OUTSIDE_MODEL,
                shared_with=dict(self._shared.get(name, {})),
                in_optimizer=not trainable or bool(measured),
            )
            layers.append(layer)
            for n, p in measured:
                params.append(p)
                param_layer.append(slot)
                param_names.append(n)
        self.layers: list[Layer] = layers
        #: every layer name, one slot each for the whole run (the per-layer arrays of a record)
        self.names: list[str] = [layer.name for layer in layers]
        self.measured_layers: list[Layer] = [layer for layer in layers if layer.measured]
        #: the slots of the layers measured now
        self.measured_slots: list[int] = [i for i, layer in enumerate(layers) if layer.measured]
        self.params: list[nn.Parameter] = params
        self.param_names: list[str] = param_names
        self.param_layer: list[int] = param_layer
        self.layer_numel: list[int] = [layer.trainable_numel for layer in layers]
        self._frozen = frozen
        #: trainable parameters of the model that the optimizer does not hold: (name, parameter)
        self.unheld: list[tuple[str, nn.Parameter]] = unheld
        self.version += 1

    @property
    def measured_names(self) -> list[str]:
        """Names of the layers measured now, in depth order."""
        return [layer.name for layer in self.measured_layers]

    def module(self, layer_name: str) -> nn.Module:
        """The module behind a layer name (``"(root)"`` and ``"(outside model)"`` are the model itself)."""
        if layer_name in (ROOT, OUTSIDE_MODEL):
            return self.model
        return self._modules[layer_name]

    def __len__(self) -> int:
        return len(self.names)
