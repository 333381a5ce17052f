"""The step pipeline in real training loops, each against a hand-written plain-PyTorch loop.

Gradient accumulation, gradient hygiene (stale gradients, a GAN with two Watches), parameters that
change (unfreezing, add_param_group, parameters outside the model), the user's own exceptions,
defaults that change nothing, rollback under a scheduler, and the step state machine.
"""

from __future__ import annotations

import copy
import logging
import math
import threading

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def _batches(n: int, seed: int = 1, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 6, generator=g), torch.randn(size, 1, generator=g)) for _ in range(n)]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _close_weights(a: nn.Module, b: nn.Module) -> None:
    """To 1e-6: the clip coefficient is worked out in float64 on the host, clip_grad_norm_'s in float32."""
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _hand_accumulation(model, opt, micro_batches, n, clip=None):
    """The textbook loop: (loss / n).backward() per micro-batch, then clip, step, zero_grad."""
    norms, losses = [], []
    for start in range(0, len(micro_batches), n):
        chunk = micro_batches[start:start + n]
        total = 0.0
        for x, y in chunk:
            loss = F.mse_loss(model(x), y)
            (loss / n).backward()
            total += float(loss.detach())
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip else math.inf)))
        losses.append(total / n)
        opt.step()
        opt.zero_grad()
    return norms, losses


# ----- gradient accumulation ---------------------------------------------------------------------
@pytest.mark.parametrize("form", ["closure", "loss"])
@pytest.mark.parametrize("n, clip", [(4, None), (3, None), (4, 0.5)])
def test_accumulation_matches_the_hand_written_loop(form, n, clip):
    data = _batches(4 * n)
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_norms, ref_losses = _hand_accumulation(ref, ref_opt, data, n, clip=clip)

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    watch = gw.Watch(model, opt, clip_norm=clip)
    results = []
    for i, (x, y) in enumerate(data):
        last = (i + 1) % n == 0
        if form == "closure":
            closure = lambda x=x, y=y: F.mse_loss(model(x), y)  # noqa: E731
            if last:
                results.append(watch.step(closure, batch=(x, y)))
            else:
                watch.accumulate(closure, batch=(x, y))
        else:
            loss = F.mse_loss(model(x), y)
            if last:
                results.append(watch.step(loss))
            else:
                watch.accumulate(loss)
    watch.close()
    assert len(results) == 4 and all(r.record.micro_batches == n for r in results)
    assert [r.loss for r in results] == pytest.approx(ref_losses, rel=1e-6)  # the mean over micro-batches
    assert [r.grad_norm for r in results] == pytest.approx(ref_norms, rel=1e-6)
    # clipped on the accumulated gradient, as clip_grad_norm_ after the last backward
    assert [r.clipped for r in results] == [clip is not None and v > clip for v in ref_norms]
    for p, q in zip(model.parameters(), ref.parameters()):
        if n == 4 and clip is None:  # dividing by a power of two is exact: bit-identical weights
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accumulate_then_step_without_an_argument_takes_the_micro_batches_so_far():
    data = _batches(2)
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _hand_accumulation(ref, ref_opt, data, 2)
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for x, y in data:
        watch.accumulate(lambda x=x, y=y: F.mse_loss(model(x), y))
    assert watch.state is gw.StepState.ACCUMULATING
    result = watch.step()
    assert result.record.micro_batches == 2 and watch.state is gw.StepState.READY
    assert _same_weights(model, ref)


def test_a_micro_batch_that_raises_abandons_the_accumulated_step():
    data = _batches(3)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt)
    x, y = data[0]
    watch.accumulate(lambda: F.mse_loss(model(x), y))

    def oom():
        F.mse_loss(model(x), y).backward()  # gradients reached .grad, then the user's code failed
        raise MemoryError("CUDA out of memory (simulated)")

    with pytest.raises(MemoryError):
        watch.accumulate(oom)
    assert watch.state is gw.StepState.READY
    assert all(p.grad is None for p in model.parameters())  # nothing left to leak into the next step
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    (x2, y2) = data[1]
    norm = watch.step(lambda: F.mse_loss(model(x2), y2)).grad_norm
    F.mse_loss(ref(x2), y2).backward()
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), math.inf)), rel=1e-6)


