"""HF accelerate: the documented Accelerator loop (accumulation, bf16 autocast on CPU) against the same loop
written by hand without gradwatch, and a non-finite update skipped through accelerate's optimizer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from _docs import doc_block

accelerate = pytest.importorskip("accelerate")


def _hand_loop() -> dict[str, Any]:
    """docs/integrations.md's loop without gradwatch: accelerate clips, torch measures each layer."""
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(mixed_precision="bf16", gradient_accumulation_steps=4, cpu=True)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(128, 16), torch.randn(128, 1)),
                                       batch_size=8)
    model, opt, data = accelerator.prepare(model, opt, data)
    dtypes: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    out: dict[str, Any] = {"layer_norms": [], "total": [], "loss": []}
    losses = []
    for x, y in data:
        with accelerator.accumulate(model):
            loss = F.mse_loss(model(x), y)
            losses.append(loss.item())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                out["layer_norms"].append([math.hypot(*(p.grad.norm().item() for p in model[i].parameters())) for i in (0, 2)])
                out["total"].append(accelerator.clip_grad_norm_(model.parameters(), 1.0).item())
                out["loss"].append(float(np.mean(losses)))
                losses.clear()
            opt.step()
            opt.zero_grad()
    out["weights"] = [p.detach().clone() for p in model.parameters()]
    out["dtypes"] = set(dtypes)
    return out


def test_documented_accelerate_loop_matches_the_loop_without_gradwatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__doc__"}
    exec(compile(doc_block("integrations.md", "accelerate"), "docs/integrations.md", "exec"), namespace)
    assert capsys.readouterr().out.split() == ["4", "False"]
    reference = _hand_loop()
    assert reference["dtypes"] == {torch.bfloat16}  # accelerate autocasts to bf16 on the CPU
    assert max(reference["total"]) > 1.0  # the first updates are clipped: the clip is compared, not idle
    # the same weights as accelerate's own clipping
    for mine, theirs in zip(namespace["model"].parameters(), reference["weights"]):
        torch.testing.assert_close(mine.detach(), theirs, rtol=1e-6, atol=1e-7)
    run = gw.load_run(tmp_path / "runs" / "accelerate")
    assert run.meta["precision"] == "bf16" and run.steps["step"].tolist() == [1, 2, 3, 4]  # one step per update
    # pre-clip norms of the accumulated gradient: per layer as torch computes them, global as accelerate's clip returns
    np.testing.assert_allclose(run.steps["layer_grad_norms"], reference["layer_norms"], rtol=1e-5)
    np.testing.assert_allclose(run.steps["grad_norm"], reference["total"], rtol=1e-5)
    np.testing.assert_allclose(run.steps["clipped"], np.array(reference["total"]) > 1.0)
    np.testing.assert_allclose(run.steps["loss"], reference["loss"], rtol=1e-6)  # the mean of the 4 micro-batches
    assert [f.code for f in run.findings] == []  # a healthy bf16 run: nothing to say (no bf16_lost_updates false alarm)


def test_nonfinite_update_is_skipped_through_accelerates_optimizer() -> None:
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2, cpu=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    xs = torch.randn(48, 4)
    xs[18, 0] = float("nan")  # in micro-batch 3 (rows 16-23): the second update
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, torch.randn(48, 1)), batch_size=8)
    model, opt, data = accelerator.prepare(model, opt, data)
    watch = gw.Watch(model, opt, precision="bf16")
    before: list[torch.Tensor] = []
    changed = []
    for x, y in data:
        with accelerator.accumulate(model):
            if not before:
                before = [p.detach().clone() for p in model.parameters()]
            accelerator.backward(F.mse_loss(model(x), y))
            result = watch.observe(batch=(x, y)) if accelerator.sync_gradients else None
            opt.step()
            opt.zero_grad()
            if result is not None:
                changed.append((result.skipped, any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))))
                before = []
    watch.close()
    assert changed == [(False, True), (True, False), (False, True)]  # the skipped update left every weight as it was
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # said once, at the skipped update (the NaN came from an earlier micro-batch than the one passed as batch=)
    assert [(f.step, f.severity) for f in watch.findings if f.severity == "error"] == [(2, "error")]
