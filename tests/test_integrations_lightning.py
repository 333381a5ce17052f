"""GradwatchCallback in a real lightning.Trainer (CPU, a few steps)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

pl = pytest.importorskip("lightning.pytorch")

from gradwatch.integrations.lightning import GradwatchCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*GPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*TPU available but not used.*"),
    pytest.mark.filterwarnings("ignore:.*is smaller than the logging interval.*"),
    pytest.mark.filterwarnings("ignore:.*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*"),
]

NAN_BATCH = 2  # batch index whose loss is made non-finite
STEPS = 6
CLIP = 0.05  # Trainer(gradient_clip_val): below the typical norm, so Lightning's clipping engages
LR0, GAMMA = 0.1, 0.5


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if batch_idx == NAN_BATCH:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR0)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=GAMMA)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Probe(pl.Callback):
    """Independent measurements: per-layer pre-clip norms, post-clip norm, weights around each step."""

    def __init__(self) -> None:
        self.pre: list[dict[str, float]] = []
        self.post: list[float] = []
        self.changed: list[bool] = []
        self.ratios: list[dict[str, float]] = []  # ||dw|| / ||w|| per layer, around each step
        self._before: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = [p.detach().clone() for p in pl_module.parameters()]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs before gradwatch's (list order)
        sq: dict[str, float] = {}
        for name, p in pl_module.named_parameters():
            layer = name.rpartition(".")[0]
            sq[layer] = sq.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
        self.pre.append({k: math.sqrt(v) for k, v in sq.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.post.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0)
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self._before, pl_module.parameters())))
        dw: dict[str, float] = {}
        w: dict[str, float] = {}
        for (name, p), b in zip(pl_module.named_parameters(), self._before):
            layer = name.rpartition(".")[0]
            dw[layer] = dw.get(layer, 0.0) + float((p.detach().double() - b.double()).pow(2).sum())
            w[layer] = w.get(layer, 0.0) + float(b.double().pow(2).sum())
        self.ratios.append({k: math.sqrt(dw[k] / w[k]) for k in dw})


def _loader():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS * 4, 8, generator=g)
    y = torch.randn(STEPS * 4, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callback_measures_before_clipping_skips_nan_and_keeps_the_lr_schedule(tmp_path, precision):
    module = TinyModule()
    probe = Probe()
    gw_cb = GradwatchCallback(run_dir=tmp_path / "run", log_layers=True, update_ratio_every=2,
                              update_ratio_budget=1 << 20)
    trainer = pl.Trainer(
        max_steps=STEPS, accelerator="cpu", devices=1, precision=precision,
        gradient_clip_val=CLIP, callbacks=[probe, gw_cb],
        logger=pl.loggers.CSVLogger(tmp_path, name="logs"), log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, _loader())

    watch = gw_cb.watch
    records = watch.history
    assert [r.skipped for r in records] == [i == NAN_BATCH for i in range(STEPS)]
    assert watch.layers == ["net.0", "net.2", "net.4"]
    # per-layer norms are those before Lightning's clipping, equal to an independent measurement
    for i, (record, pre) in enumerate(zip(records, probe.pre)):
        if i == NAN_BATCH:
            continue
        for name, value in zip(record.layer_names, record.layer_grad_norms):
            assert value == pytest.approx(pre[name], rel=1e-6)
        assert record.grad_norm > CLIP  # ... and Lightning did clip afterwards
        assert probe.post[i] == pytest.approx(CLIP, rel=1e-3)
    # the non-finite step changed no weight; every other step did
    assert probe.changed == [i != NAN_BATCH for i in range(STEPS)]
    # the update ratio of the first 2 steps and every 2nd step after, measured once Lightning's
    # optimizer stepped (after its clipping)
    for i, record in enumerate(records):
        if (i + 1) > 2 and (i + 1) % 2:
            assert record.update_ratio is None
        else:
            assert dict(zip(record.layer_names, record.update_ratio.tolist())) == pytest.approx(probe.ratios[i], rel=1e-4)
    # the schedule advanced once per applied update only: no drift from the skipped step
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == STEPS - 1
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR0 * GAMMA ** (STEPS - 1))

    # findings and metrics through Lightning's logger; the run directory has every step
    with open(tmp_path / "logs" / "version_0" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    skipped = [float(r["gradwatch/skipped"]) for r in rows if r.get("gradwatch/skipped")]
    assert skipped == [float(i == NAN_BATCH) for i in range(STEPS)]
    assert any(r.get("gradwatch/layer_grad_norm/net.0") for r in rows)
    # the per-layer update ratios reach the logger too, once per measured step, equal to a hand measurement
    logged = [float(r["gradwatch/layer_update_ratio/net.0"]) for r in rows if r.get("gradwatch/layer_update_ratio/net.0")]
    measured = [i for i, record in enumerate(records) if record.update_ratio is not None]
    assert logged == pytest.approx([probe.ratios[i]["net.0"] for i in measured], rel=1e-4)
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["skipped"] for s in steps] == [i == NAN_BATCH for i in range(STEPS)]
    codes_logged = {k.split("/")[-1] for r in rows for k, v in r.items() if k.startswith("gradwatch/finding/") and v}
    assert codes_logged == {f.code for f in watch.findings}
    assert watch.closed  # closed at the end of training


class Accumulating(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss


@pytest.mark.slow
def test_callback_with_gradient_accumulation_records_the_mean_loss_once_per_update():
    module = Accumulating()
    gw_cb = GradwatchCallback(diagnose=False)
    trainer = pl.Trainer(
        max_steps=3, accelerator="cpu", devices=1, accumulate_grad_batches=2, callbacks=[gw_cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, _loader())
    records = gw_cb.watch.history
    assert len(records) == 3  # one record per optimizer step, not per batch
    for i, record in enumerate(records):
        assert record.loss == pytest.approx((module.losses[2 * i] + module.losses[2 * i + 1]) / 2, rel=1e-6)
    # fit() again with the same callback: measuring goes on, step numbers continue
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", devices=1, callbacks=[gw_cb], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, _loader())
    # the resumed Watch keeps the recent history (its rules look back over it) and counts on
    assert [r.step for r in gw_cb.watch.history] == [1, 2, 3, 4, 5]


def test_callback_state_round_trips_and_rejects_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradwatchCallback(on_nonfinite="rollback-please")
    with pytest.raises(ValueError, match="precision"):
        GradwatchCallback(precision="fp16")
    with pytest.raises(TypeError, match="log_layers"):
        GradwatchCallback(log_layers="yes")
    with pytest.raises(TypeError, match="positive int"):
        GradwatchCallback(log_layers=0)
    every3 = GradwatchCallback(log_layers=3)
    assert [s for s in range(1, 10) if every3._layers_due(s)] == [1, 3, 6, 9]
    assert all(GradwatchCallback(log_layers=True)._layers_due(s) for s in range(1, 5))
    cb = GradwatchCallback()
    assert cb.state_dict() == {}
    cb.load_state_dict({"watch": {"step": 7, "clipper": {}, "precision": {}}})
    assert cb._pending_state["step"] == 7  # applied when training starts


def test_import_gradwatch_does_not_import_lightning():
    import subprocess
    import sys

    code = "import sys, gradwatch, gradwatch.integrations; print('lightning' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False False"


@pytest.mark.slow
def test_docs_lightning_snippet_runs(capsys):
    from _docs import doc_block

    exec(compile(doc_block("integrations.md", "lightning"), "docs/integrations.md", "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    assert "['net.0', 'net.2']" in out


class ClassifierModule(pl.LightningModule):
    """The usual Lightning pattern: the forward returns logits, training_step computes the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.log_z: list[float] = []  # by hand, per step

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log_z.append(torch.logsumexp(logits.detach(), dim=-1).mean().item())
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_callback_sees_the_cross_entropy_of_training_step_for_log_z():
    import gradwatch as gw
    from gradwatch.precursors.plugin import PrecursorPlugin

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randint(0, 4, (48,)))
    module = ClassifierModule()
    seen: list[tuple[int, float]] = []

    class Reader(pl.Callback):  # after gradwatch's (list order): this step's signals
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            plugin = next(p for p in callback.watch.plugins if isinstance(p, PrecursorPlugin))
            if "log_z_mean" in plugin.last:
                seen.append((plugin.last["step"], plugin.last["log_z_mean"]))
            assert not plugin._window and plugin._mode_depth == 0  # the mode was left before backward

    callback = GradwatchCallback(precursors=gw.PrecursorConfig(sample_every=2))
    trainer = pl.Trainer(max_steps=6, callbacks=[callback, Reader()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert [s for s, _ in seen] == [1, 2, 4, 6]  # each of the first sample_every (2) steps, then every 2nd ...
    for step, value in seen:
        assert value == pytest.approx(module.log_z[step - 1], rel=1e-5)  # ... each equal to training_step's own
    from torch.overrides import _get_current_function_mode_stack
    assert not _get_current_function_mode_stack()
