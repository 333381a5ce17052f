"""Mixed precision through the Watch: fp16 loss scaling, bf16, telemetry, findings, forecast.

References are independent of gradwatch: a hand-written torch.amp.GradScaler loop,
the GradScaler rule written out in Python, fp32 runs of the same model, and torch's
own float16/bfloat16 casts.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from _sync import count_host_transfers
from gradwatch.amp import FORECAST_EVENT, LOST_UPDATE_EVENT, precision_plugin
from gradwatch.amp.plugin import PrecisionPlugin
from gradwatch.amp.plugin import diagnose_overflow
from gradwatch.precision import Precision


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen), torch.randn(n, 1, generator=gen)


def _deep_sigmoid(seed: int = 0) -> nn.Sequential:
    """8 sigmoid layers, PyTorch default init: layer 0's gradient elements are ~1e-9..1e-8 (fp32)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    layers.append(nn.Linear(32, 1))
    return nn.Sequential(*layers)


class _InjectInf:
    """Makes one parameter's gradient +inf on chosen steps (the GradScaler tests' pattern)."""

    def __init__(self, param: torch.Tensor, steps: set[int]) -> None:
        self.steps = steps
        self.step = 0
        param.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, math.inf) if self.step in self.steps else grad


# ----- 2. same decisions as torch ------------------------------------------------------------
def _expected_scales(init: float, growth: float, backoff: float, interval: int, inf_steps: set[int], n: int) -> list[float]:
    """GradScaler's rule written out: the scale used on each step 1..n."""
    scale, tracker, out = init, 0, []
    for step in range(1, n + 1):
        out.append(scale)
        if step in inf_steps:
            scale, tracker = scale * backoff, 0
        else:
            tracker += 1
            if tracker == interval:
                scale, tracker = scale * growth, 0
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [(2.0**10, 2.0, 0.5, 3), (100.0, 4.0, 0.25, 2)], ids=["pow2", "custom"])
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-3),
], ids=["sgd_momentum", "adam"])
def test_fp16_same_decisions_as_a_hand_written_gradscaler_loop(make_opt, config, device: str) -> None:
    n_steps, inf_steps = 16, {3, 4, 11}
    init, growth, backoff, interval = config
    kwargs = dict(init_scale=init, growth_factor=growth, backoff_factor=backoff, growth_interval=interval)
    x, y = (t.to(device) for t in _data())

    # The reference: torch's documented GradScaler loop, written by hand.
    ref = _mlp().to(device)
    ref_opt = make_opt(ref.parameters())
    ref_scaler = torch.amp.GradScaler(device, **kwargs)
    ref_inject = _InjectInf(ref[2].weight, inf_steps)
    ref_scales, ref_skipped = [], []
    for step in range(1, n_steps + 1):
        ref_inject.step = step
        before = [p.detach().clone() for p in ref.parameters()]
        with torch.autocast(device, dtype=torch.float16):
            loss = nn.functional.mse_loss(ref(x).float(), y)
        ref_scales.append(ref_scaler.get_scale())
        ref_scaler.scale(loss).backward()
        ref_scaler.unscale_(ref_opt)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad(set_to_none=True)
        ref_skipped.append(all(torch.equal(b, p) for b, p in zip(before, ref.parameters())))

    model = _mlp().to(device)
    opt = make_opt(model.parameters())
    inject = _InjectInf(model[2].weight, inf_steps)
    watch = gw.Watch(model, opt, clip_norm=None, precision="fp16", scaler=torch.amp.GradScaler(device, **kwargs))
    results = []
    for step in range(1, n_steps + 1):
        inject.step = step
        results.append(watch.step(lambda: nn.functional.mse_loss(model(x).float(), y)))
    watch.close()

    expected = _expected_scales(init, growth, backoff, interval, inf_steps, n_steps)
    assert ref_scales == expected  # the hand-written loop follows the rule (sanity of the reference)
    assert [r.loss_scale for r in results] == expected
    assert [r.step for r in results if r.skipped] == sorted(inf_steps)
    assert [i + 1 for i, s in enumerate(ref_skipped) if s] == sorted(inf_steps)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)  # bit-identical final weights
    assert watch.precision.scaler.get_scale() == ref_scaler.get_scale()
    # 3. telemetry: overflow count, and the overflowing layer named from the per-layer norms
    assert watch.precision.overflow_skips == len(inf_steps)
    for r in results:
        if r.skipped:
            assert r.record.nonfinite_layers == ["2"]
            assert gw.SkipReason.SCALER_OVERFLOW in r.record.skipped_by
    assert [r.record.overflow_skips for r in results if r.skipped] == [1, 2, 3]


