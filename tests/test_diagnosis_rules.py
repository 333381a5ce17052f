"""Diagnosis rules on real small models: each detection asserts its code (and for vanishing/exploding the gain)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from _sync import count_host_transfers
from gradwatch.diagnosis import DiagnosisPlugin, fit_depth_curve
from gradwatch.diagnosis.sampler import ActivationSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.models import init_mlp  # noqa: E402  (the shared stack builder)

WARN = ("warning", "error")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)  # standardized pixels: (1797, 64)
    return x, torch.tensor(data.target)


def mlp(depth: int, act: str, init: str, width: int = 64, ln: bool = False, scale: float = 1.0, out: int = 10) -> nn.Sequential:
    """``depth`` Linear layers, activation (and LayerNorm) after all but the last (benchmarks.models.init_mlp)."""
    return init_mlp(depth, act, init, width=width, ln=ln, scale=scale, out=out)


def train(model, data, steps, opt="sgd", lr=0.05, clip=1.0, batch=64, **kw) -> gw.Watch:
    x_all, y_all = data
    optimizer = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt == "sgd"
                 else torch.optim.AdamW(model.parameters(), lr=lr))
    watch = gw.Watch(model, optimizer, clip_norm=clip, **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        x, y = x_all[idx], y_all[idx]
        watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y))
    watch.close()
    return watch


def codes(watch: gw.Watch, severities=WARN) -> list[str]:
    return [f.code for f in watch.findings if f.severity in severities]


def only(watch: gw.Watch, code: str) -> gw.Finding:
    found = [f for f in watch.findings if f.code == code]
    assert len(found) == 1, [str(f) for f in watch.findings]
    return found[0]


# ----- vanishing / exploding ---------------------------------------------------------------
@pytest.mark.parametrize(
    "depth, init, width, opt, gain_range",
    [
        (10, "xavier", 64, "sgd", (0.17, 0.30)),  # THEORY: 0.233 per layer (sqrt(chi1) = 0.236)
        (10, "default", 32, "adamw", (0.10, 0.19)),  # THEORY: 0.1405 per layer
        (20, "xavier", 48, "adamw", (0.17, 0.30)),
        (20, "default", 64, "sgd", (0.10, 0.19)),
    ],
)
def test_deep_sigmoid_mlp_vanishes_with_the_theoretical_gain(digits, depth, init, width, opt, gain_range):
    watch = train(mlp(depth, "sigmoid", init, width=width), digits, steps=3, opt=opt, lr=1e-3)
    finding = only(watch, "vanishing_gradients")
    assert finding.step == 1 and finding.severity == "warning"
    gain = finding.evidence["effective_gain_per_layer"]
    assert gain_range[0] <= gain <= gain_range[1]
    assert [k for k in finding.evidence if "gain" in k]
    assert finding.evidence["first_last_ratio"] < 1e-4
    assert finding.evidence["layers_affected"][0] == watch.layers[0]
    assert "0.2" in finding.message or "0.1" in finding.message  # the gain, in words
    assert any("ReLU" in fix for fix in finding.fixes)
    assert "exploding_gradients" not in codes(watch)


@pytest.mark.parametrize("depth, ln, opt", [(10, False, "sgd"), (20, True, "adamw")])
def test_relu_kaiming_of_the_same_depth_is_quiet_for_100_steps(digits, depth, ln, opt):
    watch = train(mlp(depth, "relu", "kaiming", ln=ln), digits, steps=100, opt=opt, lr=0.05 if opt == "sgd" else 1e-3)
    assert codes(watch) == [], [str(f) for f in watch.findings]
    assert watch.history[-1].loss < 1.0  # it trains


def test_weight_gradients_hide_vanishing_that_activation_gradients_show(digits):
    """ReLU + Xavier, 10 layers: dL/dh shrinks ~0.705 per layer (THEORY), the weight-gradient curve barely."""
    model = mlp(10, "relu", "xavier")
    sampler = ActivationSampler(model)
    x, y = digits[0][:256], digits[1][:256]
    sampler.arm()
    sampler.enter_mode()
    F.cross_entropy(model(x), y).backward()
    sampler.disarm()
    sample = sampler.collect(1)
    names = [n for n in sampler.curve_layers]
    act = fit_depth_curve([sample.grad_rms[n] for n in names])
    weights = [model[int(n)].weight for n in names]
    weight = fit_depth_curve([w.grad.norm().item() / math.sqrt(w.numel()) for w in weights])
    assert 0.6 <= act.gain <= 0.8  # THEORY: 1/sqrt(2) = 0.705
    assert act.total < 0.1 and weight.total > 3 * act.total
    assert not any(h for h in (m._forward_hooks for m in model.modules()))  # all hooks removed


def test_relu_default_init_vanishing_is_seen_on_activation_gradients(digits):
    watch = train(mlp(12, "relu", "default"), digits, steps=2)
    finding = next(f for f in watch.findings if f.code == "vanishing_gradients")
    assert finding.evidence["curve"] == "activation_grad"
    assert 0.3 <= finding.evidence["effective_gain_per_layer"] <= 0.5  # THEORY: 1/sqrt(6) = 0.409
    assert any("kaiming_normal_" in fix for fix in finding.fixes)


def test_too_large_init_explodes_with_depth_and_is_named_on_step_1(digits):
    watch = train(mlp(8, "relu", "kaiming", scale=4.0), digits, steps=3, clip=1.0)
    init = only(watch, "init_scale_too_large")
    first = watch.history[0]
    assert init.step == 1
    assert init.evidence["first_grad_norm"] == first.grad_norm > 1e3  # the unclipped norm
    assert first.clipped
    assert max(init.evidence["weight_scale_vs_kaiming"].values()) == pytest.approx(4.0, rel=0.15)
    explode = only(watch, "exploding_gradients")
    assert 3.0 <= explode.evidence["effective_gain_per_layer"] <= 5.0  # x4 per layer, halved by ReLU: ~4
    assert "lr_too_high" not in codes(watch)


# ----- init vs lr --------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [0.2, 1.0])
def test_sgd_far_above_stable_lr_is_lr_too_high_not_init(digits, lr):
    x_all, y_all = digits
    model = mlp(4, "relu", "kaiming", out=1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=lr), clip_norm=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        idx = torch.randint(0, len(x_all), (64,), generator=g)
        watch.step(lambda: F.mse_loss(model(x_all[idx]).squeeze(1), y_all[idx].float() / 9))
    watch.close()
    finite_steps = {r.step for r in watch.history if r.finite}
    # Non-finite steps are the NaN root-cause plugin's to explain; the finite divergence is ours, raised once.
    ours = [f for f in watch.findings if f.code == "lr_too_high" and f.step in finite_steps]
    assert len(ours) == 1, [str(f) for f in watch.findings]
    finding = ours[0]
    assert finding.severity == "error"
    assert finding.evidence["first_grad_norm"] < 1e3 and finding.evidence["growth"] > 1e3
    assert f"from {lr:.3g}" in finding.fixes[0]
    assert "init_scale_too_large" not in codes(watch)


def test_sane_lr_is_quiet(digits):
    x_all, y_all = digits
    model = mlp(4, "relu", "kaiming", out=1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), clip_norm=None)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        idx = torch.randint(0, len(x_all), (64,), generator=g)
        watch.step(lambda: F.mse_loss(model(x_all[idx]).squeeze(1), y_all[idx].float() / 9))
    watch.close()
    assert codes(watch) == []


# ----- missing gradients, dead and saturated units ---------------------------------------------
class CutEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
        self.aux = nn.Linear(64, 8)  # an unused branch
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.encoder(x).detach())  # the .detach() bug


def test_encoder_cut_off_from_the_loss_is_missing_gradients(digits):
    watch = train(CutEncoder(), digits, steps=6)
    finding = only(watch, "missing_gradients")
    assert finding.step == 5
    assert finding.evidence["layers"] == ["encoder.0", "encoder.2", "aux"]
    assert "encoder.0.weight" in finding.evidence["parameters"] and "head.weight" not in finding.evidence["parameters"]


class FunctionalNet(nn.Module):
    """Activations called as functions, not modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.out = nn.Linear(64, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        with torch.no_grad():
            self.fc2.bias.fill_(-100.0)  # every unit of relu(fc2) is dead
            self.fc3.weight.mul_(30.0)  # sigmoid(fc3) saturates

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = F.relu(self.fc2(h))
        h = torch.sigmoid(self.fc3(h + x[:, :32]))
        return self.out(h)


def test_dead_and_saturated_functional_activations_are_named(digits):
    watch = train(FunctionalNet(), digits, steps=3)
    dead = only(watch, "dead_relu")
    assert dead.step == 1 and dead.location["module"] == "relu after fc2" and dead.evidence["dead_share"] == 1.0
    sat = only(watch, "saturated_activations")
    assert sat.location["module"] == "sigmoid after fc3" and sat.evidence["saturated_share"] > 0.5


def test_functional_activations_keep_the_mode_on_later_sampled_steps(digits):
    model = FunctionalNet()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), diagnosis=gw.DiagnosisConfig(sample_every=3),
                     precursors=None)  # the diagnosis sampler's mode alone (the precursors have a mode of their own)
    x, y = digits[0][:64], digits[1][:64]
    modes = []

    def loss():
        modes.append(len(torch.overrides._get_current_function_mode_stack()))
        return F.cross_entropy(model(x), y)

    for _ in range(7):
        watch.step(loss)
    watch.close()
    assert modes == [1, 0, 1, 0, 0, 1, 0]  # steps 1, 3, 6
    plugin = next(p for p in watch.plugins if isinstance(p, DiagnosisPlugin))
    assert plugin.sample.step == 6 and "relu after fc2" in plugin.sample.activations


