"""`import gradwatch` is light: it pulls in nothing heavy or optional beyond torch and numpy."""

from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL = ("matplotlib", "tensorboard", "lightning", "pytorch_lightning", "transformers", "sklearn", "wandb", "scipy", "pandas")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out))


def test_import_gradwatch_imports_no_optional_package() -> None:
    baseline = _modules_after("import torch, numpy")
    ours = _modules_after("import gradwatch")
    added = {m.split(".")[0] for m in ours - baseline}
    assert not added & set(OPTIONAL), sorted(added & set(OPTIONAL))
    heavy = [m for m in ours if m.split(".")[0] in OPTIONAL]
    assert heavy == []


def test_public_names() -> None:
    import gradwatch as gw

    for name in ("Watch", "Finding", "StepResult", "NonFiniteError", "load_run", "CODES"):
        assert hasattr(gw, name), name
