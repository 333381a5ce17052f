"""gw.probe: leaves the model untouched, sees functional activations, finds blocks, estimates Jacobians."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.preflight import detect_blocks, estimate_jacobian

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import gpt  # noqa: E402


class Functional(nn.Module):
    """Activations only as functions: F.relu, torch.tanh, Tensor.sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 32)
        self.d = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = torch.tanh(self.b(x))
        x = self.c(x).sigmoid()
        return self.d(x)


def test_model_left_exactly_as_it_was() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2),
    )
    model.train()
    model[5].eval()  # mixed modes must survive too
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    x = torch.randn(32, 8)
    rng = torch.get_rng_state()
    result = gw.probe(model, x)
    assert result.blocks and result.layers
    assert torch.equal(torch.get_rng_state(), rng)  # RNG state
    after = model.state_dict()
    for k, v in weights.items():  # weights and buffers (running stats, num_batches_tracked)
        assert torch.equal(after[k], v), k
    assert [m.training for m in model.modules()] == flags  # train/eval per module
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))  # .grad objects untouched
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_functional_activations_are_covered() -> None:
    torch.manual_seed(0)
    model = Functional()
    with torch.no_grad():
        model.a.bias.fill_(-100.0)  # every ReLU unit dead
        model.b.bias.uniform_(-5.0, 5.0)  # most tanh units driven into their tails
    x = torch.randn(64, 16)
    p = gw.probe(model, x)
    rows = {r.name: r for r in p.layers}
    assert [rows[n].activation for n in "abcd"] == ["relu", "tanh", "sigmoid", None]
    assert rows["a"].dead_fraction == 1.0 and rows["a"].act_mean == 0.0
    assert rows["b"].saturated_fraction > 0.5
    # independent check of the saturation share: |tanh| > sqrt(0.9) <=> tanh' < 0.1
    with torch.no_grad():
        h = torch.tanh(model.b(F.relu(model.a(x))))
    assert rows["b"].saturated_fraction == pytest.approx(float((h.abs() > math.sqrt(0.9)).float().mean()), abs=1e-6)
    found = {f.code: f for f in p.findings}
    assert found["dead_relu"].location["module"] == "a"
    assert found["saturated_activations"].location["module"] == "b"
    assert [r.depth for r in p.layers] == [0, 1, 2, 3]


def test_activation_and_gradient_numbers_per_layer() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    x = torch.randn(32, 10)
    p = gw.probe(model, x, lambda out: out.pow(2).mean())
    h0 = model[0](x)
    h0.retain_grad()
    loss = model[2](torch.tanh(h0)).pow(2).mean()
    loss.backward()
    r0, r1 = p.layers
    assert p.loss == pytest.approx(float(loss.detach()))
    assert r0.out_std == pytest.approx(float(h0.detach().std()), rel=1e-5)
    assert r0.act_std == pytest.approx(float(torch.tanh(h0.detach()).std()), rel=1e-5)
    assert r0.act_grad_norm == pytest.approx(float(h0.grad.norm()), rel=1e-5)
    rms = math.sqrt(sum(float(q.grad.pow(2).sum()) for q in model[0].parameters()) / sum(q.numel() for q in model[0].parameters()))
    assert r0.grad_rms == pytest.approx(rms, rel=1e-5)
    # init audit: nn.Linear default std = 1/sqrt(3 fan_in); Kaiming/Xavier std for tanh
    gain = nn.init.calculate_gain("tanh")
    assert r0.kaiming_std == pytest.approx(gain / math.sqrt(10))
    assert r0.xavier_std == pytest.approx(gain * math.sqrt(2 / 30))
    assert r0.weight_std == pytest.approx(float(model[0].weight.detach().std()), rel=1e-5)


def test_estimator_against_exact_jacobian() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 5))
    x0 = torch.randn(1, 6, dtype=torch.float64)
    net = net.double()
    jac = torch.autograd.functional.jacobian(net, x0).reshape(5, 6)
    s = torch.linalg.svdvals(jac)
    x = x0.clone().requires_grad_(True)
    est = estimate_jacobian(net(x), x, probes=400, power_iters=60, generator=torch.Generator().manual_seed(0))
    exact_mean = float((s**2).sum()) / 5  # tr(JJᵀ)/n_out
    assert abs(est.mean_sq_sv - exact_mean) < 4 * est.mean_sq_sv_se
    assert est.mean_sq_sv_se < 0.1 * exact_mean
    assert est.largest_sv == pytest.approx(float(s[0]), rel=1e-3)
    # exact cases: an orthogonal map and a scaled identity
    q = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))[0]
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    est = estimate_jacobian(x @ q.T, x, probes=4, power_iters=3)
    assert est.mean_sq_sv == pytest.approx(1.0, abs=1e-12) and est.mean_sq_sv_se == pytest.approx(0.0, abs=1e-12)
    assert est.largest_sv == pytest.approx(1.0, abs=1e-9)


