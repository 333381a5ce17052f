"""The run directory: plain, append-only files a person can read with standard tools.

Layout (every file is optional except ``meta.json``)::

    RUN_DIR/
      meta.json          written once, atomically: format version, config, model summary
      layers.json        written once, atomically, when the depth order is known
      steps.jsonl        one JSON object per step: scalars (loss, pre-clip norm, clip
                         coefficient, skip flag, loss scale, timings), the step's row in
                         the matrices below, and sparse per-layer values (update ratios
                         every K steps, the names of non-finite layers)
      grad_norms.f32     per-layer pre-clip gradient norms, one row of n_layers float32
                         (little-endian) per step: numpy.fromfile(path, "<f4").reshape(-1, n)
      weight_norms.f32   per-layer weight norms, same layout
      findings.jsonl     one Finding per line
      activations.jsonl  sampled activation statistics (one object per sampled step)
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
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .findings import Finding, _jsonable, json_line

FORMAT_VERSION = 1
STREAMS = ("steps", "findings", "activations", "events")
MATRICES = ("grad_norms", "weight_norms")


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(data), handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _f32_rows(rows: list[np.ndarray]) -> bytes:
    """Rows of one matrix as little-endian float32 bytes (one conversion for equal-length rows)."""
    try:
        return np.asarray(rows, dtype="<f4").tobytes()
    except ValueError:  # rows of different lengths (the layer table changed): row by row
        return b"".join(np.asarray(r, dtype="<f4").tobytes() for r in rows)


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
        path: the run directory (created if missing). An existing run directory
            is appended to only if ``resume=True``; otherwise a non-empty
            directory with a ``meta.json`` is refused, so no run is overwritten.
        flush_every: hand buffered lines to the writer thread every this many
            steps. Default: 50.
        resume: allow appending to an existing run. Default: False.

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
        if (self.path / "meta.json").exists() and not resume:
            raise ValueError(
                f"run_dir {str(self.path)!r} already holds a run (meta.json exists); "
                "pass a new directory, or resume=True to append to it"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self._buffers: dict[str, list[dict[str, Any]]] = {name: [] for name in STREAMS}
        self._rows: dict[str, list[np.ndarray]] = {name: [] for name in MATRICES}
        self.rows_written = 0
        self._pending_steps = 0
        self._queue: "queue.SimpleQueue[tuple[str, Any] | None]" = queue.SimpleQueue()
        self._fds: dict[str, int] = {}  # file name -> descriptor opened for appending (writer thread)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gradwatch-writer", daemon=True)
        self._thread.start()
        ref = weakref.ref(self)
        self._atexit = lambda: (lambda w: w.close() if w is not None else None)(ref())
        atexit.register(self._atexit)

    # ----- loop side -------------------------------------------------------------------
    def write_meta(self, meta: dict[str, Any]) -> None:
        """Write ``meta.json`` (atomic; format version added)."""
        _write_json_atomic(self.path / "meta.json", {"format_version": FORMAT_VERSION, **meta})

    def write_layers(self, layers: list[dict[str, Any]]) -> None:
        """Write ``layers.json`` once (atomic)."""
        self._queue.put(("json", ("layers.json", {"layers": layers})))

    def append(self, stream: str, record: dict[str, Any] | str | tuple[Callable[[int], str], int]) -> None:
        """Buffer one record for ``stream`` (encoded at the next flush); steps count towards ``flush_every``.

        The buffer is flushed when the step *after* ``flush_every`` buffered ones
        arrives: a step's line is encoded one step later at the soonest, so what
        is measured after the step returns (``observe()``'s update ratio, taken
        when the caller's optimizer has stepped) is still in it.
        """
        if stream == "steps":
            if self._pending_steps >= self.flush_every:
                self.flush()
            self._pending_steps += 1
        self._buffers[stream].append(record)

    def append_step(self, record: dict[str, Any] | Callable[[int], str], matrices: dict[str, np.ndarray]) -> None:
        """Buffer one step: its JSON line (given its ``row``) and one float32 row per matrix.

        ``record`` is the step's dict, or a function of the row index that returns
        the encoded line (``StepRecord.to_json_line``), called at the next flush:
        a step costs two list appends, and the lines of ``flush_every`` steps
        are encoded in one pass.
        """
        if callable(record):
            line: Any = (record, self.rows_written)
        else:
            line = dict(record)
            line["row"] = self.rows_written
        self.rows_written += 1
        for name in MATRICES:
            row = matrices.get(name)
            if row is not None:
                self._rows[name].append(row)
        self.append("steps", line)

    def append_finding(self, finding: Finding) -> None:
        self.append("findings", finding.to_dict())

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
                batch.append(("bytes", (name, _f32_rows(rows))))
                self._rows[name] = []
        for stream, items in self._buffers.items():
            if items:
                batch.append(("text", (stream, "".join(_encode(item) for item in items).encode("utf-8"))))
                self._buffers[stream] = []
        if batch:
            self._queue.put(("batch", batch))
        self._pending_steps = 0
        if wait:
            done = threading.Event()
            self._queue.put(("event", done))
            done.wait(timeout=30)

    def close(self) -> None:
        """Flush everything, stop the thread, close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout=30)
        try:
            atexit.unregister(self._atexit)
        except Exception:  # pragma: no cover - interpreter shutting down
            pass

    # ----- writer thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            for kind, payload in item[1] if item[0] == "batch" else [item]:
                self._handle(kind, payload)
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def _handle(self, kind: str, payload: Any) -> None:
        """Carry out one queued item on the writer thread.

        Lines and rows arrive encoded; each file gets one ``os.write`` (the
        interpreter lock is released for the system call, so the training loop
        waits for this thread as little as possible).
        """
        try:
            if kind in ("text", "bytes"):
                name, data = payload
                fd = self._fds.get(name)
                if fd is None:
                    target = self.path / (f"{name}.jsonl" if kind == "text" else f"{name}.f32")
                    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
                    self._fds[name] = fd
                view = memoryview(data)
                while view:  # a regular file takes it all at once; a short write is carried on
                    view = view[os.write(fd, view):]
            elif kind == "json":
                name, data = payload
                _write_json_atomic(self.path / name, data)
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


