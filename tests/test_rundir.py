"""Run directory: plain append-only files, readable after a kill, load_run round trip."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradwatch as gw
from gradwatch.findings import _jsonable
from gradwatch.rundir import RunWriter


def _train(run_dir: Path, steps: int = 7, flush_every: int = 3) -> tuple[gw.Watch, list[gw.StepResult]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = gw.Watch(model, opt, clip_norm=1.0, run_dir=run_dir, flush_every=flush_every, update_ratio_every=2,
                     update_ratio_budget=1 << 20)  # measured whole
    results = []
    for _ in range(steps):
        x, y = torch.randn(16, 4), torch.randn(16, 1)
        results.append(watch.step(lambda: F.mse_loss(model(x), y)))
    return watch, results


def test_round_trip_through_load_run(tmp_path: Path) -> None:
    watch, results = _train(tmp_path / "run")
    watch.close()
    run = gw.load_run(tmp_path / "run")
    assert run.layer_names == watch.layers == ["0", "2"]
    assert run.steps["step"].tolist() == list(range(1, 8))
    # the loss and the norms are float32 on the device: 9 significant digits on disk keep them exactly
    np.testing.assert_array_equal(run.steps["loss"].astype(np.float32), np.float32([r.loss for r in results]))
    np.testing.assert_array_equal(run.steps["grad_norm"].astype(np.float32), np.float32([r.grad_norm for r in results]))
    grad = np.array([[r.layer_grad_norms[n] for n in run.layer_names] for r in results])
    np.testing.assert_allclose(run.steps["layer_grad_norms"], grad, rtol=1e-6)  # float32 on disk
    weight = np.array([[r.layer_weight_norms[n] for n in run.layer_names] for r in results])
    np.testing.assert_allclose(run.steps["layer_weight_norms"], weight, rtol=1e-6)
    assert run.steps["clipped"].tolist() == [r.clipped for r in results]
    ratio = run.steps["update_ratio"]
    # update_ratio_every=2: the first 2 steps, then every 2nd
    assert [bool(np.isfinite(r).all()) for r in ratio] == [True, True, False, True, False, True, False]
    assert run.meta["clip_norm"] == 1.0 and run.meta["format_version"] == 1
    assert run.steps["clip_threshold"].tolist() == [1.0] * 7
    assert [layer["name"] for layer in run.layers] == ["0", "2"]
    assert (tmp_path / "run" / "grad_norms.f32").stat().st_size == 7 * 2 * 4
    # RMS divides by sqrt(numel): layer "0" has 4*8+8 parameters.
    np.testing.assert_allclose(run.layer_rms()[:, 0], run.steps["layer_grad_norms"][:, 0] / np.sqrt(40))


def test_files_are_plain_json_lines(tmp_path: Path) -> None:
    watch, _ = _train(tmp_path / "run", steps=3)
    watch.close()
    lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert {"step", "loss", "grad_norm", "clip_coef", "clipped", "skipped", "time_ms", "row"} <= set(first)
    matrix = np.fromfile(tmp_path / "run" / "grad_norms.f32", dtype="<f4").reshape(-1, 2)
    assert matrix.shape == (3, 2)


def test_cut_off_last_line_and_partial_row_are_skipped(tmp_path: Path) -> None:
    watch, results = _train(tmp_path / "run", steps=4)
    watch.close()
    with open(tmp_path / "run" / "steps.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 0.3, "gra')  # a kill mid-write
    with open(tmp_path / "run" / "grad_norms.f32", "ab") as handle:
        handle.write(b"\x00\x00")  # half a float
    run = gw.load_run(tmp_path / "run")
    assert run.steps["step"].tolist() == [1, 2, 3, 4]
    assert np.isfinite(run.steps["layer_grad_norms"]).all()


def test_nonfinite_values_survive_the_round_trip(tmp_path: Path) -> None:
    model = nn.Linear(3, 1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "r", flush_every=1)
    watch.step(lambda: model(torch.randn(2, 3)).sum() * float("nan"))
    watch.close()
    run = gw.load_run(tmp_path / "r")
    assert np.isnan(run.steps["loss"][0]) and run.steps["skipped"].tolist() == [True]
    line = (tmp_path / "r" / "steps.jsonl").read_text()
    assert "NaN" not in line and '"nan"' in line  # strict JSON: non-finite numbers as strings


def test_existing_run_is_never_overwritten(tmp_path: Path) -> None:
    watch, _ = _train(tmp_path / "run", steps=2)
    watch.close()
    before = (tmp_path / "run" / "steps.jsonl").read_bytes()
    model = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="already holds a run.*run_dir_mode='version'"):
        RunWriter(tmp_path / "run")
    # the Watch's default run_dir_mode='version' writes the next version instead
    second = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run")
    assert second.run_dir == tmp_path / "run" / "version_1"
    second.close()
    assert (tmp_path / "run" / "steps.jsonl").read_bytes() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RunWriter(tmp_path / "file")


def test_load_run_on_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a gradwatch run directory"):
        gw.load_run(tmp_path / "nothing")


def test_data_is_written_at_flush_points_and_at_close(tmp_path: Path) -> None:
    watch, _ = _train(tmp_path / "run", steps=7, flush_every=3)
    watch.writer.flush(wait=True)
    time.sleep(0.05)
    lines = (tmp_path / "run" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 7  # an explicit flush writes everything buffered
    watch.close()


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, sys, time, torch
    from torch import nn
    from torch.nn import functional as F
    import gradwatch as gw
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.01), run_dir=sys.argv[1], flush_every=5)
    step = 0
    while True:
        step += 1
        x = torch.randn(8, 4)
        watch.step(lambda: F.mse_loss(model(x), x[:, :1]))
        if step == 23:
            watch.writer.flush(wait=True)
            print("flushed", flush=True)
        time.sleep(0.001)
    """
)


