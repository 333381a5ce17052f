"""Reproduction bundles: one file per non-finite step, safe to share and to open.

A bundle is a plain dict saved with ``torch.save`` under
``RUN_DIR/nonfinite/step_000123.pt`` (through ``RunWriter.save_bundle``). It
holds only tensors, numbers, strings, lists, tuples and dicts, so it loads with
``torch.load(path, weights_only=True)``: no pickled code runs on load.

Keys (format 1; readers such as ``gradwatch doctor`` and the report rely on them):

- ``format`` (int): 1.
- ``step`` (int): the failing step.
- ``finding`` (dict): the step's finding, ``Finding.to_dict()`` (JSON-safe:
  non-finite floats as the strings ``"nan"``, ``"inf"``); rebuild it with
  ``gradwatch.Finding.from_dict``.
- ``batch``: the batch given to ``watch.step``, with every tensor detached and
  on the CPU, containers kept (tuple, list, dict); leaves that are not tensors,
  numbers or strings are stored as their ``repr``. None if no batch was given.
- ``rng`` (dict): the RNG states from *before* the step, ``{"cpu": ByteTensor,
  "<device type>": [ByteTensor per device]}``: restore them with
  :func:`gradwatch.nonfinite.restore_rng_state` to draw the same dropout masks.
  Empty when no closure was given (the Watch keeps RNG states only then).
- ``loss`` (float), ``grad_norm`` (float, pre-clip): as measured on the step.
- ``nonfinite_layers`` (list of str): layers whose gradient norm was non-finite.
- ``localization`` (dict or None): the replay's first non-finite op
  (:class:`~gradwatch.nonfinite.replay.Localization` as a dict).
- ``torch`` (str): the torch version that wrote it.

To reproduce: load it, rebuild the model and the weights of that step (from
your checkpoint), ``restore_rng_state(bundle["rng"])`` and call your loss on
``bundle["batch"]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

BUNDLE_FORMAT = 1
KEYS = ("format", "step", "finding", "batch", "rng", "loss", "grad_norm", "nonfinite_layers", "localization", "torch")


def bundle_name(step: int) -> str:
    """File name of a step's bundle.

    Example:
        >>> bundle_name(123)
        'step_000123.pt'
    """
    return f"step_{int(step):06d}.pt"


def _plain(obj: Any, depth: int = 0) -> Any:
    """Tensors detached to the CPU; containers kept; anything else as plain data or its repr."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if depth >= 8:
        return repr(obj)[:200]
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, (str, int)) else repr(k)): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v, depth + 1) for v in obj)
    if isinstance(obj, list):
        return [_plain(v, depth + 1) for v in obj]
    return repr(obj)[:200]


