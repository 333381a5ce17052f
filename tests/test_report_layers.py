"""The report of a model with many layers: a 75-layer GPT-2 (transformers config, random init) trained a few steps.

Checks what a person sees, from the figures matplotlib built and the HTML written:
labels without the common prefix, LayerNorm layers drawn apart from weight layers,
legends outside the data, plain tick labels, no fp16 forecast for an fp32 run
where it says nothing worth acting on, and the events as a table of one row per
finding or event.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import gradwatch as gw
from gradwatch.report import figures
from gradwatch.report.prepare import prepare
from test_report import figure_svgs, parse, write_synthetic_run

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

DRAWS = (figures.draw_depth, figures.draw_heatmap, figures.draw_grad_norm, figures.draw_loss, figures.draw_gain,
         figures.draw_update_ratio, figures.draw_act_grad, figures.draw_activations, figures.draw_loss_scale,
         figures.draw_fp16_forecast)


def make_gpt2_run(path: Path, steps: int = 10, n_embd: int = 16) -> Path:
    """A 75-layer GPT-2 (random init, synthetic tokens) trained ``steps`` steps under a Watch (also test_browser.py)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=n_embd, n_head=2, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    watch = gw.Watch(model, torch.optim.AdamW(model.parameters(), lr=1e-3), clip_norm=1.0, run_dir=path,
                     update_ratio_every=4)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 16))
        watch.step(lambda: model(input_ids=ids, labels=ids).loss)
    watch.close()
    assert len(watch.layers) == 75  # wte, wpe, 12 x (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj), ln_f
    return path


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt2_run(tmp_path_factory.mktemp("gpt") / "run")


def _drawn(views: list[Any]) -> dict[str, Any]:
    out = {}
    with figures._style():
        for draw in DRAWS:
            fig = draw(views)
            if fig is not None:
                fig.draw_without_rendering()
                out[draw.__name__] = fig
    return out


def _tick_texts(fig: Any) -> list[str]:
    return [t.get_text() for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
            for t in axis.get_ticklabels(minor=False) + axis.get_ticklabels(minor=True) if t.get_text()]


def test_labels_legends_and_ticks_are_readable_with_75_layers(gpt_run: Path) -> None:
    view = prepare(gw.load_run(gpt_run))
    drawn = _drawn([view])
    assert {"draw_depth", "draw_heatmap", "draw_grad_norm", "draw_gain", "draw_update_ratio", "draw_act_grad"} <= set(drawn)
    for name, fig in drawn.items():
        texts = _tick_texts(fig)
        assert texts, name
        # no label repeats the common prefix every layer name carries
        assert not any("transformer." in t for t in texts), (name, texts)
        # plain tick labels: no "1.06x10^0" (matplotlib's sci-notation text) and no offset text
        assert not any("\\times" in t or "×" in t for t in texts), (name, texts)
        assert all(not ax.yaxis.get_offset_text().get_text() for ax in fig.axes), name
        # every legend lies outside the data area of its axes
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is not None:
                box, data_area = legend.get_window_extent(), ax.get_window_extent()
                assert not box.overlaps(data_area), (name, box, data_area)
    # by-layer x axes label blocks: h.0 ... h.11 (not every third layer)
    depth = drawn["draw_depth"].axes[0]
    labels = [t.get_text() for t in depth.get_xticklabels()]
    assert [f"h.{b}" for b in range(12)] == [t for t in labels if t.startswith("h.")]
    assert "transformer." in depth.get_xlabel()  # the prefix is said once, in the axis label
    # the gain axis (values near 1) reads as plain numbers
    gain = [t.get_text() for t in drawn["draw_gain"].axes[0].get_yticklabels() + drawn["draw_gain"].axes[0].get_yticklabels(minor=True)]
    shown = [t for t in gain if t]
    assert shown and all(float(t) > 0 for t in shown), gain


def test_normalization_layers_are_a_separate_series(gpt_run: Path) -> None:
    run = gw.load_run(gpt_run)
    view = prepare(run)
    types = {layer["name"]: layer["type"] for layer in run.layers}
    norm_index = {i for i, name in enumerate(run.layer_names) if types[name] == "LayerNorm"}
    assert len(norm_index) == 25  # ln_1, ln_2 per block and ln_f
    with figures._style():
        ax = figures.draw_depth([view]).axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata())]
    weight_lines = [line for line in lines if line.get_marker() == "o"]
    norm_lines = [line for line in lines if line.get_marker() == "D"]
    assert len(weight_lines) == len(norm_lines) == view.checkpoints.size
    for line in weight_lines:
        assert set(np.asarray(line.get_xdata()).astype(int)) == set(range(75)) - norm_index
    for line, row in zip(norm_lines, view.checkpoints):
        xs = np.asarray(line.get_xdata()).astype(int)
        assert set(xs) == norm_index
        np.testing.assert_allclose(line.get_ydata(), view.rms[row, xs])  # the LayerNorms' own RMS


