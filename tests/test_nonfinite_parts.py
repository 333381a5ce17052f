"""The NaN root-cause parts on their own: batch checks, replay, classify, rollback, bundles."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.nonfinite import (
    Rollback,
    StepFacts,
    capture_rng_state,
    check_batch,
    classify,
    describe_bundle,
    load_bundle,
    make_bundle,
    replay,
    replay_step,
    restore_rng_state,
)
# importlib: the package re-exports functions named like their modules (classify, replay)
batch_module = importlib.import_module("gradwatch.nonfinite.batch")
bundle_module = importlib.import_module("gradwatch.nonfinite.bundle")
classify_module = importlib.import_module("gradwatch.nonfinite.classify")
plugin_module = importlib.import_module("gradwatch.nonfinite.plugin")
replay_module = importlib.import_module("gradwatch.nonfinite.replay")
rollback_module = importlib.import_module("gradwatch.nonfinite.rollback")


@pytest.mark.parametrize(
    "module", [batch_module, bundle_module, classify_module, plugin_module, replay_module, rollback_module]
)
def test_docstring_examples_run(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ----- batch checks ----------------------------------------------------------------------------------
def test_check_batch_counts_and_first_index_against_a_hand_count() -> None:
    x = torch.randn(6, 4, 5)
    x[2, 1, 3] = float("nan")
    x[4, 0, 0] = float("inf")
    x[5, 3, 4] = float("-inf")
    x[5, 3, 3] = float("nan")
    report = check_batch([x, torch.zeros(6, dtype=torch.long)])
    (t,) = report.nonfinite
    assert (t.nan, t.posinf, t.neginf) == (2, 1, 1)
    assert t.first_nonfinite == "batch[0][2, 1, 3]"  # row-major order: the first one a loop would meet
    assert report.n_tensors == 2 and len(report.tensors) == 1  # the int tensor is counted, not checked
    assert "2 NaN and 1 +inf and 1 -inf values in batch[0]" in report.summary()


def test_check_batch_structure_all_zero_constant_rows_and_labels() -> None:
    feats = torch.randn(5, 3)
    feats[1] = 2.0
    feats[3] = 0.0
    report = check_batch({"a": torch.zeros(2, 3), "b": (feats,), "y": torch.zeros(5), "y2": torch.zeros(5, 1)})
    by_path = {t.path: t for t in report.tensors}
    assert by_path["batch['a']"].all_zero and by_path["batch['a']"].whole
    assert by_path["batch['b'][0]"].constant_rows == [1, 3] and not by_path["batch['b'][0]"].whole
    assert not by_path["batch['y']"].degenerate and not by_path["batch['y2']"].degenerate  # labels, not features
    assert report.constant_rows == {0, 1, 3}
    assert check_batch(torch.full((3, 4), 7.0)).tensors[0].constant
    assert check_batch(torch.randn(3, 4)).summary() == "the batch looks fine"
    assert check_batch("not a batch").tensors == []
    with pytest.raises(TypeError, match="name must be a str"):
        check_batch(torch.ones(2), name=3)


# ----- replay ------------------------------------------------------------------------------------------
class Dropper(nn.Module):
    """The loss divides by how many units dropout kept: 0/0 when it keeps none."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self.drop(torch.ones(3))
        return self.bn(self.fc(x)).sum() * keep.sum() / (keep > 0).sum()  # MARK-keep


def test_replay_restores_rng_and_reproduces_a_dropout_dependent_nan() -> None:
    model = Dropper()
    x = torch.randn(8, 4)
    for seed in range(200):  # find a step on which dropout drops all 3 units (p = 0.343)
        torch.manual_seed(seed)
        rng = capture_rng_state()
        loss = model(x)
        if math.isnan(float(loss.detach())):
            break
    assert math.isnan(float(loss.detach()))
    after = capture_rng_state()
    params = [p.detach().clone() for p in model.parameters()]
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    grad = model.fc.weight.grad
    running = model.bn.running_mean.clone()
    outcomes = [replay(model, lambda: model(x), rng) for _ in range(3)]
    for outcome in outcomes:  # reproduced every time: the RNG state is restored first
        where = outcome.localization
        assert where is not None and where.op == "aten.div" and where.module == "(root)"
        assert where.source.endswith("test_nonfinite_parts.py:" + str(_line("MARK-keep")))
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # weights untouched
    assert model.fc.weight.grad is grad and torch.equal(grad, torch.full_like(grad, 3.0))  # grads put back
    assert torch.equal(model.bn.running_mean, running)  # buffers restored
    assert torch.equal(torch.get_rng_state(), after["cpu"])  # the training RNG stream goes on as if no replay


