"""Do data-parallel replicas agree? Per-layer weight checksums and the clip decision, compared across ranks.

Under DDP every rank starts from the same broadcast weights, applies the same
averaged gradients with the same optimizer, and so holds bit-identical
weights. A replica that drifts (a rank-conditional update, a weight changed
after wrapping without a broadcast, a buffer-driven difference, silent data
corruption: TrainCheck found one in BLOOM-176B's training) does not crash: it
trains a different model on each rank. fairseq checks that ranks agree on the
gradient norm for the same reason.

Every ``agree_every`` steps the Watch gathers, from every rank, one float64
vector (:func:`replica_checksums`): per layer the sum and the 2-norm of the
local weights (accumulated in float64), then the step's clip coefficient and
skip flag. :func:`divergence_finding` (pure) compares them: the values are
expected to be *bit-identical*, so any difference is a ``rank_divergence``
error naming the first diverging layer in depth order and the ranks that
differ from the majority (from rank 0 on a tie).

Example:
    >>> import numpy as np
    >>> rows = np.array([[1.0, 2.0, 1.0, 0.0], [1.0, 2.5, 1.0, 0.0]])  # 2 ranks, 1 layer (sum, norm), coef, skip
    >>> f = divergence_finding(7, ["fc"], rows)
    >>> f.code, f.evidence["layer"], f.evidence["ranks"]
    ('rank_divergence', 'fc', [1])
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch

from .findings import Finding

__all__ = ["divergence_finding", "replica_checksums"]


def replica_checksums(params: Sequence[torch.Tensor], param_layer: Sequence[int], n_layers: int,
                      clip_coef: float, skipped: bool, device: torch.device) -> torch.Tensor:
    """One float64 vector: per layer (sum, 2-norm) of ``params``, then the clip coefficient and the skip flag.

    Accumulated in float64 (``torch.sum(dtype=)`` and the foreach norm with
    ``dtype=torch.float64`` of each tensor, combined per layer).

    Example:
        >>> w = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
        >>> replica_checksums(w, [0, 0], 1, 1.0, False, torch.device("cpu")).tolist()
        [8.0, 5.0990195135927845, 1.0, 0.0]
    """
    from .compat import foreach_norm

    sums = torch.zeros(n_layers, dtype=torch.float64, device=device)
    squares = torch.zeros(n_layers, dtype=torch.float64, device=device)
    with torch.no_grad():
        kept = [(p.detach(), layer) for p, layer in zip(params, param_layer) if p.numel()]
        norms = foreach_norm([t for t, _ in kept], 2.0, dtype=torch.float64) if kept else []
        for (t, layer), norm in zip(kept, norms):
            sums[layer] += torch.sum(t, dtype=torch.float64).to(device)
            squares[layer] += norm.to(device=device, dtype=torch.float64) ** 2
    tail = torch.tensor([clip_coef, 1.0 if skipped else 0.0], dtype=torch.float64, device=device)
    return torch.cat([sums, squares.sqrt(), tail])


def _differs(column: np.ndarray) -> list[int]:
    """Ranks whose value differs from the majority's (rank 0's on a tie); NaN equals NaN."""
    keys = [("nan" if math.isnan(v) else v) for v in column.tolist()]
    counts = Counter(keys)
    top = max(counts.values())
    reference = next(k for k in keys if counts[k] == top)  # the first (lowest rank) of the most common values
    return [r for r, k in enumerate(keys) if k != reference]


def divergence_finding(step: int, layer_names: Sequence[str], rows: np.ndarray) -> Finding | None:
    """``rank_divergence`` when the ranks' checksum rows differ (rows: one per rank, from :func:`replica_checksums`).

    Returns None when every rank holds the same values. The first diverging layer
    in depth order is named (its sum or its norm differs); if only the clip
    decision differs, the finding says so.

    Example:
        >>> rows = np.array([[1.0, 2.0, 1.0, 0.0]] * 3)
        >>> divergence_finding(7, ["fc"], rows) is None
        True
    """
    rows = np.asarray(rows, dtype=np.float64)
    n = len(layer_names)
    world = rows.shape[0]
    for i, name in enumerate(layer_names):
        ranks = sorted(set(_differs(rows[:, i])) | set(_differs(rows[:, n + i])))
        if ranks:
            values = {"sum": rows[:, i].tolist(), "norm": rows[:, n + i].tolist()}
            later = sum(1 for j in range(i + 1, n) if _differs(rows[:, j]) or _differs(rows[:, n + j]))
            return _finding(step, ranks, world, f"layer {name}'s weights", name, values, later)
    decision = sorted(set(_differs(rows[:, 2 * n])) | set(_differs(rows[:, 2 * n + 1])))
    if decision:
        values = {"clip_coef": rows[:, 2 * n].tolist(), "skipped": [bool(v) for v in rows[:, 2 * n + 1]]}
        return _finding(step, decision, world, "the clip and skip decision", None, values, 0)
    return None


def _finding(step: int, ranks: list[int], world: int, what: str, layer: str | None, values: dict, later: int) -> Finding:
    names = ", ".join(str(r) for r in ranks)
    plural = "s" if len(ranks) > 1 else ""
    more = f" ({later} later layer{'s' if later != 1 else ''} differ too)" if later else ""
    message = (f"Data-parallel replicas disagree at step {step}: {what} on rank{plural} {names} differ from the "
               f"other ranks'{more}. Replicas must hold identical weights; each rank now trains a different model.")
    evidence = {"ranks": ranks, "world_size": world, "layer": layer, "values": values, "later_layers": later}
    location = {"module": layer, "ranks": ranks} if layer is not None else {"ranks": ranks}
    fixes = [
        f"look for code that changes parameters on rank{plural} {names} only (an `if rank == ...` around an "
        "update, an init or a weight load after the model was wrapped in DDP)",
        "load weights before wrapping in DistributedDataParallel (it broadcasts rank 0's at construction), "
        "or broadcast them again: torch.distributed.broadcast(p.data, src=0) for each parameter",
        "restart from the last checkpoint; if the code is the same on every rank, suspect the hardware of that "
        "rank (silent data corruption) and run it on another node",
    ]
    return Finding("rank_divergence", "error", step, message, evidence=evidence, location=location, fixes=fixes)
