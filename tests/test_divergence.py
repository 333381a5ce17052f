"""Divergence caught early (issue 17 items 2 and 3): lr_too_high from a climbing loss, exploding_gradients
through time from finite-but-huge RNN gradients, and no false alarms on healthy real models.

benchmarks/divergence.py runs the full table (150 steps a healthy run, more models and learning rates).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.diagnosis.rules import LrRule
from gradwatch.diagnosis.trend import TREND_WINDOW, LossTrend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import divergence as bench  # noqa: E402

OURS = bench.CODES


@pytest.fixture(autouse=True)
def _quiet_log():
    logging.getLogger("gradwatch").setLevel(logging.ERROR + 10)
    yield
    logging.getLogger("gradwatch").setLevel(logging.NOTSET)


# ----- the loss trend, by hand ----------------------------------------------------------------
def _records(losses):
    return [SimpleNamespace(update_ratio=None, finite=math.isfinite(v), layer_names=["a"], grad_norm=1.0, loss=v,
                            skipped=False) for v in losses]


def _run_lr_rule(losses, lr=1.0):
    rule, found, history = LrRule(), [], []
    for step, record in enumerate(_records(losses), 1):
        history.append(record)
        found += rule.check(SimpleNamespace(record=record, step=step, history=history), lambda: lr)
    return found


def test_a_loss_that_climbs_over_a_window_is_lr_too_high_once_with_its_evidence():
    """GPT-2's climb at lr 1.0 (no single 10x jump, norm flat): one finding, on the first full window."""
    losses = [4.6, 8.0, 12.0, 15.0, 19.0, 24.0, 30.0, 38.0, 45.0, 52.0] + [60.0 + (k % 3) for k in range(40)]
    (finding,) = _run_lr_rule(losses)
    assert finding.code == "lr_too_high" and finding.severity == "error"
    # the first full window (steps 1-8) sets the level, median 17; at step 14 the median of steps
    # 7-14 is (52 + 60) / 2 = 56 >= 3 x 17 (step 13: 48.5), and above it by 39 >= 0.25 x 4.6
    assert finding.step == 14
    ev = finding.evidence
    assert ev["signal"] == "loss_trend" and ev["loss_window"] == TREND_WINDOW
    assert ev["losses"] == losses[6:14] and ev["loss_best"] == 17.0
    assert ev["loss_recent_median"] == pytest.approx(56.0) and ev["lr"] == 1.0
    assert ev["update_ratio_medians"] == []  # none measured in this run: the key is there, empty
    assert finding.fixes[0] == "lower lr from 1 to 0.1"


@pytest.mark.parametrize("case", ["noisy_flat", "converging", "brief_rise", "converged_drift", "warmup_bump",
                                  "negative", "lucky_first_batch"])
def test_the_loss_trend_stays_quiet_on_healthy_shapes(case):
    rng = np.random.default_rng(0)
    steps = np.arange(200)
    if case == "noisy_flat":  # random tokens: ln(100) with batch noise
        losses = 4.6 + 0.3 * rng.standard_normal(200)
    elif case == "converging":  # minibatch noise, decaying to 0.01, batches 5x apart
        losses = (2.3 * np.exp(-steps / 20) + 0.01) * np.exp(0.8 * rng.standard_normal(200))
    elif case == "brief_rise":  # 3 steps at 5x, then back
        losses = 2.0 * np.exp(-steps / 100)
        losses[60:63] *= 5
    elif case == "converged_drift":  # converged at 0.01, drifting to 0.03: tripled, but by 1% of the first loss
        losses = np.concatenate([2.3 * np.exp(-steps[:100] / 10) + 0.01, np.linspace(0.01, 0.03, 100)])
    elif case == "warmup_bump":  # the loss rises 40% during warm-up, then falls
        losses = 2.3 + 0.9 * np.sin(np.minimum(steps, 30) / 30 * np.pi) - 0.005 * steps
    elif case == "negative":  # an ELBO-like loss below zero, falling
        losses = -10.0 - 0.05 * steps + 0.5 * rng.standard_normal(200)
    else:  # regression on noisy targets, batch 8: the loss of each batch spreads 0.2-1.6; step 1 at 0.26
        losses = rng.chisquare(8, 200) / 8
        losses[0] = 0.26
    trend = LossTrend()
    assert not any(trend.observe(float(v)) for v in losses)
    assert not _run_lr_rule([float(v) for v in losses])


