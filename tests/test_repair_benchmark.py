"""The repair benchmark, reduced (issue 10): replayed outlier + NaN batches on an MLP and a GPT-style model.

benchmarks/repair.py runs the full table (300 steps, 3 seeds, every protection); this
replays one seed for 150 steps with the three rows the claim rests on: the clean run,
no protection, and gradwatch's recommended default.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import repair as bench  # noqa: E402

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "gpt"])
def test_recommended_default_survives_replayed_failures(model):
    logging.getLogger("gradwatch").setLevel(logging.ERROR)
    scenario = bench.Scenario(steps=150, seed=0)
    corrupted = scenario.corruption()
    outliers = [s for s, f in corrupted.items() if math.isfinite(f)]
    assert len(outliers) == 2 and sum(math.isnan(f) for f in corrupted.values()) == 1
    rows = {row["mode"]: row for row in bench.compare([model], ["clean", "none", "recommended"], scenario)}
    clean, none, best = rows["clean"], rows["none"], rows["recommended"]
    assert not clean["diverged"] and clean["final_loss"] < 0.8 * clean["initial_loss"]  # the clean run learns
    assert none["diverged"] and not math.isfinite(none["final_loss"])  # no protection: NaN weights
    assert best["final_loss"] <= 1.10 * clean["final_loss"]  # within 10% of the clean run
    assert best["spikes_skipped"] == len(outliers)  # exactly the outlier batches were skipped ...
    assert best["lost_steps"] == len(corrupted)  # ... plus the NaN batch, and nothing else


def test_scenario_and_modes_are_validated():
    assert bench.RECOMMENDED == {"clip_norm": "zclip", "on_spike": "skip"}
    with pytest.raises(ValueError, match="mode"):
        bench.run(bench.MLPWorkload(), "magic", bench.Scenario(steps=5))
    table = bench.table([dict(model="mlp", mode="none", final_loss=math.nan, ratio=math.nan, diverged=True,
                              lost_steps=0, spikes_skipped=0, lr_backoffs=0)])
    assert "| mlp | none | diverged | - | 1/1 |" in table