def test_fp16_with_clipping_matches_the_reference_loop() -> None:
    x, y = _data()
    kwargs = dict(init_scale=2.0**12, growth_interval=2)
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    ref_scaler = torch.amp.GradScaler("cpu", **kwargs)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    watch = gw.Watch(model, opt, clip_norm=0.1, precision="fp16", scaler=torch.amp.GradScaler("cpu", **kwargs))
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(ref(x).float(), y)
        ref_scaler.scale(loss).backward()
        ref_scaler.unscale_(ref_opt)
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
        result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
        assert result.clipped and result.grad_norm == pytest.approx(float(norm), rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert watch.precision.scaler.get_scale() == ref_scaler.get_scale() == 2.0**15
    watch.close()


def test_healthy_fp16_step_skips_gradscalers_item_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    # GradScaler.step reads found_inf with .item() (_maybe_opt_step); the Watch already knows it is 0.
    def boom(*args, **kwargs):
        raise AssertionError("GradScaler._maybe_opt_step called: an extra host sync")

    monkeypatch.setattr(torch.amp.GradScaler, "_maybe_opt_step", boom)
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _data()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16", clip_norm=None)
    result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    assert not result.skipped and watch.errors.count == 0
    assert not any(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    watch.close()


# ----- 1. unscaled, comparable norms ----------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision,rtol", [("fp16", 2e-2), ("bf16", 6e-2)])
def test_recorded_norms_are_unscaled_and_agree_with_fp32(precision: str, rtol: float, device: str) -> None:
    x, y = (t.to(device) for t in _data(64))
    runs = {}
    for mode in ("fp32", precision):
        model = _mlp().to(device)
        watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), clip_norm=None, precision=mode)
        runs[mode] = [watch.step(lambda: nn.functional.mse_loss(model(x).float(), y)).record for _ in range(4)]
        watch.close()
    for ref, rec in zip(runs["fp32"], runs[precision]):
        assert rec.loss_scale == (65536.0 if precision == "fp16" else None)
        np.testing.assert_allclose(rec.layer_grad_norms, ref.layer_grad_norms, rtol=rtol)
        assert rec.grad_norm == pytest.approx(ref.grad_norm, rel=rtol)


# ----- 7. fp16 without scaling loses a layer; with scaling it is recovered ---------------------
def test_fp16_unscaled_loses_small_gradients_and_loss_scaling_recovers_them() -> None:
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    norms, findings = {}, {}
    for name, precision, scaler in [
        ("fp32", "fp32", None),
        ("fp16_unscaled", "fp16", torch.amp.GradScaler("cpu", enabled=False)),
        ("fp16_scaled", "fp16", None),
    ]:
        model = _deep_sigmoid()
        watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), clip_norm=None, precision=precision, scaler=scaler)
        result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
        norms[name] = result.record.layer_grad_norms
        findings[name] = [f for f in result.findings if f.code == "fp16_underflow"]
        watch.close()
    ref = norms["fp32"]
    assert ref[0] < 1e-6  # layer 0's gradients are tiny: elements ~1e-9..1e-8, below fp16's 6e-8
    assert norms["fp16_unscaled"][0] < 0.05 * ref[0]  # flushed to zero in fp16
    assert norms["fp16_unscaled"][-1] == pytest.approx(ref[-1], rel=2e-2)  # the last layer is fine
    np.testing.assert_allclose(norms["fp16_scaled"], ref, rtol=3e-2)  # scaling recovers every layer
    (finding,) = findings["fp16_unscaled"]
    assert finding.severity == "warning" and finding.evidence["loss_scale"] == 1.0
    # fp16 left layers 0 and 2 all zero: a float32 replay measured what was lost
    assert finding.evidence["all_zero_layers"] == ["0", "2"] and finding.evidence["measured_from"] == "fp32_replay"
    assert finding.evidence["layers"]["0"]["flushed"] > 0.9 and finding.location == {"module": "0"}
    assert finding.evidence["recommended_scale"] > 1.0
    # the scaled run still has layer 0 partly subnormal at 65536: the finding names the scale it needs
    scaled = findings["fp16_scaled"]
    assert all(f.evidence["loss_scale"] == 65536.0 for f in scaled)


