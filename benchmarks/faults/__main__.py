"""``python -m benchmarks.faults [--quick] [--json FILE] [--only NAME,...] [--seeds N] [--threads N]``

Runs every scenario (or the ``--quick`` subset) through gradwatch, prints one
line per run as it finishes, then the summary, the confusion table, detection
and localization per code, every scenario, and the healthy runs. ``--json``
writes the outcomes and the summary for later comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="the reduced set (what tests/test_faults.py runs)")
    parser.add_argument("--json", metavar="FILE", help="write outcomes and summary as JSON")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated substrings of scenario names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--no-probe", action="store_true", help="skip the pre-flight probe")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every scenario with model seeds 0..N-1 (each run scored on its own; default 1)")
    args = parser.parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        print(f"--json {args.json}: directory {Path(args.json).resolve().parent} does not exist", file=sys.stderr)
        return 2

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.faults import harness, scenarios, scoring, tables

    torch.set_num_threads(args.threads)
    chosen = scenarios.select(quick=args.quick, only=args.only)
    if not chosen:
        print(f"no scenario matches --only {args.only!r}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    outcomes = []
    runs = [(sc, seed) for sc in chosen for seed in range(max(1, args.seeds))]
    for i, (sc, seed) in enumerate(runs, 1):
        o = harness.run_scenario(sc, seed=seed, probe=not args.no_probe)
        if args.seeds > 1:
            o["name"] = f"{sc.name}@{seed}"
        outcomes.append(o)
        codes = ",".join(sorted({f["code"] for f in o["findings"]})) or "-"
        verdict = "healthy" if sc.healthy else ("HIT" if scoring.score_outcome(o)["detected"] else "miss")
        err = "  ERROR " + o["error"].splitlines()[0] if o["error"] else ""
        print(f"[{i:2d}/{len(runs)}] {o['name']:36s} {verdict:7s} found={codes}  {o['seconds']:.1f}s{err}", flush=True)
    seconds = time.perf_counter() - started
    summary = scoring.summarize(outcomes)
    command = ("python -m benchmarks.faults" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
               + (" --no-probe" if args.no_probe else "")
               + (f" --seeds {args.seeds}" if args.seeds > 1 else ""))
    print()
    print(tables.summary_lines(summary, seconds, command))
    print("\n### Confusion table (rows: injected cause; columns: codes raised; a run counts once per code)\n")
    print(tables.confusion_table(summary))
    print("\n### Detection and localization per code\n")
    print(tables.per_code_table(summary))
    print("\n### Scenarios\n")
    print(tables.scenario_table(outcomes))
    print("\n### Healthy runs\n")
    print(tables.healthy_table(outcomes))
    print("\n### Misses and localization errors (expected vs found)\n")
    print(tables.misses(outcomes))
    if args.json:
        def clean(x):  # JSON without NaN
            if isinstance(x, float) and not math.isfinite(x):
                return repr(x)
            if isinstance(x, dict):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        Path(args.json).write_text(json.dumps(clean({"seconds": seconds, "command": command, "summary": summary,
                                                     "outcomes": outcomes}), indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
