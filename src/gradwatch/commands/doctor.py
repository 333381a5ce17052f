"""``gradwatch doctor RUN_DIR``: a saved run's findings as text; exit 1 if any is an error.

Exit codes: 0 (no error-level finding), 1 (at least one), 2 (bad path: one
line on stderr). Also lists the reproduction bundles in ``RUN_DIR/nonfinite/``
with their step and finding code; a bundle that cannot be read is listed as
unreadable, never a crash.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from ..findings import Finding


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="print the findings of a saved run; exit code 1 if any is an error",
        description="Prints a saved run's findings (what went wrong, the numbers, where, and the fixes) and its "
        "reproduction bundles. Exit code 0: no error-level finding; 1: at least one; 2: not a run directory.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by gradwatch.Watch(run_dir=...)")
    return parser


def _num(value: Any) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.4g}"


def describe_bundle(path: Path) -> str:
    """One line for a reproduction bundle; never raises.

    Example:
        >>> describe_bundle(Path("missing.pt")).startswith("missing.pt: unreadable")
        True
    """
    try:
        import torch

        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, foreign or unsafe file: say so and go on
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return f"{path.name}: unreadable ({type(exc).__name__}: {reason})"
    if not isinstance(data, dict):
        return f"{path.name}: not a gradwatch bundle (a {type(data).__name__}, not a dict)"
    finding = data.get("finding") if isinstance(data.get("finding"), dict) else {}
    code = finding.get("code") or data.get("code") or "?"
    parts = [f"{path.name}: step {data.get('step', '?')}", str(code)]
    if "loss" in data:
        parts.append(f"loss={_num(data['loss'])}")
    if "grad_norm" in data:
        parts.append(f"grad_norm={_num(data['grad_norm'])}")
    loc = data.get("localization") if isinstance(data.get("localization"), dict) else None
    if loc:
        where = ", ".join(f"{k}={loc[k]}" for k in ("phase", "op", "module", "source") if loc.get(k))
        if where:
            parts.append(where)
    parts.append("batch saved" if data.get("batch") is not None else "no batch")
    return "  ".join(parts)


def _finding_text(finding: Finding) -> str:
    lines = [str(finding).splitlines()[0]]
    numbers = {k: v for k, v in finding.evidence.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines.append("    evidence: " + ", ".join(f"{k}={_num(v)}" for k, v in list(numbers.items())[:8]))
    lines += [f"    fix: {fix}" for fix in finding.fixes]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from ..rundir import load_run

    from ..runpath import for_reading

    path, note = for_reading(args.run_dir)  # RUN_DIR with version_N runs in it: say which one is read
    if note:
        print(note, file=sys.stderr)
    run_data = load_run(path)  # FileNotFoundError -> one line, exit 2 (cli.main)
    steps = run_data.steps["step"]
    skipped = int(run_data.steps["skipped"].sum()) if len(steps) else 0
    print(f"run {path}: {len(steps)} steps, {len(run_data.layer_names)} layers, {skipped} skipped")
    findings = run_data.findings
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")}
    if findings:
        print(f"{len(findings)} finding(s): {counts['error']} error, {counts['warning']} warning, {counts['info']} info")
        for finding in findings:
            print(_finding_text(finding))
    else:
        print("no findings: gradient flow looked healthy")
    bundles = run_data.bundles
    if bundles:
        print(f"{len(bundles)} reproduction bundle(s) in {path / 'nonfinite'}:")
        for bundle in bundles:
            print("  " + describe_bundle(bundle))
    from ..amp.summary import precision_summary

    for line in precision_summary(run_data):  # the latest fp16 forecast / bf16 lost-update events, if any
        print(line)
    return 1 if counts["error"] else 0