def test_dead_relu_module_is_named(digits):
    model = mlp(4, "relu", "kaiming")
    with torch.no_grad():
        model[2].bias.fill_(-50.0)  # the ReLU at index 3 is dead for every input
        model[4].bias.fill_(0.5)  # the next one sees only its bias: alive
    watch = train(model, digits, steps=2)
    dead = only(watch, "dead_relu")
    assert dead.location["module"] == "3" and dead.evidence["dead_share"] == 1.0


def test_saturated_tanh_module(digits):
    watch = train(mlp(3, "tanh", "xavier", scale=8.0), digits, steps=2)
    found = only(watch, "saturated_activations")  # one finding lists every saturated layer
    assert set(found.location["modules"]) >= {"3"}


# ----- clipping and loss spikes ---------------------------------------------------------------
def test_clipping_always_active_is_raised_once(digits):
    watch = train(mlp(3, "relu", "kaiming"), digits, steps=120, clip=1e-3)
    finding = only(watch, "clipping_always_active")
    assert finding.step == 50 and finding.evidence["share_clipped"] == 1.0 and finding.severity == "info"
    assert "raise clip_norm from 0.001 to about" in finding.fixes[0]  # sane norms, a tiny threshold
    huge = train(mlp(6, "relu", "kaiming", scale=5.0), digits, steps=55, clip=1.0, lr=1e-4)
    finding = only(huge, "clipping_always_active")
    assert finding.evidence["median_grad_norm"] > 1e3 and "fix their cause" in finding.fixes[0]
    quiet = train(mlp(3, "relu", "kaiming"), digits, steps=60, clip=100.0)
    assert "clipping_always_active" not in codes(quiet, ("info", "warning", "error"))


