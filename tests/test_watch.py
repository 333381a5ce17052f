"""gradwatch.Watch: same training as a plain loop, pre-clip telemetry, skip, raise, errors."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.ratio import UpdateRatioMeter
from _sync import count_host_transfers
from gradwatch import norms


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def _data(steps: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g) * 3, torch.randn(8, 1, generator=g)) for _ in range(steps)]


OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
}


def _plain_loop(model: nn.Module, opt: torch.optim.Optimizer, data, clip: float | None) -> list[float]:
    norms_seen = []
    for x, y in data:
        F.mse_loss(model(x), y).backward()
        norms_seen.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else math.inf)))
        opt.step()
        opt.zero_grad()
    return norms_seen


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("clip", [1.0, None])
def test_watch_trains_exactly_like_the_plain_loop(opt_name: str, clip: float | None) -> None:
    data = _data(12)
    ref_model = _mlp()
    ref_opt = OPTIMIZERS[opt_name](ref_model.parameters())
    ref_norms = _plain_loop(ref_model, ref_opt, data, clip)

    model = _mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    watch = gw.Watch(model, opt, clip_norm=clip)
    results = [watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y)) for x, y in data]
    watch.close()

    assert [r.grad_norm for r in results] == pytest.approx(ref_norms, rel=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if clip is not None:
        assert [r.clipped for r in results] == [n > clip for n in ref_norms]
        assert any(r.clipped for r in results)
    else:
        assert not any(r.clipped for r in results)
    assert [r.step for r in results] == list(range(1, 13))
    assert all(not r.skipped for r in results)


def test_layer_norms_are_measured_before_clipping() -> None:
    model = _mlp()
    x, y = _data(1)[0]
    probe = copy.deepcopy(model)
    F.mse_loss(probe(x), y).backward()
    want = {name: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in mod.parameters()])).item()
            for name, mod in probe.named_children() if list(mod.parameters())}

    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=1e-3)
    result = watch.step(lambda: F.mse_loss(model(x), y))
    assert result.clipped
    assert result.layer_grad_norms == pytest.approx(want, rel=1e-6)
    assert result.grad_norm == pytest.approx(math.sqrt(sum(v * v for v in want.values())), rel=1e-6)
    assert watch.layers == ["0", "2", "4"]


@pytest.fixture(params=["numpy", "torch"])
def weights_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the Watch reads CPU weights: numpy views (the default for float32) and torch's foreach kernels."""
    if request.param == "torch":
        monkeypatch.setattr(norms.HostWeights, "of", classmethod(lambda cls, params: None))
    return request.param


def test_weight_norms_and_update_ratio(weights_path: str) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=2, update_ratio_budget=1 << 20)
    x, y = _data(1)[0]

    before = {n: m.weight.detach().clone() for n, m in model.named_children() if isinstance(m, nn.Linear)}
    before_b = {n: m.bias.detach().clone() for n, m in model.named_children() if isinstance(m, nn.Linear)}
    r1 = _assert_update_ratio_of_next_step(watch, model, list(before), lambda: F.mse_loss(model(x), y))  # step 1
    w1 = {n: math.hypot(before[n].norm().item(), before_b[n].norm().item()) for n in before}
    assert r1.layer_weight_norms == pytest.approx(w1, rel=1e-6)  # weights before the update

    _assert_update_ratio_of_next_step(watch, model, list(w1), lambda: F.mse_loss(model(x), y))  # step 2
    r3 = watch.step(lambda: F.mse_loss(model(x), y))  # past the first 2 steps, every 2nd only
    assert r3.record.update_ratio is None
    # step 4: the snapshot buffer is reused, and still sees that step's own update
    _assert_update_ratio_of_next_step(watch, model, list(w1), lambda: F.mse_loss(model(x), y))


