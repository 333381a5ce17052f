"""Proof on replayed failures: which protection keeps a run alive through bad batches.

Run by hand:  python benchmarks/repair.py [--steps 300] [--seeds 0 1 2] [--models mlp gpt]
(tests/test_repair_benchmark.py runs a reduced version.)

Scenario (issue 10): a training run in which 1% of the batches are outliers
whose features are scaled x1e3, and one batch is NaN, replayed identically
(same batches, same initial weights) under each protection:

- ``clean``       plain PyTorch loop on the same batches without the corruption (the reference)
- ``none``        plain PyTorch loop, no protection
- ``torch_clip``  plain loop with ``torch.nn.utils.clip_grad_norm_(params, 1.0)``
- ``fixed``       ``Watch(clip_norm=1.0)`` (non-finite steps skipped, as always)
- ``auto``        ``Watch(clip_norm="autoclip")``
- ``zclip``       ``Watch(clip_norm="zclip")``
- ``agc``         ``Watch(clip_norm=gw.AGC(0.01))`` (unit-wise, the final classifier left unclipped)
- ``skip``        ``Watch(clip_norm=None, on_spike="skip")``
- ``rollback``    ``Watch(clip_norm=None, on_nonfinite="rollback")``
- ``recommended`` gradwatch's recommended default: ``Watch(clip_norm="zclip", on_spike="skip")``

Workloads: an MLP (4 x Linear(64)+ReLU, teacher-labelled Gaussian inputs, SGD
lr 0.05 momentum 0.9; outlier = the input batch x1e3, NaN = one input NaN) and
a GPT-style model (2 pre-LN blocks, d=64, vocab 32, sequence 32, tokens from a
fixed sparse bigram chain, AdamW lr 3e-3; outlier = the final hidden features
(ln_f's output) x1e3, NaN = those features NaN). Final loss = loss of the final
weights on a held-out clean set; a run *diverged* when that is NaN/inf or
worse than the untrained model's. Lost steps =
steps whose update was not applied (skipped, vetoed or rolled back).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradwatch as gw  # noqa: E402
from benchmarks import models  # noqa: E402

MODES = ("clean", "none", "torch_clip", "fixed", "auto", "zclip", "agc", "skip", "rollback", "recommended")
#: gradwatch's recommended protection against spikes and NaN (docs/repair.md).
RECOMMENDED: dict[str, Any] = {"clip_norm": "zclip", "on_spike": "skip"}
WATCH_OPTIONS: dict[str, dict[str, Any]] = {
    "fixed": {"clip_norm": 1.0},
    "auto": {"clip_norm": "autoclip"},
    "zclip": {"clip_norm": "zclip"},
    "agc": {"clip_norm": lambda: gw.AGC(0.01)},  # a fresh clipper per run
    "skip": {"clip_norm": None, "on_spike": "skip"},
    "rollback": {"clip_norm": None, "on_nonfinite": "rollback"},
    "recommended": RECOMMENDED,
}


@dataclass
class Scenario:
    """Which steps are corrupted: outliers (features x ``scale``) and one NaN step."""

    steps: int = 300
    outlier_rate: float = 0.01
    scale: float = 1e3
    nan_step: int | None = None  # default: the middle of the run
    seed: int = 0

    def corruption(self) -> dict[int, float]:
        """step (1-based) -> feature multiplier for the corrupted steps."""
        g = torch.Generator().manual_seed(1000 + self.seed)
        n_out = max(1, round(self.outlier_rate * self.steps))
        # outliers after a short warm-up (the first batches of a run are rarely the bad ones,
        # and every detector needs a little history)
        candidates = torch.randperm(self.steps - 30, generator=g)[:n_out] + 31
        out = {int(s): self.scale for s in candidates.tolist()}
        nan_step = self.nan_step if self.nan_step is not None else self.steps // 2
        while nan_step in out:
            nan_step += 1
        out[nan_step] = math.nan
        return out


# ----- workloads --------------------------------------------------------------------------
class Workload:
    """A model factory, its optimizer, a batch stream, the corruption, and a clean held-out loss."""

    name = "workload"

    def make(self, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        raise NotImplementedError

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], factor: float) -> torch.Tensor:
        raise NotImplementedError

    def eval_loss(self, model: nn.Module, seed: int) -> float:
        raise NotImplementedError


class MLPWorkload(Workload):
    """Teacher-labelled classification; outliers scale the input features."""

    name = "mlp"
    width, classes, batch_size = 64, 10, 64

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(12345)
        self.teacher = nn.Sequential(nn.Linear(self.width, 64), nn.Tanh(), nn.Linear(64, self.classes))
        with torch.no_grad():
            for p in self.teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(p.shape[-1])))
        self._eval = self._sample(10**6, 1024)

    def _sample(self, key: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(key)
        x = torch.randn(n, self.width, generator=g)
        with torch.no_grad():
            y = self.teacher(x).argmax(dim=1)
        return x, y

    def make(self, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = models.mlp(width=self.width, layers=4, out=self.classes)
        return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(seed * 100_003 + step, self.batch_size)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], factor: float) -> torch.Tensor:
        x, y = batch
        if factor != 1.0:
            x = x * factor if math.isfinite(factor) else x.index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(math.nan))
        return F.cross_entropy(model(x), y)

    def eval_loss(self, model: nn.Module, seed: int) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(model(self._eval[0]), self._eval[1]))


class GPTWorkload(Workload):
    """Next-token prediction on a sparse bigram chain; outliers scale the final hidden features."""

    name = "gpt"
    vocab, seq, batch_size = 32, 32, 16

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(54321)
        logits = torch.full((self.vocab, self.vocab), -1e9)
        for token in range(self.vocab):  # each token has 3 likely successors
            nxt = torch.randperm(self.vocab, generator=g)[:3]
            logits[token, nxt] = torch.tensor([2.0, 1.0, 0.0])
        self.probs = logits.softmax(dim=1)
        self._eval = self._sample(10**6, 64)
        self._factor = 1.0

    def _sample(self, key: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(key)
        idx = torch.empty(n, self.seq + 1, dtype=torch.long)
        idx[:, 0] = torch.randint(0, self.vocab, (n,), generator=g)
        for t in range(self.seq):
            idx[:, t + 1] = torch.multinomial(self.probs[idx[:, t]], 1, generator=g).squeeze(1)
        return idx[:, :-1], idx[:, 1:]

    def make(self, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = models.gpt(vocab=self.vocab, d=64, heads=4, layers=2, seq=self.seq)
        model.ln_f.register_forward_hook(lambda module, args, out: out * self._factor if self._factor != 1.0 else out)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def batch(self, step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._sample(seed * 100_003 + step, self.batch_size)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], factor: float) -> torch.Tensor:
        self._factor = factor
        try:
            return models.gpt_loss(model, *batch)
        finally:
            self._factor = 1.0

    def eval_loss(self, model: nn.Module, seed: int) -> float:
        with torch.no_grad():
            return float(models.gpt_loss(model, *self._eval))


WORKLOADS: dict[str, Callable[[], Workload]] = {"mlp": MLPWorkload, "gpt": GPTWorkload}


# ----- one run ----------------------------------------------------------------------------
def run(workload: Workload, mode: str, scenario: Scenario) -> dict[str, Any]:
    """Train ``scenario.steps`` steps under ``mode``; returns final loss, lost steps, skips, backoffs, time."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model, opt = workload.make(scenario.seed)
    initial = workload.eval_loss(model, scenario.seed)
    corruption = {} if mode == "clean" else scenario.corruption()
    lost = 0
    options = {k: v() if callable(v) else v for k, v in WATCH_OPTIONS.get(mode, {}).items()}
    started = time.perf_counter()
    watch = gw.Watch(model, opt, diagnose=False, **options) if mode in WATCH_OPTIONS else None
    params = list(model.parameters())
    for step in range(1, scenario.steps + 1):
        batch = workload.batch(step, scenario.seed)
        factor = corruption.get(step, 1.0)
        if watch is not None:
            result = watch.step(lambda: workload.loss(model, batch, factor), batch=batch)
            lost += int(result.skipped)
        else:
            loss = workload.loss(model, batch, factor)
            loss.backward()
            if mode == "torch_clip":
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    backoffs = spikes = 0
    if watch is not None:
        spikes = sum(len(getattr(p, "skipped_steps", [])) for p in watch.plugins)
        lost += _rolled_back_steps(watch)
        backoffs = _lr_backoffs(watch)
        watch.close()
    final = workload.eval_loss(model, scenario.seed)
    return {
        "model": workload.name,
        "mode": mode,
        "final_loss": final,
        "initial_loss": initial,
        "diverged": not final <= initial,  # NaN/inf, or worse than the untrained model
        "lost_steps": lost,
        "lr_backoffs": backoffs,
        "spikes_skipped": spikes,
        "seconds": time.perf_counter() - started,
    }


