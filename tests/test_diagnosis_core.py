"""The pure core of the diagnosis rules: robust baselines and norm patterns."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from gradwatch.diagnosis.patterns import HUGE_FIRST_NORM, norm_pattern
from gradwatch.diagnosis.robust import MAD_TO_SIGMA, median_mad, robust_zscore

NAN, INF = math.nan, math.inf


# ----- robust_zscore ---------------------------------------------------------------------
def test_robust_zscore_matches_hand_computed_median_mad():
    history = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, |dev| = 2,1,0,1,97 -> MAD 1
    assert median_mad(history) == (3.0, 1.0)
    assert robust_zscore(history, 6.0) == pytest.approx(3.0 / MAD_TO_SIGMA)
    assert robust_zscore(history, 0.0) == pytest.approx(-3.0 / MAD_TO_SIGMA)


def test_robust_zscore_nan_and_inf_never_enter_the_baseline():
    clean = [1.0, 1.2, 0.8, 1.1, 0.9, 1.0]
    poisoned = clean[:3] + [NAN, INF, -INF] + clean[3:]
    for value in (1.0, 3.0, 50.0):
        assert robust_zscore(poisoned, value) == pytest.approx(robust_zscore(clean, value))


def test_robust_zscore_one_spike_barely_moves_the_baseline():
    rng = np.random.default_rng(0)
    history = list(1.0 + 0.05 * rng.standard_normal(50))
    before = robust_zscore(history, 2.0)
    after = robust_zscore(history + [1e6], 2.0)  # a huge spike now sits in the history
    assert before > 10 and after > 0.8 * before  # a mean/std baseline would drop to ~0


def test_robust_zscore_edge_cases():
    assert math.isnan(robust_zscore([], 1.0))
    assert math.isnan(robust_zscore([NAN, INF], 1.0))
    assert math.isnan(robust_zscore([1.0, 2.0], NAN))
    assert robust_zscore([1.0, 2.0], INF) == INF
    constant = [2.0] * 10
    assert robust_zscore(constant, 2.0) == 0.0
    assert robust_zscore(constant, 2.1) > 1e3  # a constant history: any departure is far out
    assert math.isfinite(robust_zscore(constant, 2.1))


# ----- norm_pattern -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "norms, expected",
    [
        ([3e5], "init_scale_too_large"),  # huge before any update
        ([INF], "init_scale_too_large"),
        ([NAN, 1.0, 1.0], "init_scale_too_large"),
        ([2 * HUGE_FIRST_NORM, 10.0, 1.0], "init_scale_too_large"),
        ([1.2, 1.0, 4.0, 40.0, 900.0, INF], "lr_too_high"),  # sane, then growth after updates
        ([0.8, 30.0, NAN], "lr_too_high"),
        ([1.0, 0.7, 8.0, 90.0, 1e3, 2e4], "lr_too_high"),  # finite divergence by >1e3
        ([1.2, 1.0, 1.1, 0.9, NAN], None),  # flat then NaN: a numerics bug, not divergence
        ([1.0, 1.1, 1.2, 1.3, INF], None),  # rising, but only 1.2x before the inf
        ([1.0, 5.0, INF], None),  # one 5x rise is not "step over step"
        ([0.01, 0.05, 0.2, 0.5, 1.0], None),  # warm-up of a zero-initialized head
        ([1.0, 0.9, 1.1, 1.0, 0.95], None),  # healthy
        ([], None),
    ],
)
def test_norm_pattern_cases(norms, expected):
    assert norm_pattern(norms) == expected


def test_norm_pattern_skipped_steps_are_left_out_of_the_growth_run():
    # A skipped step between rises (no update after it) does not break the run.
    norms = [1.0, 3.0, 50.0, 45.0, 60.0, INF]
    assert norm_pattern(norms) is None  # 50 -> 45 breaks the run; 45 -> 60 is not tenfold
    assert norm_pattern(norms, skipped=[False, False, False, True, False, True]) == "lr_too_high"


def test_norm_pattern_rejects_mismatched_skipped():
    with pytest.raises(ValueError, match="skipped"):
        norm_pattern([1.0, 2.0], skipped=[False])


@pytest.mark.parametrize("gaps", [False, True])
def test_geometric_medians_equal_numpy_median_of_logs(gaps: bool) -> None:
    """Both helpers against exp(nanmedian(log)) over the finite positive entries (the sort path without gaps)."""
    from gradwatch.diagnosis.curve import column_geometric_medians, window_log_median

    rng = np.random.default_rng(0)
    for steps in (1, 2, 7, 20):
        rows = np.exp(rng.normal(0, 3, size=(steps, 9)))
        if gaps:
            rows[rng.random(rows.shape) < 0.15] = np.nan  # skipped or missing entries
            rows[rng.random(rows.shape) < 0.1] = 0.0  # dead layers
            rows[:, 4] = np.nan  # a column with nothing usable
        usable = np.where(np.isfinite(rows) & (rows > 0), rows, np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN column
            want = np.exp(np.nanmedian(np.log(usable), axis=0))
        np.testing.assert_allclose(window_log_median(rows), want, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(np.array(column_geometric_medians(rows.T.tolist())), want, rtol=1e-12, equal_nan=True)


def test_fit_depth_curve_matches_numpy_least_squares() -> None:
    from gradwatch.diagnosis.curve import fit_depth_curve

    rng = np.random.default_rng(1)
    rms = np.exp(-0.7 * np.arange(12) + rng.normal(0, 0.3, 12))
    rms[[3, 8]] = [0.0, np.nan]  # left out of the fit, depth kept
    ok = np.isfinite(rms) & (rms > 0)
    x, y = np.arange(12)[ok], np.log(rms[ok])
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - ((y - (intercept + slope * x)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    fit = fit_depth_curve(rms)
    assert fit.slope == pytest.approx(slope, rel=1e-10)
    assert fit.r2 == pytest.approx(r2, rel=1e-10)
    assert fit.gain == pytest.approx(math.exp(-slope), rel=1e-10) and fit.n == 10
    assert fit.first_last_ratio == pytest.approx(rms[0] / rms[11], rel=1e-12)


def _spike_run(losses: list[float], skipped_every: int, monkeypatch: pytest.MonkeyPatch | None) -> tuple[list, int]:
    """Feed ``losses`` to a LossSpikeRule; (findings as (step, ratio), number of window sorts)."""
    from types import SimpleNamespace

    from gradwatch.diagnosis import rules

    if monkeypatch is not None:  # the reference: every step sorts the window (no bound)
        monkeypatch.setattr(rules, "SPIKE_BOUND_STEPS", 0)
    rule = rules.LossSpikeRule()
    sorts = 0
    ordered = rule._ordered

    def counted() -> list[float]:
        nonlocal sorts
        sorts += 1
        return ordered()

    rule._ordered = counted
    found = []
    for step, loss in enumerate(losses, 1):
        finite = math.isfinite(loss)
        record = SimpleNamespace(loss=loss, grad_norm=1.0 if finite else math.nan, loss_finite=finite, finite=finite,
                                 extra={})
        inp = SimpleNamespace(step=step, record=record, skipped_by=["spike"] if step % skipped_every == 0 else [])
        found += [(f.step, f.evidence["ratio"]) for f in rule.check(inp)]
    return found, sorts


def test_loss_spike_bound_decides_like_sorting_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-comparison path never changes a decision: same findings as sorting the window on every step
    (decaying, noisy, converged, negative and NaN losses, spikes, steps another plugin skipped)."""
    rng = np.random.default_rng(3)
    steps = np.arange(1500)
    losses = 2.0 * np.exp(-steps / 150) * np.exp(rng.normal(0, 0.3, steps.size)) + 1e-4 * rng.random(steps.size)
    losses[rng.choice(steps.size, 25, replace=False)] *= rng.choice([3.0, 8.0, 30.0, 1e3], 25)  # spikes, some below 10x
    losses[rng.choice(steps.size, 6, replace=False)] = np.nan
    losses[900:960] = rng.normal(-1.0, 0.2, 60)  # a loss that goes negative for a while
    losses[1100:1140] = 0.0
    values = losses.tolist()
    fast, fast_sorts = _spike_run(values, 97, None)
    with monkeypatch.context() as patch:
        reference, reference_sorts = _spike_run(values, 97, patch)
    assert fast == reference and len(reference) >= 5
    assert fast_sorts < 0.25 * reference_sorts  # most steps were decided by the bound (it is exercised)
    # the median falls within the bound's 10 steps (1.0 -> 0.01): a loss of 0.5 is then 50x the median;
    # every phase of the bound's refresh against the fall
    hits = 0
    for ones in range(60, 70):
        for spike_at in range(ones + 20, ones + 32):
            drop = [1.0] * ones + [0.01] * 40
            drop[spike_at] = 0.5
            fast, _ = _spike_run(drop, 10**6, None)
            with monkeypatch.context() as patch:
                reference, _ = _spike_run(drop, 10**6, patch)
            assert fast == reference, (ones, spike_at)
            hits += len(reference)
    assert hits >= 40
