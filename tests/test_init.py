"""gradwatch.init: gains from the following nonlinearity, Linear and ConvNd, LSUV, and fixes that work."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import init


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(128, 128)
        self.b = nn.Linear(128, 128)
        self.c = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(F.leaky_relu(self.a(x), 0.2))))


def test_kaiming_gains_follow_the_nonlinearity() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.Dropout(0.1), nn.Tanh(),
        nn.Linear(256, 256), nn.LeakyReLU(0.2), nn.Linear(256, 256), nn.Sigmoid(), nn.Linear(256, 10),
    )
    report = init.kaiming_(model)
    expected = [("relu", None), ("tanh", None), ("leaky_relu", 0.2), ("sigmoid", None), ("linear", None)]
    assert [c.nonlinearity for c in report.layers] == [e[0] for e in expected]
    for change, (name, param), layer in zip(report.layers, expected, [m for m in model if isinstance(m, nn.Linear)]):
        gain = nn.init.calculate_gain(name, param)
        assert change.gain == pytest.approx(gain)
        assert change.source == "structure" and change.bias_zeroed
        assert float(layer.weight.detach().std()) == pytest.approx(gain / math.sqrt(256), rel=0.03)
        assert change.std_after == pytest.approx(float(layer.weight.detach().double().std()))
        assert torch.count_nonzero(layer.bias) == 0
    assert "kaiming_: 5 layer(s)" in str(report) and report.to_dict()["layers"][0]["gain"] == pytest.approx(math.sqrt(2))


def test_functional_activations_need_a_batch() -> None:
    torch.manual_seed(0)
    model = FunctionalNet()
    assert [c.nonlinearity for c in init.xavier_(model).layers] == ["linear"] * 3  # nothing to read without a batch
    report = init.xavier_(model, torch.randn(8, 128))
    assert [(c.nonlinearity, c.source) for c in report.layers] == [
        ("leaky_relu", "traced"), ("tanh", "traced"), ("linear", "traced")]
    gain = nn.init.calculate_gain("leaky_relu", 0.2)
    assert report.layers[0].gain == pytest.approx(gain)
    assert float(model.a.weight.detach().std()) == pytest.approx(gain * math.sqrt(2 / 256), rel=0.03)


def test_conv_layers_and_orthogonal() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.Tanh(), nn.Conv1d(1, 1, 1))
    report = init.kaiming_(model)
    assert float(model[0].weight.detach().std()) == pytest.approx(math.sqrt(2) / math.sqrt(27), rel=0.05)  # fan_in = 3·3·3
    assert report.layers[1].nonlinearity == "tanh"
    report = init.orthogonal_(model)
    flat = model[2].weight.detach().reshape(64, -1)  # (64, 576): rows orthonormal times the gain 5/3
    assert torch.allclose(torch.linalg.svdvals(flat), torch.full((64,), 5 / 3), atol=1e-4)
    assert report.method == "orthogonal_"


def test_critical_gain_uses_the_mean_field_edge_of_chaos() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    report = init.orthogonal_(model, gain="critical")
    assert [round(c.gain, 3) for c in report.layers] == [1.0, round(math.sqrt(2), 3), 1.0]  # tanh σb=0: σw² = 1
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, math.sqrt(0.05), generator=torch.Generator().manual_seed(0))
    kept = init.kaiming_(model, gain="critical", bias="keep").layers[0]
    sb2 = float(model[0].bias.detach().double().pow(2).mean())
    assert kept.gain == pytest.approx(math.sqrt(gw.theory.critical_sigma_w2("tanh", sb2)), rel=1e-4)
    assert 1.5 < kept.gain**2 < 2.1  # ≈ 1.761 at σb² = 0.05


def _output_vars(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    found: dict[str, float] = {}
    def hook(name: str):
        def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
            found.setdefault(name, float(output.double().var()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_lsuv_gives_unit_output_variance(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 100), nn.Tanh(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
        x = torch.randn(128, 64) * 3 + 1
    else:
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                              nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
        x = torch.randn(32, 3, 12, 12)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    report = init.lsuv_(model, x)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in buffers.items())  # BatchNorm statistics untouched
    measured = _output_vars(model, x)  # in train mode, as LSUV measured (BatchNorm on batch statistics)
    assert set(measured) == {c.name for c in report.layers}
    for change in report.layers:
        assert abs(measured[change.name] - 1.0) < 0.1  # the 1 ± 0.1
        assert change.out_var == pytest.approx(measured[change.name], rel=1e-4)
        assert 0 <= change.iterations <= 10
    assert any(c.iterations >= 1 for c in report.layers)  # the rescaling did work
    assert model.training


@pytest.mark.parametrize("call,exc,match", [
    (lambda m: init.kaiming_(m, gain=-1.0), ValueError, "gain must be"),
    (lambda m: init.kaiming_(m, gain="huge"), ValueError, "gain must be"),
    (lambda m: init.xavier_(m, bias="random"), ValueError, "bias must be one of"),
    (lambda m: init.kaiming_(m, mode="fan_avg"), ValueError, "mode must be"),
    (lambda m: init.lsuv_(m, torch.randn(4, 4), tol=2.0), ValueError, "tol must be"),
    (lambda m: init.orthogonal_(nn.ReLU()), ValueError, "no nn.Linear or nn.ConvNd"),
    (lambda m: init.kaiming_("model"), TypeError, "model must be a torch.nn.Module"),
])
def test_bad_arguments(call, exc, match) -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    before = model[0].weight.detach().clone()
    with pytest.raises(exc, match=match):
        call(model)
    assert torch.equal(model[0].weight, before)  # nothing changed


# ---- the probe's recommended fixes make its vanishing finding go away, and training works -------------

def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), torch.tensor(data.target)


def _mlp(act: type[nn.Module], depth: int, width: int = 64, norm_after: bool = False) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(64, width)]
    for i in range(depth - 1):
        mods += [act()] + ([nn.LayerNorm(width)] if norm_after else []) + [nn.Linear(width, 10 if i == depth - 2 else width)]
    return nn.Sequential(*mods)


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 300, lr: float = 0.1) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _vanishing(model: nn.Module, batch) -> gw.Probe:
    return gw.probe(model, batch, F.cross_entropy)


@pytest.mark.slow
def test_relu_default_init_fixed_by_kaiming() -> None:
    x, y = _digits()
    torch.manual_seed(0)
    model = _mlp(nn.ReLU, 12)  # PyTorch default init: 1/√6 per layer
    before = _vanishing(model, (x[:256], y[:256])).finding("vanishing_gradients")
    assert before is not None and before.severity == "error"
    assert before.fixes[0].startswith("gradwatch.init.kaiming_(model)")
    loss_before = _train(model, x, y)
    torch.manual_seed(0)
    model = _mlp(nn.ReLU, 12)
    init.kaiming_(model)
    assert _vanishing(model, (x[:256], y[:256])).finding("vanishing_gradients") is None
    loss_after = _train(model, x, y)
    assert loss_before > 2.0 and loss_after < 0.5 * loss_before


@pytest.mark.slow
def test_tanh_ordered_phase_fixed_by_critical_orthogonal_init() -> None:
    x, y = _digits()

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        model = _mlp(nn.Tanh, 30)
        for m in model:
            if isinstance(m, nn.Linear):  # σw² = 1, σb² = 0.05: χ1 = 0.76, ordered phase
                nn.init.normal_(m.weight, 0, 1 / math.sqrt(m.in_features))
                nn.init.normal_(m.bias, 0, math.sqrt(0.05))
        return model

    model = make()
    before = _vanishing(model, (x[:256], y[:256])).finding("vanishing_gradients")
    assert before is not None
    assert before.fixes[0] == "gradwatch.init.orthogonal_(model, gain='critical')  # orthogonal weights at the edge of chaos (χ1 = 1)"
    loss_before = _train(model, x, y, lr=0.05)
    model = make()
    init.orthogonal_(model, gain="critical")
    assert _vanishing(model, (x[:256], y[:256])).finding("vanishing_gradients") is None
    loss_after = _train(model, x, y, lr=0.05)
    assert loss_after < 0.5 * loss_before


@pytest.mark.slow
def test_sigmoid_fixed_by_normalization() -> None:
    x, y = _digits()
    torch.manual_seed(0)
    model = _mlp(nn.Sigmoid, 10)
    init.xavier_(model)
    found = _vanishing(model, (x[:256], y[:256]))
    before = found.finding("vanishing_gradients")
    assert before is not None and before.severity == "error" and found.finding("missing_normalization") is not None
    assert any(f.startswith("add nn.LayerNorm after each nn.Sigmoid") for f in before.fixes)
    loss_before = _train(model, x, y)
    torch.manual_seed(0)
    model = _mlp(nn.Sigmoid, 10, norm_after=True)
    init.xavier_(model)
    assert not {f.code for f in _vanishing(model, (x[:256], y[:256])).findings} & {"vanishing_gradients", "missing_normalization"}
    loss_after = _train(model, x, y)
    assert loss_before > 2.0 and loss_after < 0.5


def test_exploding_tanh_fixed_by_the_recommended_critical_orthogonal_init() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(256, 256), nn.Tanh())])
    for m in model:
        if isinstance(m, nn.Linear):  # σw² = 4, σb² = 0.05: χ1 = 1.34, chaotic phase
            nn.init.normal_(m.weight, 0, 2 / 16)
            nn.init.normal_(m.bias, 0, math.sqrt(0.05))
    x = torch.randn(64, 256)
    found = gw.probe(model, x).finding("exploding_gradients")
    assert found is not None and found.evidence["effective_per_layer_gain"] > 1.1
    assert "gradwatch.init.orthogonal_(model, gain='critical')" in " ".join(found.fixes)
    init.orthogonal_(model, gain="critical")
    after = gw.probe(model, x)
    assert not {f.code for f in after.findings} & {"exploding_gradients", "vanishing_gradients"}
