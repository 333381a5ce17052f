"""Activations judged by what they are (issue 17): real Hugging Face models, a saturated tanh stack,
derivatives checked against autograd, the probe's labels, and loss spikes relative to the run's scale."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.activation_fns import ACTIVATIONS, FLAT_SHARE, function_activation, module_activation
from gradwatch.diagnosis import DiagnosisPlugin
from gradwatch.diagnosis.sampler import ActivationSampler

transformers = pytest.importorskip("transformers")

ACTIVATION_CODES = ("dead_relu", "saturated_activations")


def _gpt2() -> nn.Module:
    # 20x GPT-2's init scale: the GELU inputs reach |x| ~ 2, where the tanh *inside* NewGELU saturates
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, initializer_range=0.4))


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, initializer_range=0.2))


def _bert() -> nn.Module:
    return transformers.BertForMaskedLM(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=32, initializer_range=0.2))


def _train_lm(model: nn.Module, run_dir, steps: int = 30) -> gw.Watch:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.Watch(model, opt, run_dir=run_dir, diagnosis=gw.DiagnosisConfig(sample_every=10))
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 100, (4, 16), generator=gen)
        watch.step(lambda: model(input_ids=ids, labels=ids).loss)
    watch.close()
    return watch


def _diagnosis(watch: gw.Watch) -> DiagnosisPlugin:
    return next(p for p in watch.plugins if isinstance(p, DiagnosisPlugin))


@pytest.mark.parametrize("make, kind, module_suffix", [
    (_gpt2, "gelu_tanh", "mlp.act"),  # NewGELUActivation
    (_llama, "silu", "mlp.act_fn"),  # SiLU inside SwiGLU: down(silu(gate(x)) * up(x))
    (_bert, "gelu", "intermediate.intermediate_act_fn"),  # GELUActivation
])
def test_healthy_hf_models_raise_no_activation_finding(tmp_path, make, kind, module_suffix):
    torch.manual_seed(0)
    watch = _train_lm(make(), tmp_path / "run")
    assert not [str(f) for f in watch.findings if f.code in ACTIVATION_CODES]
    sample = _diagnosis(watch).sample
    assert sample is not None and sample.step == 30
    kinds = {stats["kind"] for stats in sample.activations.values()}
    assert kinds == {kind}  # the whole function, never the tanh / sigmoid / erf inside it
    sites = list(sample.activations)
    assert len([site for site in sites if site.endswith(module_suffix)]) == 2  # one per block (BERT: + its MLM head)
    for site, stats in sample.activations.items():
        assert stats["label"].count(ACTIVATIONS[kind].label) == 1 and "tanh tanh" not in stats["label"]
        assert stats["after"] is not None and stats["label"].endswith(f"(after {stats['after']})")
        assert stats["dead"] < 0.6 and stats["flat"] < 0.9


def test_gpt2_gelu_inputs_are_wide_enough_that_a_tanh_test_would_fire():
    """The control for the test above: the tanh inside NewGELU does sit in its tails on this model."""
    torch.manual_seed(0)
    model = _gpt2()
    inner = []

    def keep(module, args, output):
        x = args[0]
        inner.append((torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)).abs() > math.sqrt(0.9)).float().mean())

    handle = model.transformer.h[0].mlp.act.register_forward_hook(keep)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (4, 16)))
    handle.remove()
    assert float(inner[0]) > 0.3


def test_six_saturated_tanh_layers_are_one_finding_listing_all_six(tmp_path):
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        linear = nn.Linear(32, 32)
        nn.init.normal_(linear.weight, std=8.0 / math.sqrt(32))  # 8x Xavier: the tanh inputs have std ~6
        layers += [linear, nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "run", diagnosis=gw.DiagnosisConfig(sample_every=10))
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    for _ in range(21):
        watch.step(lambda: F.cross_entropy(model(x), y))
    watch.close()
    found = [f for f in watch.findings if f.code == "saturated_activations"]
    assert len(found) == 1, [str(f) for f in found]
    finding = found[0]
    tanh_sites = [str(i) for i in range(1, 12, 2)]
    assert finding.location["modules"] == tanh_sites and finding.step == 1
    assert len(finding.evidence["layers"]) == 6 and all(share >= 0.5 for share in finding.evidence["layers"].values())
    assert "6 activation layers" in finding.message and "tanh tanh" not in finding.message
    assert all(f"tanh {site} (after {int(site) - 1})" in finding.message for site in tanh_sites)


def _reference_flat_share(f, x: torch.Tensor) -> float:
    """Share of |f'(x)| below 10% of max |f'|, both by autograd on f itself."""
    grid = torch.linspace(-12, 12, 24001, dtype=torch.float64, requires_grad=True)
    (slope_grid,) = torch.autograd.grad(f(grid).sum(), grid)
    x = x.detach().double().requires_grad_(True)
    (slope,) = torch.autograd.grad(f(x).sum(), x)
    return float((slope.abs() < FLAT_SHARE * slope_grid.abs().max()).double().mean())


REFERENCES = {
    "gelu": (nn.GELU(), F.gelu),
    "gelu_tanh": (transformers.activations.NewGELUActivation(), lambda x: F.gelu(x, approximate="tanh")),
    "quick_gelu": (transformers.activations.QuickGELUActivation(), lambda x: x * torch.sigmoid(1.702 * x)),
    "silu": (nn.SiLU(), F.silu),
    "mish": (transformers.activations.MishActivation(), F.mish),
    "tanh": (nn.Tanh(), torch.tanh),
    "sigmoid": (nn.Sigmoid(), torch.sigmoid),
}


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_flat_share_matches_an_autograd_derivative(kind):
    module, f = REFERENCES[kind]
    assert module_activation(module).name == kind
    x = torch.randn(64, 48) * 3.0 - 0.5  # wide inputs: tails, the GELU's negative dip, its zero crossing
    sampler = ActivationSampler(nn.Sequential(nn.Identity(), module), [])
    sampler.arm()
    with torch.enable_grad():
        sampler.model(x.requires_grad_(True))
    sampler.disarm()
    stats = sampler.collect(1).activations["1"]
    key = "saturated" if kind in ("tanh", "sigmoid") else "flat"
    assert stats[key] == pytest.approx(_reference_flat_share(f, x), abs=2e-3)
    grid = torch.linspace(-12, 12, 48001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(f(grid).sum(), grid)
    assert ACTIVATIONS[kind].max_slope == pytest.approx(float(slope.abs().max()), rel=1e-6)


def test_dead_smooth_units_are_flat_for_every_example():
    """A SiLU unit whose inputs are all below -10 passes no gradient: dead; units that reach x > 0 are not."""
    x = torch.randn(32, 8)
    x[:, :5] = -20.0 + x[:, :5]
    sampler = ActivationSampler(nn.Sequential(nn.Identity(), nn.SiLU()), [])
    sampler.arm()
    sampler.model(x.requires_grad_(True))
    sampler.disarm()
    stats = sampler.collect(1).activations["1"]
    assert stats["dead"] == pytest.approx(5 / 8) and stats["kind"] == "silu"


def test_calls_inside_a_recognised_activation_module_are_its_own():
    """HF classes are recognised by class name and module, without importing transformers."""
    fake = types.new_class("NewGELUActivation", (nn.Module,))
    fake.__module__ = "transformers.activations"
    fake.forward = lambda self, x: 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x**3)))
    assert module_activation(fake()).name == "gelu_tanh"
    model = nn.Sequential(nn.Linear(8, 16), fake(), nn.Linear(16, 2))
    sampler = ActivationSampler(model)
    sampler.arm()
    sampler.enter_mode()
    out = model(torch.randn(32, 8))
    sampler.exit_mode(forward_complete=True)
    out.sum().backward()
    sampler.disarm()
    sample = sampler.collect(1)
    assert list(sample.activations) == ["1"] and sample.activations["1"]["kind"] == "gelu_tanh"
    assert sampler.functional is False  # the torch.tanh inside the module did not count as functional
    assert function_activation(F.gelu, {"approximate": "tanh"}).name == "gelu_tanh"


def test_probe_on_gpt2_calls_c_fc_a_gelu_not_a_tanh():
    torch.manual_seed(0)
    model = _gpt2()
    ids = torch.randint(0, 100, (4, 16))
    probe = gw.probe(model, {"input_ids": ids, "labels": ids}, loss_fn=lambda out: out.loss)
    rows = {row.name: row for row in probe.layers}
    for i in range(2):
        row = rows[f"transformer.h.{i}.mlp.c_fc"]
        assert row.activation == "gelu" and row.saturated_fraction is None and row.gain_for != "tanh"
    assert not [f for f in probe.findings if f.code == "saturated_activations"]


# ----- loss spikes relative to the run's scale -------------------------------------------------------
def _run_losses(losses: list[float], tmp_path, on_spike=None) -> gw.Watch:
    """A Watch whose step losses are exactly ``losses`` (the model's output times 0, plus the value)."""
    model = nn.Linear(4, 1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), run_dir=tmp_path, on_spike=on_spike)
    x = torch.randn(8, 4)
    for value in losses:
        watch.step(lambda: model(x).mean() * 0.0 + value)
    watch.close()
    return watch