# ----- gradient hygiene ----------------------------------------------------------------------------
def test_stale_gradients_of_a_failed_closure_never_enter_the_next_step():
    data = _batches(3)
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = data[0]

    def fails_after_backward():
        loss = F.mse_loss(model(x), y)
        loss.backward()  # e.g. the usual "catch OOM, skip the batch" after a partial step
        raise RuntimeError("skip this batch")

    with pytest.raises(RuntimeError, match="skip this batch"):
        watch.step(fails_after_backward)
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    results = [watch.step(lambda x=x, y=y: F.mse_loss(model(x), y)) for x, y in data]
    ref_norms = []
    for x, y in data:
        F.mse_loss(ref(x), y).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), math.inf)))
        ref_opt.step()
        ref_opt.zero_grad()
    assert [r.grad_norm for r in results] == pytest.approx(ref_norms, rel=1e-6)  # not 2x
    assert _same_weights(model, ref)


def _gan(seed=0):
    torch.manual_seed(seed)
    gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 6))
    disc = nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    return gen, disc


def _gan_data(steps):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g) + 2.0) for _ in range(steps)]


def test_a_gan_with_one_watch_per_model_trains_as_the_hand_written_loop():
    """The generator's backward fills the discriminator's .grad; the discriminator's step must not use it."""
    steps = 6
    gen, disc = _gan()
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    for z, real in _gan_data(steps):  # the textbook loop (each optimizer zeroes its own gradients first)
        d_opt.zero_grad()
        d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(gen(z).detach())).mean()
        d_loss.backward()
        d_opt.step()
        g_opt.zero_grad()
        g_loss = F.softplus(-disc(gen(z))).mean()
        g_loss.backward()
        g_opt.step()
    ref_gen, ref_disc = gen, disc

    gen, disc = _gan()
    g_opt, d_opt = torch.optim.Adam(gen.parameters(), lr=1e-3), torch.optim.Adam(disc.parameters(), lr=1e-3)
    g_watch, d_watch = gw.Watch(gen, g_opt), gw.Watch(disc, d_opt)
    for z, real in _gan_data(steps):
        d_watch.step(lambda: F.softplus(-disc(real)).mean() + F.softplus(disc(gen(z).detach())).mean())
        g_watch.step(lambda: F.softplus(-disc(gen(z))).mean())  # leaves gradients in disc's .grad
    g_watch.close()
    d_watch.close()
    assert _same_weights(gen, ref_gen) and _same_weights(disc, ref_disc)
    assert not g_watch.findings and not d_watch.findings


def test_the_loss_form_never_guesses_from_grad_being_set():
    gen, disc = _gan()
    d_watch = gw.Watch(disc, torch.optim.SGD(disc.parameters(), lr=0.1))
    z, real = _gan_data(1)[0]
    F.softplus(-disc(gen(z))).mean().backward()  # another model's backward left gradients in disc
    before = copy.deepcopy(disc.state_dict())
    with pytest.raises(ValueError, match="zero_grad"):
        d_watch.step(F.softplus(-disc(real)).mean())
    assert all(torch.equal(v, before[k]) for k, v in disc.state_dict().items())  # nothing applied
    assert d_watch.state is gw.StepState.READY
    d_watch.zero_grad()
    d_watch.step(F.softplus(-disc(real)).mean())  # once cleared, the same call works
    d_watch.close()


def test_a_closure_that_calls_backward_itself_is_a_clear_error():
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batches(1)[0]

    def torch_style_closure():
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"ran backward\(\) itself.*return the loss without calling backward"):
        watch.step(torch_style_closure)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# ----- parameters that change --------------------------------------------------------------------
