"""Extra peak memory of gradwatch.Watch against the plain training loop (issue 19).

Run by hand (not a test):
    OMP_NUM_THREADS=1 python benchmarks/memory.py [--sizes 25m 100m] [--steps 12] [--device cpu|cuda]

Workloads: Hugging Face ``GPT2LMHeadModel`` built from a config (random init, tied
embeddings, vocab 50257, sequence 128, batch 2, synthetic tokens, AdamW) at about
25M parameters (d=320, 8 layers) and about 100M (d=768, 8 layers). Variants, each
run for ``--steps`` steps:

- ``plain``: ``loss.backward(); clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad()``
- ``watch``: ``watch.step(closure)`` with the defaults (clip_norm=1.0 to match the plain loop;
  the update ratio on each of the first 10 steps, within the default budget)
- ``watch_rollback``: the same with ``on_nonfinite="rollback"`` and ``rollback_every=5``
  (so that a snapshot with the AdamW state is taken within the few steps; the default, 100,
  takes the same snapshot at step 100)

Measurement: on CUDA ``torch.cuda.max_memory_allocated`` (exact, in one process per
variant). On CPU torch has no allocator statistics, so each variant runs in a fresh
subprocess and reports its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``); the
extra is the variant's peak minus the plain loop's peak measured in the same run, and
``--repeats`` (default 1) takes the lowest peak of several fresh processes. The table
gives the extra as bytes and as a multiple of the parameter bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = {  # name: GPT2Config arguments
    "tiny": dict(n_embd=32, n_layer=2, n_head=2, vocab_size=512),  # the smoke test
    "25m": dict(n_embd=320, n_layer=8, n_head=5, vocab_size=50257),
    "100m": dict(n_embd=768, n_layer=8, n_head=12, vocab_size=50257),
}
VARIANTS = ("plain", "watch", "watch_rollback")
SEQ, BATCH = 128, 2
MiB = 1 << 20


def _model(size: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SIZES[size])
    return GPT2LMHeadModel(config)


def child(size: str, variant: str, steps: int, device: str) -> dict[str, Any]:
    """One variant in this process: train ``steps`` steps and return its peak memory."""
    import resource
    import warnings

    import torch

    import gradwatch as gw

    torch.manual_seed(0)
    model = _model(size).to(device)
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (BATCH, SEQ), generator=g).to(device) for _ in range(steps)]

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        return model(input_ids=tokens, labels=tokens).loss

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    watch = None
    if variant != "plain":
        rollback = variant == "watch_rollback"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            watch = gw.Watch(model, opt, clip_norm=1.0, on_nonfinite="rollback" if rollback else "skip",
                             nonfinite=gw.NonFiniteConfig(rollback_every=5) if rollback else gw.NonFiniteConfig())
    start = time.perf_counter()
    for tokens in batches:
        if watch is None:
            loss_of(tokens).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            watch.step(lambda: loss_of(tokens))
    seconds = time.perf_counter() - start
    out: dict[str, Any] = {"size": size, "variant": variant, "params": sum(p.numel() for p in params),
                           "param_bytes": param_bytes, "seconds": seconds}
    if watch is not None:
        meter = watch._pipeline.ratio
        if hasattr(meter, "held_bytes"):  # (a gradwatch before issue 19 kept a full copy)
            out["ratio_budget"] = meter.budget
            out["ratio_held"] = meter.held_bytes
            out["ratio_rounds"] = len(meter.rounds)
        keeper = next((p.rollback for p in watch.plugins if getattr(p, "rollback", None) is not None), None)
        if keeper is not None and hasattr(keeper, "nbytes"):
            out["rollback_bytes"] = keeper.nbytes
        watch.close()
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated()
        out["measure"] = "cuda max_memory_allocated"
    else:
        out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        out["measure"] = "peak RSS"
    return out


def run_child(size: str, variant: str, steps: int, device: str) -> dict[str, Any]:
    """``child`` in a fresh interpreter (its peak RSS is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--sizes", size,
           "--steps", str(steps), "--device", device]
    env = dict(os.environ)
    root = Path(__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{size}/{variant} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: peak, extra over the plain loop (bytes and x parameter bytes)."""
    lines = ["| model | params (MiB fp32) | variant | peak MiB | extra MiB | extra / param bytes | held by gradwatch |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    base = {r["size"]: r["peak"] for r in rows if r["variant"] == "plain"}
    for r in rows:
        extra = r["peak"] - base[r["size"]]
        held = []
        if "ratio_held" in r:
            held.append(f"ratio copy {r['ratio_held'] / MiB:.1f} MiB ({r['ratio_rounds']} rounds)")
        if "rollback_bytes" in r:
            held.append(f"rollback {r['rollback_bytes'] / MiB:.0f} MiB")
        lines.append(f"| GPT-2 {r['size']} | {r['params'] / 1e6:.2f}M ({r['param_bytes'] / MiB:.1f}) | {r['variant']} "
                     f"| {r['peak'] / MiB:.0f} | {extra / MiB:+.1f} | {extra / r['param_bytes']:+.3f}x | "
                     f"{', '.join(held) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["25m", "100m"], choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per variant; the lowest peak counts")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.sizes[0], args.child, args.steps, args.device)))
        return 0
    rows = []
    for size in args.sizes:
        for variant in VARIANTS:
            runs = [run_child(size, variant, args.steps, args.device) for _ in range(max(1, args.repeats))]
            rows.append(min(runs, key=lambda r: r["peak"]))
            print(f"# {size} {variant}: peak {rows[-1]['peak'] / MiB:.0f} MiB in {rows[-1]['seconds']:.1f} s",
                  file=sys.stderr)
    print(f"{args.steps} steps, batch {BATCH} x {SEQ} tokens, AdamW, {args.device} "
          f"({rows[0]['measure']}; extra = variant - plain, same run), {time.strftime('%Y-%m-%d')}")
    print(table(rows))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
