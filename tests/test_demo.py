"""``gradwatch demo --quick``: three variants, the right findings, a table and a PNG."""

from __future__ import annotations

import subprocess
import sys

import pytest

import gradwatch as gw
from gradwatch.cli import main
from gradwatch.demo import VARIANTS, build_variant


@pytest.mark.slow
def test_demo_quick_finds_vanishing_exploding_and_healthy(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    png = out / "gradient_by_depth.png"
    assert str(png) in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    lines = {line.split()[0]: line for line in text.splitlines() if line.split() and line.split()[0] in VARIANTS}
    assert "vanishing_gradients (gain 0.1" in lines["sigmoid-default"]  # THEORY: 0.1405 per layer
    assert "exploding_gradients (gain" in lines["relu-3x-init"] and "init_scale_too_large" in lines["relu-3x-init"]
    assert lines["relu-kaiming-ln"].rstrip().endswith("none")
    runs = {name: gw.load_run(out / name) for name in VARIANTS}
    vanish = next(f for f in runs["sigmoid-default"].findings if f.code == "vanishing_gradients")
    assert 0.10 <= vanish.evidence["effective_gain_per_layer"] <= 0.19
    explode = next(f for f in runs["relu-3x-init"].findings if f.code == "exploding_gradients")
    assert 2.0 <= explode.evidence["effective_gain_per_layer"] <= 3.5  # 3x Kaiming: ~3 per layer
    assert not [f for f in runs["relu-kaiming-ln"].findings if f.severity != "info"]
    assert all(len(run.steps["step"]) == 60 for run in runs.values())
    assert [a["step"] for a in runs["sigmoid-default"].activations] == [1, 20, 40, 60]
    # A second run never overwrites the first: it goes to a timestamped folder inside.
    assert main(["demo", "--quick", "--steps", "2", "--out", str(out)]) == 0
    assert len(list(out.glob("*/sigmoid-default/meta.json"))) == 1


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "steps must be a positive int" in err
    with pytest.raises(ValueError, match="variant must be one of"):
        build_variant("swish")


def test_import_gradwatch_does_not_import_matplotlib():
    code = "import sys, gradwatch; sys.exit(1 if 'matplotlib' in sys.modules or 'sklearn' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
