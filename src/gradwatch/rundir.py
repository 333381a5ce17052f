"""The run directory: plain, append-only files a person can read with standard tools.

Layout (every file is optional except ``meta.json``)::

    RUN_DIR/
      meta.json          written once, atomically: format version, config, model summary
      layers.json        written once, atomically, when the depth order is known
      steps.jsonl        one JSON object per step: scalars (loss, pre-clip norm, clip
                         coefficient, skip flag, loss scale, timings), the step's ``row`` in
                         the matrices below, and sparse per-layer values (update ratios
                         every K steps, the names of non-finite layers)
      grad_norms.f32     per-layer pre-clip gradient norms, one row of n float32
                         (little-endian) per step, n = layers.json's ``matrix_width`` (every
                         layer slot, frozen ones too, in layers.json order):
                         numpy.fromfile(path, "<f4").reshape(-1, n)[row]. A row sits at
                         ``row * n * 4`` whatever happened to earlier writes (a failed
                         write leaves NaN rows, never shifted ones)
      weight_norms.f32   per-layer weight norms (before the update), same layout; measured on the
                         steps that measure the update ratio (the first update_ratio_every, then
                         every update_ratio_every-th), NaN rows on the others
      findings.jsonl     one Finding per line
      activations.jsonl  sampled activation statistics (one object per sampled step)
      signals.jsonl      precursor signals (Adam RMS_t, attention logits, log Z), see gradwatch.precursors
      events.jsonl       other events: rollbacks, LR backoffs, internal errors
      nonfinite/         reproduction bundles: step_000123.pt (torch.load(weights_only=True))

Writes happen on a background thread: the training loop only appends to a list;
every ``flush_every`` steps (and at ``close()`` and interpreter exit) the batch is
encoded and handed to the thread, which hands each file's part to the OS in one
``os.write`` (no buffer of its own, so nothing waits in the process). A
process killed at any instant leaves every flushed line readable; a cut-off last
line is skipped by :func:`load_run`.

Non-finite floats are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``
(strict JSON has no such numbers; ``jq`` and every JSON reader accept strings).
"""

from __future__ import annotations

import atexit
import json
import math
import os
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import runpath
from .errors import GradwatchWarning
from .findings import Finding, _jsonable, json_line
from .runfiles import ReadLog
from .runpath import RunDirTaken

FORMAT_VERSION = 1
STREAMS = ("steps", "findings", "activations", "events", "signals")
MATRICES = ("grad_norms", "weight_norms")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(data), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _encode(item: Any) -> str:
    """One buffered record as its JSONL line: a line, a ``(line_of_row, row)`` pair, or a dict."""
    if isinstance(item, str):
        return item
    if isinstance(item, tuple):
        line_of, row = item
        return line_of(row)
    return json_line(item)


