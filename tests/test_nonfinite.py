"""NaN root cause through the Watch: every finding class on real small models, several variants each.

Each test builds a small model, trains it through ``gradwatch.Watch`` with a
closure (unless stated), injects one known fault, and asserts the finding's
code, the op, and where it applies the module and the source line (a line of
this file, found by a marker comment).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.nonfinite import NonFinitePlugin

HERE = Path(__file__).name


def line_of(marker: str) -> str:
    """``test_nonfinite.py:<line>`` of the line of this file that carries ``marker``."""
    for i, text in enumerate(Path(__file__).read_text().splitlines(), start=1):
        if marker in text and "line_of(" not in text:
            return f"{HERE}:{i}"
    raise AssertionError(f"marker {marker!r} not found")


def plugin_of(watch: gw.Watch) -> NonFinitePlugin:
    return next(p for p in watch.plugins if isinstance(p, NonFinitePlugin))


def mlp(d_in: int = 8, width: int = 16, d_out: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, d_out))


def errors(findings: list[gw.Finding]) -> list[gw.Finding]:
    return [f for f in findings if f.severity == "error"]


def train(watch: gw.Watch, model: nn.Module, loss_fn, batches, closure: bool = True) -> list[gw.StepResult]:
    out = []
    for batch in batches:
        x, y = batch
        if closure:
            out.append(watch.step(lambda: loss_fn(model(x), y), batch=batch))
        else:
            out.append(watch.step(loss_fn(model(x), y), batch=batch))
    return out


def regression_batches(n: int, d: int = 8, bs: int = 16, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, 1, generator=g)
    batches = []
    for _ in range(n):
        x = torch.randn(bs, d, generator=g)
        batches.append((x, x @ w + 0.01 * torch.randn(bs, 1, generator=g)))
    return batches


# ----- loss_numerics ------------------------------------------------------------------------------
def bce_by_hand(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()  # MARK-log0


def masked_mean_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    keep = (y >= 0).float()  # label -1: ignore
    per = (out.squeeze(-1) - y.clamp_min(0).float()).pow(2)
    return (per * keep).sum() / keep.sum()  # MARK-emptycount


def selected_mean_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    per = (out.squeeze(-1) - y.clamp_min(0).float()).pow(2)
    return per[y >= 0].mean()  # MARK-emptymean


def test_log0_in_a_hand_written_loss_is_loss_numerics_at_aten_log() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.Watch(model, opt)
    batches = [(torch.randn(16, 8), torch.randint(0, 2, (16, 1)).float()) for _ in range(5)]
    train(watch, model, bce_by_hand, batches)
    assert not errors(watch.findings)
    x, y = torch.randn(16, 8) * 400, torch.randint(0, 2, (16, 1)).float()  # saturates sigmoid to exactly 0 / 1
    before = [p.detach().clone() for p in model.parameters()]
    result = watch.step(lambda: bce_by_hand(model(x), y), batch=(x, y))
    assert result.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    (finding,) = result.findings
    assert finding.code == "loss_numerics" and finding.severity == "error"
    assert finding.location["op"] == "aten.log"
    assert finding.location["phase"] == "loss"
    assert finding.location["source"].endswith(line_of("MARK-log0"))
    assert finding.location["function"] == "bce_by_hand"
    assert finding.evidence["localization"]["kind"] == "-inf"
    assert finding.evidence["replay"]["model_output_finite"] is True
    assert any("log_softmax" in fix for fix in finding.fixes)
    assert any(line_of("MARK-log0") in fix for fix in finding.fixes)
    watch.close()


@pytest.mark.parametrize(
    "loss_fn, op, marker",
    [(masked_mean_loss, "aten.div", "MARK-emptycount"), (selected_mean_loss, "aten.mean", "MARK-emptymean")],
)
def test_division_by_an_empty_count_is_loss_numerics(loss_fn, op: str, marker: str) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    watch = gw.Watch(model, opt)
    for _ in range(3):
        x, y = torch.randn(8, 8), torch.randint(0, 3, (8,))
        assert not watch.step(lambda: loss_fn(model(x), y), batch=(x, y)).skipped
    x, y = torch.randn(8, 8), torch.full((8,), -1)  # every label ignored: an empty count
    result = watch.step(lambda: loss_fn(model(x), y), batch=(x, y))
    (finding,) = result.findings
    assert result.skipped and finding.code == "loss_numerics"
    assert finding.location["op"] == op and finding.location["source"].endswith(line_of(marker))
    assert finding.evidence["localization"]["kind"] == "nan"
    assert "empty" in " ".join(finding.fixes)
    watch.close()


# ----- degenerate_batch -----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_features_mid_run_skip_the_step_and_training_goes_on(bad: float) -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gw.Watch(model, opt, clip_norm=1.0)
    batches = regression_batches(60)
    x, y = batches[30][0].clone(), batches[30][1]
    x[3, 7] = bad
    x[5, 1] = bad
    x[9, 2] = bad
    batches[30] = (x, y)
    losses, state_before, weights_before = [], None, None
    for i, (xb, yb) in enumerate(batches):
        if i == 30:
            weights_before = [p.detach().clone() for p in model.parameters()]
            state_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
            result = watch.step(lambda: F.mse_loss(model(xb), yb), batch=(xb, yb))
            assert result.skipped
            assert all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))
            assert all(torch.equal(state_before[k], v) for k, v in opt.state_dict()["state"][0].items())
            (finding,) = result.findings
        else:
            losses.append(watch.step(lambda: F.mse_loss(model(xb), yb), batch=(xb, yb)).loss)
    assert finding.code == "degenerate_batch"
    assert finding.location["first_nonfinite"] == "batch[0][3, 7]"
    word = "NaN" if math.isnan(bad) else "inf"
    assert f"3 {word} values at batch[0][3, 7] (first)" in finding.fixes[0]
    assert finding.location["op"] == "aten.addmm" and finding.location["module"] == "0"  # the first op that saw it
    assert finding.evidence["localization"]["created"] is False
    assert losses[-1] < 0.3 * losses[0]  # training went on and converged
    assert len(errors(watch.findings)) == 1
    watch.close()


class InputNorm(nn.Module):
    """Hand-written per-example standardization (no eps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)  # MARK-std


class NormedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = InputNorm()
        self.body = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))


@pytest.mark.parametrize("kind", ["all_zero", "constant_rows"])
def test_degenerate_batch_that_breaks_inside_the_model_names_the_div(kind: str) -> None:
    model = NormedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    train(watch, model, F.mse_loss, regression_batches(3))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    if kind == "all_zero":
        x = torch.zeros(16, 8)
    else:
        x[2] = 5.0
        x[11] = 0.0
    result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    (finding,) = result.findings
    assert finding.code == "degenerate_batch"
    assert finding.location["op"] == "aten.div" and finding.location["module"] == "norm"
    assert finding.location["source"].endswith(line_of("MARK-std"))
    if kind == "constant_rows":
        assert "2 of 16 examples of batch[0] are constant" in finding.message
        assert finding.evidence["localization"]["nonfinite_rows"] == [2, 11]
    else:
        assert "all zeros" in finding.message
    assert any("eps" in fix for fix in finding.fixes)
    watch.close()


def test_nested_dict_batch_names_the_key() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    x[1, 6] = float("nan")
    batch = {"inputs": [x], "target": y, "meta": {"ids": torch.arange(4)}}
    result = watch.step(lambda: F.mse_loss(model(batch["inputs"][0]), batch["target"]), batch=batch)
    (finding,) = result.findings
    assert finding.code == "degenerate_batch"
    assert finding.location["first_nonfinite"] == "batch['inputs'][0][1, 6]"
    watch.close()


