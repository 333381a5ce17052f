"""Watch.observe(): measure and decide without owning the optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


def _layer_norms(model: nn.Module) -> dict[str, float]:
    sq: dict[str, float] = {}
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        sq[layer] = sq.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
    return {k: math.sqrt(v) for k, v in sq.items()}


def test_observe_records_pre_clip_norms_and_clips_like_clip_grad_norm():
    model, twin = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, clip_norm=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    loss = F.mse_loss(model(x), y)
    loss.backward()
    F.mse_loss(twin(x), y).backward()
    expect = _layer_norms(twin)
    total = float(torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1))
    result = watch.observe(loss, batch=(x, y))
    assert result.layer_grad_norms == pytest.approx(expect, rel=1e-6)
    assert result.grad_norm == pytest.approx(total, rel=1e-6) and result.clipped
    assert result.loss == pytest.approx(float(loss.detach()))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad)  # clipped in place, like clip_grad_norm_
    assert all(p.grad is not None for p in model.parameters())  # observe() never zeroes
    watch.close()


def test_observe_skip_leaves_adam_weights_and_state_bit_identical():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    watch = gw.Watch(model, opt, clip_norm=None)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    F.mse_loss(model(x), y).backward()
    watch.observe(None)
    opt.step()
    opt.zero_grad()
    weights = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items()}
    loss = F.mse_loss(model(x), y) * float("nan")
    loss.backward()
    result = watch.observe(loss)
    assert result.skipped and watch.history[-1].skipped
    assert all(p.grad is None for p in model.parameters())
    opt.step()  # the loop's own step: nothing to apply
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    after = {k: v for p in model.parameters() for k, v in opt.state[p].items()}
    assert all(torch.equal(state[k], after[k]) for k in state)
    watch.close()


def test_observe_without_loss_and_bad_input():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt)
    model(torch.randn(4, 6)).sum().backward()
    result = watch.observe()
    assert math.isnan(result.loss) and not result.skipped and result.grad_norm > 0
    with pytest.raises(ValueError, match="scalar"):
        watch.observe(torch.ones(3))
    watch.close()
    with pytest.raises(RuntimeError, match="closed"):
        watch.observe(1.0)
    fp16 = gw.Watch(model, opt, precision="fp16") if torch.amp.GradScaler("cpu").is_enabled() else None
    if fp16 is not None:
        with pytest.raises(ValueError, match="precision"):
            fp16.observe(1.0)
        fp16.close()


def test_docs_observe_snippet_runs(capsys):
    from _docs import doc_block

    exec(compile(doc_block("integrations.md", "observe"), "docs/integrations.md", "exec"), {"__name__": "__doc__"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("2 True") and "degenerate_batch" in lines[2]
    assert lines[3] == "3 False []"


@pytest.mark.slow
def test_docs_compile_snippet_runs(capsys):
    from _docs import doc_block

    torch._dynamo.reset()
    exec(compile(doc_block("integrations.md", "compile"), "docs/integrations.md", "exec"), {"__name__": "__doc__"})
    assert "['0', '2']" in capsys.readouterr().out


def _ratio_by_hand(before: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """||w_after - w_before|| / ||w_before|| per layer, from the named parameters."""
    dw: dict[str, float] = {}
    w: dict[str, float] = {}
    for name, p in model.named_parameters():
        layer = name.rpartition(".")[0]
        dw[layer] = dw.get(layer, 0.0) + float((p.detach().double() - before[name].double()).pow(2).sum())
        w[layer] = w.get(layer, 0.0) + float(before[name].double().pow(2).sum())
    return {k: math.sqrt(dw[k] / w[k]) for k in dw}


def test_observe_measures_the_update_ratio_once_the_callers_optimizer_stepped(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=2, update_ratio_budget=1 << 20, run_dir=tmp_path / "run", flush_every=2)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    want = {}
    for step in range(1, 9):
        F.mse_loss(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        record = watch.observe(None).record
        if step == 4:  # no optimizer.step() follows (a GradScaler that found inf): no ratio for this step
            opt.zero_grad()
            continue
        opt.step()
        opt.zero_grad()
        if step <= 2 or step % 2 == 0:  # the first `every` steps (divergence shows early), then every 2nd
            want[step] = _ratio_by_hand(before, model)
            assert dict(zip(watch.layers, record.update_ratio.tolist())) == pytest.approx(want[step], rel=1e-5)
        else:
            assert record.update_ratio is None
    assert watch.history[3].update_ratio is None  # step 4: the hook was dropped by the next observe()
    watch.close()
    run = gw.load_run(tmp_path / "run")
    ratios = run.steps["update_ratio"]  # the lines were encoded after the caller's step: they carry the ratio
    for step, expect in want.items():
        assert ratios[step - 1].tolist() == pytest.approx(list(expect.values()), rel=1e-4)
    assert all(math.isnan(v) for v in ratios[3])


def test_observe_update_ratio_raises_lr_too_high_for_updates_that_rewrite_the_weights():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)  # each update moves every weight by ~1: ratio >> 0.1
    watch = gw.Watch(model, opt, clip_norm=None, update_ratio_every=1, update_ratio_budget=1 << 20)
    x, y = torch.randn(16, 6), torch.randn(16, 1)
    for _ in range(4):
        F.mse_loss(model(x), y).backward()
        watch.observe(None)
        opt.step()
        opt.zero_grad()
    found = [f for f in watch.findings if f.code == "lr_too_high"]
    assert found and found[0].evidence["update_ratio_median"] > 0.1
    watch.close()
