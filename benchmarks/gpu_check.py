"""GPU check (issue 19): what gradwatch claims, verified on one CUDA device in a few minutes.

Run by hand on a machine with a GPU (not a test):
    python benchmarks/gpu_check.py                 # CUDA; without CUDA: says so and exits 0
    python benchmarks/gpu_check.py --device cpu    # the same code paths on the CPU, tiny sizes

Prints one table, a row per check, and exits 1 if a check failed:

1. ``norms_fp32`` / ``norms_bf16``: the Watch's fused pass (per-tensor norms of the
   gradients and the weights, per-layer sums, the clip multiply) against
   ``torch.nn.utils.clip_grad_norm_`` on the same gradients (GPT-mini, params in that
   dtype): the global norm, the clipped gradients, and the time of each.
2. ``fp16_scaler``: ``Watch(precision="fp16", scaler=...)`` against a hand-written
   ``GradScaler`` loop (autocast fp16, unscale, clip 1.0, SGD step, update) from the same
   init on the same batches: the loss scale after every step, the skipped steps, the
   losses and the final weights.
3. ``nan_replay``: a ``torch.log`` of a negative input on step 3: the finding names
   the op and this file's line (the replay ran on the device).
4. ``host_syncs``: synchronizing CUDA calls per step counted with
   ``torch.cuda.set_sync_debug_mode("warn")`` (on the CPU: calls of ``Tensor.cpu``,
   ``.item``, ``.tolist``, ``.numpy``) for the plain clipped loop and for a healthy Watch
   step, with the Python lines that synced; the contract is one per step (the skip decision).
5. ``step_time_gpt_mini`` / ``step_time_gpt2_124m``: the step-time ratio Watch /
   plain clipped loop (AdamW, autocast bf16, clip 1.0), alternating rounds, median of
   the per-round ratios: GPT-mini (benchmarks/models.py: 6 blocks, d=256, seq 128,
   batch 8) and a GPT-2 124M config (transformers, random init, seq 512, batch 8).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gradwatch as gw  # noqa: E402
from benchmarks import models  # noqa: E402
from gradwatch import norms as _norms  # noqa: E402
from gradwatch.layers import LayerIndex  # noqa: E402


@dataclass
class Row:
    """One line of the table."""

    check: str
    ok: bool
    result: str
    detail: str = ""


@dataclass
class Sizes:
    """Model sizes: the real ones on CUDA, tiny ones for ``--device cpu``."""

    mini: dict[str, int]
    mini_batch: int
    gpt2: dict[str, int]
    gpt2_seq: int
    gpt2_batch: int
    steps: int
    rounds: int


FULL = Sizes(mini=dict(vocab=256, d=256, heads=4, layers=6, seq=128), mini_batch=8,
             gpt2=dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257), gpt2_seq=512, gpt2_batch=8,
             steps=20, rounds=5)
TINY = Sizes(mini=dict(vocab=64, d=32, heads=2, layers=2, seq=16), mini_batch=4,
             gpt2=dict(n_embd=32, n_layer=2, n_head=2, vocab_size=512), gpt2_seq=32, gpt2_batch=2,
             steps=4, rounds=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` calls, the device synchronized around each."""
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """gradwatch's own warnings (findings logged as warnings) off: the table says what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----- 1. the fused pass against clip_grad_norm_ ---------------------------------------------
def check_norms(device: torch.device, dtype: torch.dtype, sizes: Sizes) -> Row:
    torch.manual_seed(0)
    model = models.gpt(**sizes.mini).to(device=device, dtype=dtype)
    x, y = (t.to(device) for t in models.gpt_batch(batch=sizes.mini_batch, seq=sizes.mini["seq"],
                                                   vocab=sizes.mini["vocab"]))
    models.gpt_loss(model, x, y).backward()
    index = LayerIndex(model)
    params = index.params
    grads = [p.grad.detach().clone() for p in params]
    total_ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
    max_norm = 0.5 * float(total_ref)  # clipping engages

    ref = [nn.Parameter(torch.empty_like(g)) for g in grads]
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    total_torch = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))

    plan = _norms.MeasurePlan(params, index.param_layer, len(index), device)
    mine = [g.clone() for g in grads]

    @torch.no_grad()
    def fused(gs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        groups, powers, _weights = plan.measure(gs)  # gradient and weight norms in one pass, as the Watch
        _layers, total = _norms.finalize_norms(powers)
        coef = _norms.clip_coefficient(total, max_norm)
        _norms.scale_(groups, coef)
        return total, coef

    @torch.no_grad()
    def grads_only(gs: list[torch.Tensor]) -> None:  # per-layer gradient norms and the clip, no weights
        _norms.per_layer_grad_norms_(gs, index.param_layer, len(index), max_norm)

    total_gw = float(fused(mine)[0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    norm_err = abs(total_gw - total_torch) / total_torch
    grad_err = max(float((a.double() - b.grad.double()).abs().max()) for a, b in zip(mine, ref)) / max(
        float(b.grad.double().abs().max()) for b in ref)
    spare = [g.clone() for g in grads]
    t_torch = _timed(device, lambda: torch.nn.utils.clip_grad_norm_(ref, max_norm), 30)
    t_gw = _timed(device, lambda: fused(spare), 30)
    t_grads = _timed(device, lambda: grads_only(spare), 30)
    ok = norm_err <= tol and grad_err <= tol
    return Row(f"norms_{str(dtype).split('.')[-1]}", ok,
               f"norm rel err {norm_err:.1e}, clipped grads {grad_err:.1e} (tol {tol:g})",
               f"clip_grad_norm_ {t_torch * 1e6:.0f} us; the Watch's pass (grad + weight norms per layer, clip) "
               f"{t_gw * 1e6:.0f} us ({t_gw / t_torch:.2f}x); per-layer grad norms + clip alone {t_grads * 1e6:.0f} us "
               f"({t_grads / t_torch:.2f}x); {len(params)} tensors")


# ----- 2. fp16 through the Watch against a hand-written GradScaler loop ----------------------
def check_fp16(device: torch.device, sizes: Sizes, steps: int = 12) -> Row:
    torch.manual_seed(0)
    base = models.gpt(**sizes.mini).to(device)
    batches = [tuple(t.to(device) for t in models.gpt_batch(batch=sizes.mini_batch, seq=sizes.mini["seq"],
                                                            vocab=sizes.mini["vocab"], seed=s)) for s in range(steps)]
    init_scale = 2.0 ** 24  # large: the first steps overflow and are skipped, as GradScaler does

    plain = copy.deepcopy(base)
    # SGD, not Adam: Adam's normalized step turns the last-bit differences of CUDA's atomic adds
    # (the embedding's backward) into lr-sized ones on near-zero gradients
    opt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
    plain_scales, plain_losses, plain_skips = [], [], []
    for x, y in batches:
        with torch.autocast(device.type, dtype=torch.float16):
            loss = models.gpt_loss(plain, x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        plain_skips.append(scaler.get_scale() < before)
        plain_scales.append(scaler.get_scale())
        plain_losses.append(float(loss.detach()))

    watched = copy.deepcopy(base)
    opt2 = torch.optim.SGD(watched.parameters(), lr=0.05, momentum=0.9)
    scaler2 = torch.amp.GradScaler(device.type, init_scale=init_scale)
    with _quiet():
        watch = gw.Watch(watched, opt2, clip_norm=1.0, precision="fp16", scaler=scaler2, diagnose=False)
        watch_scales, watch_losses, watch_skips = [], [], []
        for x, y in batches:
            result = watch.step(lambda: models.gpt_loss(watched, x, y))
            watch_scales.append(scaler2.get_scale())
            watch_losses.append(result.loss)
            watch_skips.append(result.skipped)
        watch.close()
    loss_err = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(watch_losses, plain_losses))
    with torch.no_grad():
        weight_err = max(float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12)
                         for a, b in zip(watched.parameters(), plain.parameters()))
    ok = watch_scales == plain_scales and watch_skips == plain_skips and loss_err < 1e-3 and weight_err < 1e-3
    return Row("fp16_scaler", ok,
               f"scales equal: {watch_scales == plain_scales}, skipped steps equal: {watch_skips == plain_skips} "
               f"({sum(plain_skips)} skipped)",
               f"loss rel err {loss_err:.1e}, final weights {weight_err:.1e}; final scale {plain_scales[-1]:g}")


# ----- 3. a NaN replayed on the device -------------------------------------------------------
class LogFeatures(nn.Module):
    """``log`` of its input: NaN for a negative feature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)  # NAN-LINE


