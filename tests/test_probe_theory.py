"""gw.probe's measured and predicted numbers against THEORY.md (item 3 of issue 5).

Width 256, medians over a few seeds (single finite-width nets fluctuate), loss
(out·R).sum()/B with a fixed Gaussian R (the probe's default loss).
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import theory

WIDTH = 256
BATCH = 64


def stack(depth: int, act: type[nn.Module] | None, init: str, seed: int, *, bias: bool = True,
          sigma_w2: float | None = None, sigma_b2: float = 0.0) -> nn.Sequential:
    """depth square Linear layers, `act` after all but the last (THEORY.md's setup)."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(WIDTH, WIDTH, bias=bias)
        with torch.no_grad():
            if init == "xavier":
                nn.init.xavier_normal_(lin.weight)
            elif init == "kaiming":
                nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            elif init == "orthogonal":
                nn.init.orthogonal_(lin.weight)
            elif init == "gaussian":
                lin.weight.normal_(0.0, math.sqrt((sigma_w2 or 1.0) / WIDTH))
            # "default": nn.Linear's own kaiming_uniform_(a=√5)
            if bias and init != "default":
                lin.bias.normal_(0.0, math.sqrt(sigma_b2)) if sigma_b2 > 0 else lin.bias.zero_()
        mods.append(lin)
        if act is not None and i < depth - 1:
            mods.append(act())
    return nn.Sequential(*mods)


def run(depth: int, act, init: str, seeds=range(3), **kw) -> list[gw.Probe]:
    out = []
    for seed in seeds:
        model = stack(depth, act, init, seed, **kw)
        x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(100 + seed))
        out.append(gw.probe(model, x))
    return out


def median(values) -> float:
    return statistics.median(list(values))


def codes(p: gw.Probe) -> set[str]:
    return {f.code for f in p.findings}


def test_orthogonal_linear_stack_is_isometric() -> None:
    (p,) = run(24, None, "orthogonal", seeds=[0], bias=False)
    assert len(p.blocks) == 24
    for b in p.blocks:
        assert b.jacobian.mean_sq_sv == pytest.approx(1.0, abs=1e-3)
        assert b.jacobian.largest_sv == pytest.approx(1.0, abs=1e-3)
    assert p.predicted_gain == pytest.approx(1.0, abs=1e-2)
    assert not codes(p) & {"vanishing_gradients", "exploding_gradients"}


def test_gaussian_linear_blocks_are_unit_on_average_but_spread_grows_with_depth() -> None:
    variances = {}
    for depth in (4, 16):
        per_seed = []
        for seed in range(2):
            model = stack(depth, None, "gaussian", seed, bias=False)
            p = gw.probe(model, torch.randn(8, WIDTH), end_to_end=True, probes=16)
            for b, layer in zip(p.blocks, model):
                exact = float(layer.weight.detach().double().pow(2).sum()) / WIDTH  # tr(WᵀW)/n
                assert abs(b.jacobian.mean_sq_sv - exact) < 4 * b.jacobian.mean_sq_sv_se + 1e-6
                assert b.jacobian.mean_sq_sv == pytest.approx(1.0, abs=0.05)
            w = torch.eye(WIDTH, dtype=torch.float64)
            for layer in model:
                w = layer.weight.detach().double() @ w
            s2 = torch.linalg.svdvals(w) ** 2
            assert p.end_to_end.mean_sq_sv == pytest.approx(float(s2.mean()), rel=0.1)
            assert p.end_to_end.sq_sv_var == pytest.approx(float(s2.var(unbiased=False)), rel=0.2)
            per_seed.append(p.end_to_end.sq_sv_var)
        variances[depth] = median(per_seed)
        assert 0.8 * depth < variances[depth] < 1.5 * depth  # THEORY.md: Var(s²) ≈ L
    assert 3.0 < variances[16] / variances[4] < 6.0  # linear growth with depth


