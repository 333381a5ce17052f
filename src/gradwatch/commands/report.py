"""``gradwatch report RUN_DIR [RUN_B] [-o FILE]``: write the run's self-contained HTML report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import check_output_path, read_problems


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a run (or two runs overlaid)",
        description="Write one self-contained HTML file (no network needed to open it) with gradient flow by "
        "layer depth, the global norm against the clip threshold, loss with findings, effective per-layer "
        "gain, update ratios, activation statistics, loss scale, findings, reproduction bundles and the "
        "layer table. Given a second run, overlays both in the same charts (run B dashed).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by gradwatch.Watch(run_dir=...)")
    parser.add_argument("run_b", metavar="RUN_B", nargs="?", default=None,
                        help="a second run directory to compare with (e.g. after a fix)")
    parser.add_argument("-o", "--output", metavar="FILE", default=None,
                        help="HTML file to write (default: RUN_DIR/report.html, or RUN_DIR/compare.html with RUN_B)")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..report import report

    from ..runpath import for_reading

    run_dir, note = for_reading(args.run_dir)  # RUN_DIR with version_N runs in it: say which one is read
    if note:
        print(note, file=sys.stderr)
    default = Path(run_dir) / ("compare.html" if args.run_b is not None else "report.html")
    check_output_path(args.output if args.output is not None else default)
    problems = read_problems(run_dir, args.run_b)
    path = report(run_dir, output=args.output, compare=args.run_b)
    for line in problems:  # what a damaged run directory lost: after the report is written, so exit 2 stays one line
        print(f"gradwatch report: {line}", file=sys.stderr)
    print(path, file=sys.stdout)
    return 0
