"""The code blocks of docs/probe.md run as written (in order, one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "probe.md"


def test_docs_code_blocks_run(capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict[str, object] = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    out = capsys.readouterr().out
    assert "predicted end-to-end gradient gain" in out and "kaiming_: 12 layer(s)" in out and "lsuv_" in out
    assert "1.76" in out  # the critical σw² printed by the theory block


def test_docstring_examples_run() -> None:
    import doctest
    import importlib

    names = ["gradwatch.theory", "gradwatch.init", "gradwatch.preflight.core", "gradwatch.preflight.jacobian",
             "gradwatch.preflight.blocks", "gradwatch.preflight.trace", "gradwatch.preflight.diagnose"]
    for name in names:
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name
        assert result.attempted > 0, name