def make_bundle(
    *,
    step: int,
    finding: dict[str, Any],
    batch: Any,
    rng: dict[str, Any] | None,
    loss: float,
    grad_norm: float,
    nonfinite_layers: list[str] | None = None,
    localization: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The bundle dict (see the module docstring for its keys).

    Example:
        >>> b = make_bundle(step=3, finding={"code": "degenerate_batch"}, batch=(torch.zeros(2, 2),),
        ...                 rng=None, loss=float("nan"), grad_norm=float("nan"))
        >>> sorted(b) == sorted(KEYS), b["batch"][0].shape
        (True, torch.Size([2, 2]))
    """
    return {
        "format": BUNDLE_FORMAT,
        "step": int(step),
        "finding": _plain(finding),
        "batch": _plain(batch),
        "rng": _plain(rng or {}),
        "loss": float(loss),
        "grad_norm": float(grad_norm),
        "nonfinite_layers": [str(n) for n in (nonfinite_layers or [])],
        "localization": _plain(localization),
        "torch": str(torch.__version__),  # a plain str: TorchVersion is not a weights_only global
    }


def load_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a bundle safely (``weights_only=True``, tensors to the CPU).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a gradwatch bundle.
    """
    target = Path(path)
    if not target.is_file():
        raise FileNotFoundError(f"no bundle at {str(target)!r}; bundles are RUN_DIR/nonfinite/step_*.pt")
    try:
        payload = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{str(target)!r} is not a readable gradwatch bundle: {type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or "step" not in payload or "finding" not in payload:
        raise ValueError(f"{str(target)!r} is not a gradwatch bundle (a dict with 'step' and 'finding')")
    return payload


def _describe_batch(batch: Any, path: str = "batch", out: list[str] | None = None) -> list[str]:
    out = [] if out is None else out
    if len(out) >= 8:
        return out
    if isinstance(batch, torch.Tensor):
        text = f"{path} {str(batch.dtype).replace('torch.', '')} {tuple(batch.shape)}"
        if batch.is_floating_point() and batch.numel():
            bad = int((~torch.isfinite(batch)).sum())
            if bad:
                text += f" ({bad} non-finite)"
        out.append(text)
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            _describe_batch(v, f"{path}[{k!r}]", out)
    elif isinstance(batch, (list, tuple)):
        for i, v in enumerate(batch):
            _describe_batch(v, f"{path}[{i}]", out)
    return out


def format_number(value: Any) -> str:
    """A number as text, 4 significant digits (nan/inf as such; anything else as ``str``).

    Example:
        >>> format_number(0.000123456), format_number(float("nan")), format_number("n/a")
        ('0.0001235', 'nan', 'n/a')
    """
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return str(value)
    return f"{x:.4g}" if math.isfinite(x) else str(x)


def describe_bundle(path: str | os.PathLike[str]) -> str:
    """A few lines of text on a bundle: step, finding, location, batch, RNG (for ``gradwatch doctor``).

    Example:
        >>> print(describe_bundle("runs/exp1/nonfinite/step_000012.pt"))  # doctest: +SKIP
        step_000012.pt: step 12, loss nan, grad_norm nan
          degenerate_batch: Step 12 was skipped because its input batch is itself non-finite: ...
          location: tensor=batch[0], first_nonfinite=batch[0][3, 7]
          batch: batch[0] float32 (32, 10) (3 non-finite); batch[1] int64 (32,)
          rng: cpu
    """
    target = Path(path)
    payload = load_bundle(target)
    finding = payload.get("finding") or {}
    lines = [f"{target.name}: step {payload.get('step')}, loss {format_number(payload.get('loss'))}, "
             f"grad_norm {format_number(payload.get('grad_norm'))}"]
    if isinstance(finding, Mapping):
        lines.append(f"  {finding.get('code', '?')}: {finding.get('message', '')}")
        location = finding.get("location") or {}
        if isinstance(location, Mapping) and location:
            shown = {k: v for k, v in location.items() if k != "code"}
            lines.append("  location: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    batch = _describe_batch(payload.get("batch"))
    lines.append("  batch: " + ("; ".join(batch) if batch else "none kept"))
    rng = payload.get("rng") or {}
    lines.append("  rng: " + (", ".join(sorted(rng)) if isinstance(rng, Mapping) and rng else "none (no closure)"))
    return "\n".join(lines)


def summarize_bundle(path: str | os.PathLike[str]) -> str:
    """One line on a reproduction bundle (``gradwatch doctor``'s list); never raises, unlike
    :func:`describe_bundle`: an unreadable or foreign file is said to be one.

    Example:
        >>> summarize_bundle("missing.pt").startswith("missing.pt: unreadable")
        True
    """
    path = Path(path)
    if not path.is_file():  # a directory, a pipe (torch.load would wait on it for ever)
        return f"{path.name}: unreadable (not a regular file)"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated, foreign or unsafe file: say so and go on
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        return f"{path.name}: unreadable ({type(exc).__name__}: {reason})"
    if not isinstance(data, dict):
        return f"{path.name}: not a gradwatch bundle (a {type(data).__name__}, not a dict)"
    finding = data.get("finding") if isinstance(data.get("finding"), dict) else {}
    code = finding.get("code") or data.get("code") or "?"
    parts = [f"{path.name}: step {data.get('step', '?')}", str(code)]
    if "loss" in data:
        parts.append(f"loss={format_number(data['loss'])}")
    if "grad_norm" in data:
        parts.append(f"grad_norm={format_number(data['grad_norm'])}")
    loc = data.get("localization") if isinstance(data.get("localization"), dict) else None
    if loc:
        where = ", ".join(f"{k}={loc[k]}" for k in ("phase", "op", "module", "source") if loc.get(k))
        if where:
            parts.append(where)
    parts.append("batch saved" if data.get("batch") is not None else "no batch")
    return "  ".join(parts)
