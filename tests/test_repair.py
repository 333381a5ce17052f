"""Repair (issue 10): spike skipping and LR backoff, alone and composed with rollback."""

from __future__ import annotations

import doctest
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import repair
from gradwatch.repair import backoff, spike
from gradwatch.repair.backoff import LRBackoff
from gradwatch.repair.spike import SpikeDetector

torch.set_num_threads(1)


# ----- the detector against a hand-written reference ------------------------------------------
def spike_reference(losses, norms, threshold=6.0, window=128, warmup=32):
    """OLMo-style skip decision with a robust baseline, written out with numpy.

    A step is a spike when, against the last ``window`` finite values before it (at least
    ``warmup`` of them), its loss or (on a log scale) its gradient norm lies more than
    ``threshold`` x 1.4826 x MAD above the median, more than 5% above the median value, and
    above it by more than 1% of the signal's early level (median |x| of its first ``warmup``
    finite values; no such floor before those are seen).
    """
    hist_l, hist_n, out = [], [], []
    for loss, norm in zip(losses, norms):
        hit = False
        for value, hist, log in ((loss, hist_l, False), (norm, hist_n, True)):
            h = np.array(hist[-window:])
            if len(h) < warmup or not math.isfinite(value):
                continue
            med_raw = np.median(h)
            early = np.median(np.abs(hist[:warmup]))  # hist keeps every finite value, oldest first
            x, base = (math.log(value), np.log(h[h > 0])) if log else (value, h)
            med = np.median(base)
            scale = max(1.4826 * np.median(np.abs(base - med)), 1e-6 * max(abs(med), 1e-12))
            if (x - med) / scale > threshold and value - med_raw > max(0.05 * abs(med_raw), 0.01 * early):
                hit = True
        out.append(hit)
        if math.isfinite(loss):
            hist_l.append(loss)
        if math.isfinite(norm):
            hist_n.append(norm)
    return out