def test_adaptive_clipping_is_not_reported_as_always_active(digits):
    """An adaptive clipper that clips (nearly) every step by design: no single clip_norm to raise, no finding."""
    watch = train(mlp(3, "relu", "kaiming"), digits, steps=70, clip=gw.AutoClip(percentile=1, max_norm=0.05))
    clipped = sum(r.clipped for r in watch.history) / len(watch.history)
    assert clipped >= 0.85  # the condition that would fire for a fixed threshold
    assert "clipping_always_active" not in codes(watch, ("info", "warning", "error"))


class SpikeSkipper(gw.WatchPlugin):
    """Stands in for the repair plugin's on_spike='skip': vetoes one step and says why."""

    name = "spike-skipper"

    def __init__(self, step: int) -> None:
        self.at = step

    def veto(self, ctx, record):
        if ctx.step == self.at:
            ctx.skip_reasons.append(gw.SkipReason.SPIKE)
            return True
        return False


@pytest.mark.parametrize("skip_it", [False, True, "on_spike"])
def test_loss_spike_survives_a_nan_and_is_not_duplicated(digits, skip_it):
    x_all, y_all = digits
    model = mlp(3, "relu", "kaiming", out=1)
    plugins = [SpikeSkipper(60)] if skip_it is True else []
    options = {"on_spike": "skip"} if skip_it == "on_spike" else {}  # the repair plugin (issue 10) reports it
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), plugins=plugins, **options)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 71):
        idx = torch.randint(0, len(x_all), (64,), generator=g)
        x, y = x_all[idx], y_all[idx].float() / 9
        if step == 30:
            x = x * math.nan  # a non-finite step: skipped, never in the baseline
        if step == 60:
            y = y * 100.0  # a corrupted batch: the loss jumps by orders of magnitude
        watch.step(lambda: F.mse_loss(model(x).squeeze(1), y))
    watch.close()
    assert watch.history[29 - 70].skipped  # step 30
    spikes = [f for f in watch.findings if f.code == "loss_spike"]
    if skip_it is True:
        assert spikes == []
    elif skip_it == "on_spike":
        assert [f.step for f in spikes] == [60]  # one finding, from the plugin that skipped the step
        assert watch.history[59 - 70].skipped
    else:
        assert [f.step for f in spikes] == [60]
        assert spikes[0].evidence["ratio"] > 100


