"""The precursor signals outside the run directory: loggers, TensorBoard (live and exported), the HF Trainer
callback, and the report's section. The reference is always the run's own ``signals.jsonl``: each output must
carry exactly its values, on exactly its steps (nothing on the steps that measured nothing)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.loggers import MetricsLogger
from gradwatch.report.data import precursor_series

STEPS = 30
JUMP = 26  # from this step the loss (so every gradient) is 1000x: Adam's second moment lags
THRESHOLDS = {"rms_threshold": 3.0, "attention_logit_threshold": 30.0, "log_z_threshold": 1.0}
SIGNAL_PREFIXES = ("gradwatch/adam_rms", "gradwatch/layer_adam_rms/", "gradwatch/attention_logit", "gradwatch/log_z",
                   "gradwatch/output_rms", "gradwatch/layer_output_rms/")


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(h).unsqueeze(1).chunk(3, -1)
        return F.scaled_dot_product_attention(q, k, v).squeeze(1)


class Tiny(nn.Module):
    """Embedding, one attention module (site "attn"), a classifier trained with F.cross_entropy."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.emb = nn.Linear(6, d)
        self.attn = Attention(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        return self.head(h + self.attn(h)).mean(1)


def train(run_dir: Path | None, plugins: list[gw.WatchPlugin] = (), **watch_kwargs: Any) -> gw.Watch:
    """30 AdamW steps: attention logits grow past 30 (inputs scaled up), log Z sits above 1, and from
    step 26 the 1000x loss makes RMS_t jump above 3: each of the three findings is raised once."""
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # dense_sampling off: the attention logits pass half their threshold early, which would sample every step
    config = gw.PrecursorConfig(rms_every=2, sample_every=4, rms_warmup=5, quiet_steps=4, dense_sampling=False,
                                **THRESHOLDS)
    watch = gw.Watch(model, opt, run_dir=run_dir, precursors=config, plugins=list(plugins), **watch_kwargs)
    for step in range(1, STEPS + 1):
        x = torch.randn(8, 5, 6) * (1 + step / 5)
        y = torch.randint(0, 3, (8,))
        weight = 1000.0 if step >= JUMP else 1.0
        watch.step(lambda: weight * F.cross_entropy(model(x), y))
    watch.close()
    return watch


def expected_tags(line: dict[str, Any], per_layer: bool = True) -> dict[str, float]:
    """The tags of one signals.jsonl line, written out by hand from docs/precursors.md's field list."""
    out: dict[str, float] = {}
    if "adam_rms_max" in line:
        out["gradwatch/adam_rms_max"] = line["adam_rms_max"]
        if per_layer:
            out.update({f"gradwatch/layer_adam_rms/{k}": v for k, v in line.get("adam_rms", {}).items()})
    if "attention_logit_max" in line:
        out["gradwatch/attention_logit_max"] = max(line["attention_logit_max"].values())
        if per_layer:
            out.update({f"gradwatch/attention_logit/{k}": v for k, v in line["attention_logit_max"].items()})
    for key in ("log_z_mean", "log_z_max", "output_rms_growth_max"):
        if key in line:
            out[f"gradwatch/{key}"] = line[key]
    if per_layer:
        out.update({f"gradwatch/layer_output_rms/{k}": v for k, v in line.get("output_rms", {}).items()})
    return out


def signal_part(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(SIGNAL_PREFIXES)}


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, dict[str, float]]], gw.Watch]:
    """One run, written to a run directory, a MetricsLogger and TensorBoard (every 3rd step) at once."""
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("signals")
    sent: list[tuple[int, dict[str, float]]] = []
    watch = train(root / "run", [MetricsLogger(lambda m, s: sent.append((s, m)))], tensorboard=root / "tb",
                  tensorboard_every=3)
    return root, sent, watch