def _line(marker: str) -> int:
    from pathlib import Path

    for i, text in enumerate(Path(__file__).read_text().splitlines(), start=1):
        if marker in text and "_line(" not in text:
            return i
    raise AssertionError(marker)


def test_replay_ignores_an_intentional_minus_inf_mask_and_finds_the_real_origin() -> None:
    lin = nn.Linear(4, 4)
    x = torch.randn(6, 4)

    def closure() -> torch.Tensor:
        h = lin(x)
        scores = (h @ h.T).masked_fill(torch.triu(torch.ones(6, 6, dtype=torch.bool), 1), float("-inf"))
        attn = scores.softmax(-1)  # finite: every row keeps its diagonal
        return torch.log(attn).sum()  # log(0) of the masked entries: the real problem

    where = replay_step(lin, closure, None)
    assert where.op == "aten.log" and where.created and where.phase == "loss"
    healthy = replay(lin, lambda: (lin(x) @ lin(x).T).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf")).softmax(-1).sum(), None)
    assert healthy.localization is None and healthy.grads_finite is True and math.isfinite(healthy.loss)


def test_replay_reports_the_first_op_that_saw_a_nan_input_when_nothing_created_one() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    outcome = replay(model, lambda: model(x).mean(), None)
    where = outcome.localization
    assert where.op == "aten.addmm" and where.module == "0" and not where.created
    assert where.nonfinite_rows == [2] and outcome.model_output_finite is False


def test_fp16_replay_finds_a_range_overflow_that_fp32_does_not() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.fill_(300.0)
    x = torch.full((4, 8), 30.0)  # 8 * 300 * 30 = 72000 > 65504: overflows float16, fine in float32
    closure = lambda: model(x).mean()  # noqa: E731
    assert replay_step(model, closure, None) is None  # fp32: finite
    where = replay_step(model, closure, None, autocast_ctx=lambda: torch.autocast("cpu", dtype=torch.float16))
    assert where is not None and where.module == "0" and where.kind == "inf" and where.dtype == "float16"
    assert where.op in {"aten.addmm", "aten.mm", "aten.linear"}


def test_replay_scales_the_loss_like_the_step_did() -> None:
    model = nn.Linear(2, 1)
    x = torch.ones(3, 2)

    def closure() -> torch.Tensor:  # the loss is 0, its gradients ~1e30: finite in float32
        out = model(x) * 1e30
        return (out - out.detach()).mean()

    assert replay_step(model, closure, None) is None
    where = replay_step(model, closure, None, loss_scale=1e10)  # scaled: ~1e40 overflows in the backward
    assert where is not None and where.phase == "backward" and where.node == "MulBackward0"


def test_replay_never_raises_for_a_failing_closure_and_validates_its_arguments() -> None:
    model = nn.Linear(2, 1)

    def broken() -> torch.Tensor:
        raise KeyError("batch missing")

    outcome = replay(model, broken, None)
    assert outcome.localization is None and "KeyError" in outcome.error
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replay_step("model", lambda: None, None)
    with pytest.raises(TypeError, match="rng_state must be"):
        replay_step(model, lambda: model(torch.ones(1, 2)).sum(), torch.get_rng_state())
    with pytest.raises(ValueError, match="loss_scale must be a positive"):
        replay_step(model, lambda: model(torch.ones(1, 2)).sum(), None, loss_scale=0)
    with pytest.raises(TypeError, match="restore_rng_state|rng_state"):
        restore_rng_state([1, 2])


def test_capture_and_restore_rng_round_trip() -> None:
    state = capture_rng_state("cpu")
    a = torch.randn(5)
    restore_rng_state(state)
    assert torch.equal(a, torch.randn(5))


# ----- classify (pure) -----------------------------------------------------------------------------------
def _facts(norms: list[float], **kw) -> StepFacts:
    return StepFacts(step=len(norms), loss=float("nan"), grad_norm=norms[-1], norms=norms,
                     skipped=[False] * (len(norms) - 1) + [True], closure_given=True, **kw)


def test_classify_uses_the_norm_pattern_for_lr_and_init() -> None:
    lr = classify(_facts([1.2, 1.0, 4.0, 40.0, 900.0, math.inf], lr=0.5, updates_applied=5), None, None)
    assert lr.code == "lr_too_high" and "lower lr from 0.5 to 0.05" in lr.fixes
    assert lr.evidence["norm_pattern"] == "lr_too_high" and lr.evidence["decided_by"] == "norm_pattern"
    init = classify(_facts([3e5, math.inf], updates_applied=1), None, None)
    assert init.code == "init_scale_too_large" and "3e+05" in init.message
    flat = classify(_facts([1.0, 1.1, 0.9, math.nan]), None, None)  # a NaN after a flat norm: not the pattern
    assert flat.code == "nonfinite_forward" and flat.evidence["decided_by"] == "no_replay"


def test_classify_a_nonfinite_first_step_is_init_only_with_evidence() -> None:
    huge = classify_module.WeightScale(layer="0", ratio=500.0, rms=50.0, fan_in=100)
    assert classify(_facts([math.nan], weight_scale=huge), None, None).code == "init_scale_too_large"
    sane = classify_module.WeightScale(layer="0", ratio=0.58, rms=0.058, fan_in=100)
    assert classify(_facts([math.nan], weight_scale=sane), None, None).code == "nonfinite_forward"


def test_weight_scale_matches_the_default_init_formula() -> None:
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 64), nn.Conv1d(4, 8, 3))
    scale = classify_module.weight_scale(model)
    assert 0.4 < scale.ratio < 0.75  # U(+-1/sqrt(fan_in)): rms * sqrt(fan_in) = 1/sqrt(3) = 0.577
    with torch.no_grad():
        model[2].weight.mul_(40)
    assert classify_module.weight_scale(model).layer == "2"


