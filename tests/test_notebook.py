"""Notebooks: one-line reprs, HTML reprs (escaped) and Run.to_pandas() against torch's own numbers.

The HTML reprs are also rendered in headless Chromium by tests/test_browser.py.
"""

from __future__ import annotations

import base64
import copy
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.findings import Finding
from test_report import HOSTILE, HOSTILE_MESSAGE, make_watch_run, parse


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2))


def _batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)) for _ in range(steps)]


# ----- one-line reprs -----------------------------------------------------------------------
def test_short_reprs_are_one_line_and_say_what_it_is(tmp_path: Path) -> None:
    long = Finding("loss_spike", "warning", 7, "The loss jumped. " * 200, evidence={"x": list(range(1000))})
    text = repr(long)
    assert "\n" not in text and len(text) < 200 and text.startswith("Finding(warning loss_spike at step 7: ")
    watch = make_watch_run(tmp_path / "run", activation="sigmoid", steps=24, hostile=True, nan_step=15)
    run = gw.load_run(tmp_path / "run")
    assert len(run.findings) >= 2 and len(run.layer_names) == 7
    for obj, start, facts in (
        (run, "Run(", ["24 steps", "7 layers", "fp32", f"{len(run.findings)} findings", run.findings[0].code]),
        (watch, "Watch(", ["Sequential", "7 layers", "24 steps", "clip_norm=0.5", "closed", f"{len(watch.findings)} findings"]),
    ):
        text = repr(obj)
        assert "\n" not in text and len(text) < 200 and text.startswith(start), text
        for fact in facts:
            assert fact in text, (fact, text)
    model = _tiny_model()
    x, y = _batches(1)[0]
    probe = gw.probe(model, (x, y), loss_fn=nn.functional.mse_loss)
    text = repr(probe)
    assert "\n" not in text and len(text) < 200 and text.startswith(f"Probe({len(probe.layers)} layers, ")
    assert f"{len(probe.findings)} finding" in text


# ----- HTML reprs -----------------------------------------------------------------------
def _assert_safe(html: str) -> str:
    parsed = parse(html)
    assert not any(tag in ("script", "iframe", "link", "object") for tag, _ in parsed.tags)
    for tag, attrs in parsed.tags:
        for key in ("src", "href"):
            assert attrs.get(key) is None or attrs[key].startswith("data:image/png;base64,"), (tag, key)
    assert HOSTILE not in html and "<img src=x" not in html
    return "".join(parsed.text)


def test_html_reprs_escape_and_show_the_numbers(tmp_path: Path) -> None:
    watch = make_watch_run(tmp_path / "run", activation="sigmoid", steps=24, hostile=True, nan_step=15)
    run = gw.load_run(tmp_path / "run")
    hostile = next(f for f in run.findings if f.message == HOSTILE_MESSAGE)
    text = _assert_safe(hostile._repr_html_())
    assert HOSTILE_MESSAGE in text and HOSTILE in text and "kaiming_normal_ on" in text  # shown, as text
    text = _assert_safe(watch._repr_html_())
    assert HOSTILE in text and "24" in text and "vanishing_gradients" in text
    last = watch.history[-1]
    assert f"{last.grad_norm:.4g}" in text  # the last step's pre-clip norm, as the report writes numbers
    html = run._repr_html_()
    text = _assert_safe(html)
    assert "vanishing_gradients" in text and "skipped steps" in text
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 2  # the depth chart and the global norm chart
    for payload in images:
        png = base64.b64decode(payload)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the summary's numbers are the run's own
    assert re.search(r"skipped steps</th><td[^>]*>1</td>", html)
    assert f"{float(np.median(run.steps['grad_norm'][np.isfinite(run.steps['grad_norm'])])):.4g}" in text
    model = _tiny_model()
    batch = _batches(1)[0]
    probe = gw.probe(model, batch, loss_fn=nn.functional.mse_loss)
    text = _assert_safe(probe._repr_html_())
    assert all(r.name in text for r in probe.layers) and "measured gain" in text


def test_run_html_without_matplotlib_keeps_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_watch_run(tmp_path / "run", steps=5)
    run = gw.load_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    html = run._repr_html_()
    assert "data:image/png" not in html and "pip install 'gradwatch[report]'" in html and "median global norm" in html


