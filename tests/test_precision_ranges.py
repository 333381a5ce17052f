"""The pure fp16/bf16 range core (gradwatch.amp.ranges) against torch's own casts and THEORY.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradwatch.amp import ranges
from gradwatch.amp.ranges import exponent_histogram, fp16_shares, lost_update_counts, recommend_scale


def _values_across_binades(n: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    log2 = torch.empty(n, dtype=torch.float64).uniform_(lo, hi, generator=gen)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return (sign * torch.exp2(log2)).float()


@pytest.mark.parametrize("scale", [1.0, 8.0, 2.0**10, 2.0**16, 2.0**20])
def test_shares_equal_torch_float16_cast(scale: float) -> None:
    # Independent reference: cast g * scale to float16 with torch and count what happened.
    g = _values_across_binades(200_000, -50.0, 20.0)
    scaled = g.double() * scale
    # Drop the measure-zero slivers where the histogram's binary boundaries and fp16 rounding differ
    # by design (values within half an fp16 ulp below 2^-14, and [65520, 65536]).
    keep = ~(((scaled.abs() > 2.0**-14 - 2.0**-25) & (scaled.abs() <= 2.0**-14)) | ((scaled.abs() >= 65520) & (scaled.abs() <= 65536)))
    g, scaled = g[keep], scaled[keep]
    half = scaled.to(torch.float16)
    flushed = int((half == 0).sum())
    overflow = int(torch.isinf(half).sum())
    subnormal = int(((half != 0) & (half.abs() < 2.0**-14)).sum())
    shares = fp16_shares(exponent_histogram([g], [0], 1), scale)
    n = g.numel()
    assert shares.nonzero[0] == n
    assert round(shares.flushed[0] * n) == flushed
    assert round(shares.subnormal[0] * n) == subnormal
    assert round(shares.overflow[0] * n) == overflow
    assert flushed > 0 and subnormal > 0  # the test covers every region
    assert overflow > 0 or scale < 2.0**-3


def test_exact_fp16_boundaries_from_theory() -> None:
    # THEORY.md exact: fp16(2^-25) = 0; fp16(65504) is finite; fp16(2^17) = inf.
    assert torch.tensor(2.0**-25).half().item() == 0.0
    values = [2.0**-25, 2.0**-25 * (1 + 2**-10), 2.0**-24, 2.0**-14, 1.0, 65504.0, 2.0**17]
    hist = exponent_histogram([torch.tensor(values)], [0], 1)
    s = fp16_shares(hist, 1.0)
    assert s.flushed[0] * 7 == pytest.approx(1)  # only 2^-25
    assert s.subnormal[0] * 7 == pytest.approx(3)  # just above 2^-25, 2^-24, and 2^-14 (counted at the boundary)
    assert s.overflow[0] * 7 == pytest.approx(1)  # 2^17
    # Scaling shifts by whole binades: at scale 2, 2^-25 is kept (2^-24); 2^17 and 2 * 65504 overflow.
    s2 = fp16_shares(hist, 2.0)
    assert s2.flushed[0] == 0.0 and s2.overflow[0] * 7 == pytest.approx(2)  # 2 * 65504 overflows too


@pytest.mark.parametrize("scale,expected", [(1.0, 0.159), (8.0, 0.055), (2.0**16, 1.3e-5)])
def test_lognormal_flush_share_matches_theory(scale: float, expected: float) -> None:
    # THEORY.md: if log2|g| ~ N(-20, 5^2), share flushed = 0.159 at scale 1, 0.055 at 8, 1.3e-5 at 2^16.
    gen = torch.Generator().manual_seed(1)
    g = torch.exp2(torch.randn(4_000_000, generator=gen, dtype=torch.float64) * 5 - 20).float()
    share = fp16_shares(exponent_histogram([g], [0], 1), scale).flushed[0]
    rel = 0.02 if expected > 1e-3 else 0.35  # 1.3e-5 of 4e6 is ~53 elements: Poisson noise ~14%
    assert share == pytest.approx(expected, rel=rel)


def test_histogram_rows_are_layers_and_zeros_and_nonfinite_are_apart() -> None:
    a = torch.tensor([0.0, 0.0, 1e-3, float("nan")])
    b = torch.tensor([float("inf"), 5.0])
    hist = exponent_histogram([a, None, b], [0, 1, 1], 2)
    assert hist[:, ranges.ZERO_SLOT].tolist() == [2, 0]
    assert hist[:, ranges.NONFINITE_SLOT].tolist() == [1, 1]
    assert hist[:, : ranges.N_BINS].sum(dim=1).tolist() == [1, 1]
    s = fp16_shares(hist)
    assert s.nonzero.tolist() == [1, 1]
    empty = fp16_shares(exponent_histogram([torch.zeros(3)], [0], 1))
    assert math.isnan(empty.flushed[0])


def test_bfloat16_and_float64_inputs() -> None:
    g = torch.tensor([2.0**-30, 2.0**-10, 2.0**20])
    for dtype in (torch.bfloat16, torch.float64):
        s = fp16_shares(exponent_histogram([g.to(dtype)], [0], 1), 1.0)
        assert (s.flushed[0], s.subnormal[0], s.overflow[0]) == pytest.approx((1 / 3, 0.0, 1 / 3))


def test_recommend_scale_brings_every_layer_into_range() -> None:
    small = torch.full((1000,), 3e-9)  # 2^-28.3: needs 2^15 to reach 2^-14
    large = torch.full((10,), 0.25)  # max element 2^-2: 2^17 keeps it <= 2^15
    hist = exponent_histogram([small, large], [0, 1], 2)
    advice = recommend_scale(hist, share=0.05)
    assert advice.fits and advice.recommended == 2.0**15 and advice.max_safe == 2.0**17
    assert advice.per_layer[0] == 2.0**15
    at = fp16_shares(hist, advice.recommended)
    assert at.below_normal[0] == 0.0 and at.overflow.max() == 0.0
    assert fp16_shares(hist, advice.recommended / 2).below_normal[0] == 1.0  # the smallest such scale
    # torch agrees: at the recommended scale every element is a normal fp16 number.
    assert (small * advice.recommended).half().abs().min() >= 2.0**-14


def test_recommend_scale_says_when_fp16_cannot_hold_the_range() -> None:
    hist = exponent_histogram([torch.full((100,), 1e-12), torch.full((100,), 100.0)], [0, 1], 2)
    advice = recommend_scale(hist)
    assert not advice.fits
    assert advice.recommended == advice.max_safe == 2.0**8  # 100 * 256 = 25600 <= 2^15
    assert advice.needed is not None and advice.needed > advice.max_safe


def test_recommend_scale_never_below_one_for_small_gradients_and_below_one_for_huge() -> None:
    assert recommend_scale(exponent_histogram([torch.full((5,), 10.0)], [0], 1)).recommended == 1.0
    huge = recommend_scale(exponent_histogram([torch.full((5,), 1e6)], [0], 1))
    assert huge.recommended == 2.0**-5 and huge.recommended * 1e6 <= 2.0**15


@pytest.mark.parametrize("bad", [-0.1, 1.0, "0.05"])
def test_recommend_scale_validates_share(bad: object) -> None:
    with pytest.raises(ValueError, match="share must be"):
        recommend_scale(exponent_histogram([torch.ones(2)], [0], 1), share=bad)  # type: ignore[arg-type]


def test_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        fp16_shares(exponent_histogram([torch.ones(2)], [0], 1), 0.0)


def test_lost_updates_follow_bf16_rounding() -> None:
    # THEORY.md exact: 1 + 1/256 rounds to 1 in bf16; an update is lost when |dw|/|w| < 2^-8.
    w = torch.ones(4)
    dw = torch.tensor([2.0**-8, 2.0**-9, 2.0**-6, 0.0])
    counts = lost_update_counts([w], [w + dw], [0], 1)
    assert counts.tolist() == [[2], [3]]  # 2^-8 (tie to even) and 2^-9 lost; 2^-6 kept; 0 not intended
    # Independent reference: do the update in bf16 and compare.
    w16 = w.bfloat16()
    reference = int(((w16 + dw.bfloat16()) == w16)[dw != 0].sum())
    assert reference == 2
    # Weights already in bf16: lost where the mask says an update was meant but the weight did not move.
    before = torch.tensor([1.0, 1.0, 1.0], dtype=torch.bfloat16)
    after = before + torch.tensor([2.0**-9, 2.0**-6, 0.0], dtype=torch.bfloat16)
    mask = torch.tensor([True, True, False])
    assert lost_update_counts([before], [after], [0], 1, intended=[mask]).tolist() == [[1], [2]]


def test_compact_histogram_keeps_the_occupied_range() -> None:
    hist = exponent_histogram([torch.tensor([0.75, 3.0, 0.0]), torch.tensor([0.1])], [0, 1], 2)
    data = ranges.compact_histogram(hist)
    assert data["lo"] == -3  # 0.1 lies in (2^-4, 2^-3]
    assert data["counts"] == [[0, 0, 0, 1, 0, 1], [1, 0, 0, 0, 0, 0]]
    assert data["zeros"] == [1, 0] and data["nonfinite"] == [0, 0]
    assert np.sum(data["counts"]) == 3


@pytest.mark.parametrize("name", ["gradwatch.amp.ranges", "gradwatch.amp.plugin", "gradwatch.amp.summary", "gradwatch.precision"])
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


def test_bit_path_equals_frexp_path() -> None:
    # float32 bins read from the bits must equal the frexp definition (subnormals: see _bin_index_fp32).
    from gradwatch.amp.ranges import _bin_index, _bin_index_fp32

    values = torch.cat([
        _values_across_binades(50_000, -126.0, 127.0, seed=3),
        torch.tensor([0.0, -0.0, 1.0, -2.0, 2.0**-126, 2.0**127, 3.4e38, float("inf"), -float("inf"), float("nan")]),
    ])
    fast = _bin_index_fp32(values).long()
    reference = _bin_index(values.double())  # float64 goes through frexp
    assert torch.equal(fast, reference)
    sub = torch.tensor([1e-45, 2.0**-127, 1e-40])  # float32 subnormals: all in the bin of 2^-126
    assert _bin_index_fp32(sub).tolist() == [-126 - ranges.EXP_LO] * 3


def test_fused_histogram_equals_the_per_tensor_histogram(monkeypatch) -> None:
    """Small float32 models take the one-pass path; it counts exactly what the per-tensor loop counts."""
    from gradwatch.amp import ranges as R

    torch.manual_seed(0)
    grads = [torch.randn(64, 32) * 1e-6, torch.randn(32), torch.randn(16, 64) * 1e3, None, torch.randn(10)]
    grads[0][0, :5] = 0.0
    grads[1][3] = float("inf")
    grads[1][4] = float("nan")
    grads[2][0, 0] = 2.0**-130  # float32 subnormal
    grads[2][0, 1] = 0.5  # an exact power of two goes one bin down
    grads[4][0] = 3.0e38
    slots = [0, 0, 2, 1, 1]
    fused = R.exponent_histogram(grads, slots, 3)
    monkeypatch.setattr(R, "_fused_histogram", lambda *a, **k: None)
    assert torch.equal(fused, R.exponent_histogram(grads, slots, 3))
    assert int(fused.sum()) == sum(g.numel() for g in grads if g is not None)