def test_fp32_run_has_no_fp16_forecast_unless_it_matters(gpt_run: Path, tmp_path: Path) -> None:
    events = [json.loads(line) for line in (gpt_run / "events.jsonl").read_text().splitlines()]
    forecast = next(e for e in events if e["event"] == "fp16_forecast")
    assert forecast["precision"] == "fp32"  # the plugin wrote one: the report leaves it out
    page = gw.report(gpt_run).read_text(encoding="utf-8")
    text = " ".join(parse(page).text)
    assert "fig-fp16-forecast" not in figure_svgs(page) and "fp16 forecast at step" not in text
    assert "fp16_forecast" not in text  # not in the events table either
    # The same forecast, made worth acting on: the default GradScaler's scale would put 6% of
    # layer 3's non-zero gradient elements below fp16's normal range (the threshold is 5%).
    for share, shown in ((0.04, False), (0.06, True)):
        run = write_synthetic_run(tmp_path / f"r{share}", steps=5, layers=4)
        below = [0.0, 0.0, 0.0, share]
        event = {"event": "fp16_forecast", "step": 5, "precision": "fp32", "layers": [f"blocks.{i}.fc" for i in range(4)],
                 "current": {"scale": 1.0, "flushed": [0.5] * 4, "subnormal": [0.1] * 4, "overflow": [0.0] * 4},
                 "reference": {"scale": 65536.0, "flushed": [b / 2 for b in below], "subnormal": [b / 2 for b in below],
                               "overflow": [0.0] * 4}, "recommended_scale": 1024.0, "fits": True}
        with open(run / "events.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")
        page = gw.report(run).read_text(encoding="utf-8")
        assert ("fig-fp16-forecast" in figure_svgs(page)) is shown, share
        assert ("fp16 forecast at step 5" in " ".join(parse(page).text)) is shown, share


def test_events_are_a_table_of_one_row_per_finding_or_event(tmp_path: Path) -> None:
    run = write_synthetic_run(tmp_path / "run", steps=30, layers=3, findings=4)
    writer_events = [{"event": "lr_backoff", "step": 12, "factor": 0.5, "lr_before": [0.1], "lr_after": [0.05],
                      "lost_steps": [9, 11], "reasons": ["spike", "nonfinite"], "window": 20},
                     {"event": "rollback", "step": 20, "restored_step": 18, "lr_before": [0.05], "lr_after": [0.025],
                      "factor": 0.5}]
    with open(run / "events.jsonl", "a", encoding="utf-8") as handle:
        for event in writer_events:
            handle.write(json.dumps(event) + "\n")
    page = gw.report(run).read_text(encoding="utf-8")
    section = page.split('<section id="events">')[1].split("</section>")[0]
    table = re.search(r'<table class="events">(.*?)</table>', section, re.S)
    assert table is not None
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    assert re.findall(r"<th>(\w+)</th>", rows[0]) == ["step", "code", "severity", "message"]
    cells = [[" ".join(parse(c).text) for c in re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)] for r in rows[1:]]
    findings = gw.load_run(run).findings
    assert len(cells) == len(findings) + len(writer_events)  # one row per finding and per event
    assert [int(c[0]) for c in cells] == sorted(int(c[0]) for c in cells)  # in step order
    for f in findings:
        assert [str(f.step), f.code, f.severity, f.message] in cells
    assert ["12", "lr_backoff", "warning", "lr lowered from 0.1 to 0.05 after lost steps 9, 11"] in cells
    assert ["20", "rollback", "warning", "rolled back to the weights after step 18; lr lowered from 0.05 to 0.025"] in cells
    assert "{" not in section  # no raw JSON


def test_plain_tick_text_by_hand() -> None:
    from gradwatch.report.data import tick_text

    assert [tick_text(v) for v in (1.06, 0.004, 65536.0, 1e-4, 2.5e-9, -0.5)] == \
        ["1.06", "0.004", "65536", "$10^{-4}$", "2.5e-09", "-0.5"]


def test_prefix_and_blocks_by_hand() -> None:
    from gradwatch.report.data import common_prefix, depth_ticks

    llama = ["model.embed_tokens"] + [f"model.layers.{b}.{p}" for b in range(30) for p in ("input_layernorm", "self_attn.q_proj")] + ["model.norm", "lm_head"]
    assert common_prefix(llama) == ""  # lm_head shares nothing
    assert common_prefix(llama[:-1]) == "model."
    ticks, labels = depth_ticks(llama[:-1], max_labels=10)
    # 10 of the 30 blocks, first and last included; the final norm, two layers after the last
    # block's label, would crowd it and is left to its minor tick
    assert len(labels) == 10 and labels[0] == "layers.0" and labels[-1] == "layers.29" and "norm" not in labels
    for tick, label in zip(ticks, labels):  # each label sits on the first layer of its block
        assert llama[tick] == f"model.{label}.input_layernorm"
    assert depth_ticks(llama[:-1], max_labels=40)[1][-1] == "norm"  # with room, it is labelled


def test_update_ratio_lines_of_a_rotating_run_show_every_layers_latest_value(tmp_path: Path) -> None:
    """A budget far below the weights: each measurement covers a few layers; each line carries every layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(6)])
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run",
                     update_ratio_every=2, update_ratio_budget=2 * 32 * 33 * 4 + 128, diagnose=False)
    for _ in range(12):
        x = torch.randn(8, 32)
        watch.step(lambda: model(x).pow(2).mean())
    watch.close()
    view = prepare(gw.load_run(watch.run_dir))
    measured = np.isfinite(view.update_ratio)
    assert measured.any(axis=0).all() and not measured[measured.any(axis=1)].all(axis=1).any()  # no row has all 6
    with figures._style():
        fig = figures.draw_update_ratio([view])
    lines = [line for line in fig.axes[0].get_lines() if "step" in str(line.get_label())]
    last = np.asarray(lines[-1].get_ydata(), dtype=float)
    assert len(last) == 6 and np.isfinite(last).all()  # every layer's latest ratio by the last step
    # and each value is the layer's last measured ratio in the run directory
    want = [view.update_ratio[np.flatnonzero(measured[:, j])[-1], j] for j in range(6)]
    np.testing.assert_allclose(last, want, rtol=1e-6)
    assert "latest per layer" in str(lines[-1].get_label())
