"""Reading the files of a run directory without trusting them.

A run directory is written by a training process that may be killed, run out
of disk, or be copied, edited and synced by hand afterwards. Whatever is on
disk, reading it never raises: a file that cannot be read (a directory in its
place, no permission, bytes that are not UTF-8, valid JSON of the wrong shape)
is left out with one line in :attr:`ReadLog.problems`, and a bad line of a
``.jsonl`` stream is skipped and counted in :attr:`ReadLog.skipped_lines`,
never costing the rest of the file. :func:`gradwatch.load_run` reads through a
:class:`ReadLog` and hands its notes on to the :class:`~gradwatch.Run`.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: How many bytes of a file are shown, at most, when a problem names them.
_SHOWN = 60
#: Integers beyond int64 are read as floats (inf past float range): a reader converting them to float or int64 fails.
_INT_LIMIT = 2**63


def _int_or_float(text: str) -> int | float:
    """A JSON integer: an int if numpy's int64 holds it, else a float (``inf`` when beyond float range)."""
    value = int(text)
    return value if -_INT_LIMIT <= value < _INT_LIMIT else float(text)


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, except that an integer beyond int64 becomes a float (inf past float range).

    Example:
        >>> parse_json('{"step": 3, "numel": 1' + '0' * 400 + '}')
        {'step': 3, 'numel': inf}
    """
    return _DECODER.decode(text if isinstance(text, str) else text.decode("utf-8"))


_DECODER = json.JSONDecoder(parse_int=_int_or_float)  # made once: json.loads(parse_int=...) makes one per call


def _why(exc: BaseException) -> str:
    """An OS error in a few words (``Permission denied``), anything else as ``Type: message``."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()[0][:_SHOWN] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class ReadLog:
    """What reading one run directory had to leave out, file by file.

    ``problems`` holds one plain line per file-level problem (a file that could
    not be read at all, or not all of it); ``skipped_lines`` counts, per file
    name, the lines of a ``.jsonl`` stream that were skipped (cut off, not
    UTF-8, not JSON, not an object, or fields of the wrong type).

    Example:
        >>> log = ReadLog(Path("runs/exp1"))
        >>> log.skip("steps.jsonl", 3, "not UTF-8"); log.skip("steps.jsonl", 9, "not JSON")
        >>> log.skipped_lines, log.summary()
        ({'steps.jsonl': 2}, ['steps.jsonl: 2 unreadable line(s) skipped (first: line 3, not UTF-8)'])
    """

    root: Path
    problems: list[str] = field(default_factory=list)
    skipped_lines: dict[str, int] = field(default_factory=dict)
    _first_skip: dict[str, str] = field(default_factory=dict, repr=False)

    def note(self, name: str, text: str) -> None:
        """Record one file-level problem: ``name: text``."""
        self.problems.append(f"{name}: {text}")

    def skip(self, name: str, line: int, why: str) -> None:
        """Count one skipped line of ``name`` (1-based ``line``), remembering why the first one was."""
        self.skipped_lines[name] = self.skipped_lines.get(name, 0) + 1
        self._first_skip.setdefault(name, f"line {line}, {why}")

    def summary(self) -> list[str]:
        """Every problem, then one line per file with skipped lines.

        Example:
            >>> log = ReadLog(Path("run")); log.note("meta.json", "holds a JSON array, not an object; read without it")
            >>> log.summary()
            ['meta.json: holds a JSON array, not an object; read without it']
        """
        lines = list(self.problems)
        for name, count in self.skipped_lines.items():
            lines.append(f"{name}: {count} unreadable line(s) skipped (first: {self._first_skip[name]})")
        return lines

    # ----- whole files ---------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of ``root/name``; None (and a problem noted, unless it is simply absent) if unreadable.

        Example:
            >>> ReadLog(Path("no/such/run")).read_bytes("steps.jsonl") is None
            True
        """
        path = self.root / name
        try:
            mode = os.stat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):  # a FIFO would block the read for ever
                self.note(name, "is not a regular file (a pipe, socket or device); read without it")
                return None
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            if path.is_symlink():
                self.note(name, "is a symbolic link to a file that does not exist; read without it")
            return None
        except IsADirectoryError:
            self.note(name, "is a directory, not a file; read without it")
        except OSError as exc:  # no permission, an I/O error, a name that is not a file
            self.note(name, f"cannot be read ({_why(exc)}); read without it")
        return None

    def read_json(self, name: str, kind: type = dict) -> Any | None:
        """``root/name`` parsed as one JSON value of type ``kind``; None (problem noted) when it is not one.

        Example:
            >>> ReadLog(Path("no/such/run")).read_json("meta.json") is None
            True
        """
        data = self.read_bytes(name)
        if data is None:
            return None
        try:
            value = parse_json(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            self.note(name, f"is not UTF-8 text (byte {exc.start}); read without it")
            return None
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            self.note(name, f"is not valid JSON ({_why(exc)}); read without it")
            return None
        if not isinstance(value, kind):
            self.note(name, f"holds a JSON {_json_type(value)}, not an "
                            f"{_KIND_NAMES.get(kind, kind.__name__)}; read without it")
            return None
        return value

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """The JSON objects of ``root/name``, one per line; every other line skipped and counted.

        A line is skipped when it is not UTF-8, not JSON (a kill cut it off), or
        not a JSON object; the lines around it are read as usual.

        Example:
            >>> ReadLog(Path("no/such/run")).read_jsonl("steps.jsonl")
            []
        """
        return [record for _, record in self.numbered_jsonl(name)]

    def numbered_jsonl(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        """:meth:`read_jsonl` with the (1-based) line number of each object, for a caller that checks them further.

        Example:
            >>> ReadLog(Path("no/such/run")).numbered_jsonl("findings.jsonl")
            []
        """
        data = self.read_bytes(name)
        if not data:
            return []
        records = []
        for number, raw in enumerate(data.split(b"\n"), start=1):
            raw = raw.strip()
            if not raw:
                continue
            try:
                value = parse_json(raw.decode("utf-8"))
            except UnicodeDecodeError:
                self.skip(name, number, "not UTF-8")
                continue
            except (ValueError, RecursionError):
                self.skip(name, number, "not JSON (cut off?)")
                continue
            if not isinstance(value, dict):
                self.skip(name, number, f"a JSON {_json_type(value)}, not an object")
                continue
            records.append((number, value))
        return records

    def read_matrix(self, name: str, width: int, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` of the float32 matrix file ``root/name`` (``width`` columns); NaN where a row is missing.

        The file is memory-mapped, so only the rows asked for are read. A
        partial last row (a kill mid-write) is ignored, and steps whose row lies
        past the end of the file get NaN; both are noted.

        Example:
            >>> ReadLog(Path("no/such/run")).read_matrix("grad_norms.f32", 2, np.array([0])).tolist()
            [[nan, nan]]
        """
        out = np.full((len(rows), width), np.nan, dtype=np.float32)
        path = self.root / name
        if width == 0 or not (path.exists() or path.is_symlink()):
            return out
        if not path.exists():
            self.note(name, "is a symbolic link to a file that does not exist; per-layer values read as NaN")
            return out
        try:
            size = os.stat(path).st_size
            if not path.is_file():
                self.note(name, "is not a regular file; per-layer values read as NaN")
                return out
            n_rows = size // (4 * width)  # whole rows only
            if size % (4 * width):
                self.note(name, f"ends in a partial row ({size % (4 * width)} bytes, ignored): "
                                f"its size is not a multiple of {width} layers x 4 bytes")
            if n_rows == 0:
                return out
            whole = np.memmap(path, dtype="<f4", mode="r", shape=(n_rows, width))
            ok = (rows >= 0) & (rows < n_rows)
            out[ok] = whole[rows[ok]]
        except (OSError, ValueError) as exc:  # no permission, mmap refused
            self.note(name, f"cannot be read ({_why(exc)}); per-layer values read as NaN")
            return out
        missing = int(np.count_nonzero(rows >= n_rows))
        if missing:
            self.note(name, f"holds {n_rows} row(s); {missing} step(s) point past its end (their values read as NaN)")
        return out


_KIND_NAMES = {dict: "object", list: "array", str: "string"}


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``array``, ``object``, ``null`` ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return _KIND_NAMES.get(type(value), type(value).__name__)