def _lines(root: Path) -> dict[int, dict[str, Any]]:
    lines = {s["step"]: s for s in gw.load_run(root / "run").signals}
    codes = {f.code: f.step for f in gw.load_run(root / "run").findings}
    # the run this file is about: every signal measured, each precursor finding raised
    assert {"update_spike_precursor", "attention_logit_growth", "output_logit_divergence"} <= set(codes)
    assert any("adam_rms" in line for line in lines.values()) and any("attention_logit_max" in line for line in lines.values())
    assert set(lines) < set(range(1, STEPS + 1))  # some steps measured nothing
    return lines


def test_metrics_logger_sends_exactly_the_signals_of_the_measured_steps(logged: Any) -> None:
    root, sent, watch = logged
    lines = _lines(root)
    assert [s for s, _ in sent] == list(range(1, STEPS + 1))
    for step, metrics in sent:
        assert signal_part(metrics) == expected_tags(lines.get(step, {})), step
    # attention logits of the site the module runs, RMS_t of the layers
    assert any("gradwatch/attention_logit/attn" in m for _, m in sent)
    assert any("gradwatch/layer_adam_rms/attn.qkv" in m for _, m in sent)


def test_metrics_logger_without_layers_sends_only_the_run_wide_signals(tmp_path: Path) -> None:
    sent: list[tuple[int, dict[str, float]]] = []
    train(tmp_path / "run", [MetricsLogger(lambda m, s: sent.append((s, m)), layers_every=None)])
    lines = {s["step"]: s for s in gw.load_run(tmp_path / "run").signals}
    for step, metrics in sent:
        assert signal_part(metrics) == expected_tags(lines.get(step, {}), per_layer=False), step
    assert any("gradwatch/adam_rms_max" in m for _, m in sent)


def test_mlflow_reads_back_the_signals_on_their_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    from gradwatch.loggers import MlflowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    with mlflow.start_run() as run:
        train(tmp_path / "run", [MlflowLogger()])
    lines = {s["step"]: s for s in gw.load_run(tmp_path / "run").signals}
    client = mlflow.MlflowClient()
    for tag, key in (("gradwatch/adam_rms_max", "adam_rms_max"), ("gradwatch/log_z_mean", "log_z_mean")):
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
        want = sorted((step, line[key]) for step, line in lines.items() if key in line)
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want])
    history = client.get_metric_history(run.info.run_id, "gradwatch/attention_logit/attn")
    assert sorted(m.step for m in history) == sorted(s for s, line in lines.items() if "attention_logit_max" in line)


def _tb_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _by_step(scalars: dict[str, dict[int, float]]) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for tag, values in scalars.items():
        if tag.startswith(SIGNAL_PREFIXES):
            for step, value in values.items():
                out.setdefault(step, {})[tag] = value
    return out


def _assert_tb_matches(got: dict[int, dict[str, float]], lines: dict[int, dict[str, Any]]) -> None:
    assert sorted(got) == sorted(lines)  # the measured steps, and only those
    for step, line in lines.items():
        want = expected_tags(line)
        assert sorted(got[step]) == sorted(want), step
        for tag, value in want.items():
            assert got[step][tag] == pytest.approx(value, rel=1e-6), (step, tag)  # float32 in the event file


def test_tensorboard_live_writes_the_signals_on_their_steps_whatever_tensorboard_every(logged: Any) -> None:
    root, _, _ = logged
    lines = _lines(root)
    scalars = _tb_scalars(root / "tb")
    assert sorted(scalars["gradwatch/loss"]) == list(range(3, STEPS + 1, 3))  # tensorboard_every=3
    _assert_tb_matches(_by_step(scalars), lines)


def test_tensorboard_export_writes_the_run_directorys_signals(logged: Any, tmp_path: Path) -> None:
    from gradwatch.tensorboard import export_tensorboard

    root, _, _ = logged
    export_tensorboard(root / "run", tmp_path / "tb", every=7)
    scalars = _tb_scalars(tmp_path / "tb")
    steps = gw.load_run(root / "run").steps
    written = steps["step"][(np.arange(STEPS) % 7 == 0) | steps["skipped"]].tolist()
    assert sorted(scalars["gradwatch/loss"]) == written and len(written) < STEPS  # every=7
    _assert_tb_matches(_by_step(scalars), _lines(root))