def _no_nan(watch: gw.Watch) -> None:
    for f in watch.findings:
        assert "nan" not in f.message.lower() and "inf" not in f.message.replace("info", "").lower(), f.message


@pytest.mark.parametrize("level", [0.0, 1e-9])
def test_a_converged_loss_with_tiny_blips_is_quiet(tmp_path, level):
    early = [2.3 * math.exp(-k / 5) for k in range(30)]
    converged = [3.7e-9 if k % 7 == 3 else level for k in range(120)]
    for on_spike in (None, "skip"):
        watch = _run_losses(early + converged, tmp_path / f"{on_spike}", on_spike=on_spike)
        assert not [str(f) for f in watch.findings if f.code == "loss_spike"]
        _no_nan(watch)


def test_a_real_spike_is_one_finding_without_nan(tmp_path):
    gen = torch.Generator().manual_seed(0)
    losses = (2.0 + 0.05 * torch.randn(80, generator=gen)).tolist()
    losses[60] *= 100.0
    watch = _run_losses(losses, tmp_path / "normal")
    spikes = [f for f in watch.findings if f.code == "loss_spike"]
    assert len(spikes) == 1 and spikes[0].step == 61 and spikes[0].evidence["ratio"] > 50
    _no_nan(watch)
    # a run that converged to exactly 0, then really jumps: no ratio to print, still one finding
    losses = [2.0] * 25 + [0.0] * 30 + [1.5] + [0.0] * 5
    watch = _run_losses(losses, tmp_path / "zero")
    spikes = [f for f in watch.findings if f.code == "loss_spike"]
    assert len(spikes) == 1 and spikes[0].step == 56 and spikes[0].evidence["ratio"] is None
    assert "median of 0" in spikes[0].message
    _no_nan(watch)