# ----- rollback --------------------------------------------------------------------------------------------
def test_rollback_round_trips_and_does_not_alias_the_snapshot() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    keeper = Rollback(model, opt, every=5, lr_factor=0.5)
    with pytest.raises(RuntimeError, match="before any snapshot"):
        keeper.restore(1)
    x = torch.randn(8, 3)
    model(x).pow(2).sum().backward()
    opt.step()
    keeper.snapshot(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):  # restore twice: the snapshot must not have been changed by training in between
        model(x).pow(2).sum().backward()
        opt.step()
        event = keeper.restore(7)
        assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert event.restored_step == 1 and event.lr_before == [0.05] and event.lr_after == [0.025]
    clone = Rollback(model, opt)
    clone.load_state_dict(keeper.state_dict())
    assert clone.every == 5 and clone.step == 1 and len(clone.events) == 2
    assert keeper.due(10) and not keeper.due(11)
    with pytest.raises(ValueError, match="rollback_every"):
        Rollback(model, opt, every=0)
    with pytest.raises(TypeError, match="optimizer must be"):
        Rollback(model, "adam")


# ----- bundles ---------------------------------------------------------------------------------------------
def test_bundle_in_the_run_dir_loads_weights_only_and_reproduces_the_step(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "run")
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    bad = x.clone()
    bad[1, 2] = float("nan")
    rng_before = capture_rng_state()
    result = watch.step(lambda: F.mse_loss(model(bad), y), batch={"x": bad, "y": y, "note": object()})
    watch.close()
    path = tmp_path / "run" / "nonfinite" / "step_000002.pt"
    assert path.is_file()
    bundle = torch.load(path, weights_only=True)
    assert set(bundle) == set(bundle_module.KEYS)
    assert bundle["step"] == 2 and math.isnan(bundle["loss"])
    assert torch.equal(torch.nan_to_num(bundle["batch"]["x"]), torch.nan_to_num(bad))
    assert isinstance(bundle["batch"]["note"], str)
    assert bundle["finding"] == result.findings[0].to_dict()
    assert torch.equal(bundle["rng"]["cpu"], rng_before["cpu"])
    assert bundle["localization"]["op"] == "aten.addmm"
    assert result.findings[0].evidence["bundle"] == "nonfinite/step_000002.pt"
    assert gw.load_run(tmp_path / "run").bundles == [path]
    text = describe_bundle(path)
    assert "step 2" in text and "degenerate_batch" in text and "batch['x'] float32 (6, 4) (1 non-finite)" in text
    assert "rng: cpu" in text
    with pytest.raises(FileNotFoundError, match="no bundle"):
        load_bundle(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a gradwatch bundle"):
        load_bundle(tmp_path / "other.pt")


def test_make_bundle_is_plain_data() -> None:
    b = make_bundle(step=1, finding={"code": "x", "evidence": {"v": float("nan")}}, batch=[torch.ones(2)],
                    rng={"cpu": torch.get_rng_state()}, loss=1.0, grad_norm=2.0, nonfinite_layers=["0"])
    assert b["format"] == 1 and b["nonfinite_layers"] == ["0"] and b["batch"][0].device.type == "cpu"


# ----- docs/nonfinite.md ------------------------------------------------------------------------------------
def _doc_blocks(lang: str) -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "nonfinite.md").read_text(encoding="utf-8")
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_docs_code_blocks_run_and_print_what_the_doc_says(tmp_path, capsys) -> None:
    python = _doc_blocks("python")
    assert len(python) == 2
    example = tmp_path / "example.py"
    example.write_text(python[0], encoding="utf-8")
    code = compile(python[0], str(example), "exec")
    exec(code, {"__name__": "docs_example"})  # noqa: S102 - the doc's own example
    printed = capsys.readouterr().out.strip().splitlines()
    documented = _doc_blocks("text")[0].strip().splitlines()
    assert len(printed) == len(documented)
    for got, want in zip(printed, documented):  # the same text, up to where the example file lives
        assert got.replace(str(example), "example.py").replace(example.name, "example.py") == want
    exec(compile(python[1], "replay_example.py", "exec"), {"__name__": "docs_example"})  # noqa: S102
    assert "aten.addmm (inf) in module 0" in capsys.readouterr().out