# ----- nonfinite_forward ----------------------------------------------------------------------------
class Gate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.exp(self.proj(x))  # MARK-exp


class LogFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # MARK-logneg


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()), nn.Sequential(Gate(16), nn.LayerNorm(16))])
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_exp_overflow_inside_a_module_is_nonfinite_forward() -> None:
    model = GatedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    train(watch, model, F.mse_loss, regression_batches(5))
    with torch.no_grad():
        model.blocks[1][0].proj.bias.fill_(120.0)  # exp(120) overflows float32 (max 88.7)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    (finding,) = result.findings
    assert finding.code == "nonfinite_forward"
    assert finding.location["op"] == "aten.exp" and finding.location["module"] == "blocks.1.0"
    assert finding.location["source"].endswith(line_of("MARK-exp"))
    assert finding.evidence["localization"]["kind"] == "inf"
    assert finding.evidence["localization"]["max_abs_input"] > 88.7
    assert any("logsumexp" in fix for fix in finding.fixes)
    watch.close()


def test_nan_from_log_of_negative_activations_in_a_module() -> None:
    model = nn.Sequential(nn.Linear(8, 8), LogFeatures(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    (finding,) = result.findings
    assert finding.code == "nonfinite_forward"
    assert finding.location["op"] == "aten.log" and finding.location["module"] == "1"
    assert finding.location["source"].endswith(line_of("MARK-logneg"))
    assert finding.evidence["localization"]["kind"] == "nan"
    watch.close()


def test_overflow_in_a_transformer_block_names_the_block() -> None:
    from benchmarks.models import GPT, gpt_batch, gpt_loss

    model = GPT(vocab=32, d=16, heads=2, layers=2, seq=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    watch = gw.Watch(model, opt)
    for seed in range(3):
        x, y = gpt_batch(batch=2, seq=8, vocab=32, seed=seed)
        assert not watch.step(lambda: gpt_loss(model, x, y), batch=(x, y)).skipped
    with torch.no_grad():
        w = model.blocks[1].fc.weight
        w.copy_(torch.randn_like(w) * 1e38)  # a corrupted weight: the MLP's first Linear overflows
    x, y = gpt_batch(batch=2, seq=8, vocab=32, seed=9)
    result = watch.step(lambda: gpt_loss(model, x, y), batch=(x, y))
    (finding,) = result.findings
    assert finding.code == "nonfinite_forward"
    assert finding.location["module"] == "blocks.1.fc"
    assert finding.location["op"] in {"aten.addmm", "aten.mm", "aten.linear", "aten.bmm"}
    assert "models.py" in finding.location["source"]  # Block.mlp's line in benchmarks/models.py
    watch.close()


# ----- nonfinite_backward ---------------------------------------------------------------------------
class SqrtFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.sqrt(h * (h > 0))  # MARK-sqrt


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = mlp(8, 16, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ea, eb = self.encoder(a), self.encoder(b)
        return (ea - eb).pow(2).sum(-1).sqrt()  # MARK-norm


def test_sqrt_at_zero_is_born_only_in_backward() -> None:
    model = nn.Sequential(SqrtFeatures(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    x, y = torch.randn(16, 8), torch.randn(16, 1)  # ReLU makes exact zeros: d sqrt / dx = inf there
    result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    assert math.isfinite(result.loss) and result.skipped
    (finding,) = result.findings
    assert finding.code == "nonfinite_backward"
    assert finding.location["phase"] == "backward"
    assert finding.location["node"] == "SqrtBackward0"
    assert finding.location["module"] == "0"
    assert finding.location["source"].endswith(line_of("MARK-sqrt"))
    assert finding.evidence["localization"]["kind"] == "inf"
    assert any("torch.sqrt(x + 1e-12)" in fix for fix in finding.fixes)
    watch.close()


def test_norm_of_a_zero_vector_in_a_siamese_distance() -> None:
    model = Siamese()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    a, b, target = torch.randn(8, 8), torch.randn(8, 8), torch.ones(8)
    assert not watch.step(lambda: F.mse_loss(model(a, b), target), batch=(a, b, target)).skipped
    b = b.clone()
    b[4] = a[4]  # one pair is identical: distance 0, whose sqrt has an infinite derivative
    result = watch.step(lambda: F.mse_loss(model(a, b), target), batch=(a, b, target))
    (finding,) = result.findings
    assert finding.code == "nonfinite_backward"
    assert finding.location["node"] == "SqrtBackward0"
    assert finding.location["module"] == "(root)"
    assert finding.location["source"].endswith(line_of("MARK-norm"))
    assert finding.evidence["localization"]["nonfinite_rows"] == [4]
    assert any("vector_norm" in fix for fix in finding.fixes)
    watch.close()


class PaddedRMS(nn.Module):
    """Per-position RMS of the features, with padded positions zeroed by the mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) * mask[:, None]  # (B, 16), padded rows all zero
        return h.pow(2).mean(-1).pow(0.5)  # MARK-rms


class PaddedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rms = PaddedRMS()
        self.head = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(x, mask).unsqueeze(-1))


def test_fractional_power_at_zero_on_padded_positions_is_nonfinite_backward() -> None:
    model = PaddedNet()
    watch = gw.Watch(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = torch.randn(6, 8), torch.randn(6, 1)
    full = torch.ones(6)
    assert not watch.step(lambda: F.mse_loss(model(x, full), y), batch=(x, full, y)).skipped
    padded = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    result = watch.step(lambda: F.mse_loss(model(x, padded), y), batch=(x, padded, y))
    (finding,) = result.findings
    assert finding.code == "nonfinite_backward"
    assert finding.location["node"] == "PowBackward0" and finding.location["module"] == "rms"
    assert finding.location["source"].endswith(line_of("MARK-rms"))
    assert finding.evidence["localization"]["nonfinite_rows"] == [2, 4]
    watch.close()


# ----- init_scale_too_large / lr_too_high ------------------------------------------------------------
def test_lr_far_too_high_is_lr_too_high_not_init() -> None:
    torch.manual_seed(1)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    watch = gw.Watch(model, opt, clip_norm=None)
    results = train(watch, model, F.mse_loss, regression_batches(60))
    first_bad = next(r for r in results if r.skipped)
    ours = [f for f in first_bad.findings if f.evidence.get("decided_by")]
    assert ours and ours[0].code == "lr_too_high"
    assert ours[0].evidence["norm_pattern"] == "lr_too_high"
    assert "lower lr from 3 to 0.3" in ours[0].fixes
    assert not any(f.code == "init_scale_too_large" for f in watch.findings)
    watch.close()


def test_huge_init_is_init_scale_too_large() -> None:
    model = mlp(8, 32, 1)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(1e6)  # ~1e6 x the fan-in scale: activations overflow on step 1
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, clip_norm=None)
    x, y = torch.randn(16, 8) * 100, torch.randn(16, 1)
    result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    assert result.skipped
    ours = [f for f in result.findings if f.evidence.get("decided_by")]
    assert ours[0].code == "init_scale_too_large"
    assert ours[0].evidence["weight_scale"]["ratio"] > 1e5
    assert any("kaiming_normal_" in fix for fix in ours[0].fixes)
    watch.close()


def test_huge_first_norm_then_nan_is_init_scale_too_large() -> None:
    torch.manual_seed(0)
    model = mlp(8, 32, 1)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(30.0)  # finite but ~50x the default scale: a first norm far above 1e3
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=None)
    results = train(watch, model, F.mse_loss, regression_batches(6))
    assert math.isfinite(results[0].grad_norm) and results[0].grad_norm > 1e3
    first_bad = next(r for r in results if r.skipped)
    ours = [f for f in first_bad.findings if f.evidence.get("decided_by")]
    assert ours[0].code == "init_scale_too_large" and ours[0].evidence["norm_pattern"] == "init_scale_too_large"
    assert f"{results[0].grad_norm:.3g}" in ours[0].message
    watch.close()


# ----- without a closure ------------------------------------------------------------------------------
def test_without_a_closure_classify_what_can_be_classified() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt)
    plugin = plugin_of(watch)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    x[0, 0] = float("nan")
    result = watch.step(F.mse_loss(model(x), y), batch=(x, y))
    assert result.findings[0].code == "degenerate_batch"
    assert result.findings[0].location["first_nonfinite"] == "batch[0][0, 0]"
    assert "pass a closure" not in result.findings[0].message  # the batch explains it fully
    x = torch.randn(16, 8)
    result = watch.step(torch.log(model(x) * 0).mean(), batch=(x, y))
    finding = result.findings[0]
    assert finding.code == "nonfinite_forward" and "pass a closure" in finding.message
    assert finding.evidence["closure"] is False and "op" not in finding.location
    model2 = nn.Sequential(SqrtFeatures(), nn.Linear(16, 1))
    watch2 = gw.Watch(model2, torch.optim.SGD(model2.parameters(), lr=0.01))
    result = watch2.step(F.mse_loss(model2(x), y), batch=(x, y))
    finding = result.findings[0]
    assert finding.code == "nonfinite_backward" and "pass a closure" in finding.message
    assert finding.location["layers"] == ["0.fc"]
    assert plugin.replays == 0 and plugin_of(watch2).replays == 0
    watch.close()
    watch2.close()


# ----- on_nonfinite -----------------------------------------------------------------------------------
def test_raise_carries_the_finding() -> None:
    model = nn.Sequential(SqrtFeatures(), nn.Linear(16, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), on_nonfinite="raise")
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    with pytest.raises(gw.NonFiniteError) as info:
        watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    assert info.value.finding is not None
    assert info.value.finding.code == "nonfinite_backward"
    assert info.value.finding.location["node"] == "SqrtBackward0"
    watch.close()


class Spiky(nn.Module):
    """A regression MLP whose loss goes NaN when a flag is set (a numerics bug on some steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.bn = nn.BatchNorm1d(8)
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.bn(x))
        return out * torch.log(torch.zeros(())) if self.broken else out


def test_rollback_restores_weights_and_optimizer_state_and_training_converges() -> None:
    model = Spiky()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gw.Watch(model, opt, on_nonfinite="rollback",
                     nonfinite=gw.NonFiniteConfig(rollback_every=10, rollback_lr_factor=0.5),
                     repair=gw.RepairConfig(lr_backoff=None))
    keeper = plugin_of(watch).rollback
    assert keeper is not None and keeper.every == 10
    batches = regression_batches(120)
    losses = []
    for i, (x, y) in enumerate(batches, start=1):
        if i == 25:
            good = {k: v.clone() for k, v in model.state_dict().items()}
            model.broken = True
            result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
            model.broken = False
            assert keeper.step == 20  # the snapshot taken after step 20
            (finding,) = result.findings
            assert finding.code == "nonfinite_forward" and finding.evidence["action"] == "rollback"
            assert finding.evidence["rollback"]["restored_step"] == 20
            assert "Rolled back" in finding.message
            assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)
            assert not all(torch.equal(good[k], v) for k, v in model.state_dict().items())  # moved back
            snap = keeper.state_dict()
            assert all(torch.equal(snap["model"][k], v) for k, v in model.state_dict().items())
            exp_avg = opt.state_dict()["state"][0]["exp_avg"]
            assert torch.equal(exp_avg, snap["optimizer"]["state"][0]["exp_avg"])
            assert exp_avg.data_ptr() != snap["optimizer"]["state"][0]["exp_avg"].data_ptr()  # no aliasing
            assert int(opt.state_dict()["state"][0]["step"]) == 20
        else:
            losses.append(watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y)).loss)
    assert len(keeper.events) == 1
    assert sum(losses[-10:]) / 10 < 0.15 * losses[0]  # it went on and converged (a clean run: 0.089)
    watch.close()


def test_rollback_snapshots_on_steps_without_weight_norms_and_never_keeps_non_finite_weights() -> None:
    model = mlp()
    model.register_parameter("spare", nn.Parameter(torch.zeros(2, 2)))  # held by the optimizer, unused: no gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, on_nonfinite="rollback", update_ratio_every=10,
                     nonfinite=gw.NonFiniteConfig(rollback_every=7), repair=gw.RepairConfig(lr_backoff=None))
    keeper = plugin_of(watch).rollback
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    for _ in range(14):
        result = watch.step(lambda: F.mse_loss(model(x), y))
    assert all(math.isnan(v) for v in result.record.layer_weight_norms)  # step 14 measures no weight norm ...
    assert keeper.step == 14  # ... and its snapshot was taken all the same
    with torch.no_grad():
        model.spare[0, 0] = float("inf")  # a weight made non-finite: the loss and gradients stay finite
    for _ in range(7):
        watch.step(lambda: F.mse_loss(model(x), y))
    assert keeper.step == 14  # step 21 kept no snapshot of the inf weight
    watch.close()


def test_rollback_is_not_used_for_a_nan_batch_and_options_are_validated() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, on_nonfinite="rollback", repair=gw.RepairConfig(lr_backoff=None))
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    bad = x.clone()
    bad[0, 0] = float("nan")
    result = watch.step(lambda: F.mse_loss(model(bad), y), batch=(bad, y))
    assert result.findings[0].evidence["action"] == "skip"
    assert opt.param_groups[0]["lr"] == 0.01 and not plugin_of(watch).rollback.events
    watch.close()
    with pytest.raises(ValueError, match="rollback_every"):
        gw.Watch(model, opt, nonfinite=gw.NonFiniteConfig(rollback_every=5))
    with pytest.raises(ValueError, match="rollback_every must be a positive int"):
        gw.Watch(model, opt, on_nonfinite="rollback", nonfinite=gw.NonFiniteConfig(rollback_every=0))
    with pytest.raises(ValueError, match="rollback_lr_factor"):
        gw.Watch(model, opt, on_nonfinite="rollback", nonfinite=gw.NonFiniteConfig(rollback_lr_factor=2.0))
    with pytest.raises(ValueError, match="max_replays"):
        gw.Watch(model, opt, nonfinite=gw.NonFiniteConfig(max_replays=-1))


# ----- healthy runs and budgets -----------------------------------------------------------------------
def test_a_healthy_run_of_200_steps_never_replays(monkeypatch: pytest.MonkeyPatch) -> None:
    import gradwatch.nonfinite.plugin as plugin_module

    calls = []
    real = plugin_module.replay
    monkeypatch.setattr(plugin_module, "replay", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    watch = gw.Watch(model, opt)
    train(watch, model, F.mse_loss, regression_batches(200, bs=8))
    assert watch.steps_taken == 200
    assert calls == [] and plugin_of(watch).replays == 0
    assert not errors(watch.findings)
    watch.close()


def test_a_run_stuck_on_nan_gets_one_finding_per_cause_and_a_capped_number_of_replays(tmp_path) -> None:
    model = nn.Sequential(LogFeatures(), nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir=tmp_path / "run",
                     nonfinite=gw.NonFiniteConfig(max_replays=2, max_bundles=3))
    x, y = -torch.rand(4, 8), torch.randn(4, 1)
    results = [watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y)) for _ in range(5)]
    plugin = plugin_of(watch)
    assert all(r.skipped for r in results) and plugin.replays == 2
    ours = [[f.evidence["decided_by"] for f in r.findings if f.code == "nonfinite_forward"] for r in results]
    assert ours == [["replay"], [], ["no_replay"], [], []]  # a new finding only when the cause (as known) changes
    assert "max_replays=2" in results[2].findings[0].message
    assert plugin.repeats == 3
    assert len(list((tmp_path / "run" / "nonfinite").glob("*.pt"))) == 3  # a bundle per step, up to max_bundles
    ok = torch.rand(4, 8) + 0.5
    assert not watch.step(lambda: F.mse_loss(model(ok), y), batch=(ok, y)).skipped
    again = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))  # after a good step: a new episode
    assert [f.code for f in again.findings] == ["nonfinite_forward"]
    watch.close()


