"""Step-time overhead of gradwatch.Watch against a hand-written clipped loop.

Run by hand (not a test):  python benchmarks/overhead.py [--rounds 15] [--steps N] [--ddp]
                           python benchmarks/overhead.py --depth-sweep [--rounds 5] [--threads 1]

Workloads (issue 2): a GPT-style model (6 pre-LN blocks, d=256, 4 heads, seq 128,
batch 8, vocab 256, AdamW) and a small MLP (7 x Linear(128)+ReLU, batch 64,
AdamW), CPU, 2 threads. Each round times ``--steps`` steps of every variant in
turn (the order rotates between rounds); the printed figure is the median over
rounds of the per-round ratio variant / baseline, so drifts of a shared machine
cancel out. Variants:

- baseline: ``loss.backward(); clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad()``
- watch: ``watch.step(closure)`` with default settings and a run directory on
- watch_diagnose_off: the same with ``diagnose=False`` (telemetry, clipping, skip, NaN replay only)
- detect_anomaly: the baseline under ``torch.autograd.detect_anomaly()`` (for scale)
- baseline_copy: the baseline loop again, on a second model built alike: the control. Its
  ratio is what placement in memory alone does (0.97-1.03 on a shared 2-core machine); the
  rounds are shared among ``--builds`` fresh sets of models (default 3) so that this bias
  averages out of the other ratios

``--depth-sweep`` (issue 19): how the cost grows with the number of layers. MLPs of
10-1000 ``Linear(64)+ReLU`` layers (batch 32) and GPT-style models of 2-166 blocks
(d=64, 2 heads, seq 32, batch 4, vocab 256; 6 layers per block, ~15-1000 layers),
AdamW, run directory on: the Watch with ``clip_norm=1.0`` against the clipped loop, and
the Watch with its defaults (measure, never clip) against the loop without clipping;
each ratio with the Watch's extra microseconds per step per layer. Narrow layers on
purpose: the per-layer work of the Watch is fixed, so this is its worst case. Each
Watch first takes ``update_ratio_every + 2`` steps (past the first steps, which all
measure the update ratio), then rounds alternate as above. In the standard workloads each
Watch first takes ``max(update_ratio_every, PrecursorConfig().sample_every) + 2`` steps: the
first steps measure the update ratio and sample the precursor signals on every step, a
one-time cost; the ratios are those of the steps after.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradwatch as gw  # noqa: E402
from benchmarks import models  # noqa: E402


def _workload(name: str) -> tuple[Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]:
    if name == "gpt":
        x, y = models.gpt_batch(batch=8, seq=128, vocab=256)
        return (lambda: models.gpt(vocab=256, d=256, heads=4, layers=6, seq=128)), (lambda m: models.gpt_loss(m, x, y))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 128, generator=g), torch.randint(0, 10, (64,), generator=g)
    return (lambda: models.mlp(width=128, layers=7, out=10)), (lambda m: F.cross_entropy(m(x), y))


def clipped_loop(make: Callable[[], torch.nn.Module], loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[], None]:
    """The baseline step: ``backward; clip_grad_norm_(1.0); step; zero_grad`` on a fresh model (seed 0)."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def baseline() -> None:
        loss_of(model).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return baseline


def _variants(name: str, tmp: Path) -> dict[str, Callable[[], None]]:
    make, loss_of = _workload(name)
    out: dict[str, Callable[[], None]] = {"baseline": clipped_loop(make, loss_of),
                                          # the control: the same loop on a second model, whose ratio to the
                                          # first is what placement in memory alone does to a ratio
                                          "baseline_copy": clipped_loop(make, loss_of)}

    torch.manual_seed(0)
    watch_model = make()
    watch_opt = torch.optim.AdamW(watch_model.parameters(), lr=1e-4)
    watch = gw.Watch(watch_model, watch_opt, clip_norm=1.0, run_dir=tmp / f"{name}-watch")  # clips as the baseline

    def watched() -> None:
        watch.step(lambda: loss_of(watch_model))

    out["watch"] = watched

    torch.manual_seed(0)
    lean_model = make()
    lean_opt = torch.optim.AdamW(lean_model.parameters(), lr=1e-4)
    lean = gw.Watch(lean_model, lean_opt, clip_norm=1.0, run_dir=tmp / f"{name}-lean", diagnose=False)

    def watched_lean() -> None:
        lean.step(lambda: loss_of(lean_model))

    out["watch_diagnose_off"] = watched_lean

    torch.manual_seed(0)
    anom_model = make()
    anom_opt = torch.optim.AdamW(anom_model.parameters(), lr=1e-4)

    def anomaly() -> None:
        with warnings_off(), torch.autograd.detect_anomaly(check_nan=True):
            loss_of(anom_model).backward()
        torch.nn.utils.clip_grad_norm_(anom_model.parameters(), 1.0)
        anom_opt.step()
        anom_opt.zero_grad()

    out["detect_anomaly"] = anomaly
    return out


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