# ----- the report -------------------------------------------------------------------------
def _figures(page: str) -> dict[str, str]:
    return {fig_id: base64.b64decode(payload).decode("utf-8") for fig_id, payload in
            re.findall(r'<figure id="([^"]+)"><img alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)"', page)}


def _svg_texts(svg: str) -> list[str]:
    return re.findall(r"<!-- (.*?) -->", svg)  # matplotlib writes each text it draws as a comment


PRECURSOR_FIGURES = {"fig-adam-rms", "fig-attention-logits", "fig-log-z", "fig-output-rms"}


def test_report_draws_each_signal_with_its_threshold_and_findings(logged: Any) -> None:
    root, _, watch = logged
    meta = json.loads((root / "run" / "meta.json").read_text())
    assert {k: meta["precursors"][k] for k in THRESHOLDS} == THRESHOLDS  # the run records its thresholds
    page = gw.report(root / "run").read_text(encoding="utf-8")
    section = page.split('<section id="precursors">')[1].split("</section>")[0]
    figures = _figures(section)
    assert set(figures) == PRECURSOR_FIGURES
    assert 'href="#precursors"' in page
    assert "<code>rms_threshold</code> 3, <code>attention_logit_threshold</code> 30, <code>log_z_threshold</code> 1" in section
    assert "as recorded in the run&#x27;s meta.json" in section
    rms, attention, log_z = (_svg_texts(figures[f]) for f in ("fig-adam-rms", "fig-attention-logits", "fig-log-z"))
    assert "rms_threshold = 3" in rms and "update_spike_precursor raised" in rms
    assert "attention_logit_threshold = 30" in attention and "attention_logit_growth raised" in attention
    assert "log_z_threshold = 1" in log_z and "output_logit_divergence raised" in log_z
    assert "attn" in attention  # the site, by name
    lines = gw.load_run(root / "run").signals
    peak = max((line for line in lines if "adam_rms_max" in line), key=lambda line: line["adam_rms_max"])
    assert f"{peak['adam_rms_layer']}: {peak['adam_rms_max']:.3g}" in rms  # the largest RMS_t and its layer
    assert "max in " + peak["adam_rms_layer"] in rms