def test_the_plugin_is_on_with_diagnose_false() -> None:
    model = mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), diagnose=False)
    assert plugin_of(watch) is not None
    watch.close()


def test_observe_without_a_loss_blames_no_phase_it_cannot_see() -> None:
    model = nn.Sequential(SqrtFeatures(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, clip_norm=None)
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    F.mse_loss(model(x), y).backward()
    result = watch.observe(None, batch=(x, y))
    (finding,) = [f for f in result.findings if f.severity == "error"]
    assert finding.code == "nonfinite_backward" and "no loss was given" in finding.message
    assert finding.location["layers"] == ["0.fc"]
    watch.close()


def relative_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rel = torch.where(y != 0, (out - y) / y, torch.zeros_like(out))  # MARK-where
    return rel.abs().mean()


def test_a_masked_inf_in_the_forward_is_the_origin_of_a_nan_gradient() -> None:
    model = mlp()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    assert not watch.step(lambda: relative_error(model(x), y), batch=(x, y)).skipped
    y = y.clone()
    y[5] = 0.0  # a zero target: (out - y) / y is inf there, masked by torch.where in the forward
    result = watch.step(lambda: relative_error(model(x), y), batch=(x, y))
    assert math.isfinite(result.loss) and result.skipped
    (finding,) = result.findings
    assert finding.code == "nonfinite_backward" and finding.evidence["decided_by"] == "replay_masked"
    assert finding.location["op"] == "aten.div" and finding.location["source"].endswith(line_of("MARK-where"))
    assert "double-where" in finding.fixes[0]
    watch.close()


@pytest.mark.parametrize("dropout", [False, True])
def test_the_rng_state_is_copied_only_for_a_closure_that_draws_random_numbers(tmp_path, dropout: bool) -> None:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU()] + ([nn.Dropout(0.5)] if dropout else []) + [nn.Linear(16, 1)]
    model = nn.Sequential(*layers)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir=tmp_path / "run")
    plugin = plugin_of(watch)
    copies = []
    real_capture = plugin._capture
    plugin._capture = lambda: copies.append(watch.steps_taken) or real_capture()
    x, y = torch.randn(16, 8), torch.randn(16, 1)
    for _ in range(3):
        watch.step(lambda: F.mse_loss(model(x), y))
    assert plugin._rng_used is dropout
    if dropout:
        assert copies == [1, 1, 2, 3]  # step 1 also checked the state after backward
    else:
        assert copies == [1, 1]  # step 1 before and after: no random number drawn, no copy on steps 2 and 3
    copies.clear()
    state = torch.get_rng_state()
    bad = x.clone()
    bad[0, 0] = float("nan")
    result = watch.step(lambda: F.mse_loss(model(bad), y), batch=(bad, y))
    assert result.skipped and result.findings and result.findings[0].code == "degenerate_batch"
    assert copies == [4]  # the state kept for the replay and the bundle: before the step, or, not drawn from, now
    bundle = torch.load(next((tmp_path / "run" / "nonfinite").glob("*.pt")), weights_only=True)
    if not dropout:
        assert torch.equal(bundle["rng"]["cpu"], state)  # the state the step started with
    watch.close()
