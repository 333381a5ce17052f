"""Lightning's own clipping (Trainer(gradient_clip_val=...)) is recorded: threshold, clipped flag, clip_coef."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pl = pytest.importorskip("lightning.pytorch")

from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

STEPS, LR, CLIP = 4, 0.05, 0.5


class Big(pl.LightningModule):
    """Targets far from the outputs: global gradient norms of several units, so 0.5 clips every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * 8, 4, generator=g)
    return x, 5.0 + x.sum(1, keepdim=True)


def _fit(algorithm: str):
    x, y = _data()
    module = Big()
    start = copy.deepcopy(module.net)
    cb = GradwatchCallback()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    trainer = pl.Trainer(max_steps=STEPS, gradient_clip_val=CLIP, gradient_clip_algorithm=algorithm, callbacks=[cb],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader)
    return start, module, cb.watch.history, x, y


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_lightning_clipping_recorded_and_applied_once(algorithm):
    start, module, records, x, y = _fit(algorithm)
    # the hand-written loop: the same model, torch's own clipping, SGD
    net = start
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    coefs, peaks = [], []
    for i in range(STEPS):
        opt.zero_grad()
        F.mse_loss(net(x[i * 8:(i + 1) * 8]), y[i * 8:(i + 1) * 8]).backward()
        peaks.append(max(p.grad.abs().max().item() for p in net.parameters()))
        if algorithm == "norm":
            total = torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            coefs.append(min(1.0, CLIP / (total.item() + 1e-6)))
        else:
            torch.nn.utils.clip_grad_value_(net.parameters(), CLIP)
        opt.step()
    assert len(records) == STEPS
    assert all(r.clip_threshold == CLIP for r in records)
    assert all(r.clipped for r in records) and all(p > CLIP for p in peaks)  # 0.5 clips every step
    assert min(r.grad_norm for r in records) > 1.0
    if algorithm == "norm":
        assert [r.clip_coef for r in records] == pytest.approx(coefs, rel=1e-5)
    # Lightning clipped once (gradwatch recorded, applied nothing): the weights match the plain loop
    for a, b in zip(module.net.parameters(), net.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
