"""Which directory a run writes: a new version, the same run resumed, or the old one replaced.

``Watch(run_dir="runs/exp", run_dir_mode=...)``:

- ``"version"`` (default): a new run. ``runs/exp`` itself when it holds no run
  yet, else the next free ``runs/exp/version_N`` (N = 1, 2, ...; ``runs/exp``
  itself is version 0). Two runs' files never share a directory; re-running a
  notebook cell gets a new version while the previous, perhaps un-closed, Watch
  keeps writing its own.
- ``"resume"``: continue the latest run under ``runs/exp`` (its highest
  ``version_N``, else ``runs/exp`` itself; a new run if there is none), or,
  once ``watch.load_state_dict(checkpoint_state)`` is called, the run the state
  names (``state["run_dir"]``: ``runs/exp`` or one of its versions). Every
  record after the checkpoint's step is then dropped, so the directory ends as
  an uninterrupted run's.
- ``"overwrite"``: a new run in ``runs/exp`` itself; the gradwatch files of the
  run there are removed first (``version_N`` folders and other files stay).

A directory is claimed by creating its ``meta.json`` exclusively
(``O_CREAT | O_EXCL``), so two Watches, in one process or two, never pick the
same one. A Watch of this process still writing the directory that a resume or
an overwrite takes is closed first (its buffered lines are written; what it
records later is dropped, with one warning).

``versions("runs/exp")`` lists the runs under a directory, oldest first;
``latest("runs/exp")`` is the newest (what ``gradwatch report runs/exp`` means
when ``runs/exp`` holds several).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .rundir import RunWriter

RUN_DIR_MODES = ("version", "resume", "overwrite")
VERSION_PREFIX = "version_"
#: the files and folders of one run (what ``"overwrite"`` removes)
RUN_FILES = ("meta.json", "layers.json", "steps.jsonl", "grad_norms.f32", "weight_norms.f32", "findings.jsonl",
             "activations.jsonl", "events.jsonl", "signals.jsonl", "report.html", "compare.html", "nonfinite")
_VERSION = re.compile(rf"^{VERSION_PREFIX}(\d+)$")

# run directory (resolved) -> the writer of this process that has it open
_LIVE: "weakref.WeakValueDictionary[str, RunWriter]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


class RunDirTaken(ValueError):
    """The directory already holds a run (its ``meta.json`` exists)."""


def check_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`RUN_DIR_MODES`, else a ValueError naming them.

    Example:
        >>> check_mode("resume")
        'resume'
    """
    if mode not in RUN_DIR_MODES:
        raise ValueError(f"run_dir_mode must be one of {RUN_DIR_MODES}, got {mode!r}: 'version' starts a new "
                         "run (RUN_DIR/version_N when RUN_DIR is taken), 'resume' continues the latest run there "
                         "after a checkpoint restore, 'overwrite' replaces it")
    return mode  # type: ignore[return-value]


