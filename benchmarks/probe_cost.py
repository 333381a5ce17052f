"""Cost of ``gradwatch.probe`` in forward+backward equivalents of the model it probes.

Probes the overhead benchmark's 6-block GPT-style model (``benchmarks/models.py``:
d=256, 4 heads, sequence 128, vocab 256, batch 8) with the default probe counts,
and times one plain forward+backward of the same model in the same run (median of
``--repeats`` after a warm-up). Target: the probe costs at most ~30 equivalents.

    python benchmarks/probe_cost.py [--repeats 5] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.models import gpt, gpt_batch, gpt_loss  # noqa: E402

import gradwatch as gw  # noqa: E402


def measure(repeats: int = 5, probes: int = 8, power_iters: int = 5, layers: int = 6) -> dict[str, float]:
    """Seconds per forward+backward, seconds per probe, and their ratio."""
    torch.manual_seed(0)
    model = gpt(layers=layers)
    x, y = gpt_batch()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))

    def fwd_bwd() -> None:
        gpt_loss(model, x, y).backward()
        model.zero_grad(set_to_none=True)

    fwd_bwd()  # warm-up
    fb = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fwd_bwd()
        fb.append(time.perf_counter() - t0)
    gw.probe(model, (x, y), loss_fn, probes=probes, power_iters=power_iters)  # warm-up
    pr = []
    for _ in range(max(1, repeats // 2)):
        t0 = time.perf_counter()
        result = gw.probe(model, (x, y), loss_fn, probes=probes, power_iters=power_iters)
        pr.append(time.perf_counter() - t0)
    fb_s, probe_s = statistics.median(fb), statistics.median(pr)
    return {
        "fwd_bwd_s": fb_s,
        "probe_s": probe_s,
        "fwd_bwd_equivalents": probe_s / fb_s,
        "blocks": float(len(result.blocks)),
        "probes": float(probes),
        "power_iters": float(power_iters),
        "predicted_gain": float(result.predicted_gain or float("nan")),
        "measured_gain": float(result.measured_gain or float("nan")),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--power-iters", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = measure(args.repeats, args.probes, args.power_iters)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"forward+backward: {out['fwd_bwd_s'] * 1e3:.1f} ms   probe: {out['probe_s'] * 1e3:.1f} ms   "
              f"= {out['fwd_bwd_equivalents']:.1f} forward+backward equivalents "
              f"({int(out['blocks'])} blocks, {int(out['probes'])} probes, {int(out['power_iters'])} power iterations; target <= ~30)")
        print(f"predicted end-to-end gain {out['predicted_gain']:.3g}, measured {out['measured_gain']:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