DEFAULT_STEPS = {"gpt": 3, "mlp": 100}  # a round of each variant lasts ~0.1-1 s on 2 cores


def alternating_ratios(
    variants: dict[str, Callable[[], None]], rounds: int, steps: int
) -> tuple[dict[str, float], float]:
    """Median over rounds of each variant's step time / the ``"baseline"`` one, and the median baseline step (s).

    Each round times ``steps`` steps of every variant in turn; the order rotates
    between rounds, so drifts of a shared machine cancel out.
    """
    ratios, base_times = round_ratios(variants, rounds, steps)
    return {n: statistics.median(v) for n, v in ratios.items()}, statistics.median(base_times)


def round_ratios(
    variants: dict[str, Callable[[], None]], rounds: int, steps: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Per round, each variant's step time / the ``"baseline"`` one; and the baseline step of each round (s)."""
    names = list(variants)
    ratios: dict[str, list[float]] = {n: [] for n in names if n != "baseline"}
    base_times = []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        times = {}
        for n in order:
            start = time.perf_counter()
            for _ in range(steps):
                variants[n]()
            times[n] = (time.perf_counter() - start) / steps
        base_times.append(times["baseline"])
        for n in ratios:
            ratios[n].append(times[n] / times["baseline"])
    return ratios, base_times


def measure(name: str, rounds: int, steps: int, tmp: Path, builds: int = 3) -> tuple[dict[str, float], float]:
    """(median ratio per variant, median baseline step in seconds), over ``builds`` fresh sets of models.

    Why several builds: two copies of the same loop on two models built alike differ by up to ~3% on
    this machine (where their tensors landed in memory; ``baseline_copy`` prints it), a bias that stays
    for the life of the models. Building every variant again ``builds`` times and taking the median
    over all their rounds averages that placement out.
    """
    per_build = max(1, -(-rounds // builds))
    ratios: dict[str, list[float]] = {}
    base_times: list[float] = []
    # warm-up: the plain variants 2 steps; the Watches past their first steps (the update ratio on each of
    # the first update_ratio_every, the precursors' signals on each of the first sample_every: a one-time
    # cost), so the ratio is what every later step costs
    first = first_steps()
    for build in range(builds):
        variants = _variants(name, tmp / f"build{build}")
        for key, fn in variants.items():
            for _ in range(first if key.startswith("watch") else 2):
                fn()
        build_ratios, build_base = round_ratios(variants, per_build, steps)
        for n, values in build_ratios.items():
            ratios.setdefault(n, []).extend(values)
        base_times += build_base
        del variants
    return {n: statistics.median(v) for n, v in ratios.items()}, statistics.median(base_times)


# ----- --depth-sweep ------------------------------------------------------------------------
MLP_DEPTHS = (10, 30, 100, 300, 1000)
GPT_BLOCKS = (2, 8, 32, 100, 166)  # 6 layers a block + 3: 15 ... 999 layers


def first_steps() -> int:
    """Steps a Watch takes before it is timed: past the update ratio on each of the first
    ``update_ratio_every`` steps and the precursor signals on each of the first ``sample_every`` (a
    one-time cost), so a ratio is what every later step costs."""
    return max(gw.Watch.__init__.__kwdefaults__["update_ratio_every"], gw.PrecursorConfig().sample_every) + 2


def depth_workloads() -> list[tuple[str, Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]]:
    """(label, model factory, loss) for every depth of the sweep."""
    out: list[tuple[str, Callable[[], torch.nn.Module], Callable[[torch.nn.Module], torch.Tensor]]] = []
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    for depth in MLP_DEPTHS:
        out.append((f"mlp-{depth}", lambda depth=depth: models.mlp(width=64, layers=depth, out=10),
                    lambda m: F.cross_entropy(m(x), y)))
    tokens, targets = models.gpt_batch(batch=4, seq=32, vocab=256)
    for blocks in GPT_BLOCKS:
        out.append((f"gpt-{blocks}", lambda blocks=blocks: models.gpt(vocab=256, d=64, heads=2, layers=blocks, seq=32),
                    lambda m: models.gpt_loss(m, tokens, targets)))
    return out


def depth_sweep(rounds: int, steps: int | None, tmp: Path, only: str | None = None) -> list[dict[str, float | str]]:
    """One row per depth: layers, parameters, the plain steps and the two ratios with us per layer.

    ``clipped``: the Watch with ``clip_norm=1.0`` against ``backward; clip_grad_norm_; step;
    zero_grad``; ``monitor``: the Watch with its defaults (measure, never clip) against the same
    loop without ``clip_grad_norm_`` (what the telemetry alone costs).
    """
    import logging

    logging.getLogger("gradwatch").setLevel(logging.ERROR)  # the deep stacks' findings are not the point here
    rows: list[dict[str, float | str]] = []
    for label, make, loss_of in depth_workloads():
        if only is not None and not label.startswith(only):
            continue
        variants: dict[str, Callable[[], None]] = {"baseline": clipped_loop(make, loss_of)}
        watches = []
        for name, clip in (("watch", 1.0), ("monitor", None)):
            torch.manual_seed(0)
            model = make()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            with warnings_off():
                watch = gw.Watch(model, opt, clip_norm=clip, run_dir=tmp / f"depth-{label}-{name}")
            watches.append(watch)
            variants[name] = (lambda watch=watch, model=model: watch.step(lambda: loss_of(model)))
        variants["plain"] = plain_loop(make, loss_of)
        for name, fn in variants.items():  # the Watches past the first steps (each measures the update ratio)
            for _ in range(first_steps() if name in ("watch", "monitor") else 2):  # as in the main benchmark
                fn()
        start = time.perf_counter()
        variants["baseline"]()
        one = time.perf_counter() - start
        n = steps or max(3, min(50, int(0.3 / max(one, 1e-4))))  # a round of each variant lasts ~0.3 s
        ratio, base = alternating_ratios(variants, rounds, n)
        plain = base * ratio["plain"]
        layers = len(watches[0].layers)
        rows.append({"workload": label, "layers": layers, "params": sum(p.numel() for p in watches[0].index.params),
                     "baseline_ms": base * 1e3, "plain_ms": plain * 1e3, "ratio": ratio["watch"],
                     "us_per_layer": (ratio["watch"] - 1.0) * base / layers * 1e6,
                     "monitor_ratio": ratio["monitor"] / ratio["plain"],
                     "monitor_us_per_layer": (ratio["monitor"] - ratio["plain"]) * base / layers * 1e6, "steps": n})
        for watch in watches:
            watch.close()
        print(f"# {label}: {layers} layers, ratio {ratio['watch']:.3f}", file=sys.stderr, flush=True)
    return rows


def plain_loop(make: Callable[[], torch.nn.Module], loss_of: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[], None]:
    """``backward; step; zero_grad`` with no clipping, on a fresh model (seed 0)."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def plain() -> None:
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()

    return plain


def depth_table(rows: list[dict[str, float | str]]) -> str:
    """The markdown table of :func:`depth_sweep`."""
    lines = ["| workload | layers | params | clipped loop ms | watch(clip 1.0) / clipped loop | us / layer "
             "| watch(defaults) / plain loop | us / layer |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['layers']} | {float(r['params']) / 1e6:.2f}M | {float(r['baseline_ms']):.2f} "
                     f"| {float(r['ratio']):.3f} | {float(r['us_per_layer']):+.2f} "
                     f"| {float(r['monitor_ratio']):.3f} | {float(r['monitor_us_per_layer']):+.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per round (default: gpt 3, mlp 100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--builds", type=int, default=3,
                        help="fresh sets of models the rounds are shared among (placement in memory averages out)")
    parser.add_argument("--workloads", default="gpt,mlp")
    parser.add_argument("--ddp", action="store_true", help="also run the 2-process DDP benchmark (benchmarks/ddp_overhead.py)")
    parser.add_argument("--depth-sweep", action="store_true",
                        help="MLPs and GPT configs from ~10 to ~1000 layers: ratio and us per layer (default rounds: 5)")
    parser.add_argument("--only", default=None, help="--depth-sweep: only workloads whose label starts with this")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.depth_sweep:
        rounds = args.rounds if "--rounds" in (argv if argv is not None else sys.argv) else 5
        print(f"torch {torch.__version__}, {args.threads} threads, {rounds} rounds, {time.strftime('%Y-%m-%d')}; "
              "ratios: median over rounds; us / layer = the Watch's extra time per step / layers")
        with tempfile.TemporaryDirectory() as tmp:
            print(depth_table(depth_sweep(rounds, args.steps, Path(tmp), args.only)))
        return 0
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds; ratio = variant / baseline (median over rounds)")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads.split(","):
            steps = args.steps or DEFAULT_STEPS.get(name, 5)
            result, base_step = measure(name, args.rounds, steps, Path(tmp), args.builds)
            cells = "  ".join(f"{k} {v:.3f}" for k, v in result.items())
            # the baseline step says which state a shared machine was in (ratios drift with it)
            print(f"{name:4s}  {cells}  (baseline step {base_step * 1e3:.2f} ms)")
    if args.ddp:
        ddp = Path(__file__).with_name("ddp_overhead.py")
        if not ddp.exists():
            print("ddp: benchmarks/ddp_overhead.py is not there", file=sys.stderr)
            return 2
        import runpy

        runpy.run_path(str(ddp), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