def test_weight_norms_are_measured_on_the_update_ratio_steps_only(weights_path: str) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=3)
    x, y = _data(1)[0]
    for step in range(1, 10):
        before = {n: math.hypot(m.weight.norm().item(), m.bias.norm().item())
                  for n, m in model.named_children() if isinstance(m, nn.Linear)}
        record = watch.step(lambda: F.mse_loss(model(x), y)).record
        weights = dict(zip(watch.layers, record.layer_weight_norms.tolist()))
        if step <= 3 or step % 3 == 0:  # the first 3, then every 3rd: the steps that measure the update ratio
            assert record.update_ratio is not None
            assert weights == pytest.approx(before, rel=1e-6)  # before the update, by hand
        else:
            assert record.update_ratio is None and all(math.isnan(v) for v in weights.values())
        assert np.isfinite(record.layer_grad_norms).all()  # the gradient norms on every step


def _assert_update_ratio_of_next_step(watch, model, names, closure) -> gw.StepResult:
    before = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone()) for n in names}
    result = watch.step(closure)
    ratios = dict(zip(watch.layers, result.record.update_ratio.tolist()))
    for name, (w, b) in before.items():
        mod = model.get_submodule(name)
        dw = math.hypot((mod.weight - w).norm().item(), (mod.bias - b).norm().item())
        assert ratios[name] == pytest.approx(dw / math.hypot(w.norm().item(), b.norm().item()), rel=1e-5)
    return result


def test_weights_replaced_between_and_during_steps_are_read_where_they_now_live(weights_path: str) -> None:
    class Replacing(torch.optim.SGD):  # an optimizer that writes new storages instead of updating in place
        def step(self, closure=None):
            with torch.no_grad():
                for group in self.param_groups:
                    for q in group["params"]:
                        q.data = q.data - group["lr"] * q.grad
            return None

    model = _mlp()
    opt = Replacing(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=1, update_ratio_budget=1 << 20)
    x, y = _data(1)[0]
    for step in range(3):
        if step == 1:
            with torch.no_grad():
                model[0].weight.data = model[0].weight.data * 2.0  # between steps, as a user might
        names = watch.layers or ["0", "2", "4"]
        before = {n: (model.get_submodule(n).weight.detach().clone(), model.get_submodule(n).bias.detach().clone()) for n in names}
        record = watch.step(lambda: F.mse_loss(model(x), y)).record
        for i, name in enumerate(watch.layers):
            w, b = before[name]
            mod = model.get_submodule(name)
            norm = math.hypot(w.norm().item(), b.norm().item())
            assert record.layer_weight_norms[i] == pytest.approx(norm, rel=1e-6)
            dw = math.hypot((mod.weight - w).norm().item(), (mod.bias - b).norm().item())
            assert record.update_ratio[i] == pytest.approx(dw / norm, rel=1e-5) and dw > 0


def test_update_ratio_of_an_all_zero_layer_is_nan() -> None:
    model = _mlp()
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        first.weight.zero_()
        first.bias.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=1, update_ratio_budget=1 << 20)
    x, y = _data(1)[0]
    ratio = watch.step(lambda: F.mse_loss(model(x), y)).record.update_ratio
    assert math.isnan(ratio[0]) and np.isfinite(ratio[1:]).all()


def _state_copy(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def _assert_same_state(a: dict, b: dict) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same_state(u, v)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), "tensor changed"
    else:
        assert a == b


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("poison", ["nan_loss", "inf_grad"])
def test_nonfinite_step_is_skipped_bit_identically(opt_name: str, poison: str) -> None:
    model = _mlp()
    opt = OPTIMIZERS[opt_name](model.parameters())
    watch = gw.Watch(model, opt, clip_norm=1.0)
    data = _data(4)
    for x, y in data[:3]:  # build momentum / Adam state first
        watch.step(lambda: F.mse_loss(model(x), y))
    weights, opt_state = _state_copy(model, opt)

    x, y = data[3]
    if poison == "nan_loss":
        closure = lambda: F.mse_loss(model(x), y) * torch.tensor(float("nan"))  # noqa: E731
        handle = None
    else:  # finite loss, one layer's gradient becomes inf in backward
        closure = lambda: F.mse_loss(model(x), y)  # noqa: E731
        handle = model[2].weight.register_hook(lambda g: g * float("inf"))
    result = watch.step(closure)
    if handle is not None:
        handle.remove()

    assert result.skipped and not math.isfinite(result.grad_norm)
    assert result.record.loss_finite == (poison == "inf_grad")
    _assert_same_state(model.state_dict(), weights)
    _assert_same_state(opt.state_dict(), opt_state)
    if poison == "inf_grad":
        assert "2" in result.record.nonfinite_layers and "0" not in result.record.nonfinite_layers
    assert all(p.grad is None for p in model.parameters())  # ready for the next step

    after = watch.step(lambda: F.mse_loss(model(data[0][0]), data[0][1]))  # training goes on
    assert not after.skipped and math.isfinite(after.grad_norm)