def _hooked(model) -> bool:
    """Any forward hook on the model's modules (the depth-order tracking of step 1 uses pre-hooks only)."""
    return any(m._forward_hooks for m in model.modules())


def test_options_are_validated_and_unsampled_steps_have_no_hooks(digits, tmp_path):
    model = mlp(3, "relu", "kaiming")
    with pytest.raises(ValueError, match="sample_every"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), diagnosis=gw.DiagnosisConfig(sample_every=0))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), diagnosis=gw.DiagnosisConfig(sample_every=4),
                     run_dir=tmp_path / "run", precursors=None)  # the diagnosis sampler's hooks alone
    x, y = digits[0][:64], digits[1][:64]
    hooked, modes = [], []

    def loss():
        modes.append(len(torch.overrides._get_current_function_mode_stack()))  # the functional-activation mode
        return F.cross_entropy(model(x), y)

    for step in range(1, 10):
        watch.step(loss)
        hooked.append(_hooked(model))  # armed for the next step?
    watch.close()
    assert hooked == [False, False, True, False, False, False, True, False, False]  # before steps 4 and 8 only
    assert modes == [1, 0, 0, 0, 0, 0, 0, 0, 0]  # step 1 looked for functional activations and found none
    assert len(torch.overrides._get_current_function_mode_stack()) == 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    run = gw.load_run(tmp_path / "run")
    assert [a["step"] for a in run.activations] == [1, 4, 8]
    assert set(run.activations[0]["grad_rms"]) == {"0", "2", "4"}
    plugin = next(p for p in watch.plugins if isinstance(p, DiagnosisPlugin))
    assert plugin.sample_every == 4


