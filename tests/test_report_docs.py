"""Every code block of docs/report.md runs as written (Python blocks exec'd, shell lines via the CLI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from gradwatch.cli import main
from test_report import write_synthetic_run

DOC = Path(__file__).resolve().parents[1] / "docs" / "report.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.slow
def test_docs_code_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    write_synthetic_run(Path("runs/exp1"), steps=12, layers=4, findings=1)
    write_synthetic_run(Path("runs/exp2"), steps=12, layers=4)
    python, shell = _blocks("python"), _blocks("bash")
    assert len(python) == 4 and len(shell) == 2
    pytest.importorskip("pandas")  # the notebook block's Run.to_pandas()
    for block in python:
        exec(compile(block, str(DOC), "exec"), {})
    for block in shell:
        for line in block.strip().splitlines():
            argv = shlex.split(line)
            assert argv[0] == "gradwatch"
            assert main(argv[1:]) == 0, line
    for written in ("runs/exp1/report.html", "exp1.html", "runs/exp1/compare.html", "before_after.html"):
        assert Path(written).read_text(encoding="utf-8").startswith("<!DOCTYPE html>"), written
    for logdir in ("tb/exp1", "tb/exp1-thin"):
        assert list(Path(logdir).glob("events.out.tfevents.*")), logdir
    out = capsys.readouterr().out
    assert "runs/exp1/report.html" in out
    assert "Run('runs/exp1': 12 steps, 4 layers, fp32, 1 finding: loss_spike)" in out  # as the block says