def test_non_finite_losses_never_enter_the_window():
    trend = LossTrend()
    for v in [4.6, math.nan, 4.5, math.inf, 4.4] * 4:
        assert not trend.observe(v)
    assert all(math.isfinite(v) for v in trend.losses())


def test_lr_rule_state_round_trips_through_the_watch_state():
    """The trend window and the update-ratio medians survive Watch.state_dict / load_state_dict."""
    model = nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for _ in range(12):
        watch.step(lambda: ((model(x) - y) ** 2).mean())
    state = watch.state_dict()
    watch.close()
    fresh = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    fresh.load_state_dict(state)
    old = next(p for p in watch.plugins if p.name == "diagnosis").lr_rule
    new = next(p for p in fresh.plugins if p.name == "diagnosis").lr_rule
    assert new.trend.losses() == old.trend.losses() and new.trend.best == old.trend.best
    assert new.ratio.medians == old.ratio.medians and len(new.ratio.medians) == 3
    fresh.close()


# ----- GPT-2 at lr 1.0 ------------------------------------------------------------------------------
def test_gpt2_adam_at_lr_1_is_lr_too_high_within_20_steps():
    watch, losses = bench.lm_run("gpt2", "adam", 1.0, steps=20)
    found = [f for f in watch.findings if f.code == "lr_too_high"]
    assert len(found) == 1 and found[0].step <= 20  # once per episode
    ev = found[0].evidence
    assert ev["lr"] == 1.0 and found[0].fixes[0] == "lower lr from 1 to 0.1"
    assert ev["losses"] and ev["update_ratio_medians"] and ev["update_ratio_medians"][-1] > 0.1
    assert losses[-1] > 10 * losses[0]  # it did diverge
    # (the loss-trend signal alone cannot fire here: the climb starts on step 2, inside the first
    # window that sets the starting level; the update ratio names it on step 3)


# ----- healthy runs: no false alarms ---------------------------------------------------------------
@pytest.mark.parametrize("model,opt,lr,steps", [
    ("gpt2", "adam", 1e-3, 60), ("llama", "adam", 3e-4, 60), ("bert", "adam", 1e-3, 50),
    ("lstm", "adam", 1e-3, 80), ("mlp-digits", "sgd", 0.05, 150), ("mlp-digits", "adam", 1e-3, 150),
])
def test_healthy_runs_raise_none_of_the_divergence_codes(model, opt, lr, steps):
    row = bench.measure(model, opt, lr, steps, diverging=False)
    assert row.false_alarms == 0 and row.first is None
    assert row.trend is None
    assert row.loss_end < row.loss_start * (1.01 if model == "bert" else 1.0)  # it trained (BERT: its masked loss barely moves in 50 steps)


# ----- finite-but-huge gradients: exploding_gradients through time ---------------------------------
class RnnRegressor(nn.Module):
    """A vanilla RNN over (B, T, 8) and a Linear head on the last hidden state."""

    def __init__(self, nonlinearity: str, scale: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(8, 32, nonlinearity=nonlinearity, batch_first=True)
        self.head = nn.Linear(32, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])  # (B, 1)