class Counter(nn.Module):
    """A forward that replaces its buffer instead of updating it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.lin(x)


def test_replay_puts_back_a_buffer_the_forward_replaced() -> None:
    model = Counter()
    original = model.calls
    outcome = replay(model, lambda: torch.log(model(torch.ones(3, 2)) * 0).sum(), None)
    assert outcome.localization.op == "aten.log"
    assert model.calls is original and float(model.calls) == 0.0


def test_skip_mode_reports_buffers_the_failing_forward_poisoned() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    x[2, 1] = float("nan")
    finding = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y)).findings[0]
    assert finding.code == "degenerate_batch"
    assert "1.running_mean" in finding.evidence["nonfinite_buffers"]
    assert any("on_nonfinite='rollback' restores them" in fix for fix in finding.fixes)
    watch.close()


def test_gradwatch_doctor_lists_the_bundles_this_plugin_writes(tmp_path, capsys) -> None:
    from gradwatch.cli import main

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir=tmp_path / "run")
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    watch.step(lambda: torch.log(model(x) * 0).mean(), batch=(x, y))  # log(0) in the loss
    watch.close()
    assert main(["doctor", str(tmp_path / "run")]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "step_000002.pt:" in line)
    assert "step 2" in line and "loss_numerics" in line and "aten.log" in line


def test_an_in_place_op_that_makes_nan_is_the_origin_not_a_propagation() -> None:
    lin = nn.Linear(3, 3)
    x = torch.randn(4, 3)

    def closure() -> torch.Tensor:
        h = lin(x)
        h.div_(0.0)  # in place: its own (now non-finite) input must not count as "already non-finite"
        return h.sum()

    where = replay_step(lin, closure, None)
    assert where.op == "aten.div_" and where.created and where.phase == "loss"


def test_plugin_state_dict_round_trips() -> None:
    model = nn.Sequential(nn.Linear(3, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    x = torch.randn(4, 3)
    watch.step(lambda: model(x).pow(2).mean())
    watch.step(lambda: torch.log(model(x) * 0).mean())
    plugin = next(p for p in watch.plugins if p.name == "nonfinite")
    state = plugin.state_dict()
    assert state == {"replays": 1, "bundles": 0, "updates": 1, "first_norm": plugin._first_norm,
                     "fp16_overflows": 0, "repeats": 0, "rng_used": False, "forward_overflow_said": False}
    other = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01))
    twin = next(p for p in other.plugins if p.name == "nonfinite")
    twin.load_state_dict(state)
    assert twin.state_dict() == state
    watch.close()
    other.close()


class MaskedAttention(nn.Module):
    """Scores masked with -inf on purpose; a row with every key masked makes softmax return NaN."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ x.transpose(-1, -2)  # (B, T, T)
        scores = scores.masked_fill(mask, float("-inf"))  # intentional: not the cause
        return torch.softmax(scores, dim=-1) @ x


