"""The healthy model zoo (benchmarks/zoo.py), reduced: real architectures train without a single false alarm.

``python -m benchmarks.zoo`` runs every model for 400 steps (docs/evidence.md has the table);
here each runs 60 steps (the first window of the window rules, two sampled steps), probe included.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import zoo  # noqa: E402

REDUCED_STEPS = 60


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    return {r["model"]: r for r in zoo.run(steps=REDUCED_STEPS)}


def test_the_zoo_holds_the_architectures_people_train():
    labels = [label for label, _ in zoo.ZOO]
    for family in ("GPT-2", "BERT", "T5", "Llama", "ViT", "ResNet", "LSTM", "BatchNorm CNN"):
        assert any(label.startswith(family) for label in labels), family
    assert len(zoo.zoo_scenarios()) == len(zoo.ZOO) and all(s.healthy for _, s in zoo.zoo_scenarios())


@pytest.mark.slow
@pytest.mark.parametrize("label", [label for label, _ in zoo.ZOO])
def test_a_healthy_zoo_model_learns_with_no_warning_or_error(rows, label):
    r = rows[label]
    assert r["error"] is None, r["error"]
    assert r["steps"] == REDUCED_STEPS
    assert r["loss_fell"] and r["loss_last"] < r["loss_first"], (r["loss_first"], r["loss_last"])
    assert (r["watch_warnings"], r["watch_errors"], r["probe_alarms"]) == (0, 0, 0), r["codes"]


def test_the_table_totals_its_rows():
    rows = [zoo.summarize("A", {"name": "a", "steps": 200, "loss_first": 2.0, "loss_last": 0.5, "accuracy": None,
                                "findings": [{"severity": "warning", "source": "watch", "code": "loss_spike"},
                                             {"severity": "info", "source": "watch", "code": "x"},
                                             {"severity": "warning", "source": "probe", "code": "dead_relu"}],
                                "error": None, "seconds": 1.0}),
            zoo.summarize("B", {"name": "b", "steps": 300, "loss_first": 1.0, "loss_last": 1.5, "accuracy": None,
                                "findings": [], "error": None, "seconds": 1.0})]
    assert rows[0]["per_1000_steps"] == 5.0 and rows[0]["probe_alarms"] == 1 and rows[0]["watch_warnings"] == 1
    assert not rows[1]["loss_fell"] and rows[1]["per_1000_steps"] == 0.0
    total = zoo.table(rows).splitlines()[-1]
    assert total.startswith("| **all 2** | 500 |") and "| 1/2 |" in total and total.endswith("| 2.0 |")
