"""Effective per-layer gain measured by gradwatch's depth-curve fit, against THEORY.md.

10-layer MLPs of width 64 on standardized scikit-learn digits, batch 256, at
init, median over 5 seeds: the activation-gradient gain (dL/dh on each Linear
output) and the weight-gradient gain, both from ``fit_depth_curve``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/diagnosis_gains.py`` (a few seconds).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gradwatch.diagnosis import fit_depth_curve
from gradwatch.diagnosis.sampler import ActivationSampler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import models  # noqa: E402

CASES = [("sigmoid", "xavier", "0.233"), ("sigmoid", "default", "0.1405"), ("relu", "kaiming", "0.998"),
         ("relu", "xavier", "0.705"), ("relu", "default", "0.409"), ("tanh", "xavier", "(polynomial)")]


def mlp(depth: int, act: str, init: str, width: int = 64) -> nn.Sequential:
    return models.init_mlp(depth, act, init, width=width)


def main() -> None:
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = ((x - x.mean(0)) / (x.std(0) + 1e-3))[:256]  # (256, 64)
    y = torch.tensor(data.target)[:256]
    print("| setup | THEORY per layer | activation gain | fitted first/last | weight gain |")
    print("| --- | --- | --- | --- | --- |")
    for act, init, theory in CASES:
        act_gain, total, weight_gain = [], [], []
        for seed in range(5):
            torch.manual_seed(seed)
            model = mlp(10, act, init)
            sampler = ActivationSampler(model)
            sampler.arm()
            sampler.enter_mode()
            F.cross_entropy(model(x), y).backward()
            sampler.disarm()
            sample = sampler.collect(1)
            names = list(sampler.curve_layers)
            fit_a = fit_depth_curve([sample.grad_rms[n] for n in names])
            weights = [model[int(n)].weight for n in names]
            fit_w = fit_depth_curve([w.grad.norm().item() / math.sqrt(w.numel()) for w in weights])
            act_gain.append(fit_a.gain)
            total.append(fit_a.total)
            weight_gain.append(fit_w.gain)
        print(f"| {act} + {init} | {theory} | {np.median(act_gain):.3f} | {np.median(total):.1e} | {np.median(weight_gain):.3f} |")


if __name__ == "__main__":
    main()
