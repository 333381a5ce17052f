"""False-positive controls: healthy models trained 100+ steps raise no warning or error finding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models import GPT  # noqa: E402  (the shared pre-LN GPT-style model)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    return x, torch.tensor(data.target)


class ResidualMLP(nn.Module):
    def __init__(self, width: int = 64, blocks: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(blocks)
        )
        self.out = nn.Linear(width, 10)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = x + block(x)  # (B, width)
        return self.out(x)


class BatchNormCNN(nn.Module):
    def __init__(self, channels: int = 16, layers: int = 4) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c_in = 1
        for _ in range(layers):
            mods += [nn.Conv2d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
            c_in = channels
        self.features = nn.Sequential(*mods)
        self.head = nn.Linear(channels * 64, 10)

    def forward(self, x):
        return self.head(self.features(x.view(-1, 1, 8, 8)).flatten(1))  # (B, 1, 8, 8) -> (B, 10)


def _quiet(watch: gw.Watch) -> None:
    loud = [str(f) for f in watch.findings if f.severity in ("warning", "error")]
    assert loud == [], loud


@pytest.mark.slow
@pytest.mark.parametrize("name, make, opt", [
    ("residual", ResidualMLP, "sgd"),
    ("bn-cnn", BatchNormCNN, "adamw"),
])
def test_healthy_digits_models_are_quiet(digits, name, make, opt):
    x_all, y_all = digits
    model = make()
    optimizer = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=2e-3))
    watch = gw.Watch(model, optimizer, clip_norm=1.0, diagnosis=gw.DiagnosisConfig(sample_every=50))
    g = torch.Generator().manual_seed(1)
    for _ in range(120):
        idx = torch.randint(0, len(x_all), (64,), generator=g)
        x, y = x_all[idx], y_all[idx]
        watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y))
    watch.close()
    _quiet(watch)
    assert watch.history[-1].loss < 0.7  # it trained
    assert len([p for p in watch.plugins if p.name == "diagnosis"]) == 1


@pytest.mark.slow
def test_pre_ln_transformer_is_quiet():
    vocab, seq = 32, 16
    model = GPT(vocab=vocab, d=32, heads=2, layers=4, seq=seq, pre_ln=True)
    watch = gw.Watch(model, torch.optim.AdamW(model.parameters(), lr=3e-3), clip_norm=1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(110):
        start = torch.randint(0, vocab, (16, 1), generator=g)
        idx = (start + torch.arange(seq + 1)) % vocab  # next token = token + 1: learnable
        x, y = idx[:, :-1], idx[:, 1:]
        watch.step(lambda: F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1)))
    watch.close()
    _quiet(watch)
    assert watch.history[-1].loss < 0.5 * watch.history[0].loss