def _rolled_back_steps(watch: gw.Watch) -> int:
    """Applied updates that rollbacks undid (the failing step itself is already counted as skipped)."""
    total = 0
    for plugin in watch.plugins:
        keeper = getattr(plugin, "rollback", None)
        for event in getattr(keeper, "events", []):
            total += max(0, event.step - event.restored_step - 1)
    return total


def _lr_backoffs(watch: gw.Watch) -> int:
    """LR backoffs: by the k-in-a-window rule and by rollbacks that lowered the lr."""
    total = 0
    for plugin in watch.plugins:
        total += len(getattr(plugin, "backoffs", []))
        keeper = getattr(plugin, "rollback", None)
        total += sum(1 for e in getattr(keeper, "events", []) if e.factor < 1.0)
    return total


def compare(models_: list[str], modes: list[str], scenario: Scenario) -> list[dict[str, Any]]:
    """Every (model, mode) run for ``scenario``; the clean run's loss added to each row."""
    rows = []
    for name in models_:
        workload = WORKLOADS[name]()
        clean = run(workload, "clean", scenario)
        for mode in modes:
            row = clean if mode == "clean" else run(workload, mode, scenario)
            row = dict(row, clean_loss=clean["final_loss"], ratio=row["final_loss"] / clean["final_loss"])
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: median final loss over seeds, ratio to clean, lost steps, diverged runs."""
    keys: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        keys.setdefault((row["model"], row["mode"]), []).append(row)
    lines = [
        "| model | protection | final loss (median) | / clean | diverged | lost steps | spikes skipped | LR backoffs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (model, mode), group in keys.items():
        finals = [r["final_loss"] for r in group]
        ratio = [r["ratio"] for r in group]
        ok = not any(r["diverged"] for r in group)
        med = statistics.median(finals) if ok else math.nan
        rat = statistics.median(ratio) if ok else math.nan
        diverged = sum(r["diverged"] for r in group)
        lost = statistics.median(r["lost_steps"] for r in group)
        spikes = statistics.median(r["spikes_skipped"] for r in group)
        backoffs = statistics.median(r["lr_backoffs"] for r in group)
        lines.append(
            f"| {model} | {mode} | {'diverged' if math.isnan(med) else f'{med:.3f}'} | "
            f"{'-' if math.isnan(rat) else f'{rat:.2f}'} | {diverged}/{len(group)} | {lost:g} | {spikes:g} | {backoffs:g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the findings are counted in the table
    rows = []
    started = time.perf_counter()
    for seed in args.seeds:
        rows += compare(args.models, args.modes, Scenario(steps=args.steps, seed=seed))
    sys.stdout.write(table(rows) + "\n")
    sys.stdout.write(
        f"\n{args.steps} steps, seeds {args.seeds}, 1% outlier batches x1e3 + 1 NaN batch; "
        f"{time.perf_counter() - started:.0f} s\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