def holds_run(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a run's files (``meta.json`` or ``steps.jsonl``).

    Example:
        >>> import tempfile; holds_run(tempfile.mkdtemp())
        False
    """
    root = Path(path)
    return (root / "meta.json").exists() or (root / "steps.jsonl").exists()


def _numbered(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _VERSION.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def versions(path: str | os.PathLike[str]) -> list[Path]:
    """The runs under ``path``, oldest first: ``path`` itself (version 0) when it holds one, then ``version_N``.

    Example:
        >>> import tempfile; versions(tempfile.mkdtemp())
        []
    """
    root = Path(path)
    runs = [root] if holds_run(root) else []
    return runs + [child for _, child in _numbered(root) if holds_run(child)]


def latest(path: str | os.PathLike[str]) -> Path | None:
    """The newest run under ``path`` (its highest ``version_N``, else ``path``), None when there is none.

    Example:
        >>> import tempfile; latest(tempfile.mkdtemp()) is None
        True
    """
    found = versions(path)
    return found[-1] if found else None


def next_version(path: str | os.PathLike[str]) -> Path:
    """``path/version_N`` with N one above every version there (1 when there is none).

    Example:
        >>> import tempfile; next_version(tempfile.mkdtemp()).name
        'version_1'
    """
    numbered = _numbered(Path(path))
    return Path(path) / f"{VERSION_PREFIX}{max([n for n, _ in numbered], default=0) + 1}"


def register(writer: "RunWriter") -> None:
    """Note that ``writer`` has its directory open (a later resume or overwrite of it closes it first).

    Every :class:`~gradwatch.rundir.RunWriter` registers itself when made.

    Example:
        >>> import tempfile
        >>> from gradwatch.rundir import RunWriter
        >>> w = RunWriter(tempfile.mkdtemp())  # registered by RunWriter itself
        >>> _LIVE[str(w.path.resolve())] is w
        True
        >>> w.close()
    """
    with _LOCK:
        _LIVE[str(writer.path.resolve())] = writer


def release(path: Path) -> None:
    """Close this process's live writer of ``path`` (if any), marking it taken over: it writes no more.

    Example:
        >>> import tempfile
        >>> from gradwatch.rundir import RunWriter
        >>> w = RunWriter(tempfile.mkdtemp()); release(w.path)
        >>> str(w.path.resolve()) in _LIVE
        False
    """
    with _LOCK:
        writer = _LIVE.pop(str(path.resolve()), None)
    if writer is not None:
        writer.take_over()


def clear(path: Path) -> None:
    """Remove the files of the run in ``path`` (``"overwrite"``); ``version_N`` folders and other files stay.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()); (root / "meta.json").write_text("{}"); (root / "notes.txt").write_text("x")
        2
        1
        >>> clear(root); sorted(p.name for p in root.iterdir())
        ['notes.txt']
    """
    release(path)
    for name in RUN_FILES:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def open_exact(path: Path, flush_every: int) -> "RunWriter":
    """A writer that resumes the run in ``path`` itself (this process's live writer of it is closed first).

    Example:
        >>> import tempfile
        >>> w = open_exact(Path(tempfile.mkdtemp()), 50); w.resumed
        True
        >>> w.close()
    """
    from .rundir import RunWriter

    release(path)
    return RunWriter(path, flush_every=flush_every, resume=True)


def open_writer(path: str | os.PathLike[str], mode: str, flush_every: int) -> "RunWriter":
    """The writer of a run in ``path`` under ``mode`` (see the module docstring); its ``path`` is the directory used.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp()) / "exp"
        >>> first, second = open_writer(root, "version", 50), open_writer(root, "version", 50)
        >>> first.path.name, second.path.name
        ('exp', 'version_1')
        >>> first.close(); second.close()
    """
    from .rundir import RunWriter

    root = Path(path)
    if root.exists() and not root.is_dir():
        raise ValueError(f"run_dir {str(root)!r} exists and is not a directory; pass a directory path")
    if mode == "resume":
        return open_exact(latest(root) or root, flush_every)
    if mode == "overwrite":
        clear(root)
        return RunWriter(root, flush_every=flush_every)
    try:
        return RunWriter(root, flush_every=flush_every)
    except RunDirTaken:
        pass
    for _ in range(10_000):  # a version claimed by another Watch meanwhile: the next one
        try:
            return RunWriter(next_version(root), flush_every=flush_every)
        except RunDirTaken:
            continue
    raise RuntimeError(f"no free version_N under {str(root)!r}")  # pragma: no cover


def resume_dir(run_dir: str | os.PathLike[str], state: dict) -> Path | None:
    """The run a restored Watch ``state`` names (``state["run_dir"]``) when that is ``run_dir`` or one of its
    versions; None otherwise (the latest run under ``run_dir`` is then resumed).

    Example:
        >>> resume_dir("runs/exp", {"step": 8, "run_dir": "runs/exp/version_2"}).as_posix()
        'runs/exp/version_2'
        >>> resume_dir("runs/other", {"step": 8, "run_dir": "runs/exp"}) is None
        True
    """
    root, saved = Path(run_dir), state.get("run_dir") if isinstance(state, dict) else None
    if isinstance(saved, str) and (Path(saved) == root or (Path(saved).parent == root
                                                            and _VERSION.match(Path(saved).name))):
        return Path(saved)
    return None


def for_reading(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """The run a reader opens for ``path`` and a one-line note when ``path`` holds other runs too.

    ``path`` itself when it holds a run (a note lists its later versions); else
    its latest ``version_N``, with a note; else ``path`` unchanged (the reader's
    own error says it is not a run directory).

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for_reading(root) == (root, None)
        True
    """
    root = Path(path)
    found = versions(root)
    later = [p for p in found if p != root]
    if not later:
        return root, None
    names = ", ".join(p.name for p in later)
    if holds_run(root):
        return root, (f"note: {str(root)!r} holds {len(later)} later run(s) too ({names}); "
                      f"this is the first: pass {str(later[-1])!r} for the latest")
    return later[-1], f"note: {str(root)!r} holds runs {names}; reading the latest, {str(later[-1])!r}"