@pytest.mark.parametrize("backward_by_user", [False, True])
def test_sampling_works_when_the_loop_passes_the_loss(digits, backward_by_user):
    """watch.step(loss): the forward runs before step(), so hooks are armed at the end of the previous step."""
    model = mlp(4, "relu", "kaiming")
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), diagnosis=gw.DiagnosisConfig(sample_every=2))
    plugin = next(p for p in watch.plugins if isinstance(p, DiagnosisPlugin))
    x, y = digits[0][:64], digits[1][:64]
    steps = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        if backward_by_user:
            loss.backward()
            watch.step(loss, backward=False)  # said explicitly: the gradients are in place
        else:
            watch.step(loss)
        steps.append(plugin.sample.step)
    watch.close()
    assert steps == [1, 2, 2, 4]
    assert set(plugin.sample.grad_rms) == {"0", "2", "4", "6"}
    assert all(v > 0 for v in plugin.sample.grad_rms.values())
    assert {site for site, s in plugin.sample.activations.items() if s["kind"] == "relu"} == {"1", "3", "5"}


def _count_transfers(monkeypatch, watch, loss_fn) -> int:
    with count_host_transfers(monkeypatch) as calls:
        watch.step(loss_fn)
    return calls["n"]


def test_no_extra_host_transfer_on_unsampled_steps_one_on_sampled(monkeypatch, digits):
    x, y = digits[0][:64], digits[1][:64]
    counts = {}
    for with_plugin in (False, True):
        torch.manual_seed(0)
        model = mlp(4, "relu", "kaiming")
        plugins = [DiagnosisPlugin(sample_every=3)] if with_plugin else []
        watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), diagnose=False, plugins=plugins,
                         update_ratio_every=1000)
        watch.step(lambda: F.cross_entropy(model(x), y))  # step 1 (sampled; weight scales measured once)
        counts[with_plugin] = [_count_transfers(monkeypatch, watch, lambda: F.cross_entropy(model(x), y)) for _ in range(2)]
        watch.close()
    unsampled, sampled = counts[True]  # steps 2 and 3
    assert unsampled == counts[False][0]
    assert sampled == counts[False][1] + 2  # one .cpu() of all statistics, then .tolist() on the host copy


def test_init_rule_judges_step_1_only_not_a_resumed_run(digits):
    x, y = digits[0][:64], digits[1][:64]
    model = mlp(6, "relu", "kaiming", scale=4.0)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=1e-4))
    watch.load_state_dict({"step": 1000})  # resumed: the next step is 1001, the weights are not an init
    watch.step(lambda: F.cross_entropy(model(x), y))
    watch.close()
    assert "init_scale_too_large" not in codes(watch)
    fresh = train(mlp(6, "relu", "kaiming", scale=4.0), digits, steps=1, lr=1e-4)
    assert only(fresh, "init_scale_too_large").step == 1


def test_a_closure_that_raises_on_a_sampled_step_leaves_no_hook_or_mode(digits):
    model = mlp(3, "relu", "kaiming")
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), diagnosis=gw.DiagnosisConfig(sample_every=2))
    x, y = digits[0][:64], digits[1][:64]

    def broken():
        model(x)
        raise KeyError("user bug")

    with pytest.raises(KeyError):
        watch.step(broken)  # step 1 is sampled: hooks and the function mode were on
    assert len(torch.overrides._get_current_function_mode_stack()) == 0
    assert not _hooked(model)
    watch.step(lambda: F.cross_entropy(model(x), y))  # training goes on
    watch.close()
    with pytest.raises(ValueError, match="check_every"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05),
                 diagnosis=gw.DiagnosisConfig(check_every=-1))


