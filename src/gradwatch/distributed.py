"""gradwatch under torch.distributed: the numbers and the decisions of a single process.

When a process group is initialized (and has more than one rank) the Watch
builds a :class:`DistSync` and routes its per-step measurement through it.

**DDP** (and any data-parallel wrapper that all-reduces gradients): every rank
already holds the same averaged gradients, so the per-layer norms computed
locally are the global ones. The only collective is one ``all_reduce`` of two
numbers: the loss divided by the world size (the recorded loss becomes the mean
over ranks, and a non-finite loss on any rank makes it non-finite everywhere)
and ``0 * sum(local powers)`` (``nan`` when any rank saw a non-finite
gradient). Every rank therefore takes the same skip decision.

**FSDP2 / DTensor** (``torch.distributed.fsdp.fully_shard``): a rank holds
only shards. Per-layer powers ``sum |g|^p`` of the *local* shards
(``grad.to_local()``) are summed across ranks in ONE ``all_reduce`` of size
about 2 x n_layers + 1 (gradient powers, squared weight norms, loss), which
gives exactly the powers of the full tensors. A tensor that is replicated on
part of the world (plain tensors, ``Replicate()`` placements, HSDP) is
weighted by ``n_shards / world_size`` so that the sum counts it once. For
``norm_type=inf`` the gradient part is reduced with MAX (non-finite values
mapped to +inf first, as MAX need not propagate nan) and the weights and loss
with SUM: two collectives. Clipping multiplies the local shards in place by the
global coefficient, which is what ``clip_grad_norm_`` does on DTensor
gradients.

Both collectives are issued before the Watch's one host transfer, so the step
keeps a single host sync. Only rank ``write_rank`` (default 0) writes the run
directory; ``write_rank="all"`` gives each rank its own ``RUN_DIR/rank<k>``.

References: torch.nn.utils.clip_grad_norm_ (global norm of DTensor gradients),
torch.distributed.fsdp.fully_shard (FSDP2), torch.distributed.tensor.DTensor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from . import compat
from . import norms as _norms

if TYPE_CHECKING:  # pragma: no cover
    from .findings import Finding
    from .layers import LayerIndex

__all__ = ["DistSync", "is_distributed", "is_dtensor", "local_tensor", "unwrap_model"]


def is_distributed() -> bool:
    """True when torch.distributed is available, initialized and has more than one rank.

    Example:
        >>> is_distributed()
        False
    """
    dist = torch.distributed
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def is_dtensor(tensor: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel parameters and gradients).

    Example:
        >>> is_dtensor(torch.ones(2))
        False
    """
    cls = compat.dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of ``tensor``: the local shard of a DTensor (same storage), else the tensor itself.

    In-place operations on the result change the DTensor (gradwatch clips the local
    shards of FSDP2 gradients this way).

    Example:
        >>> t = torch.ones(3)
        >>> local_tensor(t) is t
        True
    """
    if tensor is None or not is_dtensor(tensor):
        return tensor
    return compat.dtensor_local(tensor)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / ``torch.compile`` wrappers.

    Layer names then read as in a single-process eager run (``"0"``, not
    ``"module._orig_mod.0"``). FSDP2 does not wrap (it changes the module in place).

    Raises:
        ValueError: the model is (or holds) an FSDP1 ``FullyShardedDataParallel``
            wrapper: its flattened gradient shards are plain tensors that no
            per-layer norm can be attributed to; use FSDP2's ``fully_shard``.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ValueError(
            "gradwatch does not support FSDP1 (FullyShardedDataParallel): its gradients are flat shards that "
            "cannot be split by layer; shard with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )
    seen = 0
    while seen < 8:  # wrappers nest at most a few levels (DDP(compile(model)))
        seen += 1
        inner = None
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            inner = model.module
        elif compat.compiled_inner_module(model) is not None:
            inner = compat.compiled_inner_module(model)
        if inner is None:
            return model
        model = inner
    return model


def _check_write_rank(write_rank: Any) -> int | str:
    if write_rank == "all":
        return "all"
    if isinstance(write_rank, bool) or not isinstance(write_rank, int) or write_rank < 0:
        raise ValueError(f"write_rank must be a rank number >= 0 or 'all', got {write_rank!r}")
    return write_rank


class DistSync:
    """One rank's side of a distributed Watch: local shards in, global numbers out.

    Built by the Watch (``Watch(..., write_rank=0)``); usable on its own to get
    per-layer norms that agree on every rank.

    Args:
        write_rank: the rank that writes the run directory, or ``"all"`` (each
            rank writes ``RUN_DIR/rank<k>``). Default: 0.
        group: the process group to reduce over. Default: the world.

    Raises:
        ValueError: a ``write_rank`` that is not a rank of the group.

    Example (inside an initialized 2-process group)::

        sync = DistSync.detect(write_rank=0)       # None outside torch.distributed
        groups, powers, weight_powers, loss = sync.measure(index, grads, loss, 2.0, device)
    """

    def __init__(self, write_rank: int | str = 0, group: Any = None) -> None:
        dist = torch.distributed
        self.write_rank = _check_write_rank(write_rank)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if isinstance(self.write_rank, int) and self.write_rank >= self.world_size:
            raise ValueError(
                f"write_rank={self.write_rank} is not a rank of this process group (world size {self.world_size}); "
                "pass a rank below the world size, or 'all'"
            )
        self.sharded = False
        self._params: list[torch.Tensor] | None = None
        self._plan: _norms.MeasurePlan | None = None
        self._n_layers = 0
        self._n_ext = 0
        self._ext_layer: torch.Tensor | None = None  # (n_ext,) layer of each extended slot
        self._ext_weight: torch.Tensor | None = None  # (n_ext,) 1 / replication factor
        self._ext_slots: list[int] = []

    @classmethod
    def detect(cls, write_rank: Any = 0, group: Any = None, enabled: bool | None = None) -> "DistSync | None":
        """A DistSync when a process group of more than one rank is initialized, else None.

        ``write_rank`` is validated either way, so a typo fails on one machine too.
        ``enabled=False`` always gives None (a Watch that only some ranks build must
        not issue collectives); ``enabled=True`` raises when there is no process group.

        Example:
            >>> DistSync.detect(write_rank=0) is None   # no process group here
            True
        """
        _check_write_rank(write_rank)
        if enabled is not None and not isinstance(enabled, bool):
            raise ValueError(f"distributed must be None, True or False, got {enabled!r}")
        if enabled is False:
            return None
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) <= 1:
            if enabled:
                raise ValueError(
                    "distributed=True but no torch.distributed process group of more than one rank is "
                    "initialized; call torch.distributed.init_process_group() before building the Watch"
                )
            return None
        return cls(write_rank, group)

    # ----- run directory -------------------------------------------------------------
    @property
    def writes(self) -> bool:
        """Whether this rank writes a run directory."""
        return self.write_rank == "all" or self.rank == self.write_rank

    def run_dir(self, run_dir: str | os.PathLike[str]) -> Path:
        """The directory this rank writes (``RUN_DIR/rank<k>`` with ``write_rank="all"``)."""
        path = Path(run_dir)
        return path / f"rank{self.rank}" if self.write_rank == "all" else path

    def meta(self) -> dict[str, Any]:
        """Facts for ``meta.json``."""
        backend = torch.distributed.get_backend(self.group)
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "backend": str(backend),
        }

    # ----- measurement ---------------------------------------------------------------
    def _factor(self, param: torch.Tensor) -> float:
        """How many ranks hold each element of ``param`` (world size for a plain tensor)."""
        if not is_dtensor(param):
            return float(self.world_size)
        shards = 1
        for dim, placement in enumerate(param.placements):
            if placement.is_shard():
                shards *= param.device_mesh.size(dim)
        return self.world_size / shards

    def _build(self, index: "LayerIndex", device: torch.device) -> None:
        params = list(index.params)
        self._params = index.params
        self._n_layers = n_layers = len(index)
        self.sharded = any(is_dtensor(p) for p in params)
        locals_ = [local_tensor(p.detach()) for p in params]
        if not self.sharded:
            self._plan = _norms.MeasurePlan(locals_, index.param_layer, n_layers, device)
            return
        # Extended slots: one per (layer, replication factor); n_ext == n_layers unless a
        # layer mixes placements (tensor parallel + FSDP, ignored parameters).
        layer_factor: dict[int, float] = {}
        extra: dict[tuple[int, float], int] = {}
        ext_layer = list(range(n_layers))
        ext_factor = [1.0] * n_layers
        slots: list[int] = []
        for param, layer in zip(params, index.param_layer):
            factor = self._factor(param)
            first = layer_factor.setdefault(layer, factor)
            if factor == first:
                ext_factor[layer] = factor
                slots.append(layer)
                continue
            key = (layer, factor)
            if key not in extra:
                extra[key] = len(ext_layer)
                ext_layer.append(layer)
                ext_factor.append(factor)
            slots.append(extra[key])
        self._n_ext = len(ext_layer)
        self._ext_slots = slots
        self._ext_layer = torch.tensor(ext_layer, dtype=torch.long, device=device)
        self._ext_weight = torch.tensor([1.0 / f for f in ext_factor], dtype=torch.float64, device=device)
        self._plan = _norms.MeasurePlan(locals_, slots, self._n_ext, device)

    def measure(
        self,
        index: "LayerIndex",
        grads: list[torch.Tensor | None],
        loss: torch.Tensor,
        norm_type: float,
        device: torch.device,
        exact: bool = False,
    ) -> tuple[_norms.TensorGroups, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global per-layer gradient powers, squared weight norms and mean loss; no host sync.

        Returns ``(groups, powers, weight_powers, loss)``: ``groups`` holds the
        *local* gradient tensors (clip them in place with :func:`gradwatch.norms.scale_`),
        ``powers`` and ``weight_powers`` are the powers of the full tensors
        (identical on every rank), ``loss`` the mean loss over ranks (float64). ``exact``: the
        per-tensor norms accumulated in float64 (see :meth:`gradwatch.norms.MeasurePlan.measure`).
        """
        if self._params is not index.params:  # first call, or the depth order changed
            self._build(index, device)
        local_grads = [local_tensor(g) for g in grads] if self.sharded else grads
        groups, powers, weight_powers = self._plan.measure(local_grads, norm_type, exact)
        dist = torch.distributed
        loss64 = loss.detach().reshape(1).to(device=powers.device, dtype=torch.float64) / self.world_size
        if not self.sharded:  # DDP: gradients already identical; agree on the loss and on finiteness
            flag = powers.sum().to(torch.float64).reshape(1) * 0.0  # nan iff a local power is non-finite
            buf = torch.cat([loss64, flag])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            return groups, powers + buf[1].to(powers.dtype), weight_powers, buf[0]
        weight = self._ext_weight.to(powers.device)
        n = self._n_ext
        if math.isinf(float(norm_type)):
            grad_buf = torch.nan_to_num(powers.to(torch.float64), nan=math.inf)  # MAX need not keep nan
            dist.all_reduce(grad_buf, op=dist.ReduceOp.MAX, group=self.group)
            rest = torch.cat([weight_powers.to(torch.float64) * weight, loss64])
            dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=self.group)
            grad_ext, weight_ext, mean_loss = grad_buf, rest[:n], rest[n]
        else:
            buf = torch.cat([powers.to(torch.float64) * weight, weight_powers.to(torch.float64) * weight, loss64])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            grad_ext, weight_ext, mean_loss = buf[:n], buf[n : 2 * n], buf[2 * n]
        return groups, self._fold(grad_ext, norm_type), self._fold(weight_ext, 2.0), mean_loss

    def _fold(self, ext: torch.Tensor, norm_type: float) -> torch.Tensor:
        """Extended slots back to layers (identity in the common case)."""
        if self._n_ext == self._n_layers:
            return ext
        out = torch.zeros(self._n_layers, dtype=ext.dtype, device=ext.device)
        index = self._ext_layer.to(ext.device)
        if math.isinf(float(norm_type)):
            return out.scatter_reduce_(0, index, ext, reduce="amax", include_self=True)
        return out.index_add_(0, index, ext)

    def local_params(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The local shards of ``params`` (the parameters themselves when nothing is sharded)."""
        return [local_tensor(p) for p in params]

    def layer_sq_norms(self, index: "LayerIndex", tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """Per-layer squared 2-norms of full tensors from their local parts (one collective when sharded).

        ``tensors`` are local parts aligned with ``index.params`` (e.g. weight deltas).
        """
        if not self.sharded:
            groups = _norms.group_tensors(tensors, index.param_layer)
            return _norms.layer_powers(groups, len(index), 2.0, device)
        groups = _norms.group_tensors(tensors, self._ext_slots)
        ext = _norms.layer_powers(groups, self._n_ext, 2.0, device).to(torch.float64) * self._ext_weight.to(device)
        torch.distributed.all_reduce(ext, op=torch.distributed.ReduceOp.SUM, group=self.group)
        return self._fold(ext, 2.0)

    def merge_findings(self, findings: list["Finding"]) -> list["Finding"]:
        """One list of findings for a non-finite step, the same on every rank.

        Called by the Watch on every rank for a non-finite step only (rare, so one
        ``all_gather_object`` is affordable). The rank where the non-finite value
        arose is the one whose replay can locate it, so the best-located
        error-level finding of any rank (op or source line known, lowest rank on a
        tie) replaces rank 0's; it carries ``evidence["rank"]``. Other findings
        are rank 0's (computed from the same agreed numbers on every rank).
        """
        from .findings import Finding

        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, [f.to_dict() for f in findings], group=self.group)
        per_rank = [[Finding.from_dict(d) for d in (items or [])] for items in gathered]

        def score(finding: "Finding") -> int:
            loc = finding.location or {}
            return 2 if (loc.get("op") or loc.get("source")) else 1 if loc else 0

        best: tuple[int, int, "Finding"] | None = None
        for rank, items in enumerate(per_rank):
            for finding in items:
                if finding.severity == "error" and (best is None or score(finding) > best[0]):
                    best = (score(finding), rank, finding)
        base = per_rank[0]
        if best is None:
            return base
        _, rank, chosen = best
        chosen.evidence = {**chosen.evidence, "rank": rank}
        merged: list["Finding"] = []
        placed = False
        for finding in base:
            if finding.severity == "error":
                if not placed:
                    merged.append(chosen)
                    placed = True
                continue
            merged.append(finding)
        if not placed:
            merged.append(chosen)
        return merged

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (one tiny all-reduce and a host sync).

        Used only for decisions that depend on per-rank data (a plugin's veto).
        """
        device = self._plan.device if self._plan is not None else torch.device("cpu")
        if torch.distributed.get_backend(self.group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        buf = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(buf.item() > 0)
