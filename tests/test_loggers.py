"""Logger plugins: the numbers sent match the Watch's records (a plain sink, MLflow read back, W&B offline)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradwatch as gw
import gradwatch.errors  # noqa: F401
from gradwatch.loggers import MetricsLogger

CLIP, STEPS = 0.5, 6


def _train(plugins):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, clip_norm=CLIP, plugins=plugins)
    x = torch.randn(16, 4)
    for i in range(STEPS):
        y = torch.randn(16, 1) + (5.0 if i % 2 == 0 else 0.0)  # large targets clip, small ones may not
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        watch.observe(loss)
        opt.step()
    watch.close()
    return watch


def test_metrics_logger_sends_the_records_numbers():
    sent: list[tuple[int, dict]] = []
    watch = _train([MetricsLogger(lambda m, s: sent.append((s, m)), layers_every=3)])
    records = watch.history
    assert [s for s, _ in sent] == [r.step for r in records]
    clipped = 0
    for (step, m), r in zip(sent, records):
        clipped += r.clipped
        assert m["gradwatch/grad_norm"] == pytest.approx(r.grad_norm)
        assert m["gradwatch/loss"] == pytest.approx(r.loss)
        assert m["gradwatch/clip_threshold"] == CLIP
        assert m["gradwatch/clip_coef"] == pytest.approx(min(1.0, CLIP / (r.grad_norm + 1e-6)), rel=1e-6)
        assert m["gradwatch/clipped_share"] == pytest.approx(clipped / step)
        has_layers = any(k.startswith("gradwatch/layer_grad_norm/") for k in m)
        assert has_layers == (step == 1 or step % 3 == 0)
        if has_layers:
            for name, value in zip(r.layer_names, r.layer_grad_norms.tolist()):
                assert m[f"gradwatch/layer_grad_norm/{name}"] == pytest.approx(value)
    assert 0 < clipped  # the large targets clip


def test_a_failing_logger_never_stops_training():
    def broken(metrics, step):
        raise RuntimeError("backend down")

    with pytest.warns(gw.errors.GradwatchWarning, match="backend down") as caught:
        watch = _train([MetricsLogger(broken)])
    assert len(watch.history) == STEPS
    assert sum("backend down" in str(w.message) for w in caught) == 1  # reported once


def test_mlflow_logger_local_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from gradwatch.loggers import MlflowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x: the file store is opt-in
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    with mlflow.start_run() as run:
        watch = _train([MlflowLogger(layers_every=2)])
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "gradwatch/grad_norm")
    got = sorted((m.step, m.value) for m in history)
    assert [s for s, _ in got] == [r.step for r in watch.history]
    assert [v for _, v in got] == pytest.approx([r.grad_norm for r in watch.history], rel=1e-6)
    layer = f"gradwatch/layer_grad_norm/{watch.history[0].layer_names[0]}"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, layer)) == [1, 2, 4, 6]


def test_wandb_logger_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from gradwatch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gradwatch-test")
    try:
        watch = _train([WandbLogger(run)])
        # wandb commits a step's row when the next step arrives: the summary holds step 5 or 6 (finish commits 6)
        got = run.summary["gradwatch/grad_norm"]
        assert any(got == pytest.approx(r.grad_norm, rel=1e-6) for r in watch.history[-2:])
        assert run.summary["gradwatch/clip_threshold"] == CLIP
    finally:
        run.finish()


def test_mlflow_logger_names_a_root_layer_in_a_name_mlflow_accepts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from gradwatch.loggers import MlflowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    model = torch.nn.Linear(4, 2)  # the model is its own only layer: "(root)", which MLflow's names reject
    x = torch.randn(8, 4)
    with mlflow.start_run() as run:
        watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), plugins=[MlflowLogger(layers_every=1)])
        want = []
        for _ in range(3):
            result = watch.step(lambda: model(x).pow(2).mean())
            want.append(result.grad_norm)  # one layer: its norm is the global norm
        watch.close()
    assert watch.layers == ["(root)"]
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "gradwatch/layer_grad_norm/_root_")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(want, rel=1e-6)