@pytest.mark.parametrize("fully_masked", [True, False])
def test_replay_names_the_softmax_not_the_intentional_minus_inf_mask(fully_masked: bool) -> None:
    torch.manual_seed(0)
    model = MaskedAttention()
    x = torch.randn(2, 4, 8)
    mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)  # causal: finite
    if fully_masked:
        mask = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=0)  # the off-by-one bug: row 0 masks every key
    where = replay_step(model, lambda: model(x, mask).sum(), capture_rng_state())
    if not fully_masked:
        assert where is None  # -inf scores alone never count: softmax turns them into zeros
        return
    assert where is not None and where.op in ("aten._softmax", "aten.softmax") and where.kind == "nan"
    assert where.created


def test_an_inf_in_the_batch_is_still_named_where_it_entered() -> None:
    """Unlike an -inf constant, an inf from the data is the cause: the NaN it makes later is not 'created'."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(3, 4)
    x[1, 2] = float("inf")
    where = replay_step(model, lambda: model(x).sum(), capture_rng_state())
    assert where is not None and where.op == "aten.addmm" and where.module == "0" and not where.created


def test_a_batch_of_one_repeated_example_is_degenerate() -> None:
    """A loader bug repeats one sample: every feature is constant across the batch (x.std(0) == 0)."""
    from gradwatch.nonfinite import check_batch

    x = torch.randn(1, 6).repeat(8, 1)
    report = check_batch((x, torch.zeros(8)))
    (bad,) = report.degenerate
    assert bad.identical_rows and bad.whole and "all 8 examples of batch[0] are identical" in bad.describe()
    assert not check_batch((torch.randn(8, 6), torch.zeros(8))).degenerate


def test_an_absorbed_log0_is_not_the_origin_of_a_later_overflow() -> None:
    """T5's relative-position buckets take log(0) = -inf and cast it to an integer: not a failure."""
    lin = nn.Linear(4, 4)
    x = torch.randn(6, 4)

    def buckets() -> torch.Tensor:
        rel = torch.arange(6).float()
        return (torch.log(rel / 2) * 3).to(torch.long).clamp(min=0)  # log(0) = -inf, cast away

    def closure() -> torch.Tensor:
        h = lin(x) + buckets().float()[:, None]
        return torch.exp(h * 1e3).sum()  # exp overflows: +inf made here from finite values

    where = replay_step(lin, closure, None)
    assert where.op == "aten.exp" and where.created and where.kind == "inf"
    quiet = replay(lin, lambda: (lin(x) + buckets().float()[:, None]).sum(), None)
    assert quiet.localization is None and math.isfinite(quiet.loss) and quiet.grads_finite is True


def test_an_additive_minus_inf_mask_in_the_batch_is_a_mask_and_the_fully_masked_row_is_the_origin() -> None:
    from gradwatch.nonfinite.batch import check_batch

    lin = nn.Linear(4, 4)
    x = torch.randn(6, 4)
    mask = torch.zeros(6, 6)
    mask[:, 3:] = float("-inf")  # keys 3-5 are padding
    mask[2] = float("-inf")  # query 2 is an all-padding example: its row attends to nothing

    report = check_batch({"x": x, "attention_mask": mask})
    assert report.nonfinite == [] and report.degenerate == []  # 0 / -inf only: a mask, not a bad batch
    assert report.tensors[1].additive_mask and report.tensors[1].neginf == 6 * 3 + 3
    bad_input = mask.clone()
    bad_input[0, 0] = float("nan")
    assert check_batch({"x": bad_input}).nonfinite[0].nan == 1  # a NaN is never a mask

    def closure() -> torch.Tensor:
        h = lin(x)
        attn = (h @ h.T + mask).softmax(-1)  # MARK-masked-softmax: row 2 is softmax over -inf only = NaN
        return (attn @ h).sum()

    where = replay_step(lin, closure, None)
    assert where.op == "aten._softmax" and where.kind == "nan" and where.created
    assert where.nonfinite_rows == [2] and where.source.endswith(str(_line("MARK-masked-softmax")))