def recorded_run(n=300, seed=0):
    """Loss and norm as a run records them: decaying noisy loss, drifting norm, a few spikes."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    losses = 2.0 + 1.5 * np.exp(-t / 60) + 0.05 * rng.standard_normal(n)
    norms = np.exp(np.linspace(-1.0, 0.5, n) + 0.25 * rng.standard_normal(n))
    losses[[80, 200]] *= [30.0, 1.4]
    norms[[150, 151, 260]] *= [1e3, 50.0, 4.0]
    return losses.tolist(), norms.tolist()


def decisions(detector, losses, norms):
    out = []
    for loss, norm in zip(losses, norms):
        out.append(detector.check(loss, norm) is not None)
        detector.observe(loss, norm)
    return out


@pytest.mark.parametrize("threshold, window, warmup", [(6.0, 128, 32), (4.0, 40, 10), (10.0, 64, 64)])
def test_spike_detector_matches_reference(threshold, window, warmup):
    losses, norms = recorded_run()
    got = decisions(SpikeDetector(threshold, window, warmup), losses, norms)
    assert got == spike_reference(losses, norms, threshold, window, warmup)
    if threshold == 6.0:
        assert [i for i, hit in enumerate(got) if hit] == [80, 150, 151]  # the drift is not a spike


def test_spike_detector_ignores_nonfinite_values():
    losses, norms = recorded_run()
    want = decisions(SpikeDetector(), losses, norms)
    bad_l, bad_n = list(losses), list(norms)
    for pos, (bl, bn) in {40: (math.nan, 1.0), 120: (2.0, math.inf), 121: (math.inf, math.nan), 230: (math.nan, math.nan)}.items():
        bad_l.insert(pos, bl)
        bad_n.insert(pos, bn)
    det = SpikeDetector()
    got = decisions(det, bad_l, bad_n)
    kept = [hit for i, hit in enumerate(got) if i not in (40, 120, 121, 230)]
    assert kept == want
    assert all(math.isfinite(v) for h in det.history.values() for v in h)


def test_spike_detector_state_dict_round_trips():
    losses, norms = recorded_run()
    det = SpikeDetector(window=50, warmup=10)
    decisions(det, losses[:100], norms[:100])
    twin = SpikeDetector(window=50, warmup=10)
    twin.load_state_dict(det.state_dict())
    assert decisions(twin, losses[100:], norms[100:]) == decisions(det, losses[100:], norms[100:])


# ----- on_spike="skip" through the Watch ----------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _batch(step, scale=1.0):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 8, generator=g) * scale, torch.randint(0, 4, (32,), generator=g)


def test_on_spike_skip_vetoes_the_outlier_step_and_reports_it_once(tmp_path):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gw.Watch(model, opt, on_spike="skip", run_dir=tmp_path / "run",
                     repair=gw.RepairConfig(lr_backoff=None))
    results = []
    for step in range(1, 61):
        x, y = _batch(step, 1e3 if step == 45 else 1.0)
        if step == 45:
            before = [p.detach().clone() for p in model.parameters()]
            adam_steps = [float(opt.state[p]["step"]) for p in model.parameters()]
        results.append(watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y)))
        if step == 45:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not applied
            assert [float(opt.state[p]["step"]) for p in model.parameters()] == adam_steps
    skipped = [r.step for r in results if r.skipped]
    assert skipped == [45]
    spikes = [f for f in watch.findings if f.code == "loss_spike"]
    assert len(spikes) == 1 and spikes[0].step == 45  # the diagnosis rule does not report it again
    ev = spikes[0].evidence
    assert ev["z"] > 6 and ev["threshold"] == 6.0 and ev["spikes_skipped"] == 1 and ev["action"] == "skipped"
    assert ev["value"] > 100 * ev["median"]
    assert "skipped" in spikes[0].message and "robust standard deviations" in spikes[0].message
    assert results[44].record.skipped_by == [gw.SkipReason.SPIKE]
    watch.close()
    run = gw.load_run(tmp_path / "run")
    assert run.steps["skipped"].nonzero()[0].tolist() == [44]
    assert run.step_extras[45]["skipped_by"] == ["spike"]
    assert [f.code for f in run.findings].count("loss_spike") == 1


def test_no_step_is_skipped_on_a_clean_run():
    model = _model()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), on_spike="skip")
    for step in range(1, 121):
        x, y = _batch(step)
        assert not watch.step(lambda: F.cross_entropy(model(x), y)).skipped
    assert watch.plugins and not [f for f in watch.findings if f.code == "loss_spike"]
    watch.close()


def test_spike_threshold_is_configurable():
    def run(threshold):
        model = _model()
        watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.05), on_spike="skip",
                         repair=gw.RepairConfig(spike_threshold=threshold, spike_warmup=10, lr_backoff=None))
        skipped = []
        for step in range(1, 41):
            x, y = _batch(step, 6.0 if step == 30 else 1.0)  # a mild outlier
            skipped += [step] if watch.step(lambda: F.cross_entropy(model(x), y)).skipped else []
        watch.close()
        return skipped

    assert run(3.0) == [30]
    assert run(1e3) == []


# ----- LR backoff ---------------------------------------------------------------------------------
def _nan_steps_run(nan_steps, n=12, lr=0.1, **options):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    watch = gw.Watch(model, opt, **options)
    for step in range(1, n + 1):
        x = torch.ones(4, 3) * (math.nan if step in nan_steps else 1.0)
        watch.step(lambda: model(x).square().mean(), batch=x)
    return watch, opt


def test_lr_backoff_after_k_lost_steps_in_the_window(tmp_path):
    watch, opt = _nan_steps_run({2, 8, 9}, repair=gw.RepairConfig(lr_backoff=0.5, lr_backoff_after=2, lr_backoff_window=5),
                                run_dir=tmp_path / "r")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # 2 and 8 are 6 apart: only 8+9 triggered
    found = [f for f in watch.findings if f.code == "lr_too_high"]
    assert len(found) == 1 and found[0].step == 9
    ev = found[0].evidence
    assert ev["lost_steps"] == [8, 9] and ev["lr_before"] == [0.1] and ev["lr_after"] == [pytest.approx(0.05)]
    assert ev["reasons"] == ["nonfinite", "nonfinite"] and ev["action"] == "lr_backoff"
    assert "0.1 to 0.05" in found[0].message
    watch.close()
    events = [json.loads(line) for line in (tmp_path / "r" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] == "lr_backoff"] == ["lr_backoff"]


def test_lr_backoff_counts_afresh_after_each_backoff_and_scales_every_group():
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.2}])
    watch = gw.Watch(model, opt,
                     repair=gw.RepairConfig(lr_backoff=0.5, lr_backoff_after=2, lr_backoff_window=100))
    for step in range(1, 8):
        x = torch.ones(4, 3) * (math.nan if step in (1, 2, 3, 5) else 1.0)
        watch.step(lambda: model(x).square().mean())
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.025), pytest.approx(0.05)]
    assert [f.step for f in watch.findings if f.code == "lr_too_high"] == [2, 5]
    watch.close()


def test_lr_backoff_default_is_on_only_with_a_repair_mode():
    lost = {2, 3, 5, 7, 8}
    _, opt = _nan_steps_run(lost)
    assert opt.param_groups[0]["lr"] == 0.1  # plain on_nonfinite="skip": no lr change behind the user's back
    _, opt = _nan_steps_run(lost - {8}, on_spike="skip")
    assert opt.param_groups[0]["lr"] == 0.1  # k = 5 by default
    _, opt = _nan_steps_run(lost, on_spike="skip")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    _, opt = _nan_steps_run(lost, on_spike="skip", repair=gw.RepairConfig(lr_backoff=None))
    assert opt.param_groups[0]["lr"] == 0.1


def test_lr_backoff_scales_a_tensor_lr_in_place():
    model = nn.Linear(3, 1)
    lr = torch.tensor(0.1)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    assert backoff.scale_lr_(opt, 0.5) == ([pytest.approx(0.1)], [pytest.approx(0.05)])
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)


def test_lr_backoff_state_dict_round_trips():
    plugin = LRBackoff(0.5, 3, 10)
    plugin.lost.extend([(3, "spike"), (5, "nonfinite")])
    twin = LRBackoff(0.5, 3, 10)
    twin.load_state_dict(json.loads(json.dumps(plugin.state_dict())))
    assert list(twin.lost) == list(plugin.lost)


# ----- composed with rollback (issue 4's on_nonfinite="rollback") -------------------------------
def _rollback_run(rollback_lr_factor=None, **options):
    """Steps 6, 7, 9 produce NaN inside the loss (not in the batch): each is rolled back."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, on_nonfinite="rollback", diagnose=False, **options,
                     nonfinite=gw.NonFiniteConfig(rollback_every=2, rollback_lr_factor=rollback_lr_factor))
    for step in range(1, 13):
        x = torch.randn(4, 3)
        bad = step in (6, 7, 9)
        watch.step(lambda: model(x).square().mean() + (torch.log(-torch.ones(())) if bad else 0.0), batch=x)
    return watch, opt


