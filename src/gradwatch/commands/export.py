"""``gradwatch export --tensorboard RUN_DIR DIR``: write a run directory as TensorBoard event files."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from . import check_output_path, read_problems


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        help="export a run directory to another format (TensorBoard)",
        description="Write a run's per-layer gradient norms, global norm, loss, clip coefficient, loss scale and "
        "findings (as text) as TensorBoard event files; then run: tensorboard --logdir DIR",
    )
    parser.add_argument("--tensorboard", action="store_true", required=True,
                        help="write TensorBoard event files (the only format so far)")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by gradwatch.Watch(run_dir=...)")
    parser.add_argument("logdir", metavar="DIR", help="TensorBoard log directory to write (created if missing)")
    parser.add_argument("--every", type=int, default=1, metavar="N",
                        help="write every N-th step and every skipped step (findings are all written); default 1")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..tensorboard import export_tensorboard

    check_output_path(args.logdir, folder=True)
    problems = read_problems(args.run_dir)
    path = export_tensorboard(args.run_dir, args.logdir, every=args.every)
    for line in problems:  # what a damaged run directory lost (after the export: exit 2 stays one line)
        print(f"gradwatch export: {line}", file=sys.stderr)
    print(path, file=sys.stdout)
    return 0
