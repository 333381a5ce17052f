"""The demo: three 12-layer MLPs on scikit-learn's digits, one vanishing, one exploding, one healthy.

``run_demo()`` trains each variant under a :class:`gradwatch.Watch` (run
directories under ``out/``), then returns a table of final test accuracy and
findings (with the effective per-layer gain), and saves one PNG of the
activation-gradient magnitude ``RMS(dL/dh)`` by layer depth, a line per variant
at a few steps. The digits ship inside scikit-learn: nothing is downloaded.

Variants (same width 64, depth 12, SGD with momentum 0.9, lr 0.01, batch 64,
``clip_norm=1.0``):

- ``sigmoid-default``: sigmoid, PyTorch's default init -> vanishing (gain ~0.14 per layer).
- ``relu-3x-init``: ReLU, weights 3x Kaiming -> exploding with depth (gain ~2.6),
  init_scale_too_large on step 1; clipping keeps the run alive.
- ``relu-kaiming-ln``: ReLU + Kaiming + LayerNorm -> healthy, no warning.

Example:
    >>> result = run_demo("demo-out", quick=True, progress=False)  # doctest: +SKIP
    >>> print(result.table())  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .findings import Finding

DEPTH = 12
WIDTH = 64
BATCH = 64
LR = 0.01
VARIANTS = ("sigmoid-default", "relu-3x-init", "relu-kaiming-ln")


def build_variant(name: str, depth: int = DEPTH, width: int = WIDTH, seed: int = 0) -> nn.Sequential:
    """The 12-layer MLP of one demo variant (64 inputs, 10 classes).

    Example:
        >>> len([m for m in build_variant("relu-kaiming-ln") if isinstance(m, nn.Linear)])
        12
    """
    if name not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    fan = 64
    for _ in range(depth - 1):
        lin = nn.Linear(fan, width)
        if name != "sigmoid-default":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        if name == "relu-3x-init":
            with torch.no_grad():
                lin.weight.mul_(3.0)
        mods.append(lin)
        if name == "relu-kaiming-ln":
            mods.append(nn.LayerNorm(width))
        mods.append(nn.Sigmoid() if name == "sigmoid-default" else nn.ReLU())
        fan = width
    mods.append(nn.Linear(fan, 10))
    return nn.Sequential(*mods)


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized digits (1797 x 64), split 80/20: x_train, y_train, x_test, y_test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-3
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@dataclass
class VariantResult:
    """One trained variant: accuracy, findings, and its run directory."""

    name: str
    accuracy: float
    final_loss: float
    findings: list[Finding]
    run_dir: Path

    def summary(self) -> str:
        """The findings in a few words, with the effective gain where there is one."""
        parts = []
        for finding in self.findings:
            if finding.severity == "info":
                continue
            gain = finding.evidence.get("effective_gain_per_layer")
            parts.append(f"{finding.code} (gain {gain:.2f})" if isinstance(gain, float) else finding.code)
        return ", ".join(dict.fromkeys(parts)) or "none"


@dataclass
class DemoResult:
    """What :func:`run_demo` made: one result per variant and the figure."""

    out: Path
    variants: list[VariantResult] = field(default_factory=list)
    figure: Path | None = None
    seconds: float = math.nan

    def table(self) -> str:
        """The results as a plain-text table."""
        rows = [("variant", "test acc", "findings (effective per-layer gain)")]
        rows += [(v.name, f"{v.accuracy:.1%}", v.summary()) for v in self.variants]
        widths = [max(len(r[i]) for r in rows) for i in range(2)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]}" for r in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        return "\n".join(lines)


def _fresh_out(out: Path) -> Path:
    """``out``, or a timestamped folder inside it when it already holds a demo (runs are never overwritten)."""
    if any((out / name / "meta.json").exists() for name in VARIANTS):
        return out / time.strftime("%Y%m%d-%H%M%S")
    return out


def _train_variant(name: str, data: tuple, steps: int, out: Path, tick: Callable[[], None]) -> VariantResult:
    import gradwatch as gw

    x_train, y_train, x_test, y_test = data
    model = build_variant(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    sample_every = max(1, steps // 3)
    run_dir = out / name
    watch = gw.Watch(model, optimizer, clip_norm=1.0, run_dir=run_dir,
                     diagnosis=gw.DiagnosisConfig(sample_every=sample_every))
    g = torch.Generator().manual_seed(0)
    loss = math.nan
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (BATCH,), generator=g)
        x, y = x_train[idx], y_train[idx]
        loss = watch.step(lambda: F.cross_entropy(model(x), y), batch=(x, y)).loss
        tick()
    watch.close()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return VariantResult(name, accuracy, loss, list(watch.findings), run_dir)


def plot_depth_curves(result: DemoResult, path: Path) -> Path:
    """Save the activation-gradient RMS by layer depth (log scale), a line per variant and sampled step.

    Imports matplotlib here (``import gradwatch`` does not).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .rundir import load_run

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"sigmoid-default": "tab:red", "relu-3x-init": "tab:orange", "relu-kaiming-ln": "tab:green"}
    styles = [":", "--", "-"]
    for variant in result.variants:
        run = load_run(variant.run_dir)
        samples = run.activations[-3:] if len(run.activations) > 3 else run.activations
        samples = [run.activations[0]] + [s for s in samples if s is not run.activations[0]][-2:]
        order = [n for n in run.layer_names if n in samples[0].get("grad_rms", {})]
        for k, sample in enumerate(samples):
            values = [float(sample["grad_rms"].get(n, math.nan)) for n in order]
            ax.plot(range(1, len(values) + 1), values, styles[k % 3], marker="o", ms=3,
                    color=colors.get(variant.name), label=f"{variant.name}, step {sample['step']}")
    ax.set_yscale("log")
    ax.set_xlabel("layer depth (Linear layers, input -> output)")
    ax.set_ylabel("RMS of dL/dh (activation gradient)")
    ax.set_title("Gradient magnitude by layer depth")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=1, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(
    out: str | os.PathLike[str] = "gradwatch-demo",
    steps: int = 300,
    quick: bool = False,
    progress: bool = True,
) -> DemoResult:
    """Train the three variants, plot the gradient-by-depth curves, return the results.

    Args:
        out: output folder (run directories and the PNG). Default: ``"gradwatch-demo"``.
        steps: training steps per variant. Default: 300.
        quick: 60 steps per variant (for tests and a first look). Default: False.
        progress: show a tqdm progress bar on stderr (when tqdm is installed). Default: True.

    Returns:
        a :class:`DemoResult`; ``result.table()`` is the text table, ``result.figure`` the PNG.

    Raises:
        ValueError: ``steps`` is not a positive int.
        ImportError: scikit-learn or matplotlib is missing (``pip install 'gradwatch[demo]'``).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}; e.g. --steps 300")
    if quick:
        steps = min(steps, 60)
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the demo needs scikit-learn and matplotlib (missing: {', '.join(missing)}); "
                          "pip install 'gradwatch[demo]'")
    started = time.perf_counter()
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"out {str(out_path)!r} exists and is not a folder; pass a folder path with --out")
    out_path = _fresh_out(out_path)
    out_path.mkdir(parents=True, exist_ok=True)
    data = load_digits_split()
    bar: Any = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=steps * len(VARIANTS), desc="gradwatch demo", unit="step", leave=False)
        except ImportError:
            bar = None
    result = DemoResult(out=out_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only add overhead (and contend on small machines)
    try:
        for name in VARIANTS:
            if bar is not None:
                bar.set_postfix_str(name)
            tick = (lambda: bar.update(1)) if bar is not None else (lambda: None)
            result.variants.append(_train_variant(name, data, steps, out_path, tick))
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    result.figure = plot_depth_curves(result, out_path / "gradient_by_depth.png")
    result.seconds = time.perf_counter() - started
    return result