def test_a_layer_unfrozen_later_is_measured_clipped_and_checked():
    data = _batches(6)

    def build():
        model = _mlp()
        model[0].requires_grad_(False)  # fine-tuning: the first layer starts frozen
        return model, torch.optim.SGD(model.parameters(), lr=0.1)  # the optimizer holds it already

    ref, ref_opt = build()
    model, opt = build()
    watch = gw.Watch(model, opt, clip_norm=0.5)
    assert watch.layers == ["2", "4"]
    for i, (x, y) in enumerate(data):
        if i == 3:
            ref[0].requires_grad_(True)
            model[0].requires_grad_(True)  # gradual unfreezing
        F.mse_loss(ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        result = watch.step(lambda x=x, y=y: F.mse_loss(model(x), y))
        assert math.isfinite(result.layer_grad_norms["0"]) == (i >= 3)  # NaN: not measured (frozen)
    assert watch.layers == ["0", "2", "4"]
    _close_weights(model, ref)  # clipped over the unfrozen layer too, as clip_grad_norm_ does

    # ... and checked: a NaN in the unfrozen layer's gradient is skipped, its weights untouched
    before = model[0].weight.detach().clone()
    handle = model[0].weight.register_hook(lambda g: g * float("nan"))
    x, y = data[0]
    result = watch.step(lambda: F.mse_loss(model(x), y))
    handle.remove()
    assert result.skipped and "0" in result.record.nonfinite_layers
    assert torch.equal(model[0].weight, before)
    watch.close()


def test_a_param_group_added_later_is_measured_clipped_and_checked():
    torch.manual_seed(0)
    body, head = nn.Linear(6, 16), nn.Linear(16, 1)
    model = nn.Sequential(body, nn.ReLU(), head)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref[2].parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=0.3)
    data = _batches(5)
    for i, (x, y) in enumerate(data):
        if i == 2:  # unfreeze the body with its own lr
            opt.add_param_group({"params": list(body.parameters()), "lr": 0.01})
            ref_opt.add_param_group({"params": list(ref[0].parameters()), "lr": 0.01})
        F.mse_loss(ref(x), y).backward()
        held = [p for g in ref_opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(held, 0.3)
        ref_opt.step()
        ref_opt.zero_grad()
        ref[0].zero_grad(set_to_none=True)  # before step 2 its gradients are never applied
        result = watch.step(lambda x=x, y=y: F.mse_loss(model(x), y))
        assert math.isfinite(result.layer_grad_norms["0"]) == (i >= 2)  # NaN: not measured (not held)
    _close_weights(model, ref)
    before = body.weight.detach().clone()
    handle = body.weight.register_hook(lambda g: g * float("inf"))
    x, y = data[0]
    assert watch.step(lambda: F.mse_loss(model(x), y)).skipped
    handle.remove()
    assert torch.equal(body.weight, before)
    watch.close()


def test_gradients_of_parameters_the_optimizer_does_not_hold_never_accumulate(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model[2].parameters(), lr=0.0)  # lr 0: identical batches give identical norms
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        watch = gw.Watch(model, opt)
        x, y = _batches(1)[0]
        results = [watch.step(lambda: F.mse_loss(model(x), y)) for _ in range(3)]
    said = [r for r in caplog.records if "not held by the optimizer" in r.getMessage()]
    assert len(said) == 1 and "0.weight" in said[0].getMessage()  # said once
    assert model[0].weight.grad is None  # cleared after every step
    assert len({r.grad_norm for r in results}) == 1
    watch.close()


def test_fp16_an_optimizer_parameter_outside_the_model_is_checked_like_gradscaler_does():
    """A learned temperature held by the optimizer but not in the model: an inf gradient skips the step."""

    def build():
        model = _mlp()
        temperature = nn.Parameter(torch.ones(()))
        opt = torch.optim.SGD(list(model.parameters()) + [temperature], lr=0.05)
        return model, temperature, opt

    def loss_of(model, temperature, x, y, poison):
        out = model(x).float() * temperature
        return F.mse_loss(out, y) + (temperature * poison).sum()

    data = _batches(4)
    poisons = [0.0, float("inf"), 0.0, 0.0]
    model, temperature, opt = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    ref_skipped = []
    for (x, y), poison in zip(data, poisons):  # the hand-written GradScaler loop
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model, temperature, x, y, 0.0)
        scaled = scaler.scale(loss)
        scaled.backward()
        if poison:
            temperature.grad.fill_(poison)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        ref_skipped.append(scaler.get_scale() < before)
        opt.zero_grad()
    ref_model, ref_temperature = model, temperature

    model, temperature, opt = build()
    watch = gw.Watch(model, opt, precision="fp16", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert "(outside model)" in watch.layers
    skipped = []
    for (x, y), poison in zip(data, poisons):
        handle = temperature.register_hook(lambda g, poison=poison: g.fill_(poison) if poison else g)
        skipped.append(watch.step(lambda x=x, y=y: loss_of(model, temperature, x, y, 0.0)).skipped)
        handle.remove()
    watch.close()
    assert skipped == ref_skipped == [False, True, False, False]
    assert torch.isfinite(temperature) and torch.equal(temperature, ref_temperature)
    assert _same_weights(model, ref_model)


# ----- the user's errors are the user's ----------------------------------------------------------
class _FailingSGD(torch.optim.SGD):
    """Updates some parameters, then raises (a user's custom optimizer with a bug)."""

    def __init__(self, params, fail_on):
        super().__init__(params, lr=0.1)
        self.fail_on, self.calls = fail_on, 0

    def step(self, closure=None):
        self.calls += 1
        group = self.param_groups[0]
        with torch.no_grad():
            for p in group["params"][:2]:
                p.add_(p.grad, alpha=-group["lr"])
        if self.calls == self.fail_on:
            raise ArithmeticError("bug in my optimizer")
        with torch.no_grad():
            for p in group["params"][2:]:
                p.add_(p.grad, alpha=-group["lr"])


def test_an_exception_of_the_users_optimizer_propagates_and_nothing_is_applied_twice():
    data = _batches(3)
    ref = _mlp()
    ref_opt = _FailingSGD(ref.parameters(), fail_on=2)
    for i, (x, y) in enumerate(data):
        F.mse_loss(ref(x), y).backward()
        try:
            ref_opt.step()
        except ArithmeticError:
            pass
        ref_opt.zero_grad()

    model = _mlp()
    opt = _FailingSGD(model.parameters(), fail_on=2)
    watch = gw.Watch(model, opt)
    for i, (x, y) in enumerate(data):
        try:
            watch.step(lambda x=x, y=y: F.mse_loss(model(x), y))
        except ArithmeticError as exc:
            assert i == 1 and str(exc) == "bug in my optimizer"  # the user's own exception, unchanged
    assert opt.calls == 3  # never stepped again by a fallback
    assert _same_weights(model, ref)
    assert watch.errors.count == 0  # not taken for an internal error
    watch.close()


def test_the_users_closure_and_backward_errors_propagate_unchanged():
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    error = KeyError("my bug")

    def broken():
        raise error

    with pytest.raises(KeyError) as info:
        watch.step(broken)
    assert info.value is error
    x, y = _batches(1)[0]
    handle = model[0].weight.register_hook(lambda g: (_ for _ in ()).throw(OverflowError("in my hook")))
    with pytest.raises(OverflowError, match="in my hook"):
        watch.step(lambda: F.mse_loss(model(x), y))
    handle.remove()
    assert watch.errors.count == 0
    assert watch.step(lambda: F.mse_loss(model(x), y)).grad_norm > 0  # training goes on
    watch.close()


def test_optimizers_that_need_a_closure_and_meta_models_are_refused_at_construction(tmp_path):
    model = _mlp()
    with pytest.raises(ValueError, match="LBFGS"):
        gw.Watch(model, torch.optim.LBFGS(model.parameters()), run_dir=tmp_path / "lbfgs")
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device.*to_empty"):
        gw.Watch(meta, torch.optim.SGD(meta.parameters(), lr=0.1), run_dir=tmp_path / "meta")
    assert not (tmp_path / "lbfgs").exists() and not (tmp_path / "meta").exists()


def test_a_refused_watch_creates_no_directory_and_starts_no_thread(tmp_path):
    model = _mlp()
    threads = set(threading.enumerate())
    for bad in (dict(diagnosis=gw.DiagnosisConfig(), repair=gw.RepairConfig(spike_threshold=3.0)),  # no on_spike
                dict(nonfinite=gw.NonFiniteConfig(rollback_every=5)),  # not rollback mode
                dict(amp={"every": 5}),
                dict(tensorboard=123)):
        with pytest.raises((ValueError, TypeError)):
            gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", **bad)
    assert not (tmp_path / "run").exists()
    assert set(threading.enumerate()) == threads


# ----- defaults that change nothing healthy ------------------------------------------------------
def test_the_default_watch_never_clips_a_healthy_run():
    data = [(x * 10, y * 10) for x, y in _batches(8)]  # large gradients: a clip at 1.0 would act
    ref = _mlp()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    for x, y in data:
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model = _mlp()
    watch = gw.Watch(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    results = [watch.step(lambda x=x, y=y: F.mse_loss(model(x), y)) for x, y in data]
    watch.close()
    assert max(r.grad_norm for r in results) > 1.0 and not any(r.clipped for r in results)
    assert _same_weights(model, ref)


def test_one_clipper_instance_is_bound_to_one_watch():
    clipper = gw.AutoClip()
    model_a, model_b = _mlp(0), _mlp(1)
    first = gw.Watch(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), clip_norm=clipper)
    with pytest.raises(ValueError, match="already used by another Watch"):
        gw.Watch(model_b, torch.optim.SGD(model_b.parameters(), lr=0.1), clip_norm=clipper)
    x = torch.randn(4, 6)
    assert not first.step(lambda: model_a(x).square().mean()).skipped  # the first Watch is unaffected
    first.close()


def test_rollback_keeps_the_hyperparameters_a_scheduler_set():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.999))
    watch = gw.Watch(model, opt, on_nonfinite="rollback", nonfinite=gw.NonFiniteConfig(rollback_every=2),
                     repair=gw.RepairConfig(lr_backoff=None), diagnose=False)
    for step in range(1, 8):
        # a schedule of both lr and beta1 (OneCycleLR cycles momentum too)
        opt.param_groups[0]["lr"] = 0.1 / step
        opt.param_groups[0]["betas"] = (0.9 - 0.01 * step, 0.999)
        x = torch.randn(4, 3)
        bad = step == 5
        watch.step(lambda: model(x).square().mean() + (torch.log(-torch.ones(())) if bad else 0.0), batch=x)
        if step == 5:  # restored to the snapshot after step 4: the state, not the schedule
            group = opt.param_groups[0]
            assert group["betas"] == (0.9 - 0.05, 0.999)
            assert group["lr"] == pytest.approx(0.1 / 5 * 0.5)  # the current lr, times the rollback factor
    watch.close()


