"""The ``gradwatch`` command line.

Each subcommand lives in its own module under :mod:`gradwatch.commands` with two
functions: ``add_parser(subparsers)`` and ``run(args) -> int``. Bad arguments
and missing files give one clear line on stderr and exit code 2, never a
traceback; a command returns 1 when it found an error-level problem.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

#: Subcommands, in the order ``--help`` lists them.
COMMANDS = ("demo", "probe", "report", "doctor", "export")


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradwatch", description="Per-layer gradient telemetry, diagnosis and repair for PyTorch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gradwatch.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"gradwatch.commands.{name}":
                continue  # not built yet
            raise
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script. Returns the exit code."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError, ValueError, TypeError, ImportError) as exc:
        print(f"gradwatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradwatch: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gradwatch ... | head`: the reader left; not an error of ours
        try:  # point stdout at /dev/null: no second error when Python flushes it at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, AttributeError, ValueError):
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
