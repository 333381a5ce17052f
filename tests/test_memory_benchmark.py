"""benchmarks/memory.py on a tiny GPT-2 config: it runs, measures in fresh processes and prints the table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import memory  # noqa: E402


def test_memory_benchmark_prints_the_table_for_a_tiny_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert memory.main(["--sizes", "tiny", "--steps", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| GPT-2 tiny")]
    assert [row.split("|")[3].strip() for row in rows] == ["plain", "watch", "watch_rollback"]
    plain = rows[0].split("|")
    assert plain[5].strip() == "+0.0" and plain[6].strip() == "+0.000x"  # the baseline against itself
    assert "ratio copy" in rows[1] and "rollback" in rows[2]


def test_the_child_reports_what_the_watch_holds() -> None:
    out = memory.child("tiny", "watch_rollback", 6, "cpu")
    assert 0 < out["ratio_held"] <= out["ratio_budget"]
    # a snapshot after step 5 holds the weights and AdamW's two moments: about 3x the parameter bytes
    assert out["rollback_bytes"] == pytest.approx(3 * out["param_bytes"], rel=0.05)
    assert out["peak"] > out["param_bytes"]
