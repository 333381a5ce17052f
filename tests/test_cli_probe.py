"""`gradwatch probe MODULE:FACTORY`: table, --json, exit codes 0/1/2, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gradwatch.cli import main

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def sigmoid_stack():
        torch.manual_seed(0)
        layers = []
        for _ in range(10):
            layers += [nn.Linear(64, 64), nn.Sigmoid()]
        return nn.Sequential(*layers), torch.randn(32, 64)

    def healthy():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))
        return model, batch, nn.functional.cross_entropy

    def not_a_pair():
        return 3

    def not_a_model():
        return "model", torch.randn(2, 2)

    def raises():
        raise RuntimeError("factory exploded")

    def bad_batch():
        return nn.Linear(3, 3), torch.randn(2, 5)
    """
)


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "factories_probe_cli.py"
    path.write_text(FACTORIES)
    return path


def test_error_finding_exits_1_and_prints_the_table(factory_file: Path, capsys) -> None:
    assert main(["probe", f"{factory_file}:sigmoid_stack"]) == 1
    out = capsys.readouterr().out
    for text in ("depth", "block gain", "predicted end-to-end gradient gain", "measured gain",
                 "[error] step 0 vanishing_gradients", "fix:"):
        assert text in out


def test_healthy_model_exits_0_with_json(factory_file: Path, capsys, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(factory_file.parent))  # a dotted module path works too
    assert main(["probe", "factories_probe_cli:healthy", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in data["layers"]] == ["0", "2"]
    assert data["layers"][0]["activation"] == "tanh"
    assert data["findings"] == [] and data["predicted_gain"] > 0


@pytest.mark.parametrize("target,message", [
    ("no_colon_here", "expected MODULE:FACTORY"),
    ("{file}:missing", "has no callable 'missing'"),
    ("{file}:not_a_pair", "must return (model, batch) or (model, batch, loss_fn)"),
    ("{file}:not_a_model", "expected a torch.nn.Module"),
    ("{file}:raises", "factory exploded"),
    ("{file}:bad_batch", "probing"),
    ("{dir}/nope.py:f", "no such file"),
    ("surely_not_a_module_xyz:f", "cannot import 'surely_not_a_module_xyz'"),
])
def test_bad_input_exits_2_with_one_line(factory_file: Path, capsys, target: str, message: str) -> None:
    target = target.format(file=factory_file, dir=factory_file.parent)
    assert main(["probe", target]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradwatch: error:"), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_console_script_never_shows_a_traceback(factory_file: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "gradwatch.cli", "probe", f"{factory_file}:raises"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
