"""Layer discovery: execution-order depth, tied parameters once, frozen listed but not measured."""

from __future__ import annotations

import torch
from torch import nn

from gradwatch.layers import LayerIndex


class HeadFirst(nn.Module):
    """Registers its head before its body: depth must follow execution, not registration."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.mid(self.emb(idx)))


def _order(model: nn.Module, x: torch.Tensor) -> LayerIndex:
    index = LayerIndex(model)
    index.start_order_tracking()
    model(x)
    index.finish_order_tracking()
    return index


def test_depth_is_execution_order_not_registration_order() -> None:
    model = HeadFirst()
    index = LayerIndex(model)
    assert index.names == ["head", "body.0", "body.2"]  # registration order before any forward
    index.start_order_tracking()
    model(torch.randn(3, 4))
    model(torch.randn(3, 4))  # a second forward does not change the order
    index.finish_order_tracking()
    assert index.names == ["body.0", "body.2", "head"]
    assert [layer.depth for layer in index.layers] == [0, 1, 2]
    assert not index.tracking
    assert all(not m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_tied_parameter_counted_once() -> None:
    model = Tied()
    index = _order(model, torch.randint(0, 10, (2, 3)))
    assert index.names == ["emb", "mid"]  # out.weight is emb.weight: measured once, with emb
    assert len(index.params) == len({id(p) for p in model.parameters()}) == 3
    emb = next(layer for layer in index.layers if layer.name == "emb")
    assert emb.numel == 40


def test_frozen_parameters_listed_but_not_measured() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    index = _order(model, torch.randn(2, 4))
    assert [layer.name for layer in index.layers] == ["0", "1", "2"]
    assert [layer.measured for layer in index.layers] == [False, True, True]
    # every layer keeps a fixed slot (so a layer unfrozen later is measured in the same place)
    assert index.names == ["0", "1", "2"]
    assert index.measured_names == ["1", "2"]
    assert index.param_names == ["1.weight", "2.weight", "2.bias"]
    assert index.layer_numel == [0, 16, 10]


def test_layer_that_never_runs_goes_last() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unused = nn.Linear(4, 4)
            self.used = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    index = _order(Branchy(), torch.randn(1, 4))
    assert index.names == ["used", "unused"]
    assert [layer.ran_forward for layer in index.layers] == [True, False]


def test_root_module_owning_parameters() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = nn.Parameter(torch.ones(()))
            self.lin = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.alpha

    index = _order(Scale(), torch.randn(1, 2))
    assert index.names == ["(root)", "lin"]
