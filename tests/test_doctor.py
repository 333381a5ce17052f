"""``gradwatch doctor RUN_DIR``: findings as text, exit 1 on an error finding, 2 on a bad path, bundles listed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import gradwatch as gw
from gradwatch.cli import main


def _run(path, lr: float, steps: int, nan_at: int | None = None) -> gw.Watch:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=lr), clip_norm=None, run_dir=path)
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        x = torch.randn(32, 8, generator=g)
        y = x.sum(1, keepdim=True)
        if step == nan_at:
            x = x * float("nan")
        watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
    watch.close()
    return watch


def test_doctor_healthy_run_exits_0(tmp_path, capsys):
    _run(tmp_path / "ok", lr=0.01, steps=20)
    assert main(["doctor", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "20 steps, 3 layers, 0 skipped" in out


def test_doctor_error_finding_exits_1_and_lists_bundles(tmp_path, capsys):
    path = tmp_path / "diverged"
    watch = _run(path, lr=1.0, steps=8)
    assert any(f.code == "lr_too_high" and f.severity == "error" for f in watch.findings)
    (path / "nonfinite").mkdir(exist_ok=True)
    (path / "nonfinite" / "step_999998.pt").write_bytes(b"not a torch file")  # truncated / foreign
    torch.save([1, 2, 3], path / "nonfinite" / "step_999999.pt")  # loadable, but not a bundle
    assert main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    first = next(f for f in watch.findings if f.code == "lr_too_high")
    assert f"[error] step {first.step} lr_too_high:" in out
    assert "fix: lower lr from 1 to 0.1" in out
    assert "step_999998.pt: unreadable (" in out
    assert "step_999999.pt: not a gradwatch bundle" in out
    real = sorted(p.name for p in (path / "nonfinite").glob("step_0*.pt"))
    for name in real:  # bundles the NaN root-cause plugin wrote: step and finding code
        line = next(line for line in out.splitlines() if line.strip().startswith(name + ":"))
        step = int(name[5:11])
        assert f"step {step}" in line and any(code in line for code in gw.CODES)


def test_doctor_bad_path_exits_2_with_one_line(tmp_path, capsys):
    assert main(["doctor", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a gradwatch run directory" in err
    file_path = tmp_path / "file.txt"
    file_path.write_text("x")
    assert main(["doctor", str(file_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_doctor_shows_the_fp16_forecast_of_an_fp32_run(tmp_path, capsys):
    """A sigmoid net with a tiny loss: its first layer's gradients fall below fp16's 2^-24; doctor says so, with a scale."""
    torch.manual_seed(0)
    layers = []
    for _ in range(5):
        layers += [torch.nn.Linear(32, 32), torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(32, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=None, run_dir=tmp_path / "r")
    x = torch.randn(64, 32)
    watch.step(lambda: (model(x) * 1e-3).pow(2).mean())  # step 1 is a forecast step
    watch.close()
    main(["doctor", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "fp16 forecast at step 1 (a fp32 run):" in out
    assert "at loss scale 1: layer 0 would lose" in out  # the first layer is the one that flushes
    assert "recommended loss scale:" in out


def test_doctor_leaves_out_the_fp16_forecast_of_an_fp32_run_that_fp16_would_not_hurt(tmp_path, capsys):
    """An MLP with ordinary gradients: at GradScaler's 65536 nothing flushes or overflows, so no forecast noise."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), clip_norm=None, run_dir=tmp_path / "r")
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    watch.step(lambda: torch.nn.functional.mse_loss(model(x), y))  # step 1 is a forecast step
    watch.close()
    run = gw.load_run(tmp_path / "r")
    assert any(e.get("event") == "fp16_forecast" for e in run.events)  # it was measured ...
    main(["doctor", str(tmp_path / "r")])
    assert "fp16 forecast" not in capsys.readouterr().out  # ... and left out
