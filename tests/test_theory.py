"""gw.theory against THEORY.md's mean-field tables and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch import theory

# THEORY.md, "Mean field": tanh with σb² = 0.05.
TANH_TABLE = [  # (σw², q*, χ1)
    (1.0, 0.194, 0.759),
    (1.5, 0.418, 0.939),
    (1.761, 0.570, 1.0),
    (2.0, 0.722, 1.048),
    (2.5, 1.064, 1.134),
    (4.0, 2.196, 1.342),
]


@pytest.mark.parametrize("sigma_w2,q_star,chi", TANH_TABLE)
def test_tanh_table(sigma_w2: float, q_star: float, chi: float) -> None:
    mf = theory.mean_field("tanh", sigma_w2, 0.05)
    assert mf.q_star == pytest.approx(q_star, abs=2e-3)
    assert mf.chi1 == pytest.approx(chi, abs=2e-3)
    assert mf.per_layer_gain == pytest.approx(math.sqrt(mf.chi1))


def test_tanh_critical_point_and_regimes() -> None:
    crit = theory.critical_sigma_w2("tanh", sigma_b2=0.05)
    assert abs(crit - 1.761) <= 0.005
    assert theory.chi1("tanh", crit, 0.05) == pytest.approx(1.0, abs=1e-5)
    assert theory.mean_field("tanh", 1.0, 0.05).regime == "ordered"  # χ1 ≈ 0.76: vanishing
    assert theory.mean_field("tanh", 4.0, 0.05).regime == "chaotic"  # χ1 ≈ 1.34: exploding
    # σb = 0: tanh is critical at σw² = 1 (q* = 0, φ'(0) = 1); gain 5/3 is mildly chaotic.
    assert theory.critical_sigma_w2("tanh", 0.0) == pytest.approx(1.0, abs=1e-3)
    assert theory.chi1("tanh", 25 / 9) == pytest.approx(1.21, abs=0.01)


def test_sigmoid_xavier_and_default() -> None:
    assert theory.chi1("sigmoid", 1.0) == pytest.approx(0.0557, abs=5e-4)
    assert math.sqrt(theory.chi1("sigmoid", 1.0)) == pytest.approx(0.236, abs=1e-3)
    # nn.Linear default: Var(W) = Var(b) = 1/(3·fan_in); at width 256 the per-layer factor is 0.1405.
    assert theory.mean_field("sigmoid", 1 / 3, 1 / (3 * 256)).per_layer_gain == pytest.approx(0.1405, abs=2e-3)


@pytest.mark.parametrize("sigma_w2", [0.5, 1.0, 2.0, 3.0])
def test_relu_closed_form(sigma_w2: float) -> None:
    mf = theory.mean_field("relu", sigma_w2)
    assert mf.chi1 == sigma_w2 / 2  # exact
    # quadrature through an arbitrary callable agrees with the closed form (ReLU' is a step: looser)
    assert theory.chi1(torch.relu, sigma_w2, 0.1) == pytest.approx(sigma_w2 / 2, rel=1e-2)
    assert theory.critical_sigma_w2("relu") == 2.0
    assert theory.critical_sigma_w2("leaky_relu", negative_slope=0.2) == pytest.approx(2 / 1.04)
    assert theory.fixed_point("relu", 1.0, 0.1) == pytest.approx(0.2)  # q = q/2 + 0.1


def test_gauss_hermite_matches_monte_carlo() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal(2_000_000)
    q = 0.7
    m2, d2 = theory.gaussian_moments(torch.tanh, q)
    assert m2 == pytest.approx(np.mean(np.tanh(math.sqrt(q) * z) ** 2), rel=3e-3)
    assert d2 == pytest.approx(np.mean((1 - np.tanh(math.sqrt(q) * z) ** 2) ** 2), rel=3e-3)
    # linear: χ1 = σw² exactly; local χ at q equals χ1 at the fixed point
    assert theory.chi1("linear", 0.8) == pytest.approx(0.8)
    mf = theory.mean_field("tanh", 2.5, 0.05)
    assert theory.local_chi("tanh", 2.5, mf.q_star) == pytest.approx(mf.chi1, rel=1e-9)


def test_depth_scale() -> None:
    assert theory.depth_scale(math.exp(-0.25)) == pytest.approx(4.0)
    assert theory.depth_scale(1.0) == math.inf
    mf = theory.mean_field("tanh", 1.0, 0.05)
    assert mf.depth_scale == pytest.approx(-1 / math.log(0.759), rel=5e-3)
    assert theory.mean_field("relu", 2.0).regime == "critical"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: theory.mean_field("tanh", -1.0), "sigma_w2"),
        (lambda: theory.mean_field("tanh", 1.0, -0.1), "sigma_b2"),
        (lambda: theory.mean_field("tanh", 1.0, nodes=50), "nodes"),
        (lambda: theory.mean_field("swish2", 1.0), "unknown activation"),
        (lambda: theory.critical_sigma_w2("linear", 0.0) and theory.depth_scale(0.0), "chi"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
