"""``gradwatch doctor RUN_DIR [--json]``: a saved run's findings as text (or JSON); exit 1 if any is an error.

Exit codes: 0 (no error-level finding), 1 (at least one), 2 (bad path: one
line on stderr). Also lists the reproduction bundles in ``RUN_DIR/nonfinite/``
with their step and finding code; a bundle that cannot be read is listed as
unreadable, never a crash. What could not be read of a damaged run directory
(a file, or lines of one) is listed under ``read problems``, and the rest of the
run is diagnosed as usual.

``--json`` prints one JSON object instead (keys in :func:`doctor_report`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..findings import Finding, _jsonable
from ..nonfinite.bundle import format_number, summarize_bundle
from ..rundir import Run


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="print the findings of a saved run; exit code 1 if any is an error",
        description="Prints a saved run's findings (what went wrong, the numbers, where, and the fixes) and its "
        "reproduction bundles. Exit code 0: no error-level finding; 1: at least one; 2: not a run directory.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by gradwatch.Watch(run_dir=...)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (findings, counts, bundles, read problems) instead of text")
    return parser


def _finding_text(finding: Finding) -> str:
    lines = [str(finding).splitlines()[0]]
    numbers = {k: v for k, v in finding.evidence.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numbers:
        lines.append("    evidence: " + ", ".join(f"{k}={format_number(v)}" for k, v in list(numbers.items())[:8]))
    lines += [f"    fix: {fix}" for fix in finding.fixes]
    return "\n".join(lines)


def _precision_lines(run_data: Run) -> list[str]:
    """The latest fp16 forecast / bf16 lost-update events as text; a damaged event is one line, never a crash."""
    from ..amp.summary import precision_summary

    try:
        return precision_summary(run_data)
    except Exception as exc:  # an events.jsonl line of the right kind but the wrong shape
        return [f"events.jsonl: the latest precision event could not be read ({type(exc).__name__})"]


def doctor_report(run_data: Run) -> dict[str, Any]:
    """Everything ``gradwatch doctor`` says about a run, as one JSON-safe dict (what ``--json`` prints).

    Keys: ``run`` (the path), ``steps``, ``layers``, ``skipped_steps``,
    ``counts`` (findings per severity), ``findings`` (each with ``code``,
    ``severity``, ``step``, ``message``, ``evidence``, ``location``, ``fixes``),
    ``bundles`` (``path`` and a one-line ``description`` each), ``precision``
    (lines of text), ``read_problems`` (lines of text) and ``skipped_lines``
    (file name -> count), and ``exit_code`` (1 when any finding is an error).

    Example:
        >>> import gradwatch as gw
        >>> doctor_report(gw.load_run("runs/exp1"))["counts"]  # doctest: +SKIP
        {'error': 0, 'warning': 1, 'info': 0}
    """
    findings = run_data.findings
    counts = {s: sum(1 for f in findings if f.severity == s) for s in ("error", "warning", "info")}
    skipped = int(run_data.steps["skipped"].sum())
    return _jsonable({
        "run": str(run_data.path),
        "steps": int(run_data.steps["step"].size),
        "layers": len(run_data.layer_names),
        "skipped_steps": skipped,
        "counts": counts,
        "findings": [f.to_dict() for f in findings],
        "bundles": [{"path": str(b), "description": summarize_bundle(b)} for b in run_data.bundles],
        "precision": _precision_lines(run_data),
        "read_problems": list(run_data.problems),
        "skipped_lines": dict(run_data.skipped_lines),
        "exit_code": 1 if counts["error"] else 0,
    })


def _print_text(report: dict[str, Any], findings: list[Finding]) -> None:
    print(f"run {report['run']}: {report['steps']} steps, {report['layers']} layers, {report['skipped_steps']} skipped")
    if report["read_problems"]:
        print(f"read problems ({len(report['read_problems'])}; the rest of the run was read):")
        for line in report["read_problems"]:
            print("  " + line)
    counts = report["counts"]
    if findings:
        print(f"{len(findings)} finding(s): {counts['error']} error, {counts['warning']} warning, {counts['info']} info")
        for finding in findings:
            print(_finding_text(finding))
    else:
        print("no findings: gradient flow looked healthy")
    bundles = report["bundles"]
    if bundles:
        print(f"{len(bundles)} reproduction bundle(s) in {Path(report['run']) / 'nonfinite'}:")
        for bundle in bundles:
            print("  " + bundle["description"])
    for line in report["precision"]:
        print(line)


def run(args: argparse.Namespace) -> int:
    from ..rundir import load_run
    from ..runpath import for_reading

    path, note = for_reading(args.run_dir)  # RUN_DIR with version_N runs in it: say which one is read
    if note:
        print(note, file=sys.stderr)
    run_data = load_run(Path(path))  # FileNotFoundError -> one line, exit 2 (cli.main)
    report = doctor_report(run_data)
    if args.json:
        print(json.dumps(report, indent=None, allow_nan=False))
    else:
        _print_text(report, run_data.findings)
    return int(report["exit_code"])
