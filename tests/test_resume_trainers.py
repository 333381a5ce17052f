"""Resuming a run directory through real trainers (CPU, tiny models, a few steps).

Each test trains N steps uninterrupted, then the same seeded run with a checkpoint at step K that goes on to
M > K (the crash comes after the checkpoint), then resumes from the K checkpoint to N, and compares the run
directory with the uninterrupted run's: steps 1..N once each, the same losses and per-layer norms.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch import runpath

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:accelerate.*"),
]

N, K, M = 12, 4, 8  # 4 optimizer steps per epoch: the checkpoint is at an epoch's end


def _samples() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 6, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2].tanh()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _assert_same_records(path: Path, whole: Path, n: int) -> None:
    run, ref = gw.load_run(path), gw.load_run(whole)
    assert run.steps["step"].tolist() == list(range(1, n + 1))  # in order, none twice
    assert ref.steps["step"].tolist() == list(range(1, n + 1))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(run.steps[key], ref.steps[key], rtol=1e-5)
    assert not np.isnan(run.steps["layer_grad_norms"]).any()
    # weight norms: on the steps that measure the update ratio (the first 10, then every 10th), NaN elsewhere
    measured = ~np.isnan(run.steps["layer_weight_norms"]).any(axis=1)
    assert measured.tolist() == [s <= 10 or s % 10 == 0 for s in run.steps["step"].tolist()]
    for key in ("layer_grad_norms", "layer_weight_norms"):
        np.testing.assert_allclose(run.steps[key], ref.steps[key], rtol=1e-5)


# ----- Lightning ---------------------------------------------------------------------------------
def test_lightning_fit_from_a_checkpoint_resumes_the_run_directory(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from gradwatch.integrations.lightning import GradwatchCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_samples()), batch_size=4, shuffle=False)

    def fit(run_dir: Path, epochs: int, ckpt_dir: Path | None = None, ckpt_path: str | None = None):
        callbacks: list = [GradwatchCallback(run_dir=run_dir, flush_every=3)]
        if ckpt_dir is not None:
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_top_k=-1,
                                                          filename="{epoch}-{step}"))
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                             enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(Tiny(), loader(), ckpt_path=ckpt_path)
        return callbacks[0]

    fit(tmp_path / "whole", epochs=N // 4)
    fit(tmp_path / "exp", epochs=M // 4, ckpt_dir=tmp_path / "ckpt")  # checkpoints at steps 4 and 8
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == list(range(1, M + 1))
    resumed = fit(tmp_path / "exp", epochs=N // 4, ckpt_dir=tmp_path / "ckpt", ckpt_path=str(tmp_path / "ckpt" / f"epoch=0-step={K}.ckpt"))
    assert resumed.watch.run_dir == tmp_path / "exp" and resumed.watch.steps_taken == N
    _assert_same_records(tmp_path / "exp", tmp_path / "whole", N)
    assert runpath.versions(tmp_path / "exp") == [tmp_path / "exp"]
    # a plain fit() on the same run_dir (no checkpoint) is a new run: the next version
    again = fit(tmp_path / "exp", epochs=1)
    assert again.watch.run_dir == tmp_path / "exp" / "version_1"


# ----- Hugging Face Trainer ----------------------------------------------------------------------
def test_hf_trainer_resume_from_checkpoint_resumes_the_run_directory(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gradwatch.integrations.transformers import STATE_FILE, GradwatchCallback

    class Data(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.x, self.y = _samples()

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"x": self.x[i], "labels": self.y[i]}

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    sequential = {"train_sampling_strategy": "sequential"} if any(
        f.name == "train_sampling_strategy" for f in dataclasses.fields(transformers.TrainingArguments)) else {}
    if not sequential:
        pytest.skip("this transformers has no train_sampling_strategy='sequential'")

    def train(run_dir: Path, steps: int, out: Path, resume: str | None = None) -> GradwatchCallback:
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
            lr_scheduler_type="constant", save_strategy="steps", save_steps=K, logging_steps=1, report_to=[],
            use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True, max_grad_norm=1.0, **sequential)
        callback = GradwatchCallback(run_dir=run_dir, flush_every=3)
        trainer = transformers.Trainer(model=Tiny(), args=args, train_dataset=Data(), callbacks=[callback])
        trainer.train(resume_from_checkpoint=resume)
        return callback

    train(tmp_path / "whole", N, tmp_path / "out_whole")
    train(tmp_path / "exp", M, tmp_path / "out")  # checkpoints at steps 4 and 8
    assert (tmp_path / "out" / f"checkpoint-{K}" / STATE_FILE).is_file()
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == list(range(1, M + 1))
    resumed = train(tmp_path / "exp", N, tmp_path / "out", resume=str(tmp_path / "out" / f"checkpoint-{K}"))
    assert resumed.watch.run_dir == tmp_path / "exp" and resumed.watch.steps_taken == N
    _assert_same_records(tmp_path / "exp", tmp_path / "whole", N)
    assert runpath.versions(tmp_path / "exp") == [tmp_path / "exp"]


def test_callbacks_refuse_an_unknown_run_dir_mode() -> None:
    for module in ("gradwatch.integrations.lightning", "gradwatch.integrations.transformers"):
        try:
            callback = __import__(module, fromlist=["GradwatchCallback"]).GradwatchCallback
        except ImportError:
            continue
        with pytest.raises(ValueError, match="run_dir_mode must be one of"):
            callback(run_dir="runs/x", run_dir_mode="append")
        assert callback(run_dir="runs/x", run_dir_mode="overwrite").run_dir_mode == "overwrite"