# ----- 5. fp16 forecast for fp32 and bf16 runs -------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_forecast_names_the_small_gradient_layers_and_is_written_to_the_run(tmp_path, precision: str) -> None:
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    model = _deep_sigmoid()
    run_dir = tmp_path / "run"
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), precision=precision, run_dir=run_dir,
                     flush_every=1, amp=gw.AmpConfig(every=3))
    grads0 = None
    for step in range(1, 7):
        if step == 6:  # capture the fp32 gradient of layer 0 on a sampled step, for an independent check
            model[0].weight.register_hook(lambda g: globals().__setitem__("_G0", g.detach().clone()))
        result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
        assert not any(f.code == "fp16_underflow" for f in result.findings)  # a forecast, not a problem of this run
    forecast = precision_plugin(watch).last_forecast
    watch.close()
    grads0 = globals().pop("_G0")
    assert forecast.step == 6 and forecast.current_scale == 1.0 and forecast.reference_scale == 65536.0
    # independent: torch's fp16 cast of layer 0's weight gradient (the bias adds a few elements)
    lost = int(((grads0.half() == 0) & (grads0 != 0)).sum()) / int((grads0 != 0).sum())
    assert lost > 0.5
    assert forecast.at_current.flushed[0] == pytest.approx(lost, abs=0.05)
    assert forecast.at_reference.flushed[0] < 0.01  # GradScaler's 65536 keeps them
    assert forecast.at_current.flushed[-1] < 0.01  # the last layer is fine at scale 1
    assert forecast.advice.per_layer[0] > forecast.advice.per_layer[-1]
    run = gw.load_run(run_dir)
    events = [e for e in run.events if e.get("event") == FORECAST_EVENT]
    assert [e["step"] for e in events] == [1, 3, 6]
    last = events[-1]
    assert last["layers"] == run.layer_names and last["precision"] == precision
    assert last["current"]["flushed"][0] == pytest.approx(forecast.at_current.flushed[0], rel=1e-3)
    assert last["reference"]["scale"] == 65536.0 and last["recommended_scale"] == forecast.advice.recommended
    assert sum(map(sum, last["log2_hist"]["counts"])) == sum(last["nonzero"])


# ----- 4. fp16_overflow ------------------------------------------------------------------------
def test_fp16_overflow_after_repeated_backoffs_names_the_layer() -> None:
    x, y = _data()
    model = _mlp()
    inject = _InjectInf(model[4].weight, {5, 9, 12})
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), precision="fp16",
                     scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    found = []
    for step in range(1, 20):
        inject.step = step
        found += [f for f in watch.step(lambda: nn.functional.mse_loss(model(x).float(), y)).findings if f.code == "fp16_overflow"]
    watch.close()
    (finding,) = found  # once per window
    assert finding.step == 12
    assert finding.evidence["overflow_steps"] == [5, 9, 12]
    assert finding.evidence["nonfinite_layers"] == ["4"]
    assert finding.evidence["loss_scale"] == 2.0**6  # the scale of step 12: 2^8 backed off twice before it
    # the injected inf is there in a float32 replay too: a true non-finite source, not a range problem
    assert finding.evidence["cause"]["kind"] == "nonfinite_source" and finding.severity == "error"
    assert "no range problem" in finding.message