def test_report_of_an_old_run_falls_back_to_the_default_thresholds(logged: Any, tmp_path: Path) -> None:
    import shutil

    root, _, _ = logged
    old = tmp_path / "old"
    shutil.copytree(root / "run", old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["precursors"]  # written before meta.json recorded them
    (old / "meta.json").write_text(json.dumps(meta))
    page = gw.report(old).read_text(encoding="utf-8")
    figures = _figures(page)
    default = gw.PrecursorConfig()
    assert f"rms_threshold = {default.rms_threshold:g} (PrecursorConfig default: not recorded by this run)" in \
        _svg_texts(figures["fig-adam-rms"])
    assert f"attention_logit_threshold = {default.attention_logit_threshold:g} (PrecursorConfig default: not recorded by this run)" \
        in _svg_texts(figures["fig-attention-logits"])
    assert "PrecursorConfig&#x27;s defaults" in page


def test_a_run_without_signals_has_no_precursor_section(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    with gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "sgd",
                  precursors=gw.PrecursorConfig(output_rms=False)) as watch:
        for _ in range(5):
            watch.step(lambda: model(torch.randn(8, 4)).pow(2).mean())
    assert gw.load_run(tmp_path / "sgd").signals == []  # SGD has no second moment, MSE no softmax
    page = gw.report(tmp_path / "sgd").read_text(encoding="utf-8")
    assert 'id="precursors"' not in page and 'href="#precursors"' not in page
    assert not any(f in page for f in PRECURSOR_FIGURES)  # neither drawn nor named absent
    assert "fig-grad-norm" in _figures(page)


def test_a_run_with_only_adam_rms_draws_only_that(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with gw.Watch(model, opt, run_dir=tmp_path / "mlp",
                  precursors=gw.PrecursorConfig(rms_every=2, output_rms=False)) as watch:
        for _ in range(6):
            watch.step(lambda: model(torch.randn(8, 4)).pow(2).mean())
    assert [s["step"] for s in gw.load_run(tmp_path / "mlp").signals] == [2, 4, 6]
    page = gw.report(tmp_path / "mlp").read_text(encoding="utf-8")
    section = page.split('<section id="precursors">')[1].split("</section>")[0]
    assert set(_figures(section)) == {"fig-adam-rms"}
    assert 'id="fig-attention-logits-absent"' in section and 'id="fig-log-z-absent"' in section
    assert 'id="fig-output-rms-absent"' in section
    assert "Not measured in this run" in section


def test_precursor_series_and_thresholds_by_hand() -> None:
    import importlib

    data = importlib.import_module("gradwatch.report.data")
    series = data.precursor_series([
        {"step": 2, "adam_rms_max": 1.5, "adam_rms_layer": "a"},
        {"step": 1, "attention_logit_max": {"x": 2.0}, "log_z_mean": -1.0, "log_z_max": 3.0},
        {"step": 2, "adam_rms_max": 2.5, "adam_rms_layer": "b", "attention_logit_max": {"y": 7.0, "x": "nan"}},  # resumed: kept
        {"step": "junk", "adam_rms_max": 99.0},
    ])
    assert series.rms_steps.tolist() == [2] and series.rms_max.tolist() == [2.5] and series.rms_layer == ["b"]
    assert series.attention_sites == ["x", "y"] and series.attention_steps.tolist() == [1, 2]
    np.testing.assert_array_equal(series.attention, [[2.0, np.nan], [np.nan, 7.0]])
    assert series.attention_max.tolist() == [2.0, 7.0]
    assert series.log_z_steps.tolist() == [1] and series.log_z_mean.tolist() == [-1.0]
    assert data.precursor_series([{"step": 3}]) is None
    limits = data.precursor_thresholds({"precursors": {"rms_threshold": "bad", "log_z_threshold": 12}})
    default = gw.PrecursorConfig()  # a value that is not a number falls back to the default
    assert (limits.rms, limits.attention_logit, limits.log_z, limits.recorded) == (
        default.rms_threshold, default.attention_logit_threshold, 12.0, True)


# ----- the Hugging Face Trainer -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("logging_steps", [1, 2])
def test_hf_trainer_logs_carry_the_signals_measured_since_the_last_log(tmp_path: Path, logging_steps: int) -> None:
    transformers = pytest.importorskip("transformers")
    from gradwatch.integrations.transformers import GradwatchCallback

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n: int) -> None:
            self.ids = torch.randint(0, 64, (n, 8), generator=torch.Generator().manual_seed(3))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class Logs(transformers.TrainerCallback):  # after gradwatch's: sees what the report_to backends get
        def __init__(self) -> None:
            self.logs: list[tuple[int, dict[str, float]]] = []

        def on_log(self, args, state, control, logs=None, **kw):  # type: ignore[no-untyped-def]
            if logs is not None and "gradwatch/grad_norm" in logs:
                self.logs.append((state.global_step, dict(logs)))

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    steps = 6
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], logging_steps=logging_steps, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    cb = GradwatchCallback(run_dir=tmp_path / "run", layers_every=1,
                           precursors=gw.PrecursorConfig(rms_every=2, sample_every=3))
    logs = Logs()
    transformers.Trainer(model=model, args=args, train_dataset=Tokens(4 * steps), callbacks=[cb, logs]).train()
    lines = {s["step"]: s for s in gw.load_run(tmp_path / "run").signals}
    assert any("attention_logit_max" in line for line in lines.values())  # GPT-2's sdpa attention is seen
    assert any("log_z_mean" in line for line in lines.values()) and any("adam_rms_max" in line for line in lines.values())
    assert sorted(lines) != list(range(1, steps + 1))  # step 5 measures nothing
    assert [s for s, _ in logs.logs] == list(range(logging_steps, steps + 1, logging_steps))
    for step, got in logs.logs:  # the steps since the last log, a later value of a tag replacing an earlier one
        want: dict[str, float] = {}
        for measured in range(step - logging_steps + 1, step + 1):
            want.update(expected_tags(lines.get(measured, {})))
        assert signal_part(got) == pytest.approx(want), step
    if logging_steps == 2:  # step 3 measured signals (sampled), and they reach step 4's log
        assert "log_z_mean" in lines[3] and "gradwatch/log_z_mean" in dict(logs.logs)[4]