def test_blocks_sequential_modulelist_override_and_norm_audit() -> None:
    seq = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert [b.names for b in detect_blocks(seq)] == [["0", "1", "2", "3"], ["4", "5"], ["6"]]
    torch.manual_seed(0)
    pre = gpt(vocab=32, d=32, heads=2, layers=3, seq=16)
    post = gpt(vocab=32, d=32, heads=2, layers=3, seq=16, pre_ln=False)
    idx = torch.randint(0, 32, (2, 16))
    p_pre, p_post = gw.probe(pre, idx), gw.probe(post, idx)
    assert [b.name for b in p_pre.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [b.norm for b in p_pre.blocks] == ["pre"] * 3
    assert [b.norm for b in p_post.blocks] == ["post"] * 3
    assert p_pre.blocks[0].norm_layers == ["blocks.0.ln1", "blocks.0.ln2", "layer_norm"]
    for p in (p_pre, p_post):  # pre-LN residual blocks: gain near 1; predicted ≈ measured
        assert 1 / 1.5 < p.predicted_gain / p.measured_gain < 1.5
    p_one = gw.probe(pre, idx, blocks=["blocks.1"])
    assert [b.name for b in p_one.blocks] == ["blocks.1"]
    assert [b.name for b in gw.probe(pre, idx, blocks=[pre.blocks[2]]).blocks] == ["blocks.2"]
    with pytest.raises(ValueError, match="blocks: 'nope' is not a module"):
        gw.probe(pre, idx, blocks=["nope"])


def test_normalization_silences_a_vanishing_stack() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(64, 64), nn.Sigmoid())])
    normed = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(64, 64), nn.Sigmoid(), nn.LayerNorm(64))])
    x = torch.randn(32, 64)
    p_plain, p_norm = gw.probe(plain, x), gw.probe(normed, x)
    assert {"vanishing_gradients", "missing_normalization"} <= {f.code for f in p_plain.findings}
    assert any("LayerNorm after each nn.Sigmoid" in fix for fix in p_plain.finding("vanishing_gradients").fixes)
    assert not {f.code for f in p_norm.findings} & {"vanishing_gradients", "missing_normalization"}
    assert [b.norm for b in p_norm.blocks] == ["post"] * 12  # LayerNorm after the Linear in each block
    assert 0.3 < p_norm.predicted_gain < 3 and 0.3 < p_norm.measured_gain < 3


def test_init_scale_too_large_and_output_formats() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight.mul_(20.0)
    p = gw.probe(model, torch.randn(16, 32))
    f = p.finding("init_scale_too_large")
    assert f is not None and f.location["module"] == "2" and f.evidence["worst_ratio"] > 3
    data = json.loads(json.dumps(p.to_dict()))
    assert data["layers"][1]["name"] == "2" and data["blocks"][0]["jacobian"]["probes"] == 8
    text = p.table()
    assert "block gain" in text and "predicted end-to-end gradient gain" in text and "init_scale_too_large" in text


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"model": "not a model"}, TypeError, "model must be a torch.nn.Module"),
    ({"batch": 3}, TypeError, "batch must be a tensor"),
    ({"probes": 1}, ValueError, "probes must be an int >= 2"),
    ({"power_iters": -1}, ValueError, "power_iters"),
    ({"loss_fn": lambda out: out}, ValueError, "loss_fn must return a scalar tensor"),
    ({"loss_fn": 5}, TypeError, "loss_fn must be callable"),
])
def test_bad_input(kwargs, exc, match) -> None:
    args = {"model": nn.Linear(3, 3), "batch": torch.randn(4, 3)}
    args.update(kwargs)
    model, batch = args.pop("model"), args.pop("batch")
    with pytest.raises(exc, match=match):
        gw.probe(model, batch, **args)


class KwargsModel(nn.Module):
    """Takes keyword inputs and returns a dict, like Hugging Face models."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.ReLU(inplace=True)) for _ in range(4))
        self.head = nn.Linear(32, 3)

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        x = features * scale
        for layer in self.layers:
            x = layer(x)
        return {"logits": self.head(x), "hidden": x}


def test_inplace_relu_dict_batch_and_dict_output() -> None:
    torch.manual_seed(0)
    model = KwargsModel()
    batch = {"features": torch.randn(16, 32), "scale": 2.0}
    p = gw.probe(model, batch)
    assert [b.name for b in p.blocks] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert all(b.jacobian is not None and b.measured_gain is not None for b in p.blocks)
    first = p.layers[0]
    assert first.activation == "relu" and first.dead_fraction is not None
    # the pre-activation gradient is taken before the in-place ReLU masks it: compare with autograd
    x = batch["features"] * 2.0
    h = model.layers[0][0](x)
    h.retain_grad()
    y = model.layers[0][1](h.clone())
    for layer in model.layers[1:]:
        y = layer(y)
    r = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))  # the probe's default loss, seed 0
    ((model.head(y) * r).sum() / 16).backward()
    assert first.act_grad_norm == pytest.approx(float(h.grad.norm()), rel=1e-5)
    assert first.out_std == pytest.approx(float(h.detach().std()), rel=1e-5)