def test_fp16_range_overflow_is_told_apart_and_names_module_and_magnitude() -> None:
    x, y = _data()
    model = _mlp()
    spikes = {4, 8, 11}
    state = {"step": 0}

    def closure() -> torch.Tensor:  # a loss that spikes by 1e5 on some steps: finite in fp32
        loss = nn.functional.mse_loss(model(x).float(), y)
        return loss * (1e5 if state["step"] in spikes else 1.0)

    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), precision="fp16",
                     scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000))
    found = []
    for step in range(1, 14):
        state["step"] = step
        found += [f for f in watch.step(closure).findings if f.code == "fp16_overflow"]
    watch.close()
    (finding,) = found
    assert finding.step == 11 and finding.severity == "warning"
    assert finding.evidence["overflow_steps"] == [4, 8, 11]
    cause = finding.evidence["cause"]
    assert cause["kind"] == "range" and cause["what"] == "scaled_gradients"
    assert cause["module"] in watch.layers or cause["module"] == "(root)"
    assert cause["magnitude"] * finding.evidence["loss_scale"] > 65504
    assert finding.location["module"] == cause["module"]
    assert "exceed float16's 65504" in finding.message


def test_calibration_backoffs_at_the_start_are_not_a_finding_but_scale_below_one_is() -> None:
    x, y = _data()
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(2e3)  # last-layer grads ~1e2..1e3: overflow at 65536, fine at <= 64
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="fp16", clip_norm=None)
    results = [watch.step(lambda: nn.functional.mse_loss(model(x).float(), y)) for _ in range(14)]
    skipped = [r.step for r in results if r.skipped]
    assert len(skipped) >= 3 and skipped == list(range(1, len(skipped) + 1))  # consecutive, from step 1
    assert not any(f.code == "fp16_overflow" for r in results for f in r.findings)
    assert watch.precision.overflow_skips == len(skipped)
    watch.close()

    # gradients that overflow fp16 even unscaled: the scale falls below 1 -> error
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e7)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="fp16", clip_norm=None,
                     scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    found = []
    for _ in range(6):
        found += [f for f in watch.step(lambda: nn.functional.mse_loss(model(x).float(), y)).findings if f.code == "fp16_overflow"]
    watch.close()
    # step 1: the forward pass itself overflows float16 (finite in float32), named at once
    assert found[0].step == 1 and found[0].evidence["decided_by"] == "fp32_replay"
    assert found[0].evidence["localization"]["dtype"] == "float16" and "bf16" in found[0].fixes[0]
    below = [f for f in found if f.evidence["loss_scale"] < 1]  # then the scale falls below 1: the scaler's view
    assert below and below[0].severity == "error"
    cause = below[0].evidence["cause"]
    assert cause["kind"] == "range" and cause["what"] == "activations" and cause["module"] == "4"
    assert cause["magnitude"] > 65504
    assert "bf16" in below[0].fixes[0]


def test_diagnose_overflow_tells_range_from_a_true_source() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    # scaled gradients overflow fp16: finite in fp32, gradient at the output times 2^20 > 65504
    out = diagnose_overflow(model, lambda: model(x).sum() * 10.0, None, 2.0**20)
    assert out["kind"] == "range" and out["what"] == "scaled_gradients"
    assert out["magnitude"] * 2.0**20 > 65504 and out["module"] is not None
    # a true source: log of a negative number is NaN in fp32 too
    out = diagnose_overflow(model, lambda: torch.log(-model(x).abs() - 1).sum(), None, 1.0)
    assert out["kind"] == "nonfinite_source" and out["op"] == "aten.log"
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # never writes the weights


