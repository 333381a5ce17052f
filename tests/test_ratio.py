"""The update-to-weight ratio in bounded memory: rotating rounds of layers within a byte budget."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.diagnosis.rules import UpdateRatioSignal
from gradwatch.ratio import MiB, default_budget, plan_rounds


def _model(widths=(8, 64, 32, 128, 16, 4), seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def _hand_ratios(model: nn.Module, names: list[str], before: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """||W_after - W_before|| / ||W_before|| per layer, in a plain loop over the layer's parameters."""
    out = {}
    for name in names:
        params = list(model.get_submodule(name).parameters(recurse=False))
        dw = math.sqrt(sum(float(((p.detach().double() - b.double()) ** 2).sum()) for p, b in zip(params, before[name])))
        w = math.sqrt(sum(float((b.double() ** 2).sum()) for b in before[name]))
        out[name] = dw / w
    return out


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy path; foreach path
def test_each_measured_layer_has_the_hand_computed_ratio_and_k_rounds_cover_all(dtype) -> None:
    model = _model().to(dtype)
    # one layer's bytes at most: every round holds one or two layers
    budget = max(p.numel() * p.element_size() for p in model.parameters()) + 1024
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.Watch(model, opt, update_ratio_every=3, update_ratio_budget=budget, diagnose=False)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)
    seen: dict[int, set[str]] = {}
    for step in range(1, 25):
        names = watch.layers or [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
        before = {n: [p.detach().clone() for p in model.get_submodule(n).parameters(recurse=False)] for n in names}
        record = watch.step(lambda: F.mse_loss(model(x), y)).record
        if record.update_ratio is None:
            assert not (step <= 3 or step % 3 == 0)
            continue
        ratios = dict(zip(watch.layers, record.update_ratio.tolist()))
        measured = {n for n, v in ratios.items() if not math.isnan(v)}
        seen[step] = measured
        hand = _hand_ratios(model, sorted(measured), before)
        for name in measured:
            assert ratios[name] == pytest.approx(hand[name], rel=1e-2 if dtype == torch.bfloat16 else 1e-5)
    rounds = watch._pipeline.ratio.rounds
    k = len(rounds)
    assert k >= 3 and all(r.total_bytes <= budget for r in rounds)
    due = sorted(seen)
    for i in range(len(due) - k + 1):  # any k measurements in a row cover every layer
        assert set().union(*(seen[s] for s in due[i: i + k])) == set(watch.layers)
    # the first measurement is step 1 (issue 17): not delayed to step update_ratio_every
    assert due[0] == 1 and seen[1]
    watch.close()


def test_a_layer_larger_than_the_budget_is_measured_on_slices_of_its_elements() -> None:
    model = _model((8, 256, 4))  # layer 0: 8*256+256 floats = 9 KiB; layer 2: 4 KiB
    budget = 4096
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    watch = gw.Watch(model, opt, update_ratio_every=1, update_ratio_budget=budget, diagnose=False)
    meter = watch._pipeline.ratio
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    covered = {0: np.zeros(8 * 256 + 256, bool)}
    for step in range(1, 9):
        flat_before = torch.cat([p.detach().reshape(-1).clone() for p in model[0].parameters()])
        record = watch.step(lambda: F.mse_loss(model(x), y)).record
        rnd = meter.round_of(step)
        assert rnd.total_bytes <= budget
        flat_after = torch.cat([p.detach().reshape(-1) for p in model[0].parameters()])
        if 0 in rnd.partial:  # the slice's own ratio, from the elements of the pieces
            offsets = [0, model[0].weight.numel()]
            idx = np.concatenate([np.arange(offsets[p.param] + p.start, offsets[p.param] + p.stop) for p in rnd.pieces
                                  if p.param < 2])
            covered[0][idx] = True
            want = float((flat_after[idx] - flat_before[idx]).norm() / flat_before[idx].norm())
            assert record.update_ratio[0] == pytest.approx(want, rel=1e-5)
            assert math.isnan(record.update_ratio[1]) or 1 in rnd.layers
    assert covered[0].all()  # the slices of consecutive rounds cover the whole layer
    watch.close()


def _storages() -> dict[int, int]:
    """data_ptr -> nbytes of every tensor storage Python can reach (each storage once)."""
    out = {}
    for obj in gc.get_objects():
        # Plain tensors only: FakeTensors and other subclasses left alive by earlier torch.compile
        # tests hold no real storage, and reading their data pointer warns (an error under pytest).
        if type(obj) not in (torch.Tensor, nn.Parameter) or obj.device.type != "cpu" or obj.is_sparse:
            continue
        try:
            storage = obj.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
    return out


@pytest.mark.parametrize("widths", [[256] * 9, [784, 128, 10]])  # 2.1 MB of weights; a student's 0.4 MB MLP
def test_extra_bytes_held_by_the_watch_stay_under_the_budget(widths: list[int]) -> None:
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # no optimizer state
    x, y = torch.randn(4, widths[0]), torch.randn(4, widths[-1])
    gc.collect()
    baseline = _storages()
    watch = gw.Watch(model, opt, diagnose=False)
    for _ in range(12):
        watch.step(lambda: F.mse_loss(model(x), y))
    gc.collect()
    meter = watch._pipeline.ratio
    param_bytes = _param_bytes(model)
    assert meter.budget == int(0.05 * param_bytes)  # the default: 5% of the weights
    extra = sum(n for ptr, n in _storages().items() if ptr not in baseline)
    assert 0 < meter.held_bytes <= meter.budget
    assert extra <= 0.10 * param_bytes  # the bound: the copies plus every small tensor the Watch keeps
    watch.close()


def test_default_budget_is_five_percent_capped_at_64_mib() -> None:
    assert default_budget(0) == 0
    assert default_budget(40 * MiB) == 2 * MiB
    assert default_budget(2 * 1024 * MiB) == 64 * MiB
    model = nn.Linear(2048, 2048)  # 16 MiB + 8 KiB: budget 0.8 MiB
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), diagnose=False)
    watch.step(lambda: model(torch.randn(2, 2048)).pow(2).mean())
    meter = watch._pipeline.ratio
    param_bytes = _param_bytes(model)
    assert meter.budget == int(0.05 * param_bytes)
    slice_bytes = meter.budget // 64 * 64  # each slice of the one oversized layer fills the budget, 64-byte aligned
    assert len(meter.rounds) == math.ceil(param_bytes / slice_bytes) == 21
    assert all(r.total_bytes <= meter.budget for r in meter.rounds)
    watch.close()


