"""Every Python block of README.md runs as written."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


BLOCKS = python_blocks(ROOT / "README.md")


def test_readme_has_examples() -> None:
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # blocks that write run directories write them here
    block = BLOCKS[index]
    if "mp.start_processes" in block or "mp.spawn" in block:  # a script a person saves and runs
        script = tmp_path / "readme_script.py"
        script.write_text(block, encoding="utf-8")
        with socket.socket() as sock:  # a free port for the process group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().startswith("{'0': "), proc.stdout  # rank 0 prints the per-layer norms
        return
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(block, f"README.md block {index}", "exec"), namespace)


def test_readme_commands_exist() -> None:
    """Every `gradwatch SUBCOMMAND` the README shows answers --help (exit 0)."""
    from gradwatch import cli

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = set(re.findall(r"^gradwatch (\w+)", "\n".join(re.findall(r"```bash\n(.*?)```", text, flags=re.S)), flags=re.M))
    assert commands >= {"demo", "probe", "doctor", "report", "export"}
    for name in sorted(commands):
        with pytest.raises(SystemExit) as info:
            cli.main([name, "--help"])
        assert info.value.code == 0, name
