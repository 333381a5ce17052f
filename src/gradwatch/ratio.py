"""The update-to-weight ratio ``||w_after - w_before|| / ||w_before||`` per layer, in bounded memory.

~1e-3 per step is the usual healthy range (Karpathy's rule of thumb); a ratio
near 1 means each update rewrites the weights. Measuring it needs the weights
from before the update, and a copy of all of them is as large as the model (on
a 7B-parameter model in bf16, 14 GB). So the layers are split, in depth order,
into *rounds* whose copies fit a byte budget (``update_ratio_budget``; default
5% of the parameter bytes, at most 64 MiB), and each
measurement copies one round: measurement ``m`` takes round ``m * s mod k``
(``s`` coprime with ``k`` and near ``0.618 k``, so that the first measurements
sample the whole depth), so every layer gets a ratio every ``k`` measurements (every
``update_ratio_every * k`` steps once past the first steps), and a model whose
weights fit the budget is measured whole every time (``k = 1``). Layers a
measurement does not cover are NaN in its record, as frozen layers are; the
rules read only finite ratios.

A layer larger than the budget (a 50k x 768 embedding) is measured on a share
of its elements per round: rounds of budget-sized slices of its flattened
parameters, each reporting ``||dw_s|| / ||w_s||`` over the slice ``s`` (the
slices of consecutive rounds cover the whole layer).

The copies live in one buffer per device, allocated at the first measurement
and reused (at most the budget; :attr:`UpdateRatioMeter.held_bytes`); after the
update the per-tensor norms of the difference come to the host in one small
transfer and are summed per layer there. Which round a step measures follows
from the step number alone (no state to save; the same on every rank).

When: on each of the first ``every`` steps (divergence shows in the first
updates, before the norms have grown) and then every ``every`` steps.

Two ways the update happens:

- the Watch steps the optimizer (``watch.step``): :meth:`UpdateRatioMeter.snapshot`
  before, :meth:`UpdateRatioMeter.measure` after;
- the caller steps it (``watch.observe``): :meth:`UpdateRatioMeter.arm_caller`
  registers a one-shot ``register_step_post_hook`` on the optimizer the caller
  steps (unwrapped from accelerate's/Lightning's wrappers); if no
  ``optimizer.step()`` follows (a GradScaler that found inf), the next
  ``observe()`` removes it (:meth:`UpdateRatioMeter.drop_caller`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import compat
from . import norms as _norms

if TYPE_CHECKING:  # pragma: no cover
    from .distributed import DistSync
    from .layers import LayerIndex

MiB = 1 << 20
BUDGET_SHARE = 0.05  # of the parameter bytes: the bound is 10%, this leaves room for the rest
BUDGET_MAX = 64 * MiB  # a fixed ceiling: a 7B model's telemetry needs no more than a small one's
_ALIGN = 64  # byte alignment of each copy inside the buffer (any dtype's view of it is aligned)


def default_budget(param_bytes: int) -> int:
    """The default ``update_ratio_budget``: 5% of ``param_bytes``, at most 64 MiB (no floor: the
    copy stays within 10% of the weights on a small model too; a round still takes at least one
    element, so a model of under ~1.3 KB holds one 64-byte slot).

    Example:
        >>> default_budget(100 * MiB) / MiB, default_budget(10 * 2**30) / MiB, default_budget(1000)
        (5.0, 64.0, 50)
    """
    return int(min(BUDGET_MAX, BUDGET_SHARE * param_bytes))


def hookable_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer whose step hooks fire for ``optimizer``: itself, or the one a wrapper
    (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer) steps; None if there is none.

    A wrapper that subclasses ``torch.optim.Optimizer`` without running its ``__init__``
    (accelerate's) has no hook tables: registering a hook on it fails, so its ``.optimizer``
    is tried next.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> hookable_optimizer(opt) is opt, hookable_optimizer(object())
        (True, None)
    """
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer):
            try:
                optimizer.register_step_post_hook(_no_op).remove()
                return optimizer
            except AttributeError:  # Optimizer.__init__ never ran: a wrapper
                pass
        optimizer = getattr(optimizer, "optimizer", None)
        if optimizer is None:
            return None
    return None


