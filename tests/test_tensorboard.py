"""TensorBoard export: live from a Watch and after the fact from a run directory, read back
with TensorBoard's own EventAccumulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch.tensorboard import FINDINGS_TAG, LAYER_PREFIX, export_tensorboard

pytest.importorskip("tensorboard")

from test_report import HOSTILE, HOSTILE_MESSAGE, make_model, make_watch_run  # noqa: E402


def _accumulate(logdir: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> tuple[list[int], np.ndarray]:  # type: ignore[no-untyped-def]
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events])


def _texts(acc) -> list[tuple[int, str]]:  # type: ignore[no-untyped-def]
    from tensorboard.util import tensor_util

    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode("utf-8")) for e in acc.Tensors(FINDINGS_TAG)]


def test_watch_writes_tensorboard_live(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make_model("sigmoid", hostile=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from test_report import HostileFinding

    watch = gw.Watch(model, opt, clip_norm=0.5, tensorboard=tmp_path / "tb", plugins=[HostileFinding(step=3)])
    results = []
    for step in range(1, 9):
        x = torch.randn(16, 16)
        if step == 6:
            x[0, 0] = float("nan")
        results.append(watch.step(lambda: nn.functional.mse_loss(model(x), x[:, :1]), batch=(x,)))
    watch.close()
    acc = _accumulate(tmp_path / "tb")
    steps, loss = _scalars(acc, "gradwatch/loss")
    assert steps == list(range(1, 9))
    np.testing.assert_allclose(loss[[0, 1, 2, 3, 4, 6, 7]], [results[i].loss for i in (0, 1, 2, 3, 4, 6, 7)], rtol=1e-6)
    _, norm = _scalars(acc, "gradwatch/grad_norm")
    np.testing.assert_allclose(norm[:5], [r.grad_norm for r in results[:5]], rtol=1e-6)  # pre-clip, not 0.5
    assert np.isnan(norm[5])
    _, coef = _scalars(acc, "gradwatch/clip_coef")
    np.testing.assert_allclose(coef[:5], np.minimum(1.0, 0.5 / (norm[:5] + 1e-6)), rtol=1e-5)
    _, skipped = _scalars(acc, "gradwatch/skipped")
    assert skipped.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]
    layer_tags = [t for t in acc.Tags()["scalars"] if t.startswith(LAYER_PREFIX)]
    assert sorted(layer_tags) == sorted(LAYER_PREFIX + name for name in watch.layers)
    for name in watch.layers:
        _, values = _scalars(acc, LAYER_PREFIX + name)
        np.testing.assert_allclose(values[:5], [r.layer_grad_norms[name] for r in results[:5]], rtol=1e-6)
    _, skipped_steps = _scalars(acc, "gradwatch/skipped_steps")
    assert skipped_steps.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    _, share = _scalars(acc, "gradwatch/clipped_share")
    clipped = np.cumsum([r.clipped for r in watch.history])
    np.testing.assert_allclose(share, clipped / np.arange(1, 9), rtol=1e-6)
    # the per-layer update ratios of the measured steps (the first steps): ||dw|| / ||w|| as measured
    measured = {r.step: r.update_ratio for r in watch.history if r.update_ratio is not None}
    assert 1 in measured
    ratio_steps, ratio = _scalars(acc, "gradwatch/layer_update_ratio/" + watch.layers[0])
    finite = sorted(s for s, v in measured.items() if np.isfinite(v[0]))
    assert ratio_steps == finite
    np.testing.assert_allclose(ratio, [measured[s][0] for s in finite], rtol=1e-6)
    texts = _texts(acc)
    hostile = [(s, t) for s, t in texts if HOSTILE_MESSAGE in t]
    assert len(hostile) == 1 and hostile[0][0] == 3 and "vanishing_gradients" in hostile[0][1]
    # every finding the Watch raised is there, at its own step (the last ones written at close)
    assert sorted((f.step, f.code) for f in watch.findings) == sorted(
        (s, next(c for c in gw.CODES if f"`{c}`" in t)) for s, t in texts)


def test_tensorboard_plugin_runs_without_diagnosis_and_thins(tmp_path: Path) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.Watch(model, opt, diagnose=False, tensorboard=str(tmp_path / "tb"), tensorboard_every=3) as watch:
        for _ in range(7):
            watch.step(lambda: model(torch.randn(4, 4)).pow(2).mean())
    steps, _ = _scalars(_accumulate(tmp_path / "tb"), "gradwatch/grad_norm")
    assert steps == [3, 6]


def test_tensorboard_options_are_validated_before_anything_is_written(tmp_path: Path) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="tensorboard_every must be a positive int"):
        gw.Watch(model, opt, run_dir=tmp_path / "run", tensorboard=tmp_path / "tb", tensorboard_every=0)
    with pytest.raises(TypeError, match="tensorboard must be a log directory path"):
        gw.Watch(model, opt, run_dir=tmp_path / "run", tensorboard=5)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        gw.Watch(model, opt, run_dir=tmp_path / "run", tensorboard=tmp_path / "file")
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_export_run_dir_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gradwatch.cli import main

    watch = make_watch_run(tmp_path / "run", steps=12, hostile=True, nan_step=7)
    run = gw.load_run(tmp_path / "run")
    assert main(["export", "--tensorboard", str(tmp_path / "run"), str(tmp_path / "tb")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tb")
    acc = _accumulate(tmp_path / "tb")
    steps, loss = _scalars(acc, "gradwatch/loss")
    assert steps == run.steps["step"].tolist()
    np.testing.assert_allclose(loss, run.steps["loss"], rtol=1e-6)
    _, norm = _scalars(acc, "gradwatch/grad_norm")
    np.testing.assert_allclose(norm, run.steps["grad_norm"], rtol=1e-6)
    _, coef = _scalars(acc, "gradwatch/clip_coef")
    np.testing.assert_allclose(coef, run.steps["clip_coef"], rtol=1e-6)
    for j, name in enumerate(watch.layers):
        _, values = _scalars(acc, LAYER_PREFIX + name)
        np.testing.assert_allclose(values, run.steps["layer_grad_norms"][:, j], rtol=1e-6)
    assert LAYER_PREFIX + HOSTILE in acc.Tags()["scalars"]
    texts = _texts(acc)
    assert len(texts) == len(run.findings) and any(HOSTILE_MESSAGE in t for _, t in texts)
    # thinning and bad arguments
    export_tensorboard(tmp_path / "run", tmp_path / "tb2", every=5)
    assert _scalars(_accumulate(tmp_path / "tb2"), "gradwatch/loss")[0] == [1, 6, 7, 11]  # 7 was skipped: always written
    with pytest.raises(ValueError, match="every must be a positive int"):
        export_tensorboard(tmp_path / "run", tmp_path / "tb3", every=0)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "tb4")]) == 2  # a format is required
    assert main(["export", "--tensorboard", str(tmp_path / "missing"), str(tmp_path / "tb5")]) == 2
    assert "not a gradwatch run directory" in capsys.readouterr().err


def test_watch_writes_through_a_users_summary_writer_without_collisions(tmp_path: Path) -> None:
    """A user's SummaryWriter: gradwatch writes under gradwatch/ only, the user's own 'loss' stays theirs,
    and the writer is left open for the user."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch = gw.Watch(model, opt, clip_norm=0.5, tensorboard=writer)
    x, y = torch.randn(16, 4), torch.randn(16, 1) + 5.0
    user_losses = []
    for step in range(1, 5):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        watch.observe(loss)
        opt.step()
        writer.add_scalar("loss", loss.item() * 10.0, step)  # the user's own tag, a different number
        user_losses.append(loss.item() * 10.0)
    watch.close()
    writer.add_scalar("after_close", 1.0, 1)  # still open: gradwatch did not close it
    writer.close()
    acc = _accumulate(tmp_path / "tb")
    scalars = acc.Tags()["scalars"]
    assert {t for t in scalars if not t.startswith("gradwatch/")} == {"loss", "after_close"}
    _, theirs = _scalars(acc, "loss")
    np.testing.assert_allclose(theirs, user_losses, rtol=1e-6)  # one value per step: no collision
    _, ours = _scalars(acc, "gradwatch/loss")
    np.testing.assert_allclose(ours * 10.0, user_losses, rtol=1e-5)
    _, norm = _scalars(acc, "gradwatch/grad_norm")
    _, coef = _scalars(acc, "gradwatch/clip_coef")
    np.testing.assert_allclose(coef, np.minimum(1.0, 0.5 / (norm + 1e-6)), rtol=1e-5)
    _, threshold = _scalars(acc, "gradwatch/clip_threshold")
    assert threshold.tolist() == [0.5] * 4