def test_update_ratio_rule_flags_updates_that_rewrite_the_weights():
    """||dw||/||w|| above 0.1 on 3 measurements in a row -> lr_too_high once; healthy ratios (~1e-3) stay quiet."""
    from types import SimpleNamespace

    from gradwatch.diagnosis.rules import LrRule

    def inp(step, ratios):
        record = SimpleNamespace(update_ratio=None if ratios is None else np.array(ratios), finite=True,
                                 layer_names=["0", "2", "4"], grad_norm=1.0, loss=1.0, skipped=False)
        return SimpleNamespace(record=record, step=step, history=[record])

    rule = LrRule()
    healthy = [rule.check(inp(s, [1e-3, 2e-3, 5e-4] if s % 10 == 0 else None), lambda: 0.1) for s in range(1, 200)]
    assert not any(healthy)
    rule = LrRule()
    found = []
    for s in range(1, 80):
        ratios = ([0.5, 0.3, 2.0] if s < 60 else [1e-3] * 3) if s % 10 == 0 else None
        found += rule.check(inp(s, ratios), lambda: 0.5)
    (finding,) = found
    assert finding.code == "lr_too_high" and finding.step == 30  # the third high measurement
    assert finding.evidence["signal"] == "update_ratio"
    assert finding.evidence["update_ratio_median"] == 0.5 and finding.location["layer"] == "4"
    assert finding.fixes[0] == "lower lr from 0.5 to 0.05"


@pytest.mark.parametrize("shape", [(32, 12), (4, 8, 12), (16, 12, 3, 3)])
def test_dead_share_is_the_share_of_units_zero_for_every_example(shape):
    """Hand-counted: units are features / last dim / channels; a NaN output is not a dead unit."""
    torch.manual_seed(0)
    pre = torch.randn(*shape)
    unit_dim = 1 if len(shape) != 3 else 2
    index = [slice(None)] * len(shape)
    index[unit_dim] = slice(0, 5)
    pre[tuple(index)] = -1.0  # units 0..4: never positive
    index[unit_dim] = 5
    pre[tuple(index)] = -1.0
    first = [0] * len(shape)
    first[unit_dim] = 5
    pre[tuple(first)] = float("nan")  # unit 5: negative except one NaN
    sampler = ActivationSampler(nn.Sequential(nn.ReLU()))
    sampler.arm()
    sampler._record("site", "relu", torch.relu(pre))
    sampler.disarm()
    stats = sampler.collect(1).activations["site"]
    assert stats["units"] == 12
    assert stats["dead"] == pytest.approx(5 / 12)


def test_a_layer_called_twice_sums_its_calls():
    """One Linear + ReLU applied twice: dL/dh norms of both calls add in squares (checked against autograd),
    and a unit is dead only when it is zero in every example of both calls."""
    torch.manual_seed(0)
    layer, act = nn.Linear(6, 6), nn.ReLU()
    with torch.no_grad():
        layer.bias[:2] = -100.0  # units 0, 1: dead in both calls
    sampler = ActivationSampler(nn.Sequential(layer, act), ["0"])
    x = torch.randn(32, 6)
    sampler.arm()
    h1 = layer(x)
    h1.retain_grad()
    a1 = act(h1)
    h2 = layer(a1)
    h2.retain_grad()
    act(h2).pow(2).sum().backward()
    sampler.disarm()
    sample = sampler.collect(1)
    expected = math.sqrt(h1.grad.pow(2).sum().item() + h2.grad.pow(2).sum().item())
    assert sample.grad_norm["0"] == pytest.approx(expected, rel=1e-5)
    assert sample.grad_rms["0"] == pytest.approx(expected / math.sqrt(2 * 32 * 6), rel=1e-5)
    peaks = torch.maximum(torch.relu(h1).amax(0), torch.relu(h2).amax(0))
    stats = sample.activations["1"]
    assert stats["examples"] == 64 and stats["units"] == 6
    assert stats["dead"] == pytest.approx((peaks <= 0).sum().item() / 6) and stats["dead"] >= 2 / 6