# ----- 6. bf16 lost updates ----------------------------------------------------------------------
def test_bf16_weights_lose_small_updates_and_the_finding_says_keep_fp32_master_weights() -> None:
    x, y = _data()
    model = _mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    watch = gw.Watch(model, opt, precision="bf16", clip_norm=None, amp=gw.AmpConfig(every=2))
    results = [watch.step(lambda: nn.functional.mse_loss(model(x.bfloat16()).float(), y)) for _ in range(2)]
    found = [f for r in results for f in r.findings if f.code == "bf16_lost_updates"]
    event = precision_plugin(watch).last_lost_updates
    watch.close()
    (finding,) = found
    assert finding.severity == "info" and "fp32 master weights" in finding.fixes[0]
    assert finding.step == 1 and event["weights"] == "bf16" and event["step"] == 2
    assert max(v for v in event["lost_share"] if v is not None) > 0.5  # lr 1e-4 is far below bf16's 2^-8


def test_bf16_autocast_forecasts_lost_updates_against_an_independent_count() -> None:
    x, y = _data()
    model = _mlp()
    grads: dict[int, torch.Tensor] = {}
    for i, p in enumerate(model.parameters()):
        p.register_hook(lambda g, i=i: grads.__setitem__(i, g.detach().clone()))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.3), precision="bf16", clip_norm=None)
    before = [p.detach().clone() for p in model.parameters()]
    result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    event = precision_plugin(watch).last_lost_updates
    after = [p.detach() for p in model.parameters()]
    watch.close()
    # independent: would bf16 weights have moved? (per layer: weight and bias of Linear i)
    shares = []
    for i in range(0, len(before), 2):
        lost = wanted = 0
        for j in (i, i + 1):
            b, dw = before[j], after[j] - before[j]
            intended = (grads[j] != 0) | (dw != 0)
            moved = (b.bfloat16().float() + dw).bfloat16() != b.bfloat16()
            lost += int((intended & ~moved).sum())
            wanted += int(intended.sum())
        shares.append(lost / wanted)
    assert 0.05 < max(shares) < 0.95  # a mix of kept and lost updates: the test can tell them apart
    assert event["weights"] == "fp32" and event["lost_share"] == pytest.approx(shares, abs=1e-3)
    has_finding = any(f.code == "bf16_lost_updates" and "would be lost" in f.message for f in result.findings)
    assert has_finding == (max(shares) >= 0.1)


# ----- options, validation, state ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(amp=dict(every=0)), ValueError, "every must be a positive int"),
    (dict(amp=dict(underflow_share=1.5)), ValueError, r"underflow_share must be a number in \(0, 1\)"),
    (dict(amp=dict(overflow_backoffs="3")), ValueError, "overflow_backoffs must be a positive int"),
    (dict(amp=dict(forecast_scale=-1.0)), ValueError, "forecast_scale must be a positive number"),
    (dict(amp=dict(lost_update_share=0)), ValueError, r"lost_update_share must be a number in \(0, 1\)"),
    (dict(amp={"every": 5}), TypeError, "amp must be a gradwatch.AmpConfig"),
    (dict(precision="fp32", scaler=torch.amp.GradScaler("cpu")), ValueError, "scaler= is only used with precision='fp16'"),
    (dict(precision="fp16", scaler=object()), TypeError, "scaler must be a torch.amp.GradScaler"),
])
def test_bad_options_are_one_clear_error(tmp_path, kwargs, error, match) -> None:
    model = _mlp()
    with pytest.raises(error, match=match):  # from the config object or from the Watch
        if isinstance(kwargs.get("amp"), dict) and error is ValueError:
            kwargs = {**kwargs, "amp": gw.AmpConfig(**kwargs["amp"])}
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # nothing written before validation passed


def test_fp16_parameters_are_refused_with_the_fix() -> None:
    model = _mlp().half()
    with pytest.raises(ValueError, match=r"model.float\(\)"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16")


def test_options_are_accepted_with_diagnose_off_and_telemetry_still_counts() -> None:
    x, y = _data()
    model = _mlp()
    inject = _InjectInf(model[0].weight, {2})
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16", diagnose=False,
                     amp=gw.AmpConfig(every=5, underflow_share=0.2))
    for step in (1, 2, 3):
        inject.step = step
        result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    assert watch.precision.overflow_skips == 1  # the Watch's own count, with no precision plugin
    assert precision_plugin(watch) is None
    assert result.findings == []
    watch.close()