class RunWriter:
    """Append-only writer of one run directory, with a background flushing thread.

    Args:
        path: the run directory (created if missing). Without ``resume`` the
            directory is claimed by creating its ``meta.json`` exclusively, and
            one that already holds a run is refused (:class:`RunDirTaken`), so
            no run is overwritten (:mod:`gradwatch.runpath` picks a free one).
        flush_every: hand buffered lines to the writer thread every this many
            steps. Default: 50.
        resume: continue the run already in ``path`` (a new one if there is
            none): steps go on after its last one, and a step whose number is not
            above the last written supersedes every record from that step on
            (:meth:`supersede_from`). Default: False.

    Rows of the ``.f32`` matrices are addressed by position: the step line's
    ``row`` is the row's index, and the writer thread writes each row at
    ``row * width * 4``, whatever happened to earlier writes. A write that fails
    (disk full) is cut back to whole rows (lines: to what the file held before);
    rows that never reached the disk read as NaN (padding). ``width`` is the
    number of layers when the first row was written (``layers.json``'s
    ``matrix_width``); a row of a layer table that grew later is cut to it.

    Example:
        >>> import tempfile
        >>> w = RunWriter(Path(tempfile.mkdtemp()) / "run", flush_every=1)
        >>> w.write_meta({"model": "MLP"}); w.append("steps", {"step": 1, "loss": 0.5}); w.close()
        >>> load_run(w.path).steps["loss"].tolist()
        [0.5]
    """

    def __init__(self, path: str | os.PathLike[str], flush_every: int = 50, resume: bool = False) -> None:
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be a positive int, got {flush_every!r}")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run_dir {str(self.path)!r} exists and is not a directory; pass a directory path")
        self.path.mkdir(parents=True, exist_ok=True)
        self.resumed = resume
        #: number of the last step on disk or buffered (0: none); a step not above it supersedes the records from it on
        self.last_step = 0
        self.rows_written = 0
        self._width: int | None = None
        if resume:
            self.last_step, self.rows_written, self._width = _trim_and_scan(self.path)
        else:
            _claim(self.path)
        self.flush_every = flush_every
        self._buffers: dict[str, list[Any]] = {name: [] for name in STREAMS}
        self._rows: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in MATRICES}
        self._pending_steps = 0
        self._queue: "queue.SimpleQueue[tuple[str, Any] | None]" = queue.SimpleQueue()
        self._fds: dict[str, int] = {}  # file name -> descriptor (writer thread)
        self._error: BaseException | None = None
        self._closed = False
        self._taken_over = False
        self._thread = threading.Thread(target=self._run, name="gradwatch-writer", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda w: w.close() if w is not None else None)(ref())
        atexit.register(self._atexit)
        runpath.register(self)

    # ----- loop side -------------------------------------------------------------------
    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``meta.json`` (atomic; format version added)."""
        if not self._closed:
            _write_json_atomic(self.path / "meta.json", {"format_version": FORMAT_VERSION, **meta})

    def write_layers(self, layers: list[dict[str, Any]]) -> None:
        """Write ``layers.json`` (atomic) with the matrices' row width (fixed when first written)."""
        if self._width is None:
            self._width = len(layers)
        self._put(("json", ("layers.json", {"layers": layers, "matrix_width": self._width})))

    def append(self, stream: str, record: dict[str, Any] | str | tuple[Callable[[int], str], int]) -> None:
        """Buffer one record for ``stream`` (encoded at the next flush); steps count towards ``flush_every``.

        The buffer is flushed when the step *after* ``flush_every`` buffered ones
        arrives: a step's line is encoded one step later at the soonest, so what
        is measured after the step returns (``observe()``'s update ratio, taken
        when the caller's optimizer has stepped) is still in it.
        """
        if self._closed:
            self._dropped()
            return
        if stream == "steps":
            if self._pending_steps >= self.flush_every:
                self.flush()
            self._pending_steps += 1
        self._buffers[stream].append(record)

    def append_step(self, record: dict[str, Any] | Callable[[int], str], matrices: dict[str, np.ndarray],
                    step: int | None = None) -> None:
        """Buffer one step: its JSON line (given its ``row``) and one float32 row per matrix.

        ``record`` is the step's dict, or a function of the row index that returns
        the encoded line (``StepRecord.to_json_line``), called at the next flush:
        a step costs two list appends, and the lines of ``flush_every`` steps
        are encoded in one pass. ``step`` (or the dict's ``"step"``) not above
        the last one written supersedes the records from it on.
        """
        if self._closed:
            self._dropped()
            return
        if step is None and isinstance(record, dict):
            step = record.get("step")
        if step is not None:
            if step <= self.last_step:
                warnings.warn(
                    f"gradwatch: step {step} is not after step {self.last_step}, the last one in {str(self.path)!r}: "
                    f"the records from step {step} on are replaced. To continue a run after a checkpoint, build the "
                    "Watch with run_dir_mode='resume' and call watch.load_state_dict(saved_state) before training",
                    GradwatchWarning, stacklevel=4)
                self.supersede_from(step)
            self.last_step = step
        row = self.rows_written
        if callable(record):
            line: Any = (record, row)
        else:
            line = dict(record)
            line["row"] = row
        self.rows_written += 1
        for name in MATRICES:
            values = matrices.get(name)
            if values is not None:
                self._rows[name].append((row, values))
        self.append("steps", line)

    def append_finding(self, finding: Finding) -> None:
        self.append("findings", finding.to_dict())

    def supersede_from(self, step: int) -> None:
        """Drop every record of step ``step`` and after (steps, matrix rows, findings, events, bundles); blocks.

        After a checkpoint restore (``Watch.load_state_dict``) the steps that the
        interrupted run recorded after the checkpoint are dropped, so the resumed
        run's records follow the checkpoint's and the directory ends as an
        uninterrupted run's.

        Example:
            >>> import tempfile
            >>> w = RunWriter(Path(tempfile.mkdtemp()) / "run", flush_every=1)
            >>> for s in (1, 2, 3): w.append_step({"step": s, "loss": float(s)}, {})
            >>> w.supersede_from(2); w.append_step({"step": 2, "loss": 20.0}, {}); w.close()
            >>> load_run(w.path).steps["loss"].tolist()
            [1.0, 20.0]
        """
        if self._closed:
            return
        self.flush()
        done = threading.Event()
        result: list[tuple[int, int]] = []
        self._put(("cut", (int(step), result, done)))
        done.wait(timeout=60)
        if result:
            self.last_step, self.rows_written, _ = result[0]

    def save_bundle(self, name: str, payload: dict[str, Any]) -> Path:
        """Save a reproduction bundle under ``nonfinite/`` synchronously (it is rare and must not be lost)."""
        import torch

        folder = self.path / "nonfinite"
        folder.mkdir(exist_ok=True)
        target = folder / name
        tmp = target.with_name(target.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, target)
        return target

    def flush(self, wait: bool = False) -> None:
        """Hand buffered lines to the writer thread; with ``wait``, block until written."""
        # Encoded here, on the loop's thread, in one pass: the writer thread then only writes
        # (encoding there would hold the GIL that the training loop waits for just the same).
        # One hand-over at the end: the writer thread wakes once, after the encoding (a thread woken
        # earlier would take the GIL from this one in the middle of it).
        batch: list[tuple[str, Any]] = []
        for name, rows in self._rows.items():  # matrices first: a step line never precedes its row
            if rows:
                if self._width is None:
                    self._width = len(rows[0][1])
                for first, data in _f32_segments(rows, self._width):
                    batch.append(("rows", (name, first, self._width, data)))
                self._rows[name] = []
        for stream, items in self._buffers.items():
            if items:
                batch.append(("text", (stream, "".join(_encode(item) for item in items).encode("utf-8"))))
                self._buffers[stream] = []
        if batch:
            self._put(("batch", batch))
        self._pending_steps = 0
        if wait:
            done = threading.Event()
            self._put(("event", done))
            done.wait(timeout=30)

    def close(self) -> None:
        """Flush everything, stop the thread, close the files. Idempotent."""
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        try:
            atexit.unregister(self._atexit)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    def take_over(self) -> None:
        """Another Watch resumes or overwrites this directory: write what is buffered, then write nothing more."""
        self.close()
        self._taken_over = True

    def _dropped(self) -> None:
        if self._taken_over:
            self._taken_over = False  # warn once
            warnings.warn(f"gradwatch: {str(self.path)!r} was taken over by a newer Watch (run_dir_mode='resume' "
                          "or 'overwrite'); this Watch no longer writes it. Close a Watch before reusing its "
                          "run_dir", GradwatchWarning, stacklevel=4)

    def _put(self, item: tuple[str, Any]) -> None:
        if not self._closed:
            self._queue.put(item)

    # ----- writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            for kind, payload in item[1] if item[0] == "batch" else [item]:
                self._handle(kind, payload)
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:  # pragma: no cover
                pass
        self._fds = {}

    def _fd(self, name: str, target: Path, append: bool) -> int:
        fd = self._fds.get(name)
        if fd is None:
            flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0) | (os.O_APPEND if append else 0)
            fd = self._fds[name] = os.open(target, flags, 0o644)
        return fd

    def _handle(self, kind: str, payload: Any) -> None:
        """Carry out one queued item on the writer thread.

        Lines and rows arrive encoded; each file gets one ``os.write`` (the
        interpreter lock is released for the system call, so the training loop
        waits for this thread as little as possible).
        """
        try:
            if kind == "text":
                name, data = payload
                fd = self._fd(name, self.path / f"{name}.jsonl", append=True)
                before = os.fstat(fd).st_size
                try:
                    _write_all(fd, data)
                except BaseException:
                    os.ftruncate(fd, before)  # whole lines or none: a cut-off line would swallow the next one
                    raise
            elif kind == "rows":
                name, first, width, data = payload
                _write_rows(self._fd(name, self.path / f"{name}.f32", append=False), first, width, data)
            elif kind == "json":
                name, data = payload
                _write_json_atomic(self.path / name, data)
            elif kind == "cut":
                step, result, done = payload
                try:
                    self._close_fds()
                    result.append(_cut(self.path, step, self._width))
                finally:
                    done.set()
            elif kind == "event":
                payload.set()
        except BaseException as exc:  # keep the thread alive; the Watch reports it
            self._error = exc

    @property
    def error(self) -> BaseException | None:
        """The last error the writer thread met (None if none)."""
        return self._error

    def take_error(self) -> BaseException | None:
        """The last error the writer thread met, cleared (so that it is reported once)."""
        error, self._error = self._error, None
        return error