def _line_of(marker: str) -> int:
    lines = inspect.getsource(sys.modules[__name__]).splitlines()
    return next(i for i, line in enumerate(lines, 1) if line.rstrip().endswith(marker) and "return" in line)


def check_nan_replay(device: torch.device) -> Row:
    torch.manual_seed(0)
    model = nn.Sequential(LogFeatures(), nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    finding, skipped = None, False
    with _quiet():
        watch = gw.Watch(model, opt, clip_norm=1.0)
        for step in range(1, 5):
            x = torch.rand(16, 8, device=device) + 0.1
            if step == 3:
                x[2, 5] = -1.0  # log(-1) = NaN
            y = torch.randn(16, 1, device=device)
            result = watch.step(lambda: F.mse_loss(model(x), y), batch=(x, y))
            if step == 3:
                errors = [f for f in result.findings if f.severity == "error"]
                finding = errors[0] if errors else None
                skipped = result.skipped
        watch.close()
    if finding is None:
        return Row("nan_replay", False, "no error finding on the NaN step")
    loc = finding.location
    want = f"{Path(__file__).name}:{_line_of('NAN-LINE')}"
    ok = loc.get("op") == "aten.log" and str(loc.get("source", "")).endswith(want) and skipped
    return Row("nan_replay", bool(ok), f"{finding.code}: op {loc.get('op')} at {loc.get('source')} "
               f"(module {loc.get('module')!r})", f"expected aten.log at {want}; the step was skipped")


# ----- 4. host syncs per step ---------------------------------------------------------------
@contextlib.contextmanager
def _count_syncs(device: torch.device) -> Iterator[dict[str, Any]]:
    """Synchronizing CUDA calls (sync debug mode warnings), or host transfer calls on the CPU."""
    counts: dict[str, Any] = {"n": 0, "what": []}
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield counts
            finally:
                torch.cuda.set_sync_debug_mode(0)
        hits = [w for w in seen if "synchroniz" in str(w.message).lower()]
        counts["n"] = len(hits)
        counts["what"] = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in hits})  # the Python line that synced
        return
    names = ("cpu", "item", "tolist", "numpy", "__bool__", "__float__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name: str) -> Callable[..., Any]:
        def wrapper(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counts["n"] += 1
            counts["what"].append(name)
            return originals[name](self, *args, **kwargs)

        return wrapper

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        counts["what"] = sorted(set(counts["what"]))


def check_syncs(device: torch.device, sizes: Sizes) -> Row:
    torch.manual_seed(0)
    x, y = (t.to(device) for t in models.gpt_batch(batch=sizes.mini_batch, seq=sizes.mini["seq"], vocab=sizes.mini["vocab"]))
    plain = models.gpt(**sizes.mini).to(device)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step() -> None:
        models.gpt_loss(plain, x, y).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        plain_step()
    _sync(device)
    with _count_syncs(device) as plain_count:
        plain_step()
    watched = models.gpt(**sizes.mini).to(device)
    opt2 = torch.optim.AdamW(watched.parameters(), lr=1e-4)
    with _quiet():
        watch = gw.Watch(watched, opt2, clip_norm=1.0)
        for _ in range(50):  # past the first update-ratio steps (1-10) and the precursors' dense sampling (1-50):
            # step 51 is a plain healthy step (sampled steps read their attention logits and log Z on top)
            watch.step(lambda: models.gpt_loss(watched, x, y))
        _sync(device)
        # on the CPU the Watch reads each norm in place (nothing to transfer there); counted here is the
        # one-transfer path that a model on an accelerator takes
        read_on_cpu, _norms.MeasurePlan.read_on_cpu = _norms.MeasurePlan.read_on_cpu, False
        try:
            with _count_syncs(device) as watch_count:
                watch.step(lambda: models.gpt_loss(watched, x, y))
        finally:
            _norms.MeasurePlan.read_on_cpu = read_on_cpu
        watch.close()
    unit = "synchronizing CUDA calls" if device.type == "cuda" else "host transfer calls (.cpu/.numpy/...)"
    extra = watch_count["n"] - plain_count["n"]
    ok = extra <= (1 if device.type == "cuda" else 2)  # CPU: packed.cpu() then .numpy(): one transfer, 2 calls
    return Row("host_syncs", ok, f"{unit} per step: plain {plain_count['n']}, watch {watch_count['n']}",
               "; ".join(watch_count["what"])[:160])


# ----- 5. step time against the plain clipped loop ------------------------------------------
def _gpt2(sizes: Sizes, device: torch.device) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=sizes.gpt2_seq, **sizes.gpt2)
    tokens = torch.randint(0, config.vocab_size, (sizes.gpt2_batch, sizes.gpt2_seq),
                           generator=torch.Generator().manual_seed(0)).to(device)
    return (lambda: GPT2LMHeadModel(config).to(device)), (lambda m: m(input_ids=tokens, labels=tokens).loss)


def _mini(sizes: Sizes, device: torch.device) -> tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]:
    x, y = (t.to(device) for t in models.gpt_batch(batch=sizes.mini_batch, seq=sizes.mini["seq"], vocab=sizes.mini["vocab"]))
    return (lambda: models.gpt(**sizes.mini).to(device)), (lambda m: models.gpt_loss(m, x, y))