# ----- Run.to_pandas() -----------------------------------------------------------------------
def _hand_loop(model: nn.Module, batches: list[Any], lr: float) -> dict[str, list[Any]]:
    """The same training by hand: torch computes every per-layer norm (a layer = a module owning parameters)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    layers = [(name, m) for name, m in model.named_modules() if list(m.parameters(recurse=False))]
    out: dict[str, list[Any]] = {"loss": [], "total": [], "grad": [], "weight": [], "names": [n for n, _ in layers]}
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        out["loss"].append(loss.item())
        out["grad"].append([torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in m.parameters(recurse=False)])).item()
                            for _, m in layers])
        out["weight"].append([torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in m.parameters(recurse=False)])).item()
                              for _, m in layers])
        out["total"].append(nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item())
        opt.step()
    return out


def test_to_pandas_matches_the_run_arrays_and_torch(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    batches = _batches(6)
    model = _tiny_model()
    reference = _hand_loop(copy.deepcopy(model), batches, lr=0.1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run", update_ratio_every=2)
    for x, y in batches:
        watch.step(lambda: nn.functional.mse_loss(model(x), y))
    watch.close()
    run = gw.load_run(tmp_path / "run")
    frames = run.to_pandas()
    steps, layers = frames.steps, frames.layers
    assert isinstance(steps, pd.DataFrame) and isinstance(layers, pd.DataFrame)
    # one row per step, the Run's own arrays
    assert steps["step"].tolist() == [1, 2, 3, 4, 5, 6]
    for column in ("loss", "grad_norm", "clip_coef", "clipped", "skipped", "time_ms"):
        np.testing.assert_array_equal(steps[column].to_numpy(), run.steps[column])
    # long per-layer frame: one row per (step, layer), layers in depth order
    names = reference["names"]
    assert run.layer_names == names == ["0", "1", "3"]
    assert len(layers) == 6 * 3 and list(layers.columns) == ["step", "layer", "depth", "type", "grad_norm", "grad_rms",
                                                            "weight_norm", "update_ratio"]
    assert layers["type"].tolist()[:3] == ["Linear", "LayerNorm", "Linear"]
    wide = layers.pivot(index="step", columns="layer", values="grad_norm")[names].to_numpy()
    np.testing.assert_array_equal(wide, run.steps["layer_grad_norms"].astype(np.float64))
    # ... and torch's own numbers, computed by the hand-written loop
    np.testing.assert_allclose(wide, reference["grad"], rtol=1e-5)
    np.testing.assert_allclose(steps["loss"], reference["loss"], rtol=1e-6)
    np.testing.assert_allclose(steps["grad_norm"], reference["total"], rtol=1e-5)
    weights = layers.pivot(index="step", columns="layer", values="weight_norm")[names].to_numpy()
    # weight norms: measured (before the step's update) on the steps that measure the update ratio, NaN elsewhere
    measured = np.array([1, 2, 4, 6]) - 1
    np.testing.assert_allclose(weights[measured], np.asarray(reference["weight"])[measured], rtol=1e-5)
    assert np.isnan(np.delete(weights, measured, axis=0)).all()
    numel = np.array([4 * 8 + 8, 8 + 8, 8 * 2 + 2])
    rms = layers.pivot(index="step", columns="layer", values="grad_rms")[names].to_numpy()
    np.testing.assert_allclose(rms, np.asarray(reference["grad"]) / np.sqrt(numel), rtol=1e-5)
    # update ratios: measured on steps 1, 2, 4, 6 (update_ratio_every=2), NaN elsewhere, as in the Run
    ratio = layers.pivot(index="step", columns="layer", values="update_ratio")[names].to_numpy()
    np.testing.assert_array_equal(np.isnan(ratio), np.isnan(run.steps["update_ratio"]))
    assert np.isfinite(ratio).any() and np.isnan(ratio).any()
    # tidy: a groupby by layer keeps depth order
    medians = layers.groupby("layer", observed=True)["grad_norm"].median()
    assert list(medians.index) == names
    np.testing.assert_allclose(medians.to_numpy(), np.median(reference["grad"], axis=0), rtol=1e-5)


def test_to_pandas_without_pandas_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_watch_run(tmp_path / "run", steps=3)
    run = gw.load_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=re.escape("pip install pandas")):
        run.to_pandas()


def test_to_pandas_of_an_empty_run(tmp_path: Path) -> None:
    pytest.importorskip("pandas")
    from gradwatch.rundir import RunWriter

    writer = RunWriter(tmp_path / "empty")
    writer.write_meta({"model": "M"})
    writer.close()
    frames = gw.load_run(tmp_path / "empty").to_pandas()
    assert len(frames.steps) == 0 and len(frames.layers) == 0 and "grad_norm" in frames.layers.columns
