"""Bad batches: the (step, batch fingerprint) of every non-finite step, kept for a restart to skip.

Megatron-LM's rerun state machine re-runs a failing step to tell a transient
fault from a deterministic one and keeps the iterations to skip on restart.
gradwatch's replay is that re-run (its verdict is in the finding's
``evidence["verdict"]``); this module keeps the list.

``RUN_DIR/bad_batches.jsonl`` gets one line per non-finite step that the
non-finite plugin explained (not fp16 scaler overflows), written at once
(opened in append mode, one ``write`` per line, flushed: a crash right after
loses nothing) and never superseded by a resume::

    {"step": 12, "fingerprint": "blake2b:5c1e...", "signature": "float32(8,16);int64(8,)",
     "verdict": "reproduced", "code": "loss_numerics", "rank": null}

- ``fingerprint``: :func:`fingerprint` of the batch given to ``watch.step(..., batch=)``
  (under torch.distributed: of the rank whose local values were non-finite; ``rank`` names it).
- ``signature``: dtypes and shapes of its tensors (cheap to compare first).
- ``verdict``: ``"reproduced"`` (the replay named the op: deterministic), ``"not reproduced"``
  (the replay was finite: transient), ``"not replayed"``.

A restarted ``Watch(..., skip_bad_batches=True)`` reads every such file under
its ``run_dir`` (all versions and ranks) and ``watch.should_skip(batch)`` says
whether a batch is one of them (:class:`BadBatches`).

Example:
    >>> x = torch.zeros(2, 3)
    >>> fingerprint((x, torch.ones(2))) == fingerprint((x.clone(), torch.ones(2)))
    True
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

FILE = "bad_batches.jsonl"
VERDICTS = ("reproduced", "not reproduced", "not replayed")


def _walk(obj: Any, out: list[tuple[str, Any]], path: str = "", depth: int = 0) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
    elif depth >= 8:
        out.append((path, type(obj).__name__))
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=repr):
            _walk(obj[key], out, f"{path}[{key!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, out, f"{path}[{i}]", depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        out.append((path, obj))
    else:
        out.append((path, type(obj).__name__))  # an object whose repr may hold an address: its type only


def signature(batch: Any) -> str:
    """Dtypes and shapes of a batch's tensors, in order: cheap, and equal for equal batches.

    Example:
        >>> signature((torch.zeros(8, 16), torch.zeros(8, dtype=torch.long)))
        'float32(8,16);int64(8)'
    """
    leaves: list[tuple[str, Any]] = []
    _walk(batch, leaves)
    parts = [f"{str(v.dtype).replace('torch.', '')}({','.join(str(d) for d in v.shape)})"
             for _, v in leaves if isinstance(v, torch.Tensor)]
    return ";".join(parts)


def fingerprint(batch: Any) -> str:
    """A hash of a batch's content: every tensor's dtype, shape and bytes, other leaves by value.

    Costs one pass over the batch's bytes (a tensor on a GPU is copied to the
    host first); equal batches give equal fingerprints in any process.

    Example:
        >>> fingerprint({"x": torch.arange(4)}).startswith("blake2b:")
        True
    """
    h = hashlib.blake2b(digest_size=16)
    leaves: list[tuple[str, Any]] = []
    _walk(batch, leaves)
    for path, value in leaves:
        h.update(path.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.is_sparse or t.layout != torch.strided:
                t = t.to_dense()
            t = t.to("cpu").contiguous().reshape(-1)
            if t.numel():
                h.update(t.view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return "blake2b:" + h.hexdigest()


@dataclass
class BadStep:
    """What the non-finite plugin learnt about this rank's bad step (shared through ``StepContext.bad_step``).

    Example:
        >>> BadStep(step=3, fingerprint="blake2b:00", signature="float32(2)", verdict="reproduced").verdict
        'reproduced'
    """

    step: int
    fingerprint: str | None
    signature: str | None
    verdict: str
    code: str | None = None
    bundle_name: str | None = None
    bundle: dict[str, Any] | None = None  # the payload, when another rank may have to save it


@dataclass
class BadBatch:
    """One line of ``bad_batches.jsonl``.

    Example:
        >>> BadBatch(12, "blake2b:00", "float32(2)", "reproduced", "loss_numerics").to_dict()["step"]
        12
    """

    step: int
    fingerprint: str
    signature: str | None
    verdict: str
    code: str | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the JSON line's fields."""
        return asdict(self)


def append_bad_batch(run_dir: str | os.PathLike[str], entry: BadBatch) -> None:
    """Append one line to ``RUN_DIR/bad_batches.jsonl`` now (one write, flushed).

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp(); append_bad_batch(d, BadBatch(3, "blake2b:00", None, "reproduced"))
        >>> [b.step for b in read_bad_batches(d)]
        [3]
    """
    line = json.dumps(entry.to_dict(), separators=(",", ":")) + "\n"
    fd = os.open(Path(run_dir) / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read_bad_batches(path: str | os.PathLike[str]) -> list[BadBatch]:
    """The bad batches of one run directory, or of every run under ``path`` (versions, ranks); never raises.

    A line that cannot be read is skipped.

    Example:
        >>> read_bad_batches("no/such/dir")
        []
    """
    root = Path(path)
    files: Iterable[Path]
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob(FILE) if len(p.relative_to(root).parts) <= 4)
    else:
        return []
    out: list[BadBatch] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                d = json.loads(line)
                out.append(BadBatch(step=int(d["step"]), fingerprint=str(d["fingerprint"]),
                                    signature=d.get("signature"), verdict=str(d.get("verdict", "")),
                                    code=d.get("code"), rank=d.get("rank")))
            except (ValueError, KeyError, TypeError):
                continue
    return out


class BadBatches:
    """The fingerprints of known bad batches, and the check of a batch against them.

    Args:
        entries: :class:`BadBatch` records (e.g. :func:`read_bad_batches` of a run directory).

    Example:
        >>> x = torch.tensor([1.0, float("nan")])
        >>> known = BadBatches([BadBatch(5, fingerprint((x,)), signature((x,)), "reproduced")])
        >>> known.contains((x.clone(),)), known.contains((torch.ones(2),))
        (True, False)
    """

    def __init__(self, entries: Iterable[BadBatch] = ()) -> None:
        self.entries = list(entries)
        self._fingerprints = {e.fingerprint for e in self.entries}
        sigs = {e.signature for e in self.entries}
        self._signatures = None if None in sigs else sigs  # an entry without one: hash every batch

    def __len__(self) -> int:
        return len(self._fingerprints)

    def contains(self, batch: Any) -> bool:
        """Whether ``batch`` is one of the known bad batches (its signature first, then its hash)."""
        if not self._fingerprints:
            return False
        if self._signatures is not None and signature(batch) not in self._signatures:
            return False
        return fingerprint(batch) in self._fingerprints