def _float64_norms(model: nn.Module, loss_fn) -> tuple[float, dict[str, float]]:
    """The reference: the same gradients' norms in float64, per module and global."""
    model.zero_grad()
    loss_fn().backward()
    per = {}
    for name, module in (("rnn", model.rnn), ("head", model.head)):
        grads = [p.grad.double().reshape(-1) for p in module.parameters()]
        per[name] = float(torch.linalg.vector_norm(torch.cat(grads)))
    total = float(torch.linalg.vector_norm(torch.tensor(list(per.values()), dtype=torch.float64)))
    model.zero_grad()
    return total, per


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_an_rnn_with_a_large_recurrent_weight_is_exploding_gradients_with_exact_finite_norms(opt_name):
    torch.manual_seed(0)
    model = RnnRegressor("relu", 4.0)
    x, y = torch.randn(16, 30, 8), torch.randn(16, 1)

    def loss_fn():
        return ((model(x) - y) ** 2).mean()

    ref_total, ref_layers = _float64_norms(model, loss_fn)
    assert 1e16 < ref_total < 1e20  # ~1e18: every entry finite in float32; their squares (1e36) near its max
    opt = torch.optim.SGD(model.parameters(), lr=1e-3) if opt_name == "sgd" else torch.optim.Adam(model.parameters(), 1e-3)
    watch = gw.Watch(model, opt)
    watch.step(loss_fn)
    record = watch.history[-1]
    assert record.finite and math.isfinite(record.grad_norm)
    assert record.grad_norm == pytest.approx(ref_total, rel=1e-6)  # float32 precision of the same sum
    layers = dict(zip(record.layer_names, record.layer_grad_norms.tolist()))
    for name, ref in ref_layers.items():
        assert layers[name] == pytest.approx(ref, rel=1e-6)
    for _ in range(4 if opt_name == "adam" else 0):  # Adam's steps stay bounded: the gradients stay huge and finite
        watch.step(loss_fn)
    watch.close()
    codes = [f.code for f in watch.findings]
    (finding,) = [f for f in watch.findings if f.code == "exploding_gradients"]  # once per episode
    assert finding.step == 1 and finding.evidence["recurrent_weight"] == "rnn.weight_hh_l0"
    assert "rnn.weight_hh_l0" in finding.message and "recurrent weight" in finding.message
    rho = float(torch.linalg.eigvals(_initial(4.0).double()).abs().max())  # the init's, read before the update
    assert finding.evidence["spectral_radius"]["rnn.weight_hh_l0"] == pytest.approx(rho, rel=1e-3) and rho > 2
    assert any("nn.init.orthogonal_(rnn.weight_hh_l0)" in fix for fix in finding.fixes)
    assert any("clip_norm=1.0" in fix for fix in finding.fixes)
    assert not any("kaiming" in fix.lower() for fix in finding.fixes)
    assert "init_scale_too_large" not in [c for f, c in zip(watch.findings, codes) if f.step == 1]
    if opt_name == "adam":  # no step went non-finite: no NaN verdict at all
        assert not any(c.startswith("nonfinite") or c == "init_scale_too_large" for c in codes), codes
    assert not any("non-deterministic" in f.message for f in watch.findings)


def _initial(scale: float) -> torch.Tensor:
    """weight_hh of RnnRegressor('relu', scale) as seeded in the test, before any update."""
    torch.manual_seed(0)
    return RnnRegressor("relu", scale).rnn.weight_hh_l0.detach()


def test_a_healthy_vanilla_rnn_and_a_huge_mlp_are_not_through_time_findings():
    """Default-init RNN (rho ~0.6): quiet. A huge first norm without a recurrent weight: still init_scale_too_large."""
    torch.manual_seed(0)
    model = RnnRegressor("tanh", 1.0)
    x, y = torch.randn(16, 30, 8), torch.randn(16, 1)
    watch = gw.Watch(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    for _ in range(30):
        watch.step(lambda: ((model(x) - y) ** 2).mean())
    watch.close()
    assert not [f for f in watch.findings if f.code in OURS]
    mlp = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        mlp[0].weight.mul_(1e4)
    watch = gw.Watch(mlp, torch.optim.SGD(mlp.parameters(), lr=1e-9))
    watch.step(lambda: ((mlp(x[:, 0]) - y) ** 2).mean())
    watch.close()
    assert [f.code for f in watch.findings if f.code in OURS] == ["init_scale_too_large"]