def test_rollback_backoff_counts_as_the_window_backoff():
    watch, opt = _rollback_run()
    keeper = next(p.rollback for p in watch.plugins if getattr(p, "rollback", None) is not None)
    assert [e.step for e in keeper.events] == [6, 7, 9]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)  # the rollbacks' own backoffs, no extra
    assert not [f for f in watch.findings if f.code == "lr_too_high"]
    watch.close()


def test_rollbacks_count_towards_k_when_they_keep_the_lr():
    watch, opt = _rollback_run(rollback_lr_factor=1.0, repair=gw.RepairConfig(lr_backoff_after=3))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # 3 rolled-back steps in 50: one backoff
    found = [f for f in watch.findings if f.code == "lr_too_high"]
    assert len(found) == 1 and found[0].step == 9
    assert found[0].evidence["reasons"] == ["rollback"] * 3
    watch.close()


# ----- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, words",
    [
        ({"on_spike": "yes"}, ["on_spike", "'skip'", "None"]),
        ({"on_spike": "skip", "repair": dict(spike_threshold=0)}, ["spike_threshold"]),
        ({"on_spike": "skip", "repair": dict(spike_window=1)}, ["spike_window"]),
        ({"on_spike": "skip", "repair": dict(spike_warmup=200)}, ["spike_warmup", "spike_window"]),
        ({"repair": dict(spike_threshold=4.0)}, ["spike_threshold", "on_spike='skip'"]),
        ({"repair": dict(lr_backoff=1.5)}, ["lr_backoff", "(0, 1)"]),
        ({"repair": dict(lr_backoff="half")}, ["lr_backoff"]),
        ({"repair": dict(lr_backoff=0.5, lr_backoff_after=0)}, ["lr_backoff_after"]),
        ({"repair": dict(lr_backoff=0.5, lr_backoff_after=5, lr_backoff_window=3)},
         ["lr_backoff_after", "lr_backoff_window"]),
    ],
)
def test_bad_options_are_one_clear_error(options, words, tmp_path):
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError) as info:  # from the config object or from the Watch
        if "repair" in options:
            options = {**options, "repair": gw.RepairConfig(**options["repair"])}
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", **options)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not (tmp_path / "run").exists()


def test_docstring_examples_run():
    for module in (spike, backoff, repair):
        failures, _ = doctest.testmod(module)
        assert failures == 0, module.__name__
    assert doctest.testmod(spike)[1] >= 5 and doctest.testmod(backoff)[1] >= 3


def test_docs_code_blocks_run(tmp_path, monkeypatch, capsys):
    """Every ```python block of docs/repair.md runs as written (each in a fresh namespace)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "repair.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/repair.md", "exec"), {})
    assert "Step 51 was skipped" in capsys.readouterr().out