def check_step_time(name: str, device: torch.device, sizes: Sizes,
                    workload: Callable[[Sizes, torch.device], tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor]]]) -> Row:
    make, loss_of = workload(sizes, device)
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    watched = make()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    opt2 = torch.optim.AdamW(watched.parameters(), lr=1e-4)
    params = list(plain.parameters())
    n_params = sum(p.numel() for p in params)

    def plain_steps(n: int) -> None:
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = loss_of(plain)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    with _quiet():
        watch = gw.Watch(watched, opt2, clip_norm=1.0, precision="bf16")

        def watch_steps(n: int) -> None:
            for _ in range(n):
                watch.step(lambda: loss_of(watched))

        plain_steps(3)
        watch_steps(3)
        ratios, plain_ms = [], []
        for r in range(sizes.rounds):
            order = [("plain", plain_steps), ("watch", watch_steps)]
            if r % 2:
                order.reverse()
            took = {}
            for label, fn in order:
                _sync(device)
                start = time.perf_counter()
                fn(sizes.steps)
                _sync(device)
                took[label] = time.perf_counter() - start
            ratios.append(took["watch"] / took["plain"])
            plain_ms.append(took["plain"] / sizes.steps * 1e3)
        watch.close()
    ratio = statistics.median(ratios)
    return Row(f"step_time_{name}", math.isfinite(ratio),
               f"watch / plain {ratio:.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})",
               f"{n_params / 1e6:.1f}M params, bf16 autocast, plain step {statistics.median(plain_ms):.1f} ms, "
               f"{sizes.rounds} rounds x {sizes.steps} steps")