def test_precision_state_dict_round_trip() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7, growth_interval=5)
    p = Precision("fp16", "cpu", scaler)
    p.overflow_skips = 4
    _ = scaler.scale(torch.ones(()))  # materialize the scale tensor
    state = p.state_dict()
    q = Precision("fp16", "cpu", torch.amp.GradScaler("cpu"))
    q.load_state_dict(json.loads(json.dumps({k: v for k, v in state.items() if k != "scaler"})) | {"scaler": state["scaler"]})
    assert q.overflow_skips == 4 and q.scaler.get_scale() == 2.0**7 and q.scaler.get_growth_interval() == 5


def test_run_directory_marks_overflow_steps(tmp_path) -> None:
    x, y = _data()
    model = _mlp()
    inject = _InjectInf(model[2].bias, {2})
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16",
                     scaler=torch.amp.GradScaler("cpu", init_scale=64.0), run_dir=tmp_path / "run")
    for step in (1, 2, 3):
        inject.step = step
        watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    watch.close()
    run = gw.load_run(tmp_path / "run")
    assert run.steps["loss_scale"].tolist() == [64.0, 64.0, 32.0]
    assert run.steps["skipped"].tolist() == [False, True, False]
    assert run.step_extras[2]["skipped_by"] == ["fp16_overflow"] and run.step_extras[2]["overflow_skips"] == 1
    assert run.step_extras[2]["nonfinite_layers"] == ["2"]


# ----- docs/precision.md: every python block runs and prints what the comments say -----------------
def _doc_blocks() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "precision.md").read_text(encoding="utf-8")
    return [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.parametrize("index", range(3))
def test_docs_code_blocks_run(index: int, tmp_path, capsys) -> None:
    blocks = _doc_blocks()
    assert len(blocks) == 3
    code = blocks[index]
    exec(compile(code, f"docs/precision.md[{index}]", "exec"), {"RUN_DIR": str(tmp_path / "run"), "__name__": "__doc__"})
    out = capsys.readouterr().out.splitlines()
    expected = [line.split("# ", 1)[1].strip() for line in code.splitlines() if line.startswith("print(") and "# " in line]
    assert [line.strip() for line in out[: len(expected)]] == expected
    if index == 1:
        assert out[len(expected)].startswith("fp16 forecast at step 10 (a fp32 run):")


def test_fp16_scaler_overflow_does_not_raise_until_the_scale_falls_below_one() -> None:
    x, y = _data()
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e2)  # overflows at 65536, fits once the scaler has backed off
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="fp16", on_nonfinite="raise")
    results = [watch.step(lambda: nn.functional.mse_loss(model(x).float(), y)) for _ in range(12)]
    assert results[0].skipped and not results[-1].skipped  # calibration: skipped, not raised
    watch.close()
    # a gradient that is inf at any scale: the scaler backs off below 1, then the Watch raises
    model = _mlp()
    _InjectInf(model[0].weight, {0})  # its step attribute stays 0: always inject
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16", on_nonfinite="raise",
                     scaler=torch.amp.GradScaler("cpu", init_scale=4.0))
    with pytest.raises(gw.NonFiniteError):
        for _ in range(10):
            watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    assert watch.steps_taken == 4 and watch.precision.overflow_skips == 4  # scales 4, 2, 1, then 0.5 raises
    watch.close()


def test_healthy_unsampled_fp16_step_adds_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _mlp()
    # only the precision plugin's diagnosis, none of the others
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16", diagnose=False,
                     update_ratio_every=1000, plugins=[PrecisionPlugin(gw.AmpConfig(every=50))])
    x, y = _data()
    watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))  # step 1: sampled
    with count_host_transfers(monkeypatch) as calls:
        result = watch.step(lambda: nn.functional.mse_loss(model(x).float(), y))
    assert not result.skipped and result.loss_scale == 65536.0
    assert calls["n"] == 2  # the core's packed.cpu() and .numpy(): one transfer, nothing from fp16 or the plugin
    watch.close()