def test_plan_rounds_cover_every_element_once_within_the_budget() -> None:
    params = [torch.zeros(n) for n in (10, 300, 7, 2000, 1, 64)]
    layer = [0, 1, 1, 2, 3, 3]
    rounds = plan_rounds(params, layer, 1000)
    hits = [np.zeros(p.numel(), int) for p in params]
    for r in rounds:
        assert r.total_bytes <= 1000
        for piece in r.pieces:
            hits[piece.param][piece.start: piece.stop] += 1
    assert all((h == 1).all() for h in hits)
    assert sorted({s for r in rounds for s in r.layers}) == [0, 1, 2, 3]
    assert {s for r in rounds for s in r.partial} == {1, 2}  # 1228 and 8000 bytes: over the budget


def test_the_lr_rule_reads_only_measured_layers_not_zeros() -> None:
    signal = UpdateRatioSignal()
    nan = math.nan
    # three measurements where the measured half rewrites the weights: NaN read as 0 would give a median of 0
    results = [signal.observe(np.array(r)) for r in ([0.5, 0.4, nan, nan, nan], [nan, nan, 0.3, 0.6, nan],
                                                     [nan, nan, nan, nan, 0.2])]
    assert results == [False, False, True]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "64MiB"])
def test_update_ratio_budget_is_checked(bad) -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ValueError, match="update_ratio_budget"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), update_ratio_budget=bad)


def test_the_first_measurements_sample_the_whole_depth() -> None:
    # a 4 KiB budget: the 9 KiB first layer takes three rounds of slices, the last layer is in the last round
    model = _model((8, 256, 4))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), update_ratio_every=10,
                     update_ratio_budget=4096, diagnose=False)
    x, y = torch.randn(4, 8), torch.randn(4, 4)
    for _ in range(3):
        watch.step(lambda: F.mse_loss(model(x), y))
    k = len(watch._pipeline.ratio.rounds)
    assert k >= 3
    # the last layer is measured within the first three measurements, not only after every slice of the first
    last = [watch._pipeline.ratio.round_of(s) for s in (1, 2, 3)]
    assert any(1 in r.layers for r in last)
    assert len({id(watch._pipeline.ratio.round_of(s)) for s in range(1, k + 1)}) == k  # k in a row: every round
    watch.close()
