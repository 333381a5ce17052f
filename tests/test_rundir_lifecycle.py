"""Run-directory lifecycle: versions, resume after a checkpoint, overwrite, and rows that stay with their steps.

References are independent of the writer: an uninterrupted run of the same seeded loop, and per-layer
norms worked out in the test with ``torch.linalg.vector_norm`` on the gradients the optimizer is about to use.
"""

from __future__ import annotations

import errno
import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch as gw
from gradwatch import rundir, runpath
from gradwatch.errors import GradwatchWarning


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)  # a pure function of the step number
    x = torch.randn(32, 6, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def _train(watch: gw.Watch, model: nn.Module, first: int, last: int) -> None:
    for step in range(first, last + 1):
        x, y = _batch(step)
        result = watch.step(lambda: nn.functional.mse_loss(model(x), y))
        assert result.step == step


def _checkpoint(model: nn.Module, opt: torch.optim.Optimizer, watch: gw.Watch) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gradwatch": watch.state_dict()}, buffer)
    return buffer.getvalue()


def _restore(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=True)


def _assert_same_records(run: gw.Run, whole: gw.Run) -> None:
    steps = run.steps["step"]
    assert steps.tolist() == whole.steps["step"].tolist()
    assert np.all(np.diff(steps) > 0), "step numbers strictly increasing, no duplicates"
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(run.steps[key], whole.steps[key], rtol=1e-6)
    assert not np.isnan(run.steps["layer_grad_norms"]).any()
    # weight norms: on the steps that measure the update ratio (the first 10, then every 10th), NaN elsewhere
    measured = ~np.isnan(run.steps["layer_weight_norms"]).any(axis=1)
    assert measured.tolist() == [s <= 10 or s % 10 == 0 for s in steps.tolist()]
    for key in ("layer_grad_norms", "layer_weight_norms"):
        np.testing.assert_allclose(run.steps[key], whole.steps[key], rtol=1e-6)
    assert [(f.code, f.step) for f in run.findings] == [(f.code, f.step) for f in whole.findings]


N, K, M = 20, 8, 14  # the whole run, the checkpoint, where the interrupted run stopped


@pytest.mark.parametrize("crash", ["closed", "left_open"])
def test_plain_loop_resume_equals_an_uninterrupted_run(tmp_path: Path, crash: str) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with gw.Watch(model, opt, run_dir=tmp_path / "whole", flush_every=3) as watch:
        _train(watch, model, 1, N)
    whole = gw.load_run(tmp_path / "whole")

    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = gw.Watch(model, opt, run_dir=tmp_path / "exp", flush_every=3)
    _train(first, model, 1, K)
    blob = _checkpoint(model, opt, first)
    _train(first, model, K + 1, M)  # recorded after the checkpoint, then the process "dies"
    if crash == "closed":
        first.close()

    saved = _restore(blob)
    assert saved["gradwatch"]["step"] == K and saved["gradwatch"]["run_dir"] == str(tmp_path / "exp")
    model = _model()
    model.load_state_dict(saved["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.load_state_dict(saved["opt"])
    watch = gw.Watch(model, opt, run_dir=tmp_path / "exp", run_dir_mode="resume", flush_every=3)
    assert watch.run_dir == tmp_path / "exp"
    # every step of the interrupted run is on disk (a Watch left open is closed by the resume: its lines written)
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == list(range(1, M + 1))
    watch.load_state_dict(saved["gradwatch"])
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == list(range(1, K + 1))  # dropped at once
    _train(watch, model, K + 1, N)
    watch.close()
    _assert_same_records(gw.load_run(tmp_path / "exp"), whole)
    assert runpath.versions(tmp_path / "exp") == [tmp_path / "exp"]


def test_state_dict_writes_the_run_directory_through_its_step(tmp_path: Path) -> None:
    model = _model()
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r", flush_every=1000)
    _train(watch, model, 1, 5)
    assert not (tmp_path / "r" / "steps.jsonl").exists()  # still buffered
    watch.state_dict()
    lines = (tmp_path / "r" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 5  # a checkpoint never refers to steps that are not on disk
    watch.close()


def test_resume_without_restoring_the_state_replaces_the_steps_and_warns(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gw.Watch(model, opt, run_dir=tmp_path / "r", flush_every=2) as watch:
        _train(watch, model, 1, 6)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "r", run_dir_mode="resume", flush_every=2)
    with pytest.warns(GradwatchWarning, match="step 1 is not after step 6.*load_state_dict"):
        _train(watch, model, 1, 3)
    watch.close()
    assert gw.load_run(tmp_path / "r").steps["step"].tolist() == [1, 2, 3]  # never two records of a step


def test_resume_continues_the_latest_version(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        with gw.Watch(model, opt, run_dir=tmp_path / "exp") as watch:
            _train(watch, model, 1, 2)
    assert runpath.latest(tmp_path / "exp") == tmp_path / "exp" / "version_1"
    watch = gw.Watch(model, opt, run_dir=tmp_path / "exp", run_dir_mode="resume")
    assert watch.run_dir == tmp_path / "exp" / "version_1"
    watch.load_state_dict({"step": 2})
    _train(watch, model, 3, 4)
    watch.close()
    assert gw.load_run(tmp_path / "exp" / "version_1").steps["step"].tolist() == [1, 2, 3, 4]
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == [1, 2]
    # a checkpoint of the run in exp itself resumes that one, not the latest version
    watch = gw.Watch(model, opt, run_dir=tmp_path / "exp", run_dir_mode="resume")
    watch.load_state_dict({"step": 1, "run_dir": str(tmp_path / "exp")})
    assert watch.run_dir == tmp_path / "exp"
    _train(watch, model, 2, 3)
    watch.close()
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == [1, 2, 3]
    assert gw.load_run(tmp_path / "exp" / "version_1").steps["step"].tolist() == [1, 2, 3, 4]
    fresh = gw.Watch(model, opt, run_dir=tmp_path / "new", run_dir_mode="resume")  # nothing to resume: a new run
    assert fresh.run_dir == tmp_path / "new" and (tmp_path / "new" / "meta.json").exists()
    fresh.close()


def test_a_taken_directory_gets_the_next_version_and_an_open_watch_keeps_its_own(tmp_path: Path) -> None:
    """A notebook cell run twice: the first Watch was never closed and still writes."""
    runs, losses = [], []
    for _ in range(3):
        model = _model()
        runs.append((model, gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "exp",
                                     flush_every=2)))
        losses.append([])
    assert [w.run_dir for _, w in runs] == [tmp_path / "exp", tmp_path / "exp" / "version_1",
                                            tmp_path / "exp" / "version_2"]
    for step in range(1, 6):  # interleaved steps of the three Watches
        for i, (model, watch) in enumerate(runs):
            x, y = _batch(step + 10 * i)
            losses[i].append(watch.step(lambda: nn.functional.mse_loss(model(x), y)).loss)
    for _, watch in runs:
        watch.close()
    for i, (_, watch) in enumerate(runs):
        run = gw.load_run(watch.run_dir)
        assert run.steps["step"].tolist() == [1, 2, 3, 4, 5]
        np.testing.assert_allclose(run.steps["loss"], losses[i], rtol=1e-6)
    assert runpath.versions(tmp_path / "exp") == [w.run_dir for _, w in runs]


def test_overwrite_replaces_the_run_and_stops_an_open_watch_writing_it(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = gw.Watch(model, opt, run_dir=tmp_path / "exp", flush_every=1)
    _train(old, model, 1, 4)
    other = gw.Watch(model, opt, run_dir=tmp_path / "exp")  # version_1: left alone by the overwrite
    other.close()
    (tmp_path / "exp" / "notes.txt").write_text("mine")
    new = gw.Watch(model, opt, run_dir=tmp_path / "exp", run_dir_mode="overwrite", flush_every=1)
    assert new.run_dir == tmp_path / "exp"
    with pytest.warns(GradwatchWarning, match="taken over by a newer Watch"):
        old.step(lambda: model(_batch(5)[0]).pow(2).mean())  # the old Watch goes on training, writes nothing
    _train(new, model, 1, 2)
    new.close()
    old.close()
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == [1, 2]
    assert (tmp_path / "exp" / "version_1" / "meta.json").exists()
    assert (tmp_path / "exp" / "notes.txt").read_text() == "mine"


def test_bad_run_dir_mode_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"run_dir_mode must be one of \('version', 'resume', 'overwrite'\)"):
        gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r", run_dir_mode="append")
    assert not (tmp_path / "r").exists()


# ----- write failures -------------------------------------------------------------------------
class _LayerNormsAtUpdate:
    """Per-layer gradient norms the optimizer is about to apply, worked out with torch (clip_norm=None: pre-clip)."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, layers: list[nn.Module]) -> None:
        self.layers, self.by_step = layers, []
        opt.register_step_pre_hook(self._hook)

    def _hook(self, opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        norms = []
        for layer in self.layers:
            parts = torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in layer.parameters()])
            norms.append(float(torch.linalg.vector_norm(parts)))
        self.by_step.append(norms)


@pytest.mark.parametrize("failure", ["raise", "half_row"])
def test_rows_stay_with_their_steps_through_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        failure: str) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    truth = _LayerNormsAtUpdate(model, opt, [model[0], model[2], model[4]])
    real = rundir._write_all
    calls = {"n": 0}

    def disk_full_for_a_while(fd: int, data: bytes) -> None:
        calls["n"] += 1
        if 6 <= calls["n"] <= 13:  # a few flushes of lines and rows fail, then the disk has room again
            if failure == "half_row":
                real(fd, data[: len(data) // 2 + 3])  # not a row boundary
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(rundir, "_write_all", disk_full_for_a_while)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "r", flush_every=3)
    with pytest.warns(GradwatchWarning, match="run directory writer: OSError.*No space left"):  # reported once
        _train(watch, model, 1, 30)
    watch.close()
    assert watch.errors.count >= 1
    assert calls["n"] > 13

    run = gw.load_run(tmp_path / "r")
    expected = np.array(truth.by_step, dtype=np.float32)  # (steps, layers), step s in row s - 1
    steps = run.steps["step"]
    assert 0 < len(steps) < 30 and np.all(np.diff(steps) > 0)  # some lines were lost, none duplicated
    assert steps[-1] == 30  # writing came back
    rows = run.steps["layer_grad_norms"]
    lost = np.isnan(rows).all(axis=1)
    np.testing.assert_allclose(rows[~lost], expected[steps[~lost] - 1], rtol=1e-5)  # every row is its own step's
    assert (~lost).sum() >= len(steps) - 9  # only the rows of failed flushes are missing
    assert not np.isnan(rows[~lost]).any()
    for line in (tmp_path / "r" / "steps.jsonl").read_text().splitlines():
        json.loads(line)  # whole lines or none: no cut-off line swallowed the next one
    size = (tmp_path / "r" / "grad_norms.f32").stat().st_size
    assert size % (4 * 3) == 0  # whole rows only


def test_a_frozen_layer_keeps_the_columns_in_place(tmp_path: Path) -> None:
    model = _model()
    model[2].requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    truth = _LayerNormsAtUpdate(model, opt, [model[0], model[4]])
    with gw.Watch(model, opt, run_dir=tmp_path / "r", flush_every=2) as watch:
        _train(watch, model, 1, 5)
    run = gw.load_run(tmp_path / "r")
    assert run.layer_names == ["0", "4"]
    np.testing.assert_allclose(run.steps["layer_grad_norms"], np.array(truth.by_step), rtol=1e-5)


def test_warnings_are_not_raised_on_the_ordinary_paths(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gw.Watch(model, opt, run_dir=tmp_path / "exp", flush_every=1) as watch:
            _train(watch, model, 1, 3)
            state = watch.state_dict()
        resumed = gw.Watch(model, opt, run_dir=tmp_path / "exp", run_dir_mode="resume", flush_every=1)
        resumed.load_state_dict(state)
        _train(resumed, model, 4, 5)
        resumed.close()
    assert gw.load_run(tmp_path / "exp").steps["step"].tolist() == [1, 2, 3, 4, 5]


def test_doctor_and_report_say_which_version_they_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gradwatch import cli

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for steps in (2, 3, 4):
        with gw.Watch(model, opt, run_dir=tmp_path / "exp") as watch:
            _train(watch, model, 1, steps)
    assert cli.main(["doctor", str(tmp_path / "exp")]) == 0
    out, err = capsys.readouterr()
    assert "2 steps" in out  # RUN_DIR itself is a run: the first one
    assert "holds 2 later run(s) too (version_1, version_2)" in err and "version_2" in err
    runpath.clear(tmp_path / "exp")  # only the versions are left: the latest is read, and said so
    assert cli.main(["doctor", str(tmp_path / "exp")]) == 0
    out, err = capsys.readouterr()
    assert "4 steps" in out and "reading the latest" in err
    assert cli.main(["report", str(tmp_path / "exp"), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 0 and "reading the latest" in capsys.readouterr().err


def test_resume_after_a_kill_mid_write_drops_the_cut_off_line_and_row(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.Watch(model, opt, run_dir=tmp_path / "whole", flush_every=2) as watch:
        _train(watch, model, 1, 6)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gw.Watch(model, opt, run_dir=tmp_path / "r", flush_every=2) as watch:
        _train(watch, model, 1, 3)
        state = watch.state_dict()
    with open(tmp_path / "r" / "steps.jsonl", "ab") as f:  # what a kill in the middle of a write leaves
        f.write(b'{"step":4,"loss":0.1')
    with open(tmp_path / "r" / "grad_norms.f32", "ab") as f:
        f.write(b"\x00" * 6)
    watch = gw.Watch(model, opt, run_dir=tmp_path / "r", run_dir_mode="resume", flush_every=2)
    watch.load_state_dict(state)
    _train(watch, model, 4, 6)
    watch.close()
    _assert_same_records(gw.load_run(tmp_path / "r"), gw.load_run(tmp_path / "whole"))
    assert (tmp_path / "r" / "grad_norms.f32").stat().st_size == 6 * 3 * 4
