"""Rollback's memory: where the snapshot lives, and the size it logs against the bytes it holds."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.nonfinite.rollback import Rollback, _copy, estimate_snapshot_bytes


class Tied(nn.Module):
    """An embedding tied to the output layer, and a BatchNorm (buffers: running stats, an int64 counter)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.norm = nn.BatchNorm1d(16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.norm(self.emb(tokens)))))


def _held_bytes(state) -> int:
    """Sum of nbytes of the distinct storages in a snapshot (a plain walk, independent of the code)."""
    storages = {}

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(state)
    return sum(storages.values())


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2),
    "rmsprop_centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5),
    "nadam": lambda p: torch.optim.NAdam(p, lr=1e-3),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_estimate_before_the_first_step_is_the_bytes_the_snapshot_holds(name: str) -> None:
    torch.manual_seed(0)
    model = Tied()
    opt = OPTIMIZERS[name](model.parameters())
    estimate = estimate_snapshot_bytes(model, opt)  # no optimizer state yet: from the optimizer's kind
    assert not estimate.exact or name == "sgd"
    tokens = torch.randint(0, 50, (8,))
    for _ in range(2):
        F.cross_entropy(model(tokens), tokens).backward()
        opt.step()
        opt.zero_grad()
    keeper = Rollback(model, opt)
    keeper.snapshot(2)
    state = keeper.state_dict()
    assert estimate.total == _held_bytes([state["model"], state["optimizer"]]) == keeper.nbytes
    # the tied weight is counted and copied once
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    assert estimate.weights == param_bytes + buffer_bytes
    exact = estimate_snapshot_bytes(model, opt)  # after the steps the state exists: counted exactly
    assert (exact.exact or name == "sgd") and exact.total == estimate.total


def test_rollback_mode_logs_the_size_once(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(256, 256)
    opt = torch.optim.Adam(model.parameters())
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        watch = gw.Watch(model, opt, on_nonfinite="rollback")
        for _ in range(3):
            watch.step(lambda: model(torch.randn(4, 256)).pow(2).mean())
    lines = [r.getMessage() for r in caplog.records if "keeps a snapshot" in r.getMessage()]
    assert len(lines) == 1
    mib = (256 * 257 * 4 * 3 + 2 * 4) / 2**20  # weights + two Adam moments + two step scalars
    assert f"{mib:.1f} MiB" in lines[0] and "on the cpu" in lines[0]
    watch.close()


def test_no_log_without_rollback(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        gw.Watch(model, torch.optim.Adam(model.parameters())).close()
    assert not [r for r in caplog.records if "keeps a snapshot" in r.getMessage()]


def test_rollback_device_params_keeps_each_copy_on_its_own_device() -> None:
    on_meta = {"w": torch.empty(3, device="meta"), "n": 1}
    assert _copy(on_meta, "params")["w"].device.type == "meta"
    w = torch.ones(3)
    copied = _copy({"w": w}, "params")["w"]
    assert copied.device == w.device and copied.data_ptr() != w.data_ptr()


def test_rollback_device_params_restores_like_cpu() -> None:
    results = []
    for device in (None, "params"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        watch = gw.Watch(model, opt, on_nonfinite="rollback",
                         nonfinite=gw.NonFiniteConfig(rollback_every=2, rollback_device=device))
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        for step in range(6):
            bad = step == 4
            watch.step(lambda: F.mse_loss(model(x), y) * (float("nan") if bad else 1.0))
        results.append([p.detach().clone() for p in model.parameters()])
        assert [f.evidence.get("action") for f in watch.findings if f.severity == "error"][:1] == ["rollback"]
        watch.close()
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["cuda", "gpu", 0])
def test_rollback_device_is_checked(bad) -> None:
    with pytest.raises(ValueError, match="rollback_device"):
        gw.NonFiniteConfig(rollback_device=bad)


def test_rollback_device_needs_rollback_mode() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="rollback_device"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), nonfinite=gw.NonFiniteConfig(rollback_device="cpu"))