def test_raise_mode_carries_the_record() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, on_nonfinite="raise")
    x, y = _data(1)[0]
    weights, _ = _state_copy(model, opt)
    with pytest.raises(gw.NonFiniteError, match="non-finite") as info:
        watch.step(lambda: F.mse_loss(model(x), y) * float("inf"))
    assert info.value.record.step == 1 and info.value.record.skipped
    _assert_same_state(model.state_dict(), weights)


def test_loss_form_backpropagated_or_not() -> None:
    data = _data(5)
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    ref_norms = _plain_loop(ref, ref_opt, data, 1.0)

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.Watch(model, opt, clip_norm=1.0)
    got = []
    for i, (x, y) in enumerate(data):
        loss = F.mse_loss(model(x), y)
        if i % 2:
            loss.backward()  # the user already back-propagated, and says so
            got.append(watch.step(loss, backward=False).grad_norm)
        else:
            got.append(watch.step(loss).grad_norm)
    assert got == pytest.approx(ref_norms, rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    assert watch.layers == ["0", "2", "4"]  # depth known although the forward ran before step()


def test_internal_error_is_reported_once_and_training_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(6)
    ref = _mlp()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    _plain_loop(ref, ref_opt, data, 1.0)

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(norms.MeasurePlan, "tensor_norms2", broken)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gw.Watch(model, opt, clip_norm=1.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        results = [watch.step(lambda: F.mse_loss(model(x), y)) for x, y in data]
    ours = [w for w in seen if issubclass(w.category, gw.GradwatchWarning)]
    assert len(ours) == 1 and "injected failure" in str(ours[0].message)
    assert watch.errors.count == 6
    assert all(not r.skipped and math.isfinite(r.grad_norm) for r in results)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_internal_error_after_the_update_never_applies_it_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data(4)
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _plain_loop(ref, ref_opt, data, 1.0)

    def broken(self, *args, **kwargs):
        raise RuntimeError("fails after optimizer.step()")

    monkeypatch.setattr(UpdateRatioMeter, "measure", broken)  # gradwatch's own code, after the update
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = gw.Watch(model, opt, clip_norm=1.0, update_ratio_every=1)
    with pytest.warns(gw.GradwatchWarning, match="fails after"):
        results = [watch.step(lambda: F.mse_loss(model(x), y)) for x, y in data]
    assert not any(r.skipped for r in results)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)  # one update per step, as in the plain loop


def test_internal_error_never_applies_a_nonfinite_update(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norms.MeasurePlan, "tensor_norms2", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt)
    before = copy.deepcopy(model.state_dict())
    x, y = _data(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gw.GradwatchWarning)
        result = watch.step(lambda: F.mse_loss(model(x), y) * float("nan"))
    assert result.skipped
    _assert_same_state(model.state_dict(), before)


def test_plugin_error_is_reported_once_and_step_completes() -> None:
    class Broken(gw.WatchPlugin):
        name = "broken"

        def after_step(self, ctx, record):
            raise KeyError("plugin bug")

    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[Broken()])
    x, y = _data(1)[0]
    with pytest.warns(gw.GradwatchWarning, match="plugin bug"):
        r = watch.step(lambda: F.mse_loss(model(x), y))
    assert not r.skipped