def run_checks(device: torch.device, sizes: Sizes) -> list[Row]:
    """Every check, each inside its own guard (a failure is a row, the others still run)."""
    checks: list[tuple[str, Callable[[], Row]]] = [
        ("norms_float32", lambda: check_norms(device, torch.float32, sizes)),
        ("norms_bfloat16", lambda: check_norms(device, torch.bfloat16, sizes)),
        ("fp16_scaler", lambda: check_fp16(device, sizes)),
        ("nan_replay", lambda: check_nan_replay(device)),
        ("host_syncs", lambda: check_syncs(device, sizes)),
        ("step_time_gpt_mini", lambda: check_step_time("gpt_mini", device, sizes, _mini)),
        ("step_time_gpt2_124m", lambda: check_step_time("gpt2_124m" if sizes is FULL else "gpt2_tiny", device, sizes, _gpt2)),
    ]
    rows = []
    for name, fn in checks:
        start = time.perf_counter()
        try:
            row = fn()
        except Exception as exc:  # one broken check must not hide the others
            row = Row(name, False, f"error: {type(exc).__name__}: {str(exc)[:200]}")
        row.detail = (row.detail + f" [{time.perf_counter() - start:.1f} s]").strip()
        rows.append(row)
        print(f"# {row.check}: {'ok' if row.ok else 'FAILED'}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """The markdown table of the checks."""
    lines = ["| check | ok | result | detail |", "| --- | --- | --- | --- |"]
    cell = lambda text: " ".join(text.split()).replace("|", "/")  # noqa: E731  one line per row
    lines += [f"| {r.check} | {'yes' if r.ok else 'NO'} | {cell(r.result)} | {cell(r.detail)} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default; exits 0 with a message when there is none) or cpu (tiny sizes)")
    parser.add_argument("--full", action="store_true", help="the full sizes on the CPU too (slow)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing checked. Run it on a machine with a GPU, "
              "or with --device cpu to exercise the same code paths on the CPU at tiny sizes.")
        return 0
    device = torch.device(args.device)
    sizes = FULL if device.type == "cuda" or args.full else TINY
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = run_checks(device, sizes)
    print(f"gradwatch {gw.__version__} on {name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