# ----- Lightning ----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_lightning_loggers_get_the_signals_on_their_steps_only() -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import Logger
    from gradwatch.integrations.lightning import GradwatchCallback

    class Capture(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.got: list[tuple[int, dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "capture"

        @property
        def version(self) -> int:
            return 0

        def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
            pass

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.got.append((int(step or 0), dict(metrics)))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = Tiny()

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the loss inside forward: log Z is seen
            return F.cross_entropy(self.net(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self(*batch)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(24, 5, 6, generator=g), torch.randint(0, 3, (24,), generator=g))
    capture = Capture()
    cb = GradwatchCallback(log_layers=True, precursors=gw.PrecursorConfig(rms_every=2, sample_every=3))
    trainer = pl.Trainer(max_steps=6, logger=capture, callbacks=[cb], log_every_n_steps=1, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    lines: dict[int, dict[str, Any]] = {}

    class Keep(pl.Callback):  # after gradwatch's callback: the precursor plugin's line of the step just measured
        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            last = next(p for p in cb.watch.plugins if p.name == "precursors").last
            if len(last) > 1:
                lines[last["step"]] = json.loads(json.dumps(last))

    trainer.callbacks.append(Keep())
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    assert set(lines) == {1, 2, 3, 4, 6}  # sampled 1-3 and 6, RMS_t on 2, 4, 6; step 5 measured nothing
    assert any("log_z_mean" in line for line in lines.values()) and any("attention_logit_max" in line for line in lines.values())
    got: dict[int, dict[str, float]] = {}
    for step, metrics in capture.got:
        part = signal_part(metrics)
        if part:
            assert step not in got  # sent once per step
            got[step] = part
    # gradwatch's step N is Lightning's global step N - 1 when its numbers are logged
    assert sorted(got) == [s - 1 for s in sorted(lines)]
    for step, line in lines.items():
        assert got[step - 1] == pytest.approx(expected_tags(line)), step


def test_output_rms_growth_is_drawn_relative_to_each_layers_first_sample(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.Watch(model, opt, run_dir=tmp_path / "mlp", precursors=gw.PrecursorConfig(sample_every=2)) as watch:
        for step in range(1, 7):
            x = torch.randn(8, 4) * step  # the first layer's output grows with its input: about 6x by step 6
            watch.step(lambda: model(x).pow(2).mean())
    lines = gw.load_run(tmp_path / "mlp").signals
    assert [line["step"] for line in lines] == [1, 2, 4, 6]
    series = precursor_series(lines)
    first = lines[0]["output_rms"]
    want = np.array([[line["output_rms"][n] / first[n] for n in ("0", "2")] for line in lines])
    assert series.output_layers == ["0", "2"]
    np.testing.assert_allclose(series.output_growth, want, rtol=1e-9)
    assert lines[-1]["output_rms_growth_max"] == pytest.approx(want[-1].max(), rel=1e-4)
    page = gw.report(tmp_path / "mlp").read_text(encoding="utf-8")
    section = page.split('<section id="precursors">')[1].split("</section>")[0]
    assert set(_figures(section)) == {"fig-output-rms"}
    assert "max over 2 layers" in _svg_texts(_figures(section)["fig-output-rms"])
