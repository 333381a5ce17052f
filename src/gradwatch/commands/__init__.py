"""Subcommands of the ``gradwatch`` CLI: one module each, with ``add_parser`` and ``run``.

The helpers here are shared by the commands that write files or read run directories.
"""

from __future__ import annotations

from pathlib import Path


def check_output_path(output: str | Path, folder: bool = False) -> Path:
    """``output`` as a Path, once it is known that it can be made: no file where a folder must be.

    Args:
        output: the file (or, with ``folder``, the directory) a command is about to write.
        folder: ``output`` is a directory to create or write into. Default: False.

    Raises:
        ValueError: a file is to be written where a directory is, or a folder on the
            path is a regular file (``report -o notes.txt/x.html``).

    Example:
        >>> check_output_path("runs/exp1/report.html").name
        'report.html'
    """
    target = Path(output)
    if folder and target.exists() and not target.is_dir():
        raise ValueError(f"{str(target)!r} is a file, not a folder; pass a folder path")
    if not folder and target.is_dir():
        raise ValueError(f"output {str(target)!r} is a directory; pass a file path such as {str(target / 'report.html')!r}")
    for parent in target.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise ValueError(f"cannot write {str(target)!r}: {str(parent)!r} is a file, not a folder; "
                                 "pass a path inside a folder")
            break  # the nearest folder that exists: the command makes the rest
    return target


def read_problems(*run_dirs: str | Path | None) -> list[str]:
    """What could not be read of each run directory given (``RUN_DIR: problem``), for a command to print.

    Example:
        >>> read_problems(None)
        []
    """
    from ..rundir import load_run

    return [f"{run_dir}: {line}" for run_dir in run_dirs if run_dir is not None for line in load_run(run_dir).problems]
