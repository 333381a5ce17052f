"""Do gradwatch's precursor findings come before the loss spike? Reproduced small-scale instabilities.

Two families of runs, each a small pre-LN GPT (2 blocks, d=64, 4 heads, sequence 32,
vocabulary 64) trained with AdamW on a synthetic language task (arithmetic token
sequences ``x_t = x_0 + k t mod 64`` with 5% of the tokens replaced at random) through
``gw.Watch(...).step(closure)`` with default settings:

- **learning-rate sweep** (Wortsman et al. 2023, arXiv 2309.14322): peak lr from 1e-3 to 1,
  without and with qk-layernorm, and with qk-layernorm plus z-loss 1e-4, with the paper's
  schedule: linear warm-up (``--warmup``, 100 steps) then cosine decay (to 10% here);
- **second-moment lag** (Wortsman et al. 2023, arXiv 2304.13013): a stable run (lr 1e-2,
  beta2 = 0.999) whose loss weight ramps from 1 to 100 over 10 steps at step 305 after a long
  quiet stretch (an auxiliary-loss weight or unscaled loss switched on mid-run): the gradient
  grows faster than Adam's second moment can follow. Run once as is and once with
  ``on_precursor="clip_update"`` (StableAdamW's update clipping).

A run is *unstable* when its cross-entropy (the task loss, not the weighted one; median of
3 steps) rises above ``max(1.3 x best so far, best + 0.5)`` (the *onset*, a loss spike), or
when, at a higher learning rate than the best run of its sweep, it ends above 1.5x that run's
final loss (it *diverged*; its event is the step where its loss first exceeded 1.5x the best
run's at that step; a lower-lr run that ends higher is slow, not unstable) - judged
from the losses alone, with no look at gradwatch. For each unstable run: whether a precursor
finding (``update_spike_precursor``, ``attention_logit_growth``,
``output_logit_divergence``) came at or before the onset, and the lead in steps; for the
stable runs, how many precursor findings they got (false alarms).

Usage::

    python -m benchmarks.instability [--steps 400] [--warmup 100] [--seeds 2] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradwatch as gw  # noqa: E402

PRECURSORS = ("update_spike_precursor", "attention_logit_growth", "output_logit_divergence")
VOCAB, SEQ, BATCH = 64, 32, 16


class Block(nn.Module):
    """Pre-LN block; ``qk_ln`` normalizes each head's queries and keys (Dehghani et al. 2023)."""

    def __init__(self, d: int, heads: int, qk_ln: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.q_norm = nn.LayerNorm(d // heads) if qk_ln else None
        self.k_norm = nn.LayerNorm(d // heads) if qk_ln else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, d: int = 64, heads: int = 4, layers: int = 2, qk_ln: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(SEQ, d)
        self.blocks = nn.ModuleList(Block(d, heads, qk_ln) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def language_batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences mod VOCAB with 5% random tokens: ids and next-token targets ``(BATCH, SEQ)``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x0 = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    k = torch.randint(1, 5, (BATCH, 1), generator=g)
    idx = (x0 + k * torch.arange(SEQ + 1).view(1, -1)) % VOCAB
    noise = torch.rand(idx.shape, generator=g) < 0.05
    idx = torch.where(noise, torch.randint(0, VOCAB, idx.shape, generator=g), idx)
    return idx[:, :-1], idx[:, 1:]


def onset(losses: list[float], factor: float = 1.3, rise: float = 0.5, smooth: int = 3) -> int | None:
    """The first step (1-based) whose loss, as the median of the last ``smooth`` steps, exceeds
    ``max(factor x best so far, best + rise)`` (best: the lowest such median before it).

    The median makes one noisy batch no onset; a spike that lasts ``smooth // 2 + 1`` steps is one.

    Example:
        >>> onset([4.0, 3.0, 2.0, 2.1, 2.0, 9.0, 9.5, 9.1, 2.0], smooth=3)
        7
        >>> onset([4.0, 3.0, 2.0, 9.0, 2.0, 2.1], smooth=3) is None  # one bad batch
        True
    """
    best = float("inf")
    for i in range(smooth - 1, len(losses)):
        level = statistics.median(losses[i - smooth + 1:i + 1])
        if level > max(best * factor, best + rise):
            return i + 1
        best = min(best, level)
    return None


@dataclass
class Outcome:
    name: str
    lr: float
    variant: str
    seed: int
    steps: int
    loss_first: float
    loss_last: float
    onset: int | None
    precursor: tuple[int, str] | None  # (step, code) of the first precursor finding
    precursors: list[tuple[int, str]] = field(default_factory=list)
    max_rms: float = 0.0
    max_attention_logit: float = 0.0
    max_abs_log_z: float = 0.0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list, repr=False)
    diverged_at: int | None = None  # set by judge_sweep: the step a diverged run fell behind the best
    first_warning: tuple[int, str] | None = None  # the first warning/error finding of any code
    warnings: list[tuple[int, str]] = field(default_factory=list)  # every warning/error finding

    @property
    def warned_before(self) -> bool:
        """Whether any gradwatch warning (lr_too_high too) came at or before the event."""
        return self.event is not None and self.first_warning is not None and self.first_warning[0] <= self.event

    @property
    def event(self) -> int | None:
        """The step of the instability: the loss onset, else where a diverged run fell behind."""
        return self.onset if self.onset is not None else self.diverged_at

    @property
    def unstable(self) -> bool:
        return self.event is not None

    @property
    def lead(self) -> int | None:
        """Steps from the first precursor finding to the event (None: no finding at or before it)."""
        if self.event is None or self.precursor is None or self.precursor[0] > self.event:
            return None
        return self.event - self.precursor[0]


def train(name: str, lr: float, variant: str = "plain", seed: int = 0, steps: int = 300, beta2: float = 0.99,
          ramp_at: int | None = None, ramp_to: float = 30.0, ramp_steps: int = 10,
          on_precursor: str | None = None, warmup: int = 0, precursors: Any = "default") -> Outcome:
    """One run through ``gw.Watch(...).step(closure)``; the losses judged by :func:`onset`.

    ``warmup``: steps of linear learning-rate warm-up, then a cosine decay to 10% at ``steps``
    (0: a constant learning rate)."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = TinyGPT(qk_ln="qk_ln" in variant)
    zloss = 1e-4 if "zloss" in variant else 0.0
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.0)
    schedule = None
    if warmup:
        def factor(done: int) -> float:
            if done < warmup:
                return (done + 1) / warmup
            return 0.1 + 0.45 * (1 + math.cos(math.pi * (done - warmup) / max(1, steps - warmup)))
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    options = {} if precursors == "default" else {"precursors": precursors}
    watch = gw.Watch(model, opt, on_precursor=on_precursor, **options)
    plugin = next(p for p in watch.plugins if p.name == "precursors")
    losses: list[float] = []
    peaks = {"rms": 0.0, "attn": 0.0, "log_z": 0.0}
    for step in range(1, steps + 1):
        x, y = language_batch(step, seed)
        weight = 1.0
        if ramp_at is not None and step >= ramp_at:
            weight = min(ramp_to, 1.0 + (ramp_to - 1.0) * (step - ramp_at + 1) / ramp_steps)
        task: list[float] = []

        def closure() -> torch.Tensor:
            logits = model(x)
            ce = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
            task.append(float(ce.detach()))
            loss = weight * ce
            if zloss:
                loss = loss + zloss * (torch.logsumexp(logits, dim=-1) ** 2).mean()
            return loss

        watch.step(closure)
        if schedule is not None:
            schedule.step()
        losses.append(task[-1])
        last = plugin.last if plugin.last.get("step") == step else {}
        peaks["rms"] = max(peaks["rms"], float(last.get("adam_rms_max", 0.0)))
        peaks["attn"] = max([peaks["attn"], *last.get("attention_logit_max", {}).values()])
        peaks["log_z"] = max(peaks["log_z"], abs(float(last.get("log_z_mean", 0.0))))
    watch.close()
    found = [(f.step, f.code) for f in watch.findings if f.code in PRECURSORS]
    warnings = [(f.step, f.code) for f in watch.findings if f.severity in ("warning", "error")]
    outcome = Outcome(name, lr, variant, seed, steps, losses[0], statistics.mean(losses[-20:]), onset(losses),
                   found[0] if found else None, found, peaks["rms"], peaks["attn"], peaks["log_z"],
                   time.perf_counter() - started, losses)
    outcome.first_warning = min(warnings) if warnings else None
    outcome.warnings = sorted(warnings)
    return outcome


def behind(losses: list[float], best: list[float], factor: float = 1.5, smooth: int = 5) -> int | None:
    """The first step (1-based) where the run's loss (median of ``smooth``) exceeds ``factor`` x the best
    run's at the same step: where a diverging run falls behind the learning-rate sweep's best.

    Example:
        >>> behind([4.0, 4.5, 5.0, 5.0, 5.0, 5.0], [4.0, 3.0, 2.5, 2.0, 2.0, 2.0], smooth=1)
        3
    """
    for i in range(smooth - 1, min(len(losses), len(best))):
        if statistics.median(losses[i - smooth + 1:i + 1]) > factor * statistics.median(best[i - smooth + 1:i + 1]):
            return i + 1
    return None


def judge_sweep(runs: list[Outcome], factor: float = 1.5) -> None:
    """Mark the runs of one seed's sweep: a run at a higher learning rate than the best run whose final
    loss is above ``factor`` x the best final loss is unstable (diverged), its event the step where it
    fell behind the best run (:func:`behind`). A run at a lower learning rate that ends higher is slow
    (under-trained in the steps given), not unstable."""
    best = min(runs, key=lambda o: o.loss_last)
    for o in runs:
        if o.onset is None and o.lr > best.lr and o.loss_last > factor * best.loss_last:
            o.diverged_at = behind(o.losses, best.losses, factor) or o.steps


def sweep(steps: int, seeds: int, quick: bool = False, warmup: int = 100) -> list[Outcome]:
    lrs = [1e-3, 3e-2, 3e-1] if quick else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
    variants = ["plain", "qk_ln"] if quick else ["plain", "qk_ln", "qk_ln+zloss"]
    out = []
    for seed in range(seeds):
        runs = []
        for variant in variants:
            for lr in lrs:
                runs.append(train(f"sweep lr={lr:g} {variant}", lr, variant, seed, steps, warmup=warmup))
                _progress(runs[-1])
        judge_sweep(runs)
        out += runs
    return out


def lag_runs(seeds: int, quick: bool = False) -> list[Outcome]:
    out = []
    steps, ramp_at = (200, 155) if quick else (400, 305)  # not on a step that measures RMS_t anyway
    for seed in range(seeds):
        for clip in (None, "clip_update"):
            label = "lag beta2=0.999" + (" clip_update" if clip else "")
            out.append(train(label, 1e-2, "plain", seed, steps, beta2=0.999, ramp_at=ramp_at, ramp_to=100.0,
                             on_precursor=clip))
            _progress(out[-1])
    return out


def _progress(o: Outcome) -> None:
    print(f"  {o.name:<34} seed {o.seed}: loss {o.loss_first:.2f} -> {o.loss_last:.3f}  onset {o.onset}  "
          f"first precursor {o.precursor}  ({o.seconds:.1f}s)", file=sys.stderr, flush=True)


def table(outcomes: list[Outcome]) -> str:
    """The per-run table and the summary (markdown)."""
    rows = ["| run | seed | loss first -> last 20 | instability (step) | first precursor (step, code) | lead | max RMS_t | "
            "max attention logit | max abs log Z |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in outcomes:
        pre = f"{o.precursor[0]} {o.precursor[1]}" if o.precursor else "-"
        kind = f"spike {o.onset}" if o.onset else (f"diverged {o.diverged_at}" if o.diverged_at else "-")
        rows.append(f"| {o.name} | {o.seed} | {o.loss_first:.2f} -> {o.loss_last:.3f} | {kind} | {pre} | "
                    f"{o.lead if o.lead is not None else '-'} | {o.max_rms:.2f} | {o.max_attention_logit:.3g} | "
                    f"{o.max_abs_log_z:.2f} |")
    return "\n".join(rows) + "\n\n" + summary(outcomes)


def _codes(runs: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in runs:
        for _, code in o.warnings:
            counts[code] = counts.get(code, 0) + 1
    return ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) or "none"


def summary(outcomes: list[Outcome]) -> str:
    runs = [o for o in outcomes if "clip_update" not in o.name]  # clip_update runs are the treatment, not the proof
    unstable = [o for o in runs if o.unstable]
    stable = [o for o in runs if not o.unstable]
    warned = [o for o in unstable if o.lead is not None]
    leads = [o.lead for o in warned if o.lead is not None]
    alarms = sum(len(o.precursors) for o in stable)
    any_leads = [o.event - o.first_warning[0] for o in unstable if o.warned_before]
    lines = [
        f"- unstable runs (a loss spike, or diverged): {len(unstable)}; a precursor finding at or before the onset in "
        f"{len(warned)}/{len(unstable)} ({100 * len(warned) / max(1, len(unstable)):.0f}%); "
        f"median lead {statistics.median(leads) if leads else '-'} steps (range "
        f"{min(leads) if leads else '-'}..{max(leads) if leads else '-'})",
        f"- any gradwatch warning or error (lr_too_high included) at or before the event: "
        f"{sum(o.warned_before for o in unstable)}/{len(unstable)}; median lead "
        f"{statistics.median(any_leads) if any_leads else '-'} steps; warnings on the stable runs: "
        f"{sum(len(o.warnings) for o in stable)} ({_codes(stable)})",
        f"- stable runs: {len(stable)}; precursor findings on them (false alarms): {alarms} "
        f"(runs: {sorted({o.name for o in stable if o.precursors})})",
    ]
    for o in stable:  # a stable run that got a finding: how it ended against the same lr with qk-layernorm
        twin = next((t for t in runs if t.seed == o.seed and t.lr == o.lr and t.variant == "qk_ln"), None)
        if o.precursors and twin is not None and twin is not o:
            lines.append(f"  - {o.name} seed {o.seed}: {o.precursors[0][1]} at step {o.precursors[0][0]}; final loss "
                         f"{o.loss_last:.3f} vs {twin.loss_last:.3f} with qk-layernorm "
                         f"({100 * (o.loss_last / twin.loss_last - 1):+.0f}%), max attention logit "
                         f"{o.max_attention_logit:.3g} vs {twin.max_attention_logit:.3g}")
    for seed in sorted({o.seed for o in outcomes if o.name.startswith("lag")}):
        base = next((o for o in outcomes if o.name == "lag beta2=0.999" and o.seed == seed), None)
        clipped = next((o for o in outcomes if o.name == "lag beta2=0.999 clip_update" and o.seed == seed), None)
        if base and clipped:
            lines.append(f"- second-moment lag, seed {seed}: final loss {base.loss_last:.3f} without, "
                         f"{clipped.loss_last:.3f} with on_precursor='clip_update' (spike {base.onset} vs "
                         f"{clipped.onset}; max RMS_t {base.max_rms:.1f} vs {clipped.max_rms:.1f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400, help="steps per sweep run")
    parser.add_argument("--warmup", type=int, default=100,
                        help="linear warm-up steps of the sweep, then cosine decay to 10%% (0: constant lr)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="the reduced set tests/test_instability.py runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    outcomes = sweep(args.steps, args.seeds, args.quick, args.warmup) + lag_runs(args.seeds, args.quick)
    print(f"Command: `python -m benchmarks.instability{' --quick' if args.quick else ''} --steps {args.steps} "
          f"--warmup {args.warmup} --seeds {args.seeds}` ({time.perf_counter() - started:.0f} s wall, torch {torch.__version__}, 1 thread)\n")
    print(table(outcomes))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(o) | {"lead": o.lead, "event": o.event} for o in outcomes],
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