class _Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.lin.requires_grad_(False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(model=_Frozen()), ValueError, "no trainable parameters"),
        (dict(optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)), ValueError, "optimizer does not hold"),
        (dict(on_nonfinite="ignore"), ValueError, "on_nonfinite must be one of"),
        (dict(clip_norm=-1.0), ValueError, "clip_norm must be a positive"),
        (dict(clip_norm=float("nan")), ValueError, "clip_norm"),
        (dict(model="not a model"), TypeError, "model must be a torch.nn.Module"),
        (dict(optimizer=None), TypeError, "optimizer must be"),
        (dict(precision="fp8"), ValueError, "precision must be one of"),
        (dict(norm_type=0), ValueError, "norm_type"),
        (dict(update_ratio_every=0), ValueError, "update_ratio_every"),
        (dict(no_such_option=1), TypeError, "no_such_option"),
    ],
)
def test_bad_arguments_give_one_clear_error(kwargs: dict, error: type, match: str, tmp_path) -> None:
    model = kwargs.pop("model", _mlp())
    opt = kwargs.pop("optimizer", torch.optim.SGD(model.parameters(), lr=0.1) if isinstance(model, nn.Module) and any(p.requires_grad for p in model.parameters()) else torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))
    with pytest.raises(error, match=match):
        gw.Watch(model, opt, run_dir=tmp_path / "run", **kwargs)
    assert not (tmp_path / "run").exists()  # nothing written for a bad call


@pytest.mark.parametrize(
    "closure, error, match",
    [
        (lambda m, x: m(x), ValueError, "not a scalar"),
        (lambda m, x: 1.0, TypeError, "not a tensor"),
        (lambda m, x: m(x).sum().detach(), ValueError, "does not require grad"),
        (lambda m, x: (m(x).sum() > 0), TypeError, "floating-point"),
    ],
)
def test_bad_closure_results(closure, error: type, match: str) -> None:
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(4, 6)
    with pytest.raises(error, match=match):
        watch.step(lambda: closure(model, x))
    with pytest.raises(TypeError, match="closure"):
        watch.step(3.0)


def test_a_raising_closure_leaves_no_hook_or_mode_behind() -> None:
    """Step 1 is a sampled step (activation hooks, a function mode): a closure that raises must not leak them."""
    from torch.overrides import _get_current_function_mode_stack

    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    depth = len(_get_current_function_mode_stack())

    def closure():
        model(torch.randn(4, 6))
        raise KeyError("user bug")

    with pytest.raises(KeyError, match="user bug"):
        watch.step(closure)
    assert len(_get_current_function_mode_stack()) == depth
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_closed_watch_refuses_steps() -> None:
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    watch.close()
    watch.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        watch.step(lambda: model(torch.randn(2, 6)).sum())


def test_findings_property_and_state_dict_round_trip() -> None:
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), update_ratio_budget=1 << 20)
    x, y = _data(1)[0]
    for _ in range(3):
        watch.step(lambda: F.mse_loss(model(x), y))
    state = watch.state_dict()
    other = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), update_ratio_budget=1 << 20)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.steps_taken == 3
    assert isinstance(watch.findings, list)