def test_natural_overflow_follows_theorys_gradscaler_sequence() -> None:
    # THEORY.md: max |grad| = 1 overflows at 65536 (65536 > 65504) but not at 32768, so with the
    # default growth/backoff the skipped steps are 1, I+2, 2I+3, ... (1, 2002, 4003 for I = 2000).
    # Here dL/d(out) = 1 exactly and passes through float16 in the backward; I = 20 keeps it short.
    interval = 20
    model = nn.Linear(4, 1)
    x = torch.tensor([[0.5, 0.25, -0.5, 0.125]])  # |x| < 1: the weight gradient 32768 * x stays in range
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.0), precision="fp16", clip_norm=None,
                     scaler=torch.amp.GradScaler("cpu", growth_interval=interval))
    results = [watch.step(lambda: model(x).float().sum()) for _ in range(3 * (interval + 1))]
    watch.close()
    assert [r.step for r in results if r.skipped] == [1, interval + 2, 2 * interval + 3]
    assert {r.loss_scale for r in results} == {65536.0, 32768.0}
    assert watch.precision.overflow_skips == 3


def test_complete_flush_is_found_by_a_float32_replay_and_leaves_the_weights_alone() -> None:
    # loss x 1e-7 and no loss scaling: fp16 flushes every gradient element of every layer to zero
    x, y = _data()
    model = _mlp()
    closure = lambda: nn.functional.mse_loss(model(x).float(), y) * 1e-7  # noqa: E731
    closure().backward()  # independent reference: the float32 gradients of this step
    reference = []
    for i in range(0, 6, 2):
        g = torch.cat([model[i].weight.grad.reshape(-1), model[i].bias.grad.reshape(-1)])
        reference.append(int(((g.half() == 0) & (g != 0)).sum()) / int((g != 0).sum()))
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in model.parameters()]
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision="fp16", clip_norm=None,
                     scaler=torch.amp.GradScaler("cpu", enabled=False))
    result = watch.step(closure)
    watch.close()
    assert np.all(result.record.layer_grad_norms == 0)  # nothing survived fp16
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # so nothing moved
    (finding,) = [f for f in result.findings if f.code == "fp16_underflow"]
    assert finding.evidence["measured_from"] == "fp32_replay"
    assert finding.evidence["all_zero_layers"] == watch.layers
    assert min(v["flushed"] for v in finding.evidence["layers"].values()) > 0.5
    # the replay ran on the step's own weights (before its update): torch's fp16 cast agrees exactly
    assert [finding.evidence["layers"][name]["flushed"] for name in watch.layers] == pytest.approx(reference, abs=1e-9)
    advice = finding.evidence["recommended_scale"]
    assert advice >= 2.0**10 and "GradScaler(init_scale=" in finding.fixes[0]


@pytest.mark.parametrize("precision, every", [("fp16", 50), ("fp32", 1000), ("bf16", 1000)])
def test_default_sampling_interval_depends_on_the_precision(precision: str, every: int) -> None:
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision=precision)
    assert precision_plugin(watch).every == every
    assert precision_plugin(gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), precision=precision,
                                     amp=gw.AmpConfig(every=7))).every == 7


def test_fp16_range_overflow_is_fp16_overflow_only_even_after_the_replay_budget() -> None:
    """Inputs in raw units overflow float16 in the first layer, but stay finite in float32: the NaN
    root-cause plugin leaves these steps to fp16_overflow, also once its replays are used up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), precision="fp16",
                     nonfinite=gw.NonFiniteConfig(max_replays=3))
    for step in range(1, 16):
        x, y = _data(seed=step)
        if step >= 5:
            x = x * 1e5  # activations of ~1e5 > 65504
        watch.step(lambda: nn.functional.mse_loss(model(x).float(), y), batch=(x, y))
    codes = [f.code for f in watch.findings if f.severity != "info"]
    assert "fp16_overflow" in codes
    assert not {"nonfinite_forward", "nonfinite_backward", "loss_numerics"} & set(codes), codes
    watch.close()
