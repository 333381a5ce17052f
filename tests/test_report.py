"""The HTML report: pure data preparation against hand arithmetic, then whole reports of real runs.

Runs are made by a real ``gradwatch.Watch`` on small models (a few dozen steps),
or written with ``RunWriter`` where a stream must be present or absent on purpose.
"""

from __future__ import annotations

import base64
import json
import math
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.findings import Finding
from gradwatch.plugins import WatchPlugin
from gradwatch.report import data
from gradwatch.rundir import RunWriter

HOSTILE = "<script>alert(1)</script>"
HOSTILE_MESSAGE = 'gradient of <img src=x onerror="alert(2)"> & friends'


# ----- run makers (used by test_browser.py and test_tensorboard.py too) ------------------
class HostileFinding(WatchPlugin):
    """Raises one finding whose text and location carry markup, as a model's names could."""

    name = "hostile"

    def __init__(self, step: int = 5) -> None:
        self.step = step

    def after_step(self, ctx: Any, record: Any) -> list[Finding]:
        if record.step != self.step:
            return []
        return [Finding("vanishing_gradients", "warning", record.step, HOSTILE_MESSAGE,
                        evidence={"effective_gain": 0.25, "module": HOSTILE},
                        location={"module": HOSTILE, "source": "model.py:12"},
                        fixes=[f"kaiming_normal_ on {HOSTILE}"])]


def make_model(activation: str = "sigmoid", depth: int = 6, width: int = 16, hostile: bool = False) -> nn.Module:
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    model = nn.Sequential()
    for i in range(depth):
        model.add_module(f"fc{i}", nn.Linear(width, width))
        model.add_module(f"act{i}", act())
    model.add_module(HOSTILE if hostile else "head", nn.Linear(width, 1))
    if activation == "relu":
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def make_watch_run(path: Path, activation: str = "sigmoid", steps: int = 30, hostile: bool = False,
                   nan_step: int | None = None, **watch_kwargs: Any) -> gw.Watch:
    """Train a small MLP under a real Watch for ``steps`` steps; returns the closed Watch."""
    torch.manual_seed(0)
    model = make_model(activation, hostile=hostile)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plugins = [HostileFinding()] if hostile else []
    watch = gw.Watch(model, opt, clip_norm=0.5, run_dir=path, update_ratio_every=5, plugins=plugins, **watch_kwargs)
    for step in range(1, steps + 1):
        x = torch.randn(32, 16)
        y = x[:, :1].clone()
        if step == nan_step:
            x[0, 0] = float("nan")
        watch.step(lambda: nn.functional.mse_loss(model(x), y), batch=(x, y))
    watch.close()
    return watch