# ----- the writer's file operations (writer thread, or before it starts) ------------------
def _claim(path: Path) -> None:
    """Claim ``path`` for a new run by creating its ``meta.json`` exclusively (RunDirTaken if it holds a run)."""
    taken = (path / "steps.jsonl").exists()
    if not taken:
        try:
            fd = os.open(path / "meta.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            taken = True
        else:  # valid JSON from the first byte on; write_meta replaces it atomically
            try:
                _write_all(fd, json.dumps({"format_version": FORMAT_VERSION}).encode("utf-8"))
            finally:
                os.close(fd)
    if taken:
        raise RunDirTaken(
            f"run_dir {str(path)!r} already holds a run (meta.json exists). gradwatch.Watch(run_dir=..., "
            "run_dir_mode='version') (the default) writes the next free RUN_DIR/version_N, "
            "run_dir_mode='resume' continues that run after a checkpoint restore, 'overwrite' replaces it")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a regular file takes it all at once; a short write is carried on
        view = view[os.write(fd, view):]


def _write_rows(fd: int, first: int, width: int, data: bytes) -> None:
    """Write rows ``first, first + 1, ...`` at their positions; whole rows or none survive a failure."""
    row_bytes = 4 * width
    if row_bytes == 0:
        return
    size = os.fstat(fd).st_size
    have = size // row_bytes
    if size != have * row_bytes or have > first:  # a cut-off row, or rows of superseded steps
        have = min(have, first)
        os.ftruncate(fd, have * row_bytes)
    try:
        os.lseek(fd, have * row_bytes, os.SEEK_SET)
        if have < first:  # rows whose write failed earlier: NaN, so that no row shifts
            _write_all(fd, np.full((first - have, width), np.nan, dtype="<f4").tobytes())
        _write_all(fd, data)
    except BaseException:
        os.ftruncate(fd, os.fstat(fd).st_size // row_bytes * row_bytes)
        raise


def _f32_segments(rows: list[tuple[int, np.ndarray]], width: int) -> list[tuple[int, bytes]]:
    """Buffered ``(row, values)`` as runs of consecutive rows: ``(first row, little-endian float32 bytes)``.

    Each row is cut or NaN-padded to ``width`` (one conversion when all rows have it).
    """
    segments: list[tuple[int, list[np.ndarray]]] = []
    for row, values in rows:
        if segments and segments[-1][0] + len(segments[-1][1]) == row:
            segments[-1][1].append(values)
        else:
            segments.append((row, [values]))
    out = []
    for first, values in segments:
        if all(len(v) == width for v in values):
            block = np.asarray(values, dtype="<f4")
        else:
            block = np.full((len(values), width), np.nan, dtype="<f4")
            for i, v in enumerate(values):
                block[i, : min(width, len(v))] = np.asarray(v, dtype="<f4")[:width]
        out.append((first, block.tobytes()))
    return out


def _line_step(line: bytes) -> tuple[bool, int | None, int | None]:
    """(whether the line is a record, its ``step``, its ``row``) for one line of a ``.jsonl`` file."""
    try:
        data = json.loads(line)
    except ValueError:  # also a line that is not UTF-8
        return False, None, None
    if not isinstance(data, dict):
        return True, None, None
    step, row = data.get("step"), data.get("row")
    return (True, step if isinstance(step, int) and not isinstance(step, bool) else None,
            row if isinstance(row, int) and not isinstance(row, bool) else None)


def _matrix_width(path: Path) -> int | None:
    try:
        data = json.loads((path / "layers.json").read_text(encoding="utf-8"))
        return int(data.get("matrix_width", len(data["layers"])))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _trim_and_scan(path: Path) -> tuple[int, int, int | None]:
    """A resumed directory: cut lines cut off mid-write; (last step, next row, matrix width)."""
    return _cut(path, None, _matrix_width(path))


def _cut(path: Path, before: int | None, width: int | None) -> tuple[int, int, int | None]:
    """Keep the records of steps before ``before`` (None: all); drop cut-off lines; the matrices to match.

    Returns (the last kept step, the next free row, the matrix width); files are rewritten atomically.
    """
    last_step, next_row = 0, 0
    for stream in STREAMS:
        target = path / f"{stream}.jsonl"
        if not target.is_file():
            continue
        data = target.read_bytes()
        kept, changed = [], not data.endswith(b"\n") and bool(data)
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            ok, step, row = _line_step(line)
            if not ok or (before is not None and step is not None and step >= before):
                changed = True
                continue
            kept.append(line)
            if stream == "steps":
                last_step = max(last_step, step or 0)
                next_row = max(next_row, (row + 1) if row is not None else 0)
        if changed:
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(b"".join(line + b"\n" for line in kept))
            os.replace(tmp, target)
    width = width if width is not None else _matrix_width(path)
    for name in MATRICES:
        target = path / f"{name}.f32"
        if target.is_file() and width:
            size = target.stat().st_size
            if size > next_row * 4 * width or size % (4 * width):
                os.truncate(target, min(size // (4 * width), next_row) * 4 * width)
    folder = path / "nonfinite"
    if before is not None and folder.is_dir():
        for bundle in folder.glob("step_*.pt"):
            digits = bundle.stem[len("step_"):]
            if digits.isdigit() and int(digits) >= before:
                bundle.unlink()
    return last_step, next_row, width


# ----- reading ----------------------------------------------------------------------------
def _read_jsonl(path: Path, log: ReadLog | None = None) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; a cut-off, non-UTF-8 or non-object line is skipped (and counted in ``log``)."""
    log = log if log is not None else ReadLog(path.parent)
    return log.read_jsonl(path.name)


def _to_float(value: Any) -> float:
    """A number as written on disk (also the strings 'nan', 'inf', '-inf'; None is NaN); ValueError for anything else.

    (``runfiles.parse_json`` has read an integer beyond float range as inf already.)
    """
    if value is None:
        return math.nan
    if isinstance(value, (bool, int, float, str)):
        return float(value)  # ValueError for a string that is not a number
    raise ValueError(f"not a number: a {type(value).__name__}")


def _to_int(value: Any) -> int:
    """A step or row number: an int, or a float with an integer value; ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not an integer: {str(value)[:20]!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"not an integer: {value!r}")
    if not -(2**62) < value < 2**62:  # a numpy int64 column holds it
        raise ValueError(f"out of range: {str(value)[:20]}")
    return int(value)


def _clean_step(record: dict[str, Any]) -> dict[str, Any]:
    """A ``steps.jsonl`` record with its known fields checked and converted, in place; ValueError names a bad one."""
    if "step" not in record:
        raise ValueError("no step number")
    # The fast paths first (exact type checks, float()): a long run has a record per step.
    step, row = record["step"], record.get("row", -1)
    if type(step) is not int or not -(2**62) < step < 2**62:  # noqa: E721 (a bool is not a step)
        record["step"] = _to_int(step)
    record["row"] = row if type(row) is int else -1 if row is None else _to_int(row)  # noqa: E721
    for key in _FLOAT_COLUMNS:
        value = record.get(key)
        if value is None:
            record[key] = math.nan
            continue
        try:
            record[key] = float(value)  # also 'nan', 'inf', '-inf'
        except (TypeError, ValueError):  # a list, a dict, 'abc'
            raise ValueError(f"{key} is {str(value)[:20]!r}, not a number") from None
    for key in SPARSE_LAYER_COLUMNS:
        values = record.get(key)
        if values is None:
            continue
        if not isinstance(values, list):
            raise ValueError(f"{key} is a {type(values).__name__}, not a list")
        try:
            record[key] = [float(v) for v in values]
        except (TypeError, ValueError):  # a None (NaN), or a value that is not a number (ValueError again)
            record[key] = [_to_float(v) for v in values]
    return record


def _array(records: list[dict[str, Any]], key: str, width: int | None = None) -> np.ndarray:
    """One column of cleaned step records: 1-D, or 2-D (steps x ``width``) for a per-layer list (NaN where absent)."""
    if width is None:
        return np.array([record[key] for record in records], dtype=np.float64).reshape(len(records))
    out = np.full((len(records), width), np.nan, dtype=np.float64)
    for i, record in enumerate(records):
        values = record.get(key)
        if values:
            values = values[:width]
            out[i, : len(values)] = values
    return out


def _read_steps(log: ReadLog) -> list[dict[str, Any]]:
    """The records of ``steps.jsonl``, cleaned, one per step number (the last one written wins), by step."""
    by_step: dict[int, dict[str, Any]] = {}
    repeated = 0
    for number, record in log.numbered_jsonl("steps.jsonl"):
        try:
            clean = _clean_step(record)
        except ValueError as exc:
            log.skip("steps.jsonl", number, str(exc))
            continue
        repeated += clean["step"] in by_step
        by_step[clean["step"]] = clean
    if repeated:
        log.note("steps.jsonl", f"{repeated} record(s) repeat an earlier step number; the last of each is kept")
    return [by_step[step] for step in sorted(by_step)]


def _read_layers(log: ReadLog, records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int | None]:
    """The layer table of ``layers.json``, every entry a dict with a string name, and the matrix row width.

    The width is ``matrix_width`` (every layer slot, frozen ones too), or None
    for a run written before it existed (rows of the measured layers only).

    Without a readable table, the layers are named by position (``layer 0`` ...)
    as many as the widest per-layer list in the step records, so that the
    per-layer columns can still be read.
    """
    data = log.read_json("layers.json")
    table = data.get("layers") if data is not None else None
    if data is not None and not isinstance(table, list):
        log.note("layers.json", "has no list under 'layers'; layers named by position")
    if not isinstance(table, list):
        width = max((len(r.get(key) or ()) for r in records for key in SPARSE_LAYER_COLUMNS), default=0)
        return [{"name": f"layer {i}"} for i in range(width)], None
    layers = []
    for i, entry in enumerate(table):
        if not isinstance(entry, dict):
            log.note("layers.json", f"entry {i} is not an object; named 'layer {i}'")
            entry = {"name": f"layer {i}"}
        elif not isinstance(entry.get("name"), str):
            log.note("layers.json", f"entry {i} has no string name; named 'layer {i}'")
            entry = {**entry, "name": f"layer {i}"}
        bad = [key for key in _LAYER_COUNTS if key in entry and not _is_count(entry[key])]
        if bad:
            log.note("layers.json", f"entry {i} ({entry['name']}): {', '.join(bad)} not a count; left out")
            entry = {k: v for k, v in entry.items() if k not in bad}
        layers.append(entry)
    row_width = data.get("matrix_width")
    if row_width is not None and not _is_count(row_width):
        log.note("layers.json", "matrix_width is not a count; rows read as the measured layers")
        row_width = None
    return layers, row_width


_LAYER_COUNTS = ("depth", "numel", "trainable_numel")


def _is_count(value: Any) -> bool:
    """A non-negative int that numpy's int64 holds (what a layer's depth or parameter count must be)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def _read_stream(log: ReadLog, name: str) -> list[dict[str, Any]]:
    """The objects of ``activations.jsonl``, ``events.jsonl`` or ``signals.jsonl``; a line whose ``step`` is not a step number is skipped."""
    records = []
    for number, record in log.numbered_jsonl(name):
        if "step" in record:
            try:
                record["step"] = _to_int(record["step"])
            except ValueError as exc:
                log.skip(name, number, f"step {exc}")
                continue
        records.append(record)
    return records


@dataclass
class Run:
    """A run directory read back: layer table, per-step numpy arrays, findings.

    ``steps`` maps a column to an array over steps: scalars are 1-D
    (``step``, ``loss``, ``grad_norm``, ``clip_coef``, ``clip_threshold`` (the
    max norm that applied on the step; NaN when not clipping), ``clipped``,
    ``skipped``, ``loss_scale``, ``time_ms``); per-layer columns are 2-D (steps x layers, in
    ``layer_names`` order): ``layer_grad_norms``, ``layer_weight_norms``,
    ``update_ratio`` (NaN on steps where it was not measured).

    Reading never gives up on a damaged directory: ``problems`` has one line per
    file that could not be read, or not all of it, and ``skipped_lines`` counts
    the skipped lines of each ``.jsonl`` file (cut off, not UTF-8, not JSON,
    fields of the wrong type); ``gradwatch doctor`` prints both.
    """

    path: Path
    meta: dict[str, Any]
    layers: list[dict[str, Any]]
    layer_names: list[str]
    steps: dict[str, np.ndarray]
    findings: list[Finding]
    activations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    signals: list[dict[str, Any]] = field(default_factory=list)
    step_extras: dict[int, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    skipped_lines: dict[str, int] = field(default_factory=dict)

    @property
    def bundles(self) -> list[Path]:
        """Paths of the reproduction bundles of non-finite steps (regular files only: a pipe would block a reader)."""
        folder = self.path / "nonfinite"
        return sorted(p for p in folder.glob("*.pt") if p.is_file()) if folder.is_dir() else []

    def layer_rms(self) -> np.ndarray:
        """Per-layer gradient RMS (norm / sqrt(numel)), steps x layers."""
        numel = {layer["name"]: layer.get("trainable_numel") or layer.get("numel") or 1 for layer in self.layers}
        scale = np.array([math.sqrt(max(1, numel.get(name, 1))) for name in self.layer_names])
        return self.steps["layer_grad_norms"] / scale

    def to_pandas(self) -> Any:
        """The per-step and the per-layer history as tidy pandas frames (``.steps``, ``.layers``).

        Returns:
            a :class:`gradwatch.notebook.RunFrames`: ``steps`` has one row per step,
            ``layers`` one row per (step, layer) (long format: ``step``, ``layer``,
            ``depth``, ``type``, ``grad_norm``, ``grad_rms``, ``weight_norm``, ``update_ratio``).

        Raises:
            ImportError: pandas is not installed (``pip install pandas``).

        Example:
            >>> frames = load_run("runs/exp1").to_pandas()  # doctest: +SKIP
            >>> frames.layers.groupby("layer", observed=True)["grad_norm"].median()  # doctest: +SKIP
        """
        from .notebook import run_frames

        return run_frames(self)

    def __repr__(self) -> str:
        """One line: path, steps, layers, precision and the findings' codes."""
        from .notebook import run_repr

        return run_repr(self)

    def _repr_html_(self) -> str:
        """The run in a notebook: summary, findings and the report's two key charts (PNG)."""
        from .notebook import run_html

        return run_html(self)


SCALAR_COLUMNS = ("step", "loss", "grad_norm", "clip_coef", "clip_threshold", "loss_scale", "time_ms")
_FLOAT_COLUMNS = SCALAR_COLUMNS[1:]
FLAG_COLUMNS = ("clipped", "skipped")
SPARSE_LAYER_COLUMNS = ("update_ratio",)
_KNOWN_KEYS = set(SCALAR_COLUMNS) | set(FLAG_COLUMNS) | set(SPARSE_LAYER_COLUMNS) | {"row"}


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by a Watch (also one cut off by a kill).

    Args:
        path: the run directory.

    Returns:
        a :class:`Run` with the layer table, per-step numpy arrays and findings.

    Raises:
        FileNotFoundError: ``path`` is not a run directory (no ``meta.json`` nor ``steps.jsonl``).

    Example:
        >>> run = load_run("runs/exp1")  # doctest: +SKIP
        >>> run.steps["layer_grad_norms"].shape  # doctest: +SKIP
        (1000, 12)
    """
    root = Path(path)
    if not root.is_dir() or not any(os.path.lexists(root / name) for name in ("meta.json", "steps.jsonl")):
        raise FileNotFoundError(
            f"{str(root)!r} is not a gradwatch run directory (no meta.json or steps.jsonl); "
            "pass the run_dir given to gradwatch.Watch"
        )
    log = ReadLog(root)
    if not os.path.lexists(root / "meta.json"):
        log.note("meta.json", "missing (it is written first); read without it")
    meta = log.read_json("meta.json") or {}
    records = _read_steps(log)
    layers, row_width = _read_layers(log, records)
    layer_names = [layer["name"] for layer in layers if layer.get("measured", True)]
    width = len(layer_names)
    steps: dict[str, np.ndarray] = {key: _array(records, key) for key in _FLOAT_COLUMNS}
    steps["step"] = np.array([r["step"] for r in records], dtype=np.int64)
    # a matrix row holds every layer slot (frozen ones too), the first ``matrix_width`` of them;
    # a run written before matrix_width existed has rows of the measured layers only
    if row_width is None:
        row_width, columns = width, np.arange(width, dtype=np.int64)
    else:
        columns = np.array([i for i, layer in enumerate(layers) if layer.get("measured", True)], dtype=np.int64)
    for key in FLAG_COLUMNS:
        steps[key] = np.array([bool(r.get(key)) for r in records], dtype=bool)
    for key in SPARSE_LAYER_COLUMNS:
        steps[key] = _array(records, key, width)
    rows = np.array([r["row"] for r in records], dtype=np.int64)
    inside = columns < row_width  # slots of layers added after the first row have no column
    for key, name in (("layer_grad_norms", "grad_norms.f32"), ("layer_weight_norms", "weight_norms.f32")):
        full = log.read_matrix(name, row_width, rows)
        steps[key] = np.full((len(rows), width), np.nan, dtype=np.float32)
        steps[key][:, inside] = full[:, columns[inside]]
    extras = {}
    for record in records:
        extra = {k: v for k, v in record.items() if k not in _KNOWN_KEYS}
        if extra:
            extras[record["step"]] = extra
    findings = []
    for number, data in log.numbered_jsonl("findings.jsonl"):
        try:
            findings.append(Finding.from_dict(data))
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            log.skip("findings.jsonl", number, f"not a finding ({type(exc).__name__})")
    activations = _read_stream(log, "activations.jsonl")
    events = _read_stream(log, "events.jsonl")
    signals = _read_stream(log, "signals.jsonl")
    return Run(
        path=root,
        meta=meta,
        layers=layers,
        layer_names=layer_names,
        steps=steps,
        findings=findings,
        activations=activations,
        events=events,
        signals=signals,
        step_extras=extras,
        problems=log.summary(),
        skipped_lines=dict(log.skipped_lines),
    )
