"""The healthy model zoo: every warning or error gradwatch raises here is a false alarm.

GPT-2, BERT (masked LM), T5, Llama (RMSNorm, SwiGLU, rotary), ViT and ResNet built
from ``transformers`` configs with random init, plus an LSTM and a BatchNorm CNN
from torch, each trained for a few hundred steps on a learnable task (the ``arith``
sequences or scikit-learn's digits; see ``benchmarks/faults/data.py``) with the
model's own loss and ``watch.step(closure, batch=batch)``, after its pre-flight
probe (``gw.probe``) at init. The runs are the ``healthy_*`` scenarios of the
fault benchmark, so the two tables of docs/evidence.md come from one harness.

For each run: steps, the loss over the first and the last 10 steps, whether it
fell, the warnings and errors of the probe and of the Watch, and the false-alarm
rate per 1000 steps.

Usage::

    python -m benchmarks.zoo [--steps 400] [--only gpt2,t5] [--json zoo.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.faults import harness, scenarios  # noqa: E402

#: (family, scenario name) of each zoo member, in the order of the table
ZOO: list[tuple[str, str]] = [
    ("GPT-2", "healthy_gpt2"),
    ("BERT (MLM)", "healthy_bert_mlm"),
    ("T5", "healthy_t5"),
    ("Llama", "healthy_llama"),
    ("ViT", "healthy_vit"),
    ("ResNet (transformers)", "healthy_hf_resnet"),
    ("LSTM (torch)", "healthy_lstm"),
    ("BatchNorm CNN (torch)", "healthy_cnn_bn_4"),
]

ALARM = ("warning", "error")


def zoo_scenarios(only: str | None = None) -> list[tuple[str, scenarios.Scenario]]:
    """The zoo's (label, scenario) pairs, optionally those whose label or name contains a part of ``only``."""
    by_name = {s.name: s for s in scenarios.SCENARIOS}
    chosen = [(label, by_name[name]) for label, name in ZOO]
    if only:
        parts = [p.lower() for p in only.split(",")]
        chosen = [(lb, s) for lb, s in chosen if any(p in lb.lower() or p in s.name for p in parts)]
    return chosen


def summarize(label: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """One row of the zoo table from a harness outcome (plain data)."""
    alarms = [f for f in outcome["findings"] if f["severity"] in ALARM]
    watch = [f for f in alarms if f["source"] == "watch"]
    probe = [f for f in alarms if f["source"] == "probe"]
    first, last = outcome["loss_first"], outcome["loss_last"]
    steps = outcome["steps"]
    return {
        "model": label, "scenario": outcome["name"], "steps": steps, "loss_first": first, "loss_last": last,
        "loss_fell": bool(math.isfinite(first) and math.isfinite(last) and last < first),
        "accuracy": outcome["accuracy"],
        "watch_warnings": sum(f["severity"] == "warning" for f in watch),
        "watch_errors": sum(f["severity"] == "error" for f in watch),
        "probe_alarms": len(probe),
        "per_1000_steps": 1000 * len(watch) / steps if steps else math.nan,
        "codes": sorted({f["code"] for f in alarms}),
        "error": outcome["error"],
        "seconds": outcome["seconds"],
    }


def run(steps: int | None = None, only: str | None = None) -> list[dict[str, Any]]:
    """Train every zoo model (``steps`` overrides each scenario's own) and return the table rows."""
    return [summarize(label, harness.run_scenario(sc, steps=steps)) for label, sc in zoo_scenarios(only)]


def table(rows: list[dict[str, Any]]) -> str:
    """The zoo table in Markdown, with a total row."""
    head = ("| model | steps | loss first 10 → last 10 | falls | probe alarms | watch warnings | watch errors "
            "| false alarms / 1000 steps |\n|---|---:|---|---|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['loss_first']:.3g} → {r['loss_last']:.3g} | "
                     f"{'yes' if r['loss_fell'] else 'NO'} | {r['probe_alarms']} | {r['watch_warnings']} | "
                     f"{r['watch_errors']} | {r['per_1000_steps']:.1f} |")
    steps = sum(r["steps"] for r in rows)
    alarms = sum(r["watch_warnings"] + r["watch_errors"] for r in rows)
    lines.append(f"| **all {len(rows)}** | {steps} | | {sum(r['loss_fell'] for r in rows)}/{len(rows)} | "
                 f"{sum(r['probe_alarms'] for r in rows)} | {sum(r['watch_warnings'] for r in rows)} | "
                 f"{sum(r['watch_errors'] for r in rows)} | {1000 * alarms / steps if steps else math.nan:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per model (default: each scenario's, 400)")
    parser.add_argument("--only", default=None, help="comma-separated parts of model labels or scenario names")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = run(args.steps, args.only)
    if not rows:
        print(f"no zoo model matches --only {args.only!r}", file=sys.stderr)
        return 2
    print(table(rows))
    for r in rows:
        if r["codes"] or r["error"]:
            print(f"- {r['model']}: {', '.join(r['codes'])} {r['error'] or ''}".rstrip())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