def test_sigmoid_xavier_and_default_vanish() -> None:
    xavier = run(10, nn.Sigmoid, "xavier")
    assert median(p.per_layer_factor for p in xavier) == pytest.approx(0.233, rel=0.03)
    assert median(p.theory_factor for p in xavier) == pytest.approx(0.236, rel=0.02)
    assert 1.0e-6 < median(p.layer_gain for p in xavier) < 4.0e-6  # THEORY.md: 2.0e-6
    default = run(10, nn.Sigmoid, "default")
    assert median(p.per_layer_factor for p in default) == pytest.approx(0.1405, rel=0.05)
    for p in xavier + default:
        f = p.finding("vanishing_gradients")
        assert f is not None and f.severity == "error"
        assert f.evidence["effective_per_layer_gain"] < 0.3


@pytest.mark.parametrize("init,expected", [("kaiming", 1.0), ("xavier", 1 / math.sqrt(2)), ("default", 1 / math.sqrt(6))])
def test_relu_per_layer_factor(init: str, expected: float) -> None:
    probes = run(10, nn.ReLU, init)
    assert median(p.per_layer_factor for p in probes) == pytest.approx(expected, rel=0.05)
    assert median(p.theory_factor for p in probes) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("sigma_w2,code", [(1.0, "vanishing_gradients"), (4.0, "exploding_gradients")])
def test_tanh_per_layer_factor_matches_mean_field(sigma_w2: float, code: str) -> None:
    target = math.sqrt(theory.chi1("tanh", sigma_w2, 0.05))  # 0.871 (χ1 = 0.759) and 1.158 (χ1 = 1.342)
    probes = run(20, nn.Tanh, "gaussian", sigma_w2=sigma_w2, sigma_b2=0.05)
    burned_in = []
    for p in probes:
        factors = [r.backward_factor for r in p.layers[6:]]  # after burn-in of the length map
        burned_in.append(math.exp(statistics.mean(math.log(f) for f in factors)))
        assert code in codes(p)
    assert median(burned_in) == pytest.approx(target, rel=0.05)


@pytest.mark.parametrize("depth", [5, 10, 20])
@pytest.mark.parametrize("act,init,kw", [
    (nn.ReLU, "xavier", {}),
    (nn.Tanh, "gaussian", {"sigma_w2": 1.0, "sigma_b2": 0.05}),
])
def test_predicted_gain_agrees_with_measured(depth: int, act, init: str, kw) -> None:
    (p,) = run(depth, act, init, seeds=[depth], **kw)
    ratio = p.predicted_gain / p.measured_gain
    assert 1 / 3 < ratio < 3
    # and with the layer-level first/last activation-gradient ratio ||∂L/∂h_1|| / ||∂L/∂h_L||
    assert 1 / 3 < p.predicted_gain / p.layer_gain < 3


def test_linear_default_init_attenuates_by_one_over_sqrt3() -> None:
    probes = run(10, None, "default")  # Var(W) = 1/(3·fan_in)
    assert median(p.per_layer_factor for p in probes) == pytest.approx(math.sqrt(1 / 3), rel=0.03)
    assert median(p.layer_gain for p in probes) == pytest.approx(0.00713, rel=0.3)  # THEORY.md act ratio
    assert all(p.finding("vanishing_gradients") is not None for p in probes)


@pytest.mark.parametrize("init,per_relu", [("gaussian", 2.0), ("orthogonal", 1.0)])
def test_relu_is_never_isometric(init: str, per_relu: float) -> None:
    """THEORY.md: at σw² = 2 the variance of the squared singular values grows ≈ 2 per ReLU
    layer with Gaussian weights and ≈ 1 with orthogonal ones (normalized by the mean²)."""
    depth, spreads = 8, []
    for seed in range(2):
        model = stack(depth, nn.ReLU, "gaussian", seed, bias=False, sigma_w2=2.0)
        if init == "orthogonal":
            for layer in model:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, gain=math.sqrt(2))
        e = gw.probe(model, torch.randn(8, WIDTH), end_to_end=True, probes=16).end_to_end
        spreads.append(e.sq_sv_var / e.mean_sq_sv**2)
    assert 0.6 * per_relu * (depth - 1) < median(spreads) < 1.5 * per_relu * (depth - 1)