def test_sigkill_leaves_every_flushed_record_readable(tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SCRIPT, str(run_dir)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "flushed"
        time.sleep(0.3)  # keep training (and writing) for a while
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    run = gw.load_run(run_dir)
    n = len(run.steps["step"])
    assert n >= 23
    assert run.steps["step"].tolist() == list(range(1, n + 1))
    assert np.isfinite(run.steps["layer_grad_norms"]).all()
    assert run.layer_names == ["0", "2"]


def test_json_line_writes_plain_records_directly_and_converts_the_rest() -> None:
    import json

    from gradwatch.findings import json_line as _json_line

    plain = {"step": 3, "loss": 0.25, "clipped": False, "update_ratio": [0.001, "nan"]}
    assert _json_line(plain) == json.dumps(plain, separators=(",", ":")) + "\n"
    odd = {"step": 4, "loss": float("nan"), "grad_norm": float("inf"), "scale": np.float32(2.0), "rows": np.arange(2)}
    assert json.loads(_json_line(odd)) == {"step": 4, "loss": "nan", "grad_norm": "inf", "scale": 2.0, "rows": [0, 1]}


@pytest.mark.parametrize("case", ["plain", "threshold_and_scale", "nan_loss", "update_ratio", "finite_update_ratio", "skipped_by",
                                  "no_clip", "int_threshold"])
def test_step_record_json_line_decodes_to_to_json_plus_row(case: str) -> None:
    from gradwatch.plugins import SkipReason
    from gradwatch.records import StepRecord

    record = StepRecord(7, 0.123456789, 3.5, 0.2857, 1.0, True, False, True, ["a", "b"], np.ones(2), np.ones(2),
                        time_ms=1.234567)
    if case == "threshold_and_scale":
        record.loss_scale = 65536.0
    elif case == "nan_loss":
        record.loss, record.loss_finite, record.skipped, record.clip_coef = math.nan, False, True, math.nan
    elif case == "update_ratio":
        record.update_ratio = np.array([1e-3, np.nan])
    elif case == "finite_update_ratio":
        record.update_ratio = np.array([1.234567e-3, 0.5, 2.5e-7])
    elif case == "skipped_by":
        record.skipped_by = [SkipReason.SPIKE]
        record.micro_batches = 4
    elif case == "no_clip":
        record.clip_threshold, record.clip_coef, record.clipped = None, 1.0, False
    elif case == "int_threshold":
        record.clip_threshold = 1
    line = record.to_json_line(41)
    assert line.endswith("\n") and "\n" not in line[:-1]
    want = json.loads(json.dumps(_jsonable({**record.to_json(), "row": 41})))
    got = json.loads(line)
    assert got.keys() == want.keys()
    for key, value in want.items():  # numbers with 9 significant digits on the plain path: a float32 exactly
        assert got[key] == (pytest.approx(value, rel=1e-8) if isinstance(value, float) else value), key
