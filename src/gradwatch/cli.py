"""The ``gradwatch`` command line.

Each subcommand lives in its own module under :mod:`gradwatch.commands` with two
functions: ``add_parser(subparsers)`` and ``run(args) -> int``. Bad arguments,
missing or unreadable files and errors in the user's own code give one clear
line on stderr and exit code 2, never a traceback; a command returns 1 when it
found an error-level problem. ``--debug`` (or ``GRADWATCH_DEBUG=1``) prints the
traceback as well, e.g. of an exception raised by the factory given to
``gradwatch probe``. ``--print-completion bash|zsh|tcsh`` prints a shell
completion script (needs ``shtab``: ``pip install 'gradwatch[completion]'``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
from typing import Any, Sequence

#: Subcommands, in the order ``--help`` lists them.
COMMANDS = ("demo", "probe", "report", "doctor", "export")


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit code 2."""


class UserCodeError(Exception):
    """The user's own code (a factory given to ``gradwatch probe``, its model or loss) raised.

    Printed as one line naming the user's exception, exit code 2; with
    ``--debug`` the traceback of that exception (``__cause__``) is printed first.
    """


#: Environment variable that turns ``--debug`` on for every call.
DEBUG_ENV = "GRADWATCH_DEBUG"
#: Shells ``--print-completion`` writes a script for (those shtab supports).
SHELLS = ("bash", "zsh", "tcsh")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _PrintCompletion(argparse.Action):
    """``--print-completion SHELL``: the completion script from shtab, or one line saying how to get shtab."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            import shtab
        except ImportError:
            raise UsageError("shell completion needs shtab: pip install 'gradwatch[completion]'") from None
        _mark_paths(parser, {"run_dir": shtab.DIRECTORY, "run_b": shtab.DIRECTORY, "logdir": shtab.DIRECTORY,
                             "out": shtab.DIRECTORY, "output": shtab.FILE})
        print(shtab.complete(parser, shell=values))
        parser.exit(0)


def _mark_paths(parser: argparse.ArgumentParser, kinds: dict[str, Any]) -> None:
    """Tell shtab which arguments of every subcommand are directories or files (``action.complete``)."""
    for action in parser._actions:  # argparse keeps no public list of a parser's actions
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _mark_paths(sub, kinds)
        elif action.dest in kinds:
            action.complete = kinds[action.dest]  # type: ignore[attr-defined]


_DEBUG_HELP = f"show the traceback of an error (also: {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    """The ``gradwatch`` argument parser, one subparser per module in :data:`COMMANDS`.

    Example:
        >>> build_parser().parse_args(["doctor", "runs/exp1", "--json"]).json
        True
    """
    parser = _Parser(prog="gradwatch", description="Per-layer gradient telemetry, diagnosis and repair for PyTorch.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    parser.add_argument("--print-completion", action=_PrintCompletion, choices=SHELLS, metavar="SHELL",
                        help="print a shell completion script (bash, zsh, tcsh; needs shtab) and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"gradwatch.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"gradwatch.commands.{name}":
                continue  # not built yet
            raise
        sub = module.add_parser(subparsers)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        sub.set_defaults(_run=module.run)
    return parser


def _one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), cut at ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_OS_HINTS = {
    errno.EACCES: "check its permissions, or pass another path",
    errno.EPERM: "check its permissions, or pass another path",
    errno.ENOSPC: "the disk is full",
    errno.EROFS: "the file system is read-only; pass another path",
    errno.EISDIR: "a directory is where a file was expected",
    errno.ENOTDIR: "a file is where a directory was expected",
}


def _os_error_text(exc: OSError) -> str:
    """An OS error as ``strerror: 'path' (hint)``, or its own message when it has no errno (load_run's)."""
    if not exc.strerror:
        return str(exc)
    where = f": {os.fsdecode(exc.filename)!r}" if exc.filename is not None else ""
    hint = _OS_HINTS.get(exc.errno or 0)
    return f"{exc.strerror}{where}" + (f" ({hint})" if hint else "")


def _error_line(exc: BaseException, debug: bool) -> str:
    """The one line printed for an exception that ends a command."""
    if isinstance(exc, UserCodeError):
        text = str(exc) + ("" if debug else " (rerun with --debug to see its traceback)")
    elif isinstance(exc, OSError):
        text = _os_error_text(exc)
    elif isinstance(exc, (UsageError, ValueError, TypeError, ImportError)):
        text = str(exc)
    else:  # not foreseen: name it, and say how to see where it came from
        text = f"unexpected {type(exc).__name__}: {exc}" + ("" if debug else " (rerun with --debug to see the traceback)")
    return f"gradwatch: error: {_one_line(text)}"


def _debug_on(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradwatch`` console script (and ``python -m gradwatch``). Returns the exit code.

    Example:
        >>> main(["doctor", "no/such/run"])  # one line on stderr: not a gradwatch run directory
        2
    """
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args._run(args) or 0)
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
    except Exception as exc:  # bad input, a damaged file, the user's code: one line, exit 2
        debug = _debug_on(args)
        if debug and not isinstance(exc, UsageError):
            shown = exc.__cause__ if isinstance(exc, UserCodeError) and exc.__cause__ is not None else exc
            traceback.print_exception(type(shown), shown, shown.__traceback__, file=sys.stderr)
        print(_error_line(exc, debug), file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