# ----- reading ----------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file, skipping a last line that was cut off mid-write."""
    if not path.exists():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a kill: everything before it is intact
    return records


def _to_float(value: Any) -> float:
    if value is None:
        return math.nan
    return float(value)  # also parses 'nan', 'inf', '-inf'


def _array(records: list[dict[str, Any]], key: str, width: int | None = None) -> np.ndarray:
    if width is None:
        return np.array([_to_float(r.get(key)) for r in records], dtype=np.float64)
    out = np.full((len(records), width), np.nan, dtype=np.float64)
    for i, record in enumerate(records):
        values = record.get(key)
        if values is None:
            continue
        out[i, : len(values)] = [_to_float(v) for v in values[:width]]
    return out


@dataclass
class Run:
    """A run directory read back: layer table, per-step numpy arrays, findings.

    ``steps`` maps a column to an array over steps: scalars are 1-D
    (``step``, ``loss``, ``grad_norm``, ``clip_coef``, ``clip_threshold`` (the
    max norm that applied on the step; NaN when not clipping), ``clipped``,
    ``skipped``, ``loss_scale``, ``time_ms``); per-layer columns are 2-D (steps x layers, in
    ``layer_names`` order): ``layer_grad_norms``, ``layer_weight_norms``,
    ``update_ratio`` (NaN on steps where it was not measured).
    """

    path: Path
    meta: dict[str, Any]
    layers: list[dict[str, Any]]
    layer_names: list[str]
    steps: dict[str, np.ndarray]
    findings: list[Finding]
    activations: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    step_extras: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def bundles(self) -> list[Path]:
        """Paths of the reproduction bundles of non-finite steps."""
        folder = self.path / "nonfinite"
        return sorted(folder.glob("*.pt")) if folder.is_dir() else []

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
FLAG_COLUMNS = ("clipped", "skipped")
SPARSE_LAYER_COLUMNS = ("update_ratio",)
_KNOWN_KEYS = set(SCALAR_COLUMNS) | set(FLAG_COLUMNS) | set(SPARSE_LAYER_COLUMNS) | {"row"}


def _read_matrix(path: Path, width: int, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of a float32 matrix file, as float32 (NaN where a row is missing); a cut-off row is dropped.

    The file is memory-mapped, so only the rows asked for are read into memory
    (100,000 steps x 200 layers: 80 MB per matrix).
    """
    out = np.full((len(rows), width), np.nan, dtype=np.float32)
    if width == 0 or not path.exists() or path.stat().st_size < 4 * width:
        return out
    n_rows = path.stat().st_size // (4 * width)  # whole rows only: a kill can cut the last one
    whole = np.memmap(path, dtype="<f4", mode="r", shape=(n_rows, width))
    ok = (rows >= 0) & (rows < whole.shape[0])
    out[ok] = whole[rows[ok]]
    return out


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
    if not root.is_dir() or not ((root / "meta.json").exists() or (root / "steps.jsonl").exists()):
        raise FileNotFoundError(
            f"{str(root)!r} is not a gradwatch run directory (no meta.json or steps.jsonl); "
            "pass the run_dir given to gradwatch.Watch"
        )
    meta: dict[str, Any] = {}
    if (root / "meta.json").exists():
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    layers: list[dict[str, Any]] = []
    if (root / "layers.json").exists():
        layers = json.loads((root / "layers.json").read_text(encoding="utf-8"))["layers"]
    layer_names = [layer["name"] for layer in layers if layer.get("measured", True)]
    records = _read_jsonl(root / "steps.jsonl")
    width = len(layer_names)
    steps: dict[str, np.ndarray] = {key: _array(records, key) for key in SCALAR_COLUMNS}
    steps["step"] = steps["step"].astype(np.int64) if len(records) else np.zeros(0, dtype=np.int64)
    for key in FLAG_COLUMNS:
        steps[key] = np.array([bool(r.get(key)) for r in records], dtype=bool)
    for key in SPARSE_LAYER_COLUMNS:
        steps[key] = _array(records, key, width)
    rows = np.array([int(r.get("row", -1)) for r in records], dtype=np.int64)
    steps["layer_grad_norms"] = _read_matrix(root / "grad_norms.f32", width, rows)
    steps["layer_weight_norms"] = _read_matrix(root / "weight_norms.f32", width, rows)
    extras = {}
    for record in records:
        extra = {k: v for k, v in record.items() if k not in _KNOWN_KEYS}
        if extra:
            extras[int(record.get("step", -1))] = extra
    findings = []
    for data in _read_jsonl(root / "findings.jsonl"):
        try:
            findings.append(Finding.from_dict(data))
        except (KeyError, ValueError, TypeError):
            continue
    return Run(
        path=root,
        meta=meta,
        layers=layers,
        layer_names=layer_names,
        steps=steps,
        findings=findings,
        activations=_read_jsonl(root / "activations.jsonl"),
        events=_read_jsonl(root / "events.jsonl"),
        step_extras=extras,
    )