def test_one_host_sync_per_step_on_healthy_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Count device-to-host transfers: .cpu()/.item()/.tolist() on tensors inside one healthy step."""
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), update_ratio_every=1000, diagnose=False)
    x, y = _data(1)[0]
    watch.step(lambda: F.mse_loss(model(x), y))  # step 1 sets up the layer order
    loss_fn = lambda: F.mse_loss(model(x), y)  # noqa: E731
    assert watch._pipeline._plan.on_cpu
    with count_host_transfers(monkeypatch) as calls:  # the path of a model on an accelerator
        watch.step(loss_fn)
    assert calls["n"] == 2  # packed.cpu() then .numpy() on the host copy: one transfer
    # on the CPU there is nothing to transfer: each value is read in place, nothing packed
    n_params = len(list(model.parameters()))
    with count_host_transfers(monkeypatch, accelerator_path=False) as calls:
        result = watch.step(loss_fn)
    assert calls["n"] == n_params + 1  # one item() per gradient norm and the loss's
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0


def test_record_arrays_are_numpy_in_layer_order() -> None:
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data(1)[0]
    r = watch.step(lambda: F.mse_loss(model(x), y))
    assert isinstance(r.record.layer_grad_norms, np.ndarray)
    assert list(r.layer_grad_norms) == watch.layers
    assert watch.history[-1] is r.record


def test_quiet_plugins_are_not_called_in_the_mid_step_hooks() -> None:
    """WatchPlugin.quiet_step: the Watch skips before_forward/after_forward/after_backward/veto for that step."""

    class Counting(gw.WatchPlugin):
        name = "counting"

        def __init__(self) -> None:
            self.calls: list[tuple[int, str]] = []

        def before_forward(self, ctx):
            self.calls.append((ctx.step, "before_forward"))

        def after_forward(self, ctx):
            self.calls.append((ctx.step, "after_forward"))

        def after_backward(self, ctx):
            self.calls.append((ctx.step, "after_backward"))

        def veto(self, ctx, record):
            self.calls.append((ctx.step, "veto"))
            return False

        def after_step(self, ctx, record):
            self.calls.append((ctx.step, "after_step"))
            self.quiet_step = ctx.step + 1 != 3  # busy on step 3 only (and on step 1: False by default)
            return []

    model = _mlp()
    plugin = Counting()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin], diagnose=False)
    x, y = _data(1)[0]
    for _ in range(4):
        watch.step(lambda: F.mse_loss(model(x), y))
    mid = ["before_forward", "after_forward", "after_backward", "veto"]
    assert plugin.calls == [(1, h) for h in mid] + [(1, "after_step"), (2, "after_step")] + \
        [(3, h) for h in mid] + [(3, "after_step"), (4, "after_step")]
    # the built-in plugins stay quiet on an ordinary step of a model without dropout
    hooked = [p for p in watch.plugins if p is not plugin and any(getattr(type(p), h) is not getattr(gw.WatchPlugin, h) for h in mid)]
    assert {p.name for p in hooked} >= {"nonfinite"}  # (the precision plugin comes with diagnose=True)
    busy = [p.name for p in hooked if not p.quiet_step]
    assert busy == [], busy
    watch.close()
    diagnosing = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), diagnosis=gw.DiagnosisConfig(sample_every=10))
    for _ in range(7):  # past step 1 and the missing-gradient rule's 5 steps; step 8 is not sampled
        diagnosing.step(lambda: F.mse_loss(model(x), y))
    assert [p.name for p in diagnosing.plugins if p.name == "diagnosis" and not p.quiet_step] == []
    for _ in range(2):  # step 9 ends by arming step 10, which is sampled: busy
        diagnosing.step(lambda: F.mse_loss(model(x), y))
    assert [p.name for p in diagnosing.plugins if p.name == "diagnosis" and not p.quiet_step] == ["diagnosis"]
    diagnosing.close()


def test_sparse_embedding_gradients_are_measured_and_clipped_like_their_dense_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 1))
    ref = copy.deepcopy(model)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=0.01)
    x = torch.tensor([[1, 1, 3], [2, 1, 9]])  # index 1 three times: a sparse gradient with duplicates
    with warnings.catch_warnings():
        warnings.simplefilter("error", gw.GradwatchWarning)  # no internal error on the way
        for _ in range(3):
            result = watch.step(lambda: model(x).pow(2).mean())
            ref(x).pow(2).mean().backward()
            dense = [p.grad.to_dense() for p in ref.parameters()]
            total = torch.linalg.vector_norm(torch.stack([g.norm() for g in dense])).item()
            for p in ref.parameters():
                p.grad.mul_(min(1.0, 0.01 / (total + 1e-6)))
            ref_opt.step()
            ref_opt.zero_grad()
            assert result.grad_norm == pytest.approx(total, rel=1e-6) and result.clipped and not result.skipped
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    watch.close()


def test_a_weight_numpy_cannot_read_after_the_update_leaves_that_ratio_out_and_the_next_ones_exact() -> None:
    class Transposing(torch.optim.SGD):  # stores one weight as a non-contiguous view after its first update
        def step(self, closure=None):
            super().step(closure)
            first = self.param_groups[0]["params"][0]
            if first.is_contiguous():
                first.data = first.data.t().contiguous().t()
            return None

    model = _mlp()
    opt = Transposing(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=1, update_ratio_budget=1 << 20)
    x, y = _data(1)[0]
    assert watch.step(lambda: F.mse_loss(model(x), y)).record.update_ratio is None  # snapshot by numpy, update moved it
    _assert_update_ratio_of_next_step(watch, model, ["0", "2", "4"], lambda: F.mse_loss(model(x), y))  # foreach path now