def _no_op(*args: Any) -> None:
    return None


# ----- the rounds: which elements of which parameters one measurement copies ---------------------
@dataclass(frozen=True)
class Piece:
    """Elements ``[start, stop)`` of flattened parameter ``param`` (an index into ``index.params``),
    copied at byte ``offset`` of its device's buffer; ``whole`` when it is the entire parameter."""

    param: int
    start: int
    stop: int
    offset: int
    whole: bool


@dataclass
class Round:
    """The pieces one measurement copies, the layers they cover and the bytes per device."""

    pieces: list[Piece] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)  # layer slots with at least one piece
    partial: list[int] = field(default_factory=list)  # of those, the ones covered on a share of their elements
    nbytes: dict[torch.device, int] = field(default_factory=dict)  # aligned bytes per device

    @property
    def total_bytes(self) -> int:
        """The bytes this round's copies take, padding included."""
        return sum(self.nbytes.values())


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def plan_rounds(params: list[torch.Tensor], param_layer: list[int], budget: int) -> list[Round]:
    """Split the parameters, in depth order, into rounds whose copies fit ``budget`` bytes.

    Whole layers are packed in order while they fit; a layer larger than the budget starts a
    round of its own and is split into budget-sized slices of its flattened elements (a
    non-contiguous parameter is never split: it is copied whole).

    Example:
        >>> ps = [torch.zeros(64), torch.zeros(64), torch.zeros(640)]  # 256, 256, 2560 bytes
        >>> rounds = plan_rounds(ps, [0, 1, 2], 1024)
        >>> [(r.layers, r.partial, r.total_bytes) for r in rounds]
        [([0, 1], [], 512), ([2], [2], 1024), ([2], [2], 1024), ([2], [2], 512)]
    """
    by_layer: dict[int, list[int]] = {}
    for i, slot in enumerate(param_layer):
        by_layer.setdefault(slot, []).append(i)
    rounds: list[Round] = []
    current = Round()

    def close() -> None:
        nonlocal current
        if current.pieces:
            rounds.append(current)
        current = Round()

    def add(i: int, start: int, stop: int) -> None:
        p = params[i]
        used = current.nbytes.get(p.device, 0)
        current.pieces.append(Piece(i, start, stop, used, start == 0 and stop == p.numel()))
        current.nbytes[p.device] = used + _aligned((stop - start) * p.element_size())

    for slot, members in by_layer.items():
        size = sum(_aligned(params[i].numel() * params[i].element_size()) for i in members)
        if current.total_bytes + size > budget:
            close()
        if size <= budget:
            for i in members:
                add(i, 0, params[i].numel())
            current.layers.append(slot)
            continue
        for i in members:  # larger than the budget: slices, one round after another
            p, start = params[i], 0
            numel, item = p.numel(), p.element_size()
            while start < numel:
                room = (budget - current.total_bytes) // _ALIGN * _ALIGN  # the aligned bytes left
                take = numel - start if not p.is_contiguous() else min(numel - start, room // item)
                if take <= 0 and current.pieces:
                    _close_partial(current, slot)
                    close()
                    continue
                take = max(take, 1)  # a budget below one element still measures something
                add(i, start, start + take)
                start += take
        _close_partial(current, slot)
    close()
    return rounds


def _close_partial(current: Round, slot: int) -> None:
    if current.pieces and slot not in current.layers:
        current.layers.append(slot)
        current.partial.append(slot)


def round_stride(k: int) -> int:
    """The step through the ``k`` rounds between consecutive measurements: coprime with ``k`` (so
    any ``k`` measurements in a row visit every round) and near ``0.618 k`` (so the first few
    measurements sample the whole depth, not only the first layers or one large embedding).

    Example:
        >>> [round_stride(k) for k in (1, 2, 3, 10, 21)]
        [1, 1, 2, 7, 13]
    """
    if k <= 2:
        return 1
    target = round(0.618 * k)
    for delta in range(k):
        for s in (target - delta, target + delta):
            if 0 < s < k and math.gcd(s, k) == 1:
                return s
    return 1


def _measurement_number(step: int, every: int) -> int:
    """0 for the first due step, 1 for the next, ... (the due steps are 1..every, then multiples)."""
    return step - 1 if step <= every else every + step // every - 2


@dataclass
class RatioSnapshot:
    """The copies of one round's pieces, taken before the update (numpy arrays or tensors)."""

    round: Round
    buffers: list[Any]
    numpy: bool


#: what :meth:`UpdateRatioMeter.snapshot` returns
Snapshot = RatioSnapshot


class UpdateRatioMeter:
    """Per-layer ``||dw|| / ||w||`` every ``every`` steps (and on each of the first ``every``),
    one budget-sized round of layers per measurement.

    Args:
        every: the measurement interval in steps.
        budget: bytes the copies may take; None: :func:`default_budget` of the parameter bytes.
            Default: None.

    Example:
        >>> meter = UpdateRatioMeter(10)
        >>> [s for s in range(1, 41) if meter.due(s)]
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40]
    """

    def __init__(self, every: int, budget: int | None = None) -> None:
        self.every = every
        self.budget_arg = budget
        self.budget = 0  # resolved with the plan
        self.rounds: list[Round] = []
        self._plan_key: tuple[int, int, int] | None = None
        self._pools: dict[torch.device, torch.Tensor] = {}
        self._host_pool: np.ndarray | None = None  # the CPU buffer seen by numpy (made once per buffer)
        self._host_views: dict[int, list[np.ndarray]] = {}  # per round: its pieces' views of that buffer
        self._caller_hook: Any = None
        # made with the plan (below): measured in the step, round_stride and the device set cost ~30 us a
        # measurement when worked out each time
        self._stride = 1
        self._pool_device: torch.device | None = None  # the one device of every round, None: several
        self._pool_size = 0

    def due(self, step: int) -> bool:
        """Whether step ``step`` measures the ratio."""
        return step <= self.every or step % self.every == 0

    @property
    def held_bytes(self) -> int:
        """Bytes of the copy buffers held now (at most the budget)."""
        return sum(pool.numel() for pool in self._pools.values())

    def round_of(self, step: int) -> Round | None:
        """The round step ``step`` measures (None before the plan is made)."""
        if not self.rounds:
            return None
        k = len(self.rounds)
        return self.rounds[_measurement_number(step, self.every) * self._stride % k]

    def plan(self, index: "LayerIndex") -> list[Round]:
        """The rounds for ``index`` (re-planned when its parameters changed)."""
        params = index.params
        key = (index.version, len(params), id(index))
        if key != self._plan_key:
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            self.budget = self.budget_arg if self.budget_arg is not None else default_budget(param_bytes)
            self.rounds = plan_rounds(list(params), list(index.param_layer), self.budget)
            self._pools, self._host_pool = {}, None
            self._stride = round_stride(len(self.rounds))
            devices = {d for r in self.rounds for d in r.nbytes}
            self._pool_device = next(iter(devices)) if len(devices) == 1 else None
            self._pool_size = max(r.nbytes[self._pool_device] for r in self.rounds) if self._pool_device else 0
            self._plan_key = key
        return self.rounds

    def _pool(self, rnd: Round) -> dict[torch.device, torch.Tensor]:
        """One uint8 buffer per device large enough for ``rnd``: sized for the largest round when
        one device holds every parameter (allocated once), else for this round (held bytes stay
        within the budget either way)."""
        device = self._pool_device
        if device is not None:
            if device not in self._pools:
                self._pools, self._host_pool = {device: torch.empty(self._pool_size, dtype=torch.uint8, device=device)}, None
            return self._pools
        if any(self._pools.get(d) is None or self._pools[d].numel() < n for d, n in rnd.nbytes.items()):
            self._pools, self._host_pool = {}, None  # freed before the new ones are made
            self._pools = {d: torch.empty(n, dtype=torch.uint8, device=d) for d, n in rnd.nbytes.items()}
        return self._pools

    def _host_buffers(self, rnd: Round, host: _norms.HostWeights, pool: torch.Tensor) -> list[np.ndarray]:
        """numpy views of ``pool`` for ``rnd``'s pieces (made once per round and buffer)."""
        if self._host_pool is None:
            self._host_pool, self._host_views = pool.numpy(), {}
        key = id(rnd)
        cached = self._host_views.get(key)
        if cached is None or any(b.dtype != host.views[p.param].dtype for b, p in zip(cached, rnd.pieces)):
            raw = self._host_pool
            cached = self._host_views[key] = [
                raw[p.offset: p.offset + (p.stop - p.start) * host.views[p.param].itemsize].view(host.views[p.param].dtype)
                for p in rnd.pieces]
        return cached

    # ----- before the update --------------------------------------------------------------
    def snapshot(self, index: "LayerIndex", host: _norms.HostWeights | None, dist: "DistSync | None",
                 step: int = 1) -> Snapshot | None:
        """The weights of step ``step``'s round, copied into the buffer kept between measurements
        (on CPU with numpy views: one ``numpy.copyto`` per piece; else one foreach copy)."""
        self.plan(index)
        rnd = self.round_of(step)
        if rnd is None:
            return None
        pools = self._pool(rnd)
        params = index.params
        if host is not None and host.current():
            buffers = self._host_buffers(rnd, host, pools[params[0].device])
            copy, views = np.copyto, host.views
            for piece, buffer in zip(rnd.pieces, buffers):
                copy(buffer, views[piece.param] if piece.whole else views[piece.param][piece.start: piece.stop])
            return RatioSnapshot(rnd, buffers, True)
        with torch.no_grad():
            local = params if dist is None else dist.local_params([params[p.param] for p in rnd.pieces])
            sources = [_source(params[p.param].detach() if dist is None else local[k].detach(), params[p.param], p)
                       for k, p in enumerate(rnd.pieces)]
            targets = []
            for piece, source in zip(rnd.pieces, sources):
                raw = pools[params[piece.param].device]
                n = source.numel() * source.element_size()
                targets.append(raw[piece.offset: piece.offset + n].view(source.dtype).view(source.shape))
            compat.foreach_copy_(targets, sources)
            return RatioSnapshot(rnd, targets, False)

    # ----- after the update -----------------------------------------------------------------
    def measure(self, before: Snapshot, index: "LayerIndex", host: _norms.HostWeights | None,
                dist: "DistSync | None", device: torch.device, weight_norms: np.ndarray) -> np.ndarray | None:
        """Per layer ||w_after - w_before|| / ||w_before|| (NaN for an all-zero layer and for the
        layers this round does not cover; a slice's own norms for a layer measured on a slice).

        ``weight_norms`` are the step's per-layer weight norms (host values, before the update).
        None when numpy took the snapshot and a weight can no longer be read by numpy after the
        update (it left the CPU or changed its dtype inside the optimizer step).
        """
        rnd = before.round
        n_layers = len(index)
        slot_of = index.param_layer
        partial = set(rnd.partial)
        with torch.no_grad():
            if before.numpy:  # numpy copied the weights: numpy takes the difference
                if host is None or not host.current():
                    return None
                views = host.views
                delta, base = [0.0] * n_layers, [0.0] * n_layers
                with np.errstate(over="ignore", invalid="ignore"):
                    subtract = np.subtract
                    for piece, buffer in zip(rnd.pieces, before.buffers):
                        slot = slot_of[piece.param]
                        if partial and slot in partial:
                            base[slot] += float(buffer.dot(buffer))
                        view = views[piece.param]
                        subtract(buffer, view if piece.whole else view[piece.start: piece.stop], out=buffer)
                        delta[slot] += float(buffer.dot(buffer))
                return _ratios(rnd, delta, base, weight_norms)
            params = index.params
            local = params if dist is None else dist.local_params([params[p.param] for p in rnd.pieces])
            afters = [_source(params[p.param].detach() if dist is None else local[k].detach(), params[p.param], p)
                      for k, p in enumerate(rnd.pieces)]
            slots = [slot_of[p.param] for p in rnd.pieces]
            base = [0.0] * n_layers
            if partial:
                base = self._squares(rnd, before.buffers, slots, index, dist, device, only=partial)
            compat.foreach_sub_(before.buffers, afters)  # before := before - after = -dw
            delta = self._squares(rnd, before.buffers, slots, index, dist, device)
        return _ratios(rnd, delta, base, weight_norms)

    @staticmethod
    def _squares(rnd: Round, tensors: list[torch.Tensor], slots: list[int], index: "LayerIndex",
                 dist: "DistSync | None", device: torch.device, only: set[int] | None = None) -> list[float]:
        """Per-layer sums of squares of ``tensors`` (the pieces' copies); across ranks under torch.distributed."""
        keep = [t if only is None or s in only else None for t, s in zip(tensors, slots)]
        if dist is not None:  # sharded: sum the local parts across ranks (one collective)
            aligned: list[torch.Tensor | None] = [None] * len(index.params)
            for piece, tensor in zip(rnd.pieces, keep):
                aligned[piece.param] = tensor
            return dist.layer_sq_norms(index, aligned, device).cpu().tolist()  # type: ignore[arg-type]
        squares = [0.0] * len(index)
        present = [(t, s) for t, s in zip(keep, slots) if t is not None]
        if present:
            values = _norms._tensor_norms([t for t, _ in present], 2.0).cpu().tolist()
            for (_, slot), value in zip(present, values):
                squares[slot] += value * value
        return squares

    # ----- observe(): the caller's optimizer.step() makes the update ------------------------
    def arm_caller(self, optimizer: torch.optim.Optimizer, before: Snapshot,
                   on_update: Callable[[Snapshot], None]) -> None:
        """Call ``on_update(before)`` once, right after the caller's next ``optimizer.step()``."""
        self.drop_caller()

        def hook(stepped: Any, args: Any, kwargs: Any) -> None:
            self.drop_caller()
            on_update(before)

        self._caller_hook = optimizer.register_step_post_hook(hook)

    def drop_caller(self) -> None:
        """Remove a hook armed by :meth:`arm_caller` whose ``optimizer.step()`` never came."""
        handle, self._caller_hook = self._caller_hook, None
        if handle is not None:
            handle.remove()


def _source(tensor: torch.Tensor, param: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's elements of ``tensor`` (the parameter, or its local shard: the same share of it)."""
    if piece.whole:
        return tensor
    numel, full = tensor.numel(), param.numel()
    start, stop = (piece.start, piece.stop) if numel == full else (piece.start * numel // full, piece.stop * numel // full)
    return tensor.view(-1)[start:stop]


def _ratios(rnd: Round, delta: list[float], base: list[float], weight_norms: np.ndarray) -> np.ndarray:
    """sqrt(delta) / ||w|| per covered layer (the slice's own norm for a partial one), NaN elsewhere."""
    norms = weight_norms.tolist()
    out = [math.nan] * len(norms)  # a Python list, one array at the end: a few layers per round
    partial = rnd.partial
    for slot in rnd.layers:
        w = math.sqrt(base[slot]) if slot in partial else norms[slot]
        out[slot] = math.sqrt(delta[slot]) / w if w > 0 else math.nan
    return np.array(out)
