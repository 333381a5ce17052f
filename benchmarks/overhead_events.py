"""Where the Watch's overhead goes, step by step: the cost of each kind of step over the baseline step.

Run by hand (not a test):  python benchmarks/overhead_events.py [--rounds 30] [--workload mlp]

``benchmarks/overhead.py`` gives one ratio; this splits it. Blocks of 100
steps alternate between the hand-written clipped loop and ``watch.step`` with
default settings (as in overhead.py), and every step is timed on its own. Steps
are classed by what the defaults do on them:

- ``plain``: norms, clip decision, record, per-step rules;
- ``ratio``: every ``update_ratio_every`` (10) steps, the update-to-weight ratio;
- ``sampled``: every ``sample_every`` (50) steps, activation statistics and the
  depth-curve check (and that step's update ratio);
- ``pre-sample``: the step before, which arms the sampling hooks;
- ``post-sample``: the step after, which flushes the run directory (every 50
  steps by default, when the 51st line arrives);
- ``block start``: the first step of a block (caches cold after the other loop;
  with blocks of 100 it is also a step that flushes).

Printed per class: the median extra microseconds over the baseline's median
step, and what each class adds per step on average (its share of 100 steps).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradwatch as gw  # noqa: E402
from benchmarks.overhead import _workload, clipped_loop  # noqa: E402

BLOCK = 100


def step_class(step: int, ratio_every: int = 10, sample_every: int = 50) -> str:
    """What the default Watch does on ``step`` (1-based), beyond a plain step."""
    if step % BLOCK == 1:
        return "block start"
    if step % sample_every == 0:
        return "sampled"
    if (step + 1) % sample_every == 0:
        return "pre-sample"
    if step % sample_every == 1:
        return "post-sample"
    if step % ratio_every == 0:
        return "ratio"
    return "plain"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--workload", default="mlp", choices=["mlp", "gpt"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    make, loss_of = _workload(args.workload)
    baseline = clipped_loop(make, loss_of)
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with tempfile.TemporaryDirectory() as tmp:
        watch = gw.Watch(model, opt, clip_norm=1.0, run_dir=Path(tmp) / "run")  # clips as the baseline
        for _ in range(2 * BLOCK):  # warm-up: step 1 (layer order), a first sample, the optimizer state
            baseline()
            watch.step(lambda: loss_of(model))
        base_times: list[float] = []
        by_class: dict[str, list[float]] = collections.defaultdict(list)
        clock = time.perf_counter
        for _ in range(args.rounds):
            for _ in range(BLOCK):
                start = clock()
                baseline()
                base_times.append(clock() - start)
            for _ in range(BLOCK):
                step = watch.steps_taken + 1
                start = clock()
                watch.step(lambda: loss_of(model))
                by_class[step_class(step)].append(clock() - start)
        watch.close()
    base = statistics.median(base_times)
    counts = collections.Counter(step_class(s) for s in range(1, BLOCK + 1))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} blocks of {BLOCK} steps; "
          f"{args.workload} baseline step {base * 1e6:.0f} us (median)")
    total = 0.0
    for name in ("plain", "ratio", "pre-sample", "sampled", "post-sample", "block start"):
        extra = (statistics.median(by_class[name]) - base) * 1e6
        share = extra * counts[name] / BLOCK
        total += share
        print(f"{name:12s} {counts[name]:3d} of {BLOCK}: {extra:+8.1f} us a step  ->  {share:+6.1f} us a step on average")
    print(f"sum: {total:+.1f} us a step, about {1 + total * 1e-6 / base:.3f} x the baseline step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
