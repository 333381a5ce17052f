"""The gradwatch command: help, version, and one clear line + exit 2 on bad arguments."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gradwatch import cli


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("gradwatch ")
    assert cli.main([]) == 2  # no command: help on stderr, exit 2
    assert "COMMAND" in capsys.readouterr().err


def test_unknown_command_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradwatch: error:") and "Traceback" not in err[0]


def test_console_script_runs_as_a_module() -> None:
    out = subprocess.run([sys.executable, "-m", "gradwatch.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("gradwatch ")


def test_closed_pipe_is_not_a_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """`gradwatch ... | head`: the reader leaves early; main returns quietly instead of a BrokenPipeError traceback."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    import torch

    import gradwatch as gw

    model = torch.nn.Linear(3, 1)
    watch = gw.Watch(model, torch.optim.SGD(model.parameters(), lr=0.1), run_dir=tmp_path / "run")
    watch.step(lambda: model(torch.randn(4, 3)).pow(2).mean())
    watch.close()
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["doctor", str(tmp_path / "run")]) == 0
