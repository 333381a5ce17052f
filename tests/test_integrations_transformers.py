"""GradwatchCallback in a real transformers.Trainer: a 2-layer GPT-2 built from a config, synthetic tokens."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradwatch.integrations.transformers import GradwatchCallback  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore::UserWarning:accelerate.*"),
]

STEPS = 6
NAN_STEP = 3  # 1-based optimizer step whose forward produces NaN
CLIP = 0.05
LR0 = 1e-3


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 8, vocab: int = 64) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Probe(transformers.TrainerCallback):
    """Independent measurements around gradwatch's callback (listed before it, plus a post-clip reader after)."""

    def __init__(self) -> None:
        self.pre: list[dict[str, float]] = []
        self.changed: list[bool] = []
        self._before: list[torch.Tensor] = []

    def on_step_begin(self, args, state, control, model=None, **kw):
        self._before = [p.detach().clone() for p in model.parameters()]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        sq: dict[str, float] = {}
        for name, p in model.named_parameters():
            layer = name.rpartition(".")[0]
            sq[layer] = sq.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
        self.pre.append({k: math.sqrt(v) for k, v in sq.items()})

    def on_step_end(self, args, state, control, model=None, **kw):
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(self._before, model.parameters())))


class PostClip(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0)


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.slow
def test_trainer_callback_pre_clip_norms_skip_and_lr_schedule(tmp_path):
    model = _model()
    calls = {"n": 0}

    def poison(module, args, output):  # NaN activations on the NAN_STEP-th training forward
        calls["n"] += 1
        if calls["n"] == NAN_STEP:
            return (output[0] * float("nan"),) + tuple(output[1:]) if isinstance(output, tuple) else output * float("nan")
        return None

    model.transformer.h[1].register_forward_hook(poison)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=LR0,
        lr_scheduler_type="linear", max_grad_norm=CLIP, report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    probe, post = Probe(), PostClip()
    gw_cb = GradwatchCallback(run_dir=tmp_path / "run", update_ratio_every=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(4 * STEPS), callbacks=[probe, gw_cb, post])
    trainer.train()

    watch = gw_cb.watch
    skipped = [r.skipped for r in watch.history]
    assert skipped == [i + 1 == NAN_STEP for i in range(STEPS)]
    assert probe.changed == [i + 1 != NAN_STEP for i in range(STEPS)]  # the NaN step changed nothing
    assert watch.layers[0] == "transformer.wte" and watch.layers[-1] == "transformer.ln_f"
    for i, (record, pre) in enumerate(zip(watch.history, probe.pre)):
        if record.skipped:
            assert post.norms[i] == 0.0  # gradients dropped before optimizer.step()
            continue
        assert set(record.layer_names) == set(pre)
        for name, value in zip(record.layer_names, record.layer_grad_norms):
            assert value == pytest.approx(pre[name], rel=1e-6)  # pre-clip, as measured independently
        assert record.grad_norm > CLIP
        assert post.norms[i] == pytest.approx(CLIP, rel=1e-3)  # gradwatch clipped to args.max_grad_norm
        assert math.isfinite(record.loss) and record.loss > 0
        assert record.update_ratio is not None and (record.update_ratio[np.isfinite(record.update_ratio)] > 0).any()
    assert args.max_grad_norm == CLIP  # restored after training
    # the linear schedule advanced once per applied update
    sched = trainer.lr_scheduler
    assert sched.last_epoch == STEPS - 1
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(LR0 * (1 - (STEPS - 1) / STEPS))
    # findings: run directory, log_history, logs
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["skipped"] for s in steps] == skipped
    logged = [e["gradwatch_finding"] for e in trainer.state.log_history if "gradwatch_finding" in e]
    assert logged == [f.code for f in watch.findings]
    assert any(f.severity == "error" and f.step == NAN_STEP for f in watch.findings)
    assert gw_cb.skipped_steps == 1
    # the recorded loss is the Trainer's own loss for the step (logging_steps=1)
    hf_losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e and "gradwatch_finding" not in e]
    for record, hf_loss in zip(watch.history, hf_losses):
        if not record.skipped:
            assert record.loss == pytest.approx(hf_loss, rel=1e-3)  # the Trainer rounds logged values


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="on_nonfinite"):
        GradwatchCallback(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="clip_norm"):
        GradwatchCallback(clip_norm="always")
    with pytest.raises(ValueError, match="clip_norm"):
        GradwatchCallback(clip_norm=-1.0)
    with pytest.raises(ValueError, match="precision"):
        GradwatchCallback(precision="bf16")


@pytest.mark.slow
def test_docs_transformers_snippet_runs(capsys, tmp_path, monkeypatch):
    from _docs import doc_block

    monkeypatch.chdir(tmp_path)
    code = doc_block("integrations.md", "transformers").replace("/tmp/gradwatch-hf", str(tmp_path / "hf"))
    exec(compile(code, "docs/integrations.md", "exec"), {"__name__": "__doc__"})
    out = capsys.readouterr().out
    assert "['transformer.wte', 'transformer.wpe']" in out
