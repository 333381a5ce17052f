"""The HF callback's gradwatch/* numbers reach the Trainer's report_to backends (TensorBoard here)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tensorboard")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradwatch as gw  # noqa: E402
from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

STEPS = 4


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 8, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _scalars(logdir) -> dict[str, tuple[list[int], np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, tuple[list[int], np.ndarray]] = {}
    for root, _, files in os.walk(logdir):
        if not any(f.startswith("events.out.tfevents") for f in files):
            continue
        acc = EventAccumulator(root, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            events = acc.Scalars(tag)
            out[tag] = ([e.step for e in events], np.array([e.value for e in events]))
    return out


def test_gradwatch_numbers_reach_report_to_tensorboard(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))  # transformers 5: no logging_dir argument
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=["tensorboard"], save_strategy="no",
        use_cpu=True, disable_tqdm=True, max_grad_norm=0.05,
    )
    cb = GradwatchCallback(run_dir=tmp_path / "run", layers_every=2, update_ratio_budget=1 << 20)  # measured whole
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(STEPS * 4), callbacks=[cb])
    trainer.train()
    scalars = _scalars(logdir)  # the Trainer's TensorBoardCallback prefixes every tag with train/
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("GradwatchCallback") < names.index("TensorBoardCallback")  # moved ahead of the reporter
    run = gw.load_run(tmp_path / "run")
    steps, norms = scalars["train/gradwatch/grad_norm"]
    assert steps == list(range(1, STEPS + 1))
    np.testing.assert_allclose(norms, run.steps["grad_norm"], rtol=1e-5)  # the run directory's numbers
    _, threshold = scalars["train/gradwatch/clip_threshold"]
    assert threshold.tolist() == pytest.approx([0.05] * STEPS)
    _, coef = scalars["train/gradwatch/clip_coef"]
    np.testing.assert_allclose(coef, np.minimum(1.0, 0.05 / (run.steps["grad_norm"] + 1e-6)), rtol=1e-5)
    assert scalars["train/gradwatch/clipped"][1].tolist() == [1.0] * STEPS
    assert scalars["train/gradwatch/skipped_steps"][1].tolist() == [0.0] * STEPS
    layer = "train/gradwatch/layer_grad_norm/" + run.layer_names[0]
    layer_steps, layer_values = scalars[layer]
    assert layer_steps == [1, 2, 4]  # step 1 and every layers_every=2
    np.testing.assert_allclose(layer_values, run.steps["layer_grad_norms"][[0, 1, 3], 0], rtol=1e-5)
    # the update ratios of those steps reach the backend as the Watch measured them (the first steps
    # are measured; tests/test_watch.py checks the ratio itself against a hand computation)
    ratio_steps, ratio_values = scalars["train/gradwatch/layer_update_ratio/" + run.layer_names[0]]
    assert ratio_steps == [1, 2, 4]
    measured = {r.step: r.update_ratio[0] for r in cb.watch.history if r.update_ratio is not None}
    np.testing.assert_allclose(ratio_values, [measured[s] for s in (1, 2, 4)], rtol=1e-5)


def _train_reporting(tmp_path, report_to: str, root_parameter: bool = False):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    if root_parameter:  # a parameter on the model itself (as CLIP's logit_scale): its layer is "(root)"
        model.register_parameter("temperature", torch.nn.Parameter(torch.ones(())))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, report_to=[report_to], save_strategy="no",
        use_cpu=True, disable_tqdm=True, max_grad_norm=0.05,
    )
    cb = GradwatchCallback(run_dir=tmp_path / "run", layers_every=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(STEPS * 4), callbacks=[cb])
    trainer.train()
    return trainer, gw.load_run(tmp_path / "run")


def test_gradwatch_numbers_reach_report_to_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3.x: the local file store is opt-in
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    trainer, run = _train_reporting(tmp_path, "mlflow")
    client = mlflow.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "gradwatch/grad_norm"))
    assert [s for s, _ in history] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in history], run.steps["grad_norm"], rtol=1e-5)
    layer = "gradwatch/layer_grad_norm/" + run.layer_names[0]
    layer_history = sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, layer))
    assert [s for s, _ in layer_history] == [1, 2, 4]
    np.testing.assert_allclose([v for _, v in layer_history], run.steps["layer_grad_norms"][[0, 1, 3], 0], rtol=1e-5)


def test_report_to_mlflow_takes_a_root_layer_under_a_name_mlflow_accepts(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    trainer, run = _train_reporting(tmp_path, "mlflow", root_parameter=True)  # MLflow rejects "(root)" in a name
    assert "(root)" in run.layer_names
    client = mlflow.MlflowClient()
    (experiment,) = [e for e in client.search_experiments() if client.search_runs([e.experiment_id])]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(mlrun.info.run_id, "gradwatch/layer_grad_norm/_root_")
    j = run.layer_names.index("(root)")
    want = run.steps["layer_grad_norms"][[0, 1, 3], j]
    np.testing.assert_allclose([m.value for m in sorted(history, key=lambda m: m.step)], want, rtol=1e-5)


def test_gradwatch_numbers_reach_report_to_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_PROJECT": "gradwatch-test"}.items():
        monkeypatch.setenv(name, value)
    try:
        trainer, run = _train_reporting(tmp_path, "wandb")
        summary = wandb.run.summary  # the Trainer's WandbCallback logs under train/ and leaves the run open
        assert summary["train/gradwatch/grad_norm"] == pytest.approx(float(run.steps["grad_norm"][-1]), rel=1e-5)
        assert summary["train/gradwatch/clip_threshold"] == pytest.approx(0.05)
        layer = "train/gradwatch/layer_grad_norm/" + run.layer_names[0]
        assert summary[layer] == pytest.approx(float(run.steps["layer_grad_norms"][3, 0]), rel=1e-5)  # step 4
    finally:
        if wandb.run is not None:
            wandb.run.finish()
