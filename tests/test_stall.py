"""No silent runs: training_stalled after K skipped steps in a row, and fp16 forward overflow named."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw


def _codes(watch):
    return [(f.step, f.code) for f in watch.findings]


def test_k_consecutive_skipped_steps_raise_training_stalled_once_per_streak():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), diagnose=False,
                     diagnosis=gw.DiagnosisConfig(stall_after=4))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    bad = set(range(3, 9)) | set(range(10, 13)) | set(range(14, 20))  # streaks of 6, 3, 6 skipped steps
    for step in range(1, 21):
        poison = float("nan") if step in bad else 0.0
        watch.step(lambda: F.mse_loss(model(x), y) + poison, batch=(x, y))
    stalls = [f for f in watch.findings if f.code == "training_stalled"]
    assert [f.step for f in stalls] == [6, 17]  # the 4th skipped step of each streak of >= 4; the 3-streak is quiet
    assert stalls[0].severity == "error" and stalls[0].evidence == {
        "consecutive_skipped": 4, "reasons": {"nonfinite": 4}, "loss_scale": None, "lr": 0.1}
    assert "last 4 steps" in stalls[0].message and "since step 2" in stalls[0].message
    assert "training_stalled" in gw.findings.CODES
    watch.close()


def test_a_healthy_run_never_stalls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), diagnosis=gw.DiagnosisConfig(stall_after=2))
    for _ in range(30):
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        watch.step(lambda: F.mse_loss(model(x), y))
    assert not watch.findings
    watch.close()


class _Amplifies(nn.Module):
    """Activations ~5e4-1e5 after `fc`: finite in float32, beyond float16's 65504."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.gain = nn.Linear(32, 32)
        self.out = nn.Linear(32, 1)
        with torch.no_grad():
            self.gain.weight.copy_(torch.eye(32) * 4e3)

    def forward(self, x):
        return self.out(self.gain(self.fc(x)))


def test_fp16_forward_overflow_is_named_and_the_run_is_not_silent():
    torch.manual_seed(0)
    model = _Amplifies()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=1e-4), precision="fp16")
    x, y = torch.randn(16, 8) * 30, torch.randn(16, 1)
    with torch.no_grad():  # the premise: finite in float32, not in float16
        assert torch.isfinite(model(x)).all()
        with torch.autocast("cpu", dtype=torch.float16):
            assert not torch.isfinite(model(x)).all()
    results = [watch.step(lambda: F.mse_loss(model(x).float(), y), batch=(x, y)) for _ in range(10)]
    watch.close()
    assert all(r.skipped for r in results)
    first = watch.findings[0]
    assert (first.step, first.code, first.severity) == (1, "fp16_overflow", "error")
    assert first.location["module"] == "gain" and first.evidence["localization"]["dtype"] == "float16"
    assert "precision='bf16'" in first.fixes[0]
    assert (8, "training_stalled") in _codes(watch)
    stalled = next(f for f in watch.findings if f.code == "training_stalled")
    assert any("bf16" in fix for fix in stalled.fixes)
