"""Reproducible or not: the replay's verdict, bad_batches.jsonl, and a restarted run that skips the bad batch.

References: the op and line the test itself wrote; a module that misbehaves only on
its first call (so a replay cannot reproduce it); a plain hand-written loop that
leaves the bad batch out.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.nonfinite.badbatches import (BadBatch, BadBatches, append_bad_batch, fingerprint, read_bad_batches,
                                            signature)
from gradwatch.nonfinite.classify import verdict
from gradwatch.nonfinite.replay import ReplayOutcome


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 4, generator=g), torch.randn(6, 1, generator=g)


class MisbehavesOnce(nn.Module):
    """Identity, except that its first call returns NaN (a transient fault: a replay is finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return h * float("nan") if self.calls == 1 else h


# ----- the verdict ---------------------------------------------------------------------------------
def test_a_deterministic_nan_is_reproduced_with_its_op_and_line(tmp_path):
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run")
    x, y = _batch(0)
    line = None

    def closure():
        nonlocal line
        import inspect

        line = inspect.currentframe().f_lineno + 1
        return torch.log(model(x).abs() * 0).mean()  # log(0) = -inf, every time

    r = watch.step(closure, batch=(x, y))
    watch.close()
    f = r.findings[0]
    assert r.skipped and f.evidence["verdict"] == "reproduced"
    assert "aten.log" in f.evidence["verdict_reason"] and f"test_badbatches.py:{line}" in f.evidence["verdict_reason"]
    assert f.evidence["verdict_reason"].startswith("deterministic")


def test_a_transient_nan_is_not_reproduced():
    torch.manual_seed(0)
    once = MisbehavesOnce()
    model = nn.Sequential(nn.Linear(4, 8), once, nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _batch(0)
    r = watch.step(lambda: nn.functional.mse_loss(model(x), y), batch=(x, y))
    watch.close()
    f = r.findings[0]
    assert r.skipped and once.calls == 2  # the step, then its replay (finite)
    assert f.evidence["verdict"] == "not reproduced" and f.evidence["replay"]["reproduced"] is False
    assert f.evidence["verdict_reason"].startswith("transient") and "hardware" in f.evidence["verdict_reason"]
    assert "not reproduced" in f.message and any("skip_bad_batches=True" in fix for fix in f.fixes)


def test_the_loss_form_is_not_replayed():
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, _ = _batch(0)
    r = watch.step(torch.log(model(x).abs() * 0).mean())
    watch.close()
    assert r.findings[0].evidence["verdict"] == "not replayed"


def test_verdict_of_a_failed_replay_is_not_replayed():
    assert verdict(ReplayOutcome(localization=None, error="RuntimeError: boom"))[0] == "not replayed"
    assert verdict(ReplayOutcome(localization=None, loss=1.0, grads_finite=True))[0] == "not reproduced"


# ----- the file ------------------------------------------------------------------------------------
def _nan_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _batch(step)
    x[2, 1] = float("nan")  # a bad record in the data: deterministic
    return x, y


def test_bad_steps_are_written_at_once_and_read_back(tmp_path):
    model = _mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", flush_every=50)
    for step in range(1, 6):
        batch = _nan_batch(step) if step in (2, 4) else _batch(step)
        watch.step(lambda: nn.functional.mse_loss(model(batch[0]), batch[1]), batch=batch)
        if step == 2:  # on disk before the writer's next flush (a crash now loses nothing)
            assert len((tmp_path / "run" / "bad_batches.jsonl").read_text().splitlines()) == 1
    watch.close()
    lines = [json.loads(line) for line in (tmp_path / "run" / "bad_batches.jsonl").read_text().splitlines()]
    assert [(d["step"], d["code"], d["verdict"], d["rank"]) for d in lines] == [
        (2, "degenerate_batch", "reproduced", None), (4, "degenerate_batch", "reproduced", None)]
    read = read_bad_batches(tmp_path / "run")
    assert [b.step for b in read] == [2, 4]
    assert [b.fingerprint for b in read] == [fingerprint(_nan_batch(2)), fingerprint(_nan_batch(4))]
    assert read[0].signature == "float32(6,4);float32(6,1)"


def test_a_restarted_run_skips_the_bad_batch_like_a_hand_written_loop(tmp_path):
    """Train 5 steps (step 4's batch is bad), restart from the step-2 checkpoint with skip_bad_batches."""
    batches = {s: (_nan_batch(s) if s == 4 else _batch(s)) for s in range(1, 6)}
    loss_fn = nn.functional.mse_loss
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "run")
    checkpoint = None
    for s in range(1, 6):
        x, y = batches[s]
        watch.step(lambda: loss_fn(model(x), y), batch=(x, y))
        if s == 2:
            checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                          "opt": opt.state_dict(), "watch": watch.state_dict()}
    watch.close()

    # the restart: weights, optimizer and Watch state from the checkpoint, the same data from step 3 on
    model = _mlp()
    model.load_state_dict(checkpoint["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.load_state_dict(checkpoint["opt"])
    watch = gw.Watch(model, opt, run_dir=tmp_path / "run", run_dir_mode="resume", skip_bad_batches=True)
    watch.load_state_dict(checkpoint["watch"])
    skipped, results = [], []
    for s in range(3, 6):
        x, y = batches[s]
        if watch.should_skip((x, y)):
            skipped.append(s)
            continue
        results.append(watch.step(lambda: loss_fn(model(x), y), batch=(x, y)))
    watch.close()
    assert skipped == [4] and watch.batches_skipped == 1
    assert not any(r.skipped for r in results)
    # the bad-batch list survived the resume (it is never superseded)
    assert [b.step for b in read_bad_batches(tmp_path / "run")] == [4]

    # the reference: a plain loop from the same start that leaves batch 4 out by hand
    ref = _mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for s in (1, 2, 3, 5):
        x, y = batches[s]
        ref_opt.zero_grad()
        loss_fn(ref(x), y).backward()
        ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_should_skip_is_off_by_default_and_needs_a_run_dir(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    append_bad_batch(tmp_path, BadBatch(1, fingerprint(_batch(1)), signature(_batch(1)), "reproduced"))
    watch = gw.Watch(model, opt, run_dir=tmp_path)
    assert watch.should_skip(_batch(1)) is False  # skip_bad_batches=False: never
    watch.close()
    with pytest.raises(ValueError, match="run_dir"):
        gw.Watch(model, opt, skip_bad_batches=True)
    with pytest.raises(TypeError, match="skip_bad_batches"):
        gw.Watch(model, opt, run_dir=tmp_path, skip_bad_batches="yes")


# ----- fingerprints --------------------------------------------------------------------------------
def test_fingerprint_is_the_content():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert fingerprint({"a": x, "b": 3}) == fingerprint({"b": 3, "a": x.clone()})  # key order does not matter
    y = x.clone()
    y[2, 3] += 1e-3
    assert fingerprint((x,)) != fingerprint((y,))  # one element
    assert fingerprint((x,)) != fingerprint((x.double(),))  # the dtype
    assert fingerprint((x,)) != fingerprint((x.reshape(4, 3),))  # the shape
    assert fingerprint((x.t(),)) == fingerprint((x.t().contiguous(),))  # the values, not the strides
    assert fingerprint((x.bfloat16(),)) == fingerprint((x.bfloat16().clone(),))  # no numpy bfloat16 needed
    known = BadBatches([BadBatch(1, fingerprint((x,)), signature((x,)), "reproduced")])
    assert known.contains((x.clone(),)) and not known.contains((y,)) and not known.contains((x[:2],))


def test_a_damaged_line_is_skipped(tmp_path):
    (tmp_path / "bad_batches.jsonl").write_text('{"step": 1, "fingerprint": "blake2b:00"}\nnot json\n{"step": "x"}\n')
    assert [(b.step, b.fingerprint) for b in read_bad_batches(tmp_path)] == [(1, "blake2b:00")]
