"""``gradwatch demo [--out DIR] [--steps N] [--quick]``: vanishing, exploding and healthy MLPs on digits."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from . import check_output_path


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo",
        help="train three 12-layer MLPs on scikit-learn's digits and show what gradwatch finds",
        description="Trains a sigmoid MLP (vanishing gradients), a ReLU MLP with a 3x too-large init saved by "
        "clipping (exploding), and a ReLU + Kaiming + LayerNorm MLP (healthy) on scikit-learn's bundled digits "
        "(no download); prints a table of test accuracy and findings, and saves a PNG of gradient magnitude "
        "by layer depth.",
    )
    parser.add_argument("--out", metavar="DIR", default="gradwatch-demo", help="output folder (default: gradwatch-demo)")
    parser.add_argument("--steps", metavar="N", type=int, default=300, help="training steps per variant (default: 300)")
    parser.add_argument("--quick", action="store_true", help="60 steps per variant")
    return parser


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    check_output_path(args.out, folder=True)

    log = logging.getLogger("gradwatch")
    level = log.level
    log.setLevel(logging.ERROR)  # the findings are in the table below; keep internal errors only
    try:
        result = run_demo(args.out, steps=args.steps, quick=args.quick, progress=sys.stderr.isatty())
    finally:
        log.setLevel(level)
    print(result.table())
    print()
    for variant in result.variants:
        print(f"{variant.name}: run directory {variant.run_dir} (gradwatch doctor {variant.run_dir})")
    print(f"gradient magnitude by layer depth: {result.figure}")
    print(f"({result.seconds:.1f} s)")
    return 0