# ----- options you can see; state you can resume -------------------------------------------------
def test_every_option_is_in_the_signature():
    import inspect

    params = inspect.signature(gw.Watch).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert params["clip_norm"].default is None and params["on_nonfinite"].default == "skip"
    with pytest.raises(TypeError, match="sample_every"):
        gw.Watch(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.1), sample_every=5)


def _spiky_run(watch_factory, steps, resume_at=None):
    """A run with loss spikes and NaN steps (spike skip, LR backoff, AutoClip, diagnosis all engaged)."""
    torch.manual_seed(0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    watch = watch_factory(model, opt)
    data = _batches(steps, seed=5)
    decisions = []
    for step, (x, y) in enumerate(data, start=1):
        if resume_at is not None and step == resume_at + 1:
            state = watch.state_dict()
            ckpt = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
            watch.close()
            model = _mlp()
            model.load_state_dict(ckpt[0])
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(ckpt[1])
            watch = watch_factory(model, opt)
            watch.load_state_dict(state)
        scale = 200.0 if step in (38, 52) else 1.0
        poison = float("nan") if step in (41, 44, 47) else 0.0
        r = watch.step(lambda x=x, y=y: F.mse_loss(model(x) * scale, y) + poison, batch=(x, y))
        decisions.append((r.step, r.skipped, r.clipped, round(r.record.clip_threshold or 0.0, 6),
                          [s.value for s in r.record.skipped_by]))
    watch.close()
    findings = [(f.step, f.code) for f in watch.findings]
    return decisions, findings, [p.detach().clone() for p in model.parameters()], opt.param_groups[0]["lr"]


def test_a_resumed_run_decides_as_the_uninterrupted_one():
    def factory(model, opt):
        return gw.Watch(model, opt, clip_norm="autoclip", on_spike="skip",
                        repair=gw.RepairConfig(spike_warmup=10, lr_backoff=0.5, lr_backoff_after=3))

    whole = _spiky_run(factory, 60)
    resumed = _spiky_run(factory, 60, resume_at=30)
    assert any(d[1] for d in whole[0]) and any("spike" in d[4] for d in whole[0])  # the run has decisions
    assert whole[3] < 0.05  # the lr was backed off
    assert resumed[0] == whole[0]
    assert resumed[3] == whole[3]
    for p, q in zip(resumed[2], whole[2]):
        assert torch.equal(p, q)
    # the resumed Watch raised the findings of steps after the resume exactly as the whole run did
    assert [f for f in resumed[1]] == [f for f in whole[1] if f[0] > 30]


def test_state_dict_survives_torch_save_weights_only(tmp_path):
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_norm="zclip", on_spike="skip")
    for x, y in _batches(5):
        watch.step(lambda x=x, y=y: F.mse_loss(model(x), y))
    torch.save(watch.state_dict(), tmp_path / "gw.pt")
    state = torch.load(tmp_path / "gw.pt", weights_only=True)
    fresh = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_norm="zclip", on_spike="skip")
    fresh.load_state_dict(state)
    assert fresh.steps_taken == 5 and len(fresh.history) == 5
    watch.close()
    fresh.close()


# ----- the step state machine --------------------------------------------------------------------
def test_calls_out_of_order_are_a_runtime_error_naming_the_call():
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match=r"watch.step\(\).*accumulate"):
        watch.step()  # nothing accumulated
    watch.accumulate(lambda: F.mse_loss(model(x), y))
    with pytest.raises(RuntimeError, match=r"watch.observe\(\)"):
        watch.observe()
    with pytest.raises(RuntimeError, match=r"watch.state_dict\(\)"):
        watch.state_dict()

    def reentrant():
        watch.step(lambda: F.mse_loss(model(x), y))
        return F.mse_loss(model(x), y)

    watch.step()
    with pytest.raises(RuntimeError, match="while a step is running"):
        watch.step(reentrant)
    assert watch.state is gw.StepState.READY
    watch.close()
    assert watch.state is gw.StepState.CLOSED
    with pytest.raises(RuntimeError, match="closed"):
        watch.step(lambda: F.mse_loss(model(x), y))