def write_synthetic_run(path: Path, steps: int, layers: int, *, findings: int = 0, loss_scale: bool = False,
                        activations: bool = False, bundle: bool = False, layer_file: bool = True) -> Path:
    """A run directory written with RunWriter: gradients shrink by 0.8 per layer towards the input."""
    rng = np.random.default_rng(0)
    writer = RunWriter(path, flush_every=1000)
    writer.write_meta({"model": "Synthetic", "optimizer": "SGD", "clip_norm": 1.0, "precision": "fp16" if loss_scale else "fp32"})
    names = [f"blocks.{i}.fc" for i in range(layers)]
    if layer_file:
        writer.write_layers([{"name": n, "type": "Linear", "depth": i, "numel": 100, "trainable_numel": 100, "measured": True}
                             for i, n in enumerate(names)])
    depth = np.arange(layers)
    for s in range(1, steps + 1):
        norms = 10.0 * 0.8 ** (layers - 1 - depth) * np.exp(rng.normal(0, 0.05, layers))
        total = float(np.sqrt((norms ** 2).sum()))
        record: dict[str, Any] = {"step": s, "loss": 1.0 / s, "grad_norm": total, "clip_coef": min(1.0, 1.0 / total),
                                  "clipped": total > 1.0, "skipped": False, "time_ms": 1.0}
        if loss_scale:
            record["loss_scale"] = 2.0 ** 16 if s < steps // 2 else 2.0 ** 15
        if s % 10 == 0:
            record["update_ratio"] = [1e-3] * layers
        writer.append_step(record, {"grad_norms": norms, "weight_norms": np.ones(layers)})
        if activations and s % 5 == 0:
            # the diagnosis sampler's format (gradwatch.diagnosis.sampler.ActivationSample.to_json)
            writer.append("activations", {"step": s, "grad_rms": {n: 0.5 ** (layers - j) for j, n in enumerate(names)},
                                          "activations": {f"relu after blocks.{i}.fc": {"kind": "relu", "dead": 0.1 * i}
                                                          for i in range(3)} | {"sigmoid": {"kind": "sigmoid", "saturated": 0.7}}})
    if loss_scale:  # the precision plugin's forecast event (format in docs/precision.md)
        writer.append("events", {"event": "fp16_forecast", "step": steps, "precision": "fp16", "layers": names,
                                 "current": {"scale": 32768.0, "flushed": [0.5] + [0.0] * (layers - 1),
                                             "subnormal": [0.1] * layers, "overflow": [0.0] * layers},
                                 "reference": {"scale": 65536.0, "flushed": [0.25] + [0.0] * (layers - 1),
                                               "subnormal": [0.1] * layers, "overflow": [0.0] * layers},
                                 "recommended_scale": 262144.0, "max_safe_scale": 1048576.0, "fits": True})
    for k in range(findings):
        writer.append_finding(Finding("loss_spike", "warning", 1 + k * max(1, steps // max(1, findings)), f"spike {k}"))
    if bundle:
        writer.save_bundle("step_000007.pt", {"format": 1, "step": 7, "batch": (torch.zeros(2, 3), torch.ones(2)),
                                              "rng": {"cpu": torch.zeros(8, dtype=torch.uint8)},
                                              "nonfinite_layers": ["blocks.0.fc"],
                                              "localization": {"module": HOSTILE, "op": "aten.log", "phase": "forward"},
                                              "finding": {"code": "loss_numerics", "severity": "error", "message": "log(0)"}})
    writer.close()
    return path


# ----- HTML inspection --------------------------------------------------------------------
class PageParser(HTMLParser):
    """Collects tags with their attributes and the page's text (entities decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, text: str) -> None:
        self.text.append(text)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def figure_svgs(page: str) -> dict[str, str]:
    """figure id -> decoded SVG text of its image."""
    out = {}
    for fig_id, payload in re.findall(r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)"', page):
        out[fig_id] = base64.b64decode(payload).decode("utf-8")
    return out


def assert_self_contained(page: str) -> None:
    parsed = parse(page)
    for tag, attrs in parsed.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed"), tag
        for key in ("src", "href", "action", "srcset", "data"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, key, value[:80])
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", page)
    assert "url(" not in page.split("<body>")[0]  # no fonts or images fetched by the CSS
    csp = [a for t, a in parsed.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in (csp[0]["content"] or "")


# ----- data module -----------------------------------------------------------------------
def test_minmax_downsample_keeps_extremes_and_bounds_points() -> None:
    rng = np.random.default_rng(1)
    y = rng.normal(size=50_001)
    y[12_345] = 40.0
    y[33_333] = -40.0
    y[20_000:20_100] = np.nan
    x = np.arange(1, y.size + 1)
    xs, ys = data.minmax_downsample(x, y, max_points=500)
    assert len(xs) == len(ys) <= 500
    assert np.nanmax(ys) == 40.0 and xs[np.nanargmax(ys)] == 12_346
    assert np.nanmin(ys) == -40.0 and xs[np.nanargmin(ys)] == 33_334
    assert np.all(np.diff(xs) >= 0)  # still a line from left to right
    # Every kept point is a real sample, at its own x.
    finite = np.isfinite(ys)
    np.testing.assert_array_equal(ys[finite], y[xs[finite] - 1])
    # Short series pass through untouched.
    xs2, ys2 = data.minmax_downsample(x[:100], y[:100], max_points=500)
    np.testing.assert_array_equal(ys2, y[:100])


def test_minmax_downsample_all_nan_bucket_is_a_gap() -> None:
    y = np.ones(1000)
    y[:500] = np.nan
    _, ys = data.minmax_downsample(np.arange(1000), y, max_points=10)
    assert np.isnan(ys[:4]).all() and (ys[-4:] == 1.0).all()


def test_effective_gain_recovers_per_layer_factor_with_gaps() -> None:
    depth = np.arange(12)
    rng = np.random.default_rng(0)
    sigmas = np.array([0.25, 0.9, 1.0, 1.3])
    rms = np.stack([3.0 * s ** (11 - depth) for s in sigmas])
    rms[1, 4] = np.nan  # a missing layer does not bias the fit
    rms[2, 0] = 0.0  # nor does a zero
    np.testing.assert_allclose(data.effective_gain(rms), sigmas, rtol=1e-9)
    noisy = 0.5 ** (11 - depth)[None, :] * np.exp(rng.normal(0, 0.1, (200, 12)))
    assert abs(np.median(data.effective_gain(noisy)) - 0.5) < 0.02
    # the same fit as the diagnosis rules' gradwatch.diagnosis.curve.fit_depth_curve, row by row
    curve = pytest.importorskip("gradwatch.diagnosis.curve")
    reference = [curve.fit_depth_curve(row).gain for row in noisy[:20]]
    np.testing.assert_allclose(data.effective_gain(noisy[:20]), reference, rtol=1e-9)
    one_layer = np.full((1, 12), np.nan)
    one_layer[0, 3] = 1.0
    assert np.isnan(data.effective_gain(one_layer)[0])


def test_heatmap_is_geometric_mean_per_bucket() -> None:
    m = np.array([[1.0, 100.0], [100.0, np.nan], [10.0, 10.0], [0.0, 10_000.0]])  # 4 steps x 2 layers
    hm = data.heatmap(m, np.array([1, 2, 3, 4]), max_cols=2)
    # columns: steps {1,2} and {3,4}; log10 means over finite positive values
    np.testing.assert_allclose(hm.z, [[1.0, 1.0], [2.0, 2.5]])
    assert hm.step_edges.tolist() == [1, 3, 5]
    big = data.heatmap(np.full((2_000, 700), 10.0), np.arange(2_000), max_cols=600, max_rows=400)
    assert big.z.shape == (400, 600) and np.all(big.z == 1.0)  # 700 layers into 400 rows, 2,000 steps into 600 columns


def test_chunked_whole_run_computations_match_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    m = np.exp(rng.normal(size=(3_000, 7)))
    m[5, 3], m[2_000:2_010] = np.nan, 0.0
    one_pass = (data.heatmap(m, np.arange(3_000), max_cols=60).z, data.effective_gain(m))
    monkeypatch.setattr(data, "CHUNK_ROWS", 77)
    chunked = (data.heatmap(m, np.arange(3_000), max_cols=60).z, data.effective_gain(m))
    np.testing.assert_allclose(chunked[0], one_pass[0])
    np.testing.assert_allclose(chunked[1], one_pass[1])
    assert np.isnan(chunked[1][2_000:2_010]).all()


def test_checkpoints_flags_and_last_values() -> None:
    usable = np.ones(100, bool)
    usable[99] = False
    rows = data.checkpoint_rows(np.arange(1, 101), usable, count=4)
    assert rows[0] == 0 and rows[-1] == 98 and len(rows) == 4 and usable[rows].all()
    centre, share, count = data.flag_buckets(np.arange(1, 101), np.arange(100) < 30, max_buckets=4)
    assert count.tolist() == [25, 5, 0, 0] and share.tolist() == [1.0, 0.2, 0.0, 0.0]
    assert centre.tolist() == [13.0, 38.0, 63.0, 88.0]
    last = data.last_finite_rows(np.array([[1.0, np.nan, 5.0], [2.0, np.nan, np.inf]]))
    assert last[0] == 2.0 and math.isnan(last[1]) and last[2] == 5.0
    assert data.clip_threshold({"clip_norm": "auto"}) is None and data.clip_threshold({"clip_norm": 2}) == 2.0


def test_activation_stats_reads_both_layouts_and_ignores_junk() -> None:
    records = [
        {"step": 10, "layers": {"relu1": {"dead": 0.5, "saturated": None}, "sig": {"saturated_fraction": 0.9}}},
        {"step": 20, "layers": [{"name": "relu1", "dead_fraction": 0.75}]},
        {"step": 30, "something": "else"},
        "not a dict",
    ]
    stats = data.activation_stats(records)  # type: ignore[arg-type]
    assert stats is not None and stats.layers == ["relu1", "sig"] and stats.steps.tolist() == [10, 20]
    np.testing.assert_array_equal(stats.series["dead"], [[0.5, np.nan], [0.75, np.nan]])
    np.testing.assert_array_equal(stats.series["saturated"], [[np.nan, 0.9], [np.nan, np.nan]])
    assert data.activation_stats([]) is None


# ----- whole reports ------------------------------------------------------------------------
EXPECTED_FIGURES = {"fig-depth", "fig-heatmap", "fig-grad-norm", "fig-loss", "fig-gain", "fig-update-ratio"}


@pytest.mark.slow
def test_report_of_a_watch_run_is_self_contained_with_every_figure(tmp_path: Path) -> None:
    watch = make_watch_run(tmp_path / "run", steps=30, nan_step=12)
    out = gw.report(tmp_path / "run")
    assert out == tmp_path / "run" / "report.html"
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    svgs = figure_svgs(page)
    assert EXPECTED_FIGURES <= set(svgs)
    for fig_id, svg in svgs.items():
        root = ET.fromstring(svg)  # well-formed SVG
        assert root.tag.endswith("svg")
        assert len(svg) > 5000, fig_id  # a drawn chart, not an empty canvas
    # Streams this run does not have are said to be absent, not drawn empty (fp32: no loss scale).
    assert 'id="fig-loss-scale-absent"' in page and "fig-loss-scale" not in svgs
    text = " ".join(parse(page).text)
    # The layer table lists every measured layer in depth order with its type and last RMS.
    table = " ".join(parse(page.split('<section id="layers">')[1].split("</section>")[0]).text)
    positions = [table.index(f" {name} ") for name in watch.layers]
    assert positions == sorted(positions) and watch.layers[-1] == "head"
    assert table.count("Linear") == len(watch.layers)
    # The non-finite step was skipped and the summary says so.
    assert re.search(r"skipped steps</th><td>1</td>", page)
    assert "median effective gain" in text


def test_hostile_module_and_finding_text_are_escaped(tmp_path: Path) -> None:
    make_watch_run(tmp_path / "run", steps=8, hostile=True)
    page = gw.report(tmp_path / "run").read_text(encoding="utf-8")
    assert HOSTILE not in page
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    parsed = parse(page)
    assert not any(tag == "script" for tag, _ in parsed.tags)
    assert all(tag != "img" or (attrs.get("src") or "").startswith("data:image/svg+xml;base64,") for tag, attrs in parsed.tags)
    text = "".join(parsed.text)
    assert HOSTILE in text  # shown as text: in the layer table, the location and the fix
    assert text.count(HOSTILE) >= 3
    assert HOSTILE_MESSAGE in text
    assert "vanishing_gradients" in text and "effective_gain" in text


def test_dollar_signs_in_layer_names_are_not_math(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("cost$x$", nn.Linear(4, 4))
    model.add_module("relu", nn.ReLU())
    model.add_module("$", nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.Watch(model, opt, run_dir=tmp_path / "run") as watch:
        for _ in range(3):
            watch.step(lambda: model(torch.randn(8, 4)).pow(2).mean())
    page = gw.report(tmp_path / "run").read_text(encoding="utf-8")
    assert "cost$x$" in "".join(parse(page).text)
    assert "fig-depth" in figure_svgs(page)


def test_every_optional_stream_shown_when_present(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", steps=200, layers=8, findings=3, loss_scale=True,
                              activations=True, bundle=True)
    page = gw.report(run).read_text(encoding="utf-8")
    svgs = figure_svgs(page)
    assert EXPECTED_FIGURES | {"fig-activations", "fig-loss-scale", "fig-act-grad", "fig-fp16-forecast"} <= set(svgs)
    assert "absent" not in re.sub(r"\.absent\{[^}]*\}", "", page.split("<body>")[1].split('id="bundles"')[0])
    text = "".join(parse(page).text)
    assert "step_000007.pt" in text and "aten.log" in text and HOSTILE in text  # bundle location, escaped
    assert HOSTILE not in page
    assert "fp16 forecast at step 200" in text and "would lose 50% of its non-zero gradient elements" in text
    assert "tuple of 2: [tensor (2, 3) torch.float32, tensor (2,) torch.float32]" in text
    assert "loss_numerics" in text and "log(0)" in text and "aten.log" in text
    assert text.count("spike ") >= 3


def test_absent_streams_and_empty_runs_are_handled(tmp_path: Path) -> None:
    # Steps only: no layers.json, no findings, no update ratios, nothing optional.
    bare = write_synthetic_run(tmp_path / "bare", steps=5, layers=3, layer_file=False)
    page = gw.report(bare).read_text(encoding="utf-8")
    assert_self_contained(page)
    assert {"fig-grad-norm", "fig-loss"} <= set(figure_svgs(page))
    assert 'id="fig-depth-absent"' in page and "No findings" in page
    assert 'id="bundles"' not in page and 'href="#bundles"' not in page  # no non-finite step: no bundles section
    # A run killed before its first step: meta.json only.
    empty = tmp_path / "empty"
    writer = RunWriter(empty)
    writer.write_meta({"model": "M"})
    writer.close()
    page = gw.report(empty, output=tmp_path / "out" / "empty.html").read_text(encoding="utf-8")
    # every chart left out, each named once in one line (no empty headings)
    assert figure_svgs(page) == {} and len(re.findall(r'id="fig-[a-z0-9-]+-absent"', page)) == 10 and page.count("Not recorded in this run") == 1
    assert "<h3>Gradient magnitude by layer depth</h3>" not in page
    # Comparing runs with different layers: one layer table per run; the empty run adds no lines.
    page = gw.report(bare, compare=write_synthetic_run(tmp_path / "other", steps=4, layers=2), output=tmp_path / "c.html").read_text(encoding="utf-8")
    layers = page.split('<section id="layers">')[1].split("</section>")[0]
    assert layers.count("<table>") == 1 and "No layer table" in layers and "blocks.1.fc" in layers
    page = gw.report(bare, compare=empty, output=tmp_path / "c2.html").read_text(encoding="utf-8")
    assert {"fig-grad-norm", "fig-loss"} <= set(figure_svgs(page))


def test_degenerate_runs_render_without_warnings(tmp_path: Path) -> None:
    """Every value non-finite, or every value zero: charts that cannot exist are absent, nothing warns
    (pytest turns any matplotlib warning into an error)."""
    for name, value in (("nan", float("nan")), ("zero", 0.0)):
        writer = RunWriter(tmp_path / name, flush_every=1)
        writer.write_meta({"model": "M", "clip_norm": 1.0})
        writer.write_layers([{"name": f"l{i}", "type": "Linear", "depth": i, "numel": 4, "trainable_numel": 4,
                              "measured": True} for i in range(3)])
        for s in range(1, 6):
            writer.append_step({"step": s, "loss": value, "grad_norm": value, "clip_coef": value, "clipped": False,
                                "skipped": name == "nan", "loss_scale": 0.0, "update_ratio": [0.0, 0.0, 0.0]},
                               {"grad_norms": np.full(3, value), "weight_norms": np.ones(3)})
        writer.append("activations", {"step": 1, "grad_rms": {"l0": 0.0, "l1": float("nan")},
                                      "activations": {"relu": {"kind": "relu", "dead": None}}})
        writer.close()
        page = gw.report(tmp_path / name).read_text(encoding="utf-8")
        svgs = figure_svgs(page)
        assert {"fig-grad-norm", "fig-loss"} <= set(svgs), name
        for absent in ("fig-depth", "fig-heatmap", "fig-update-ratio", "fig-act-grad", "fig-activations", "fig-loss-scale"):
            assert f'id="{absent}-absent"' in page, (name, absent)
        assert "could not be drawn" not in page


def test_adaptive_clipping_threshold_is_drawn_where_it_clipped(tmp_path: Path) -> None:
    from gradwatch.report import figures
    from gradwatch.report.prepare import prepare

    run = write_synthetic_run(tmp_path / "run", steps=50, layers=3)
    meta = json.loads((run / "meta.json").read_text())
    (run / "meta.json").write_text(json.dumps({**meta, "clip_norm": "AutoClip(percentile=10)"}))
    view = prepare(gw.load_run(run))
    assert view.threshold is None and view.clipped.all()
    texts = re.findall(r"<!-- (.*?) -->", figures.fig_grad_norm([view]) or "")
    assert "threshold applied (adaptive clipping)" in texts and not any("clip threshold" in t for t in texts)


def test_adaptive_clipping_threshold_is_drawn_from_the_recorded_per_step_threshold(tmp_path: Path) -> None:
    from gradwatch.report import figures
    from gradwatch.report.prepare import prepare

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), clip_norm="autoclip", run_dir=tmp_path / "auto")
    for _ in range(12):
        x = torch.randn(16, 4)
        watch.step(lambda: (model(x) - 1).pow(2).mean())
    watch.close()
    run = gw.load_run(tmp_path / "auto")
    threshold = run.steps["clip_threshold"]
    assert np.isnan(threshold[0]) and np.isfinite(threshold[1:]).all()  # AutoClip clips nothing before one norm is known
    assert np.ptp(threshold[1:]) > 0  # it adapts
    view = prepare(run)
    texts = re.findall(r"<!-- (.*?) -->", figures.fig_grad_norm([view]) or "")
    assert "clip threshold (adaptive)" in texts


def test_a_failing_chart_costs_only_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gradwatch.report import figures

    def broken(views: Any) -> str:
        raise RuntimeError("<b>boom</b>")

    monkeypatch.setattr(figures, "FIGURES", (("fig-broken", "Broken", broken, "x"),) + figures.FIGURES[:1])
    page = gw.report(write_synthetic_run(tmp_path / "run", steps=5, layers=3)).read_text(encoding="utf-8")
    assert 'id="fig-broken-error"' in page and "RuntimeError: &lt;b&gt;boom&lt;/b&gt;" in page
    assert "fig-depth" in figure_svgs(page)


def test_compare_runs_with_different_layers_on_relative_depth(tmp_path: Path) -> None:
    from gradwatch.report import figures
    from gradwatch.report.prepare import prepare

    three = prepare(gw.load_run(write_synthetic_run(tmp_path / "three", steps=5, layers=3)))
    five = prepare(gw.load_run(write_synthetic_run(tmp_path / "five", steps=5, layers=5)))
    texts = re.findall(r"<!-- (.*?) -->", figures.fig_depth([three, five]) or "")
    assert any("relative depth" in t for t in texts) and "blocks.4.fc" not in texts
    texts = re.findall(r"<!-- (.*?) -->", figures.fig_depth([five, five]) or "")
    assert not any("relative depth" in t for t in texts) and "blocks.4.fc" in texts  # same layers: named ticks


@pytest.mark.slow
def test_compare_overlays_two_runs_in_the_same_charts(tmp_path: Path) -> None:
    make_watch_run(tmp_path / "sigmoid", activation="sigmoid", steps=20)
    make_watch_run(tmp_path / "relu", activation="relu", steps=20)
    out = gw.report(tmp_path / "sigmoid", compare=tmp_path / "relu")
    assert out == tmp_path / "sigmoid" / "compare.html"
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    text = "".join(parse(page).text)
    assert "sigmoid vs relu" in text
    single = figure_svgs(gw.report(tmp_path / "sigmoid").read_text(encoding="utf-8"))
    both = figure_svgs(page)
    assert EXPECTED_FIGURES <= set(both)
    for fig_id in ("fig-depth", "fig-grad-norm", "fig-loss", "fig-gain"):
        # run B is drawn dashed in the same axes: dashes appear that the single report lacks
        assert both[fig_id].count("stroke-dasharray") > single[fig_id].count("stroke-dasharray"), fig_id
    # the layer table has one "last grad RMS" column per run (same layer names)
    assert page.count("last grad RMS") == 2
    # effective gain differs: sigmoid vanishes (< 0.5), kaiming relu flows (near 1)
    from gradwatch.report.prepare import prepare

    gains = [float(np.nanmedian(prepare(gw.load_run(tmp_path / n)).gain)) for n in ("sigmoid", "relu")]
    assert gains[0] < 0.5 < gains[1]


def test_large_run_is_thinned_for_display_not_in_data(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "big", steps=12_000, layers=20, findings=500)
    page = gw.report(run).read_text(encoding="utf-8")
    assert len(page.encode()) < 3_000_000
    svg = figure_svgs(page)["fig-grad-norm"]
    vertices = sum(len(re.findall(r"[ML] ", d)) for d in re.findall(r' d="([^"]+)"', svg))
    assert vertices < 6_000  # 12,000 steps drawn with ~2,000 points
    # all 500 findings are counted, and only MAX_FINDINGS are listed in full
    assert re.search(r"<td>loss_spike</td><td class=\"num\">500</td>", page)
    assert "300 more findings are not listed here" in page
    assert "<details><summary>199 more loss_spike findings</summary>" in page  # folded, no script needed
    # the data on disk is untouched
    assert gw.load_run(run).steps["layer_grad_norms"].shape == (12_000, 20)


def test_output_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a gradwatch run directory"):
        gw.report(tmp_path / "missing")
    run = write_synthetic_run(tmp_path / "run", steps=3, layers=2)
    with pytest.raises(ValueError, match="is a directory"):
        gw.report(run, output=tmp_path)


# ----- command line ---------------------------------------------------------------------
def test_cli_report_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.cli import main

    a = write_synthetic_run(tmp_path / "a", steps=20, layers=4)
    b = write_synthetic_run(tmp_path / "b", steps=30, layers=4)
    assert main(["report", str(a), "-o", str(tmp_path / "r.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert main(["report", str(a), str(b)]) == 0
    assert "a vs b" in (a / "compare.html").read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a gradwatch run directory" in err
    assert main(["report", str(a), str(tmp_path / "nope")]) == 2
    assert main(["report"]) == 2


def test_docstring_examples_of_the_pure_modules() -> None:
    import doctest

    from gradwatch import tensorboard
    from gradwatch.report import page

    for module in (data, page, tensorboard):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
