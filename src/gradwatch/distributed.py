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

**Which rank.** Each rank adds to that all-reduce a few float64 words of
per-rank flags (``ceil(world / 26)`` words, 2 bits per rank: a non-finite local
loss, non-finite local gradients), exact as sums of distinct powers of two.
Under DDP the gradient bit comes from a communication hook
(:func:`flagging_allreduce_hook`, registered by the Watch with
``register_comm_hook``) that sums each bucket (float32 accumulator) *before* the
all-reduce (the sum is non-finite iff an element is) and then runs torch's
default all-reduce unchanged; a model that already has a comm hook keeps it
(the Watch says so once and names ranks from the loss alone). Under FSDP2 each
``fully_shard`` module's reduce-scatter comm is wrapped the same way
(:class:`FlaggingReduceScatter`, through FSDP2's public
``set_custom_reduce_scatter``): its input is this rank's unsharded gradients. The flags are read on the host only on a
non-finite step (:meth:`DistSync.nonfinite_ranks`).

**Do replicas agree** (DDP): every ``agree_every`` steps (and on step 1)
:meth:`DistSync.check_replicas` all-gathers per-layer float64 checksums of the
local weights (sum and 2-norm) and the step's clip coefficient and skip flag;
replicas must hold bit-identical values (the same broadcast start, the same
averaged gradients, the same optimizer): any difference is a
``rank_divergence`` finding (:mod:`gradwatch.replicas`).

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

__all__ = ["DistSync", "FlaggingReduceScatter", "HookState", "flagging_allreduce_hook", "is_distributed", "is_dtensor", "local_tensor", "unwrap_model"]

#: ranks per float64 word of the per-rank flags (2 bits each: 52 of the 53 exact bits)
RANKS_PER_WORD = 26
GRAD_BIT, LOSS_BIT = 1, 2


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


class HookState:
    """The state of gradwatch's DDP comm hook: the process group and the Watch's DistSync (None once closed)."""

    def __init__(self, group: Any, sync: "DistSync | None") -> None:
        self.group = group
        self.sync = sync


def flagging_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]  # no annotations: see below
    """DDP comm hook: note whether this rank's bucket is finite, then torch's default all-reduce (unchanged).

    The float32 sum of the bucket is non-finite iff one of its elements is
    (or the sum of finite values overflows, above 3e38: not a gradient); it is added, times 0,
    to the DistSync's per-step accumulator on the device: no host sync, no extra
    collective. The gradients are then divided by the world size and
    all-reduced exactly as ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook``
    does, so the averaged gradients are bit-identical to DDP without a hook.
    Once the Watch is closed (``state.sync`` None) only the all-reduce remains.

    Example (registered by the Watch; by hand)::

        ddp_model.register_comm_hook(state=HookState(None, sync), hook=flagging_allreduce_hook)
    """
    # (No annotations: DDP's _check_comm_hook compares them with dist.GradBucket and Future[Tensor], and
    # under ``from __future__ import annotations`` they would be strings.)
    buffer = bucket.buffer()
    if state.sync is not None:
        state.sync.note_local_bucket(buffer)
    group = state.group if state.group is not None else torch.distributed.group.WORLD
    buffer.div_(group.size())
    work = torch.distributed.all_reduce(buffer, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class FlaggingReduceScatter:
    """FSDP2's reduce-scatter comm, wrapped: this rank's unsharded gradients are checked before it runs.

    The FSDP2 counterpart of :func:`flagging_allreduce_hook`, set with FSDP2's
    public ``FSDPModule.set_custom_reduce_scatter``: ``allocate`` and the call
    delegate to the comm that was there (the default one, or yours), and the
    float32 sum of the reduce-scatter input (this rank's padded, unsharded
    gradients of the group; padding is zeros) is folded into the per-step flag first.

    Example (set by the Watch; by hand)::

        module.set_custom_reduce_scatter(FlaggingReduceScatter(old_comm, HookState(None, sync)))
    """

    def __init__(self, inner: Any, state: HookState) -> None:
        self.inner = inner
        self.state = state

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The inner comm's buffer."""
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                 async_op: bool = False) -> Any:
        if self.state.sync is not None:
            self.state.sync.note_local_bucket(input_tensor)
        return self.inner(output_tensor=output_tensor, input_tensor=input_tensor, group=group, op=op,
                          async_op=async_op)


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
        self.n_flag_words = -(-self.world_size // RANKS_PER_WORD)
        self.hooked = False  # a DDP comm hook flags non-finite local gradients
        self._hook_state: HookState | None = None
        self._replica_group: Any = None  # DDP's process group (the replicas), when the model is DDP
        #: report an internal error once (the Watch's ``errors.report``); None: drop it
        self.report: Any = None
        self._local_bad: torch.Tensor | None = None  # float64 scalar: nan iff a bucket of this step was non-finite
        self._flags: torch.Tensor | None = None  # the reduced flag words of the last measurement

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

    # ----- which rank ----------------------------------------------------------------
    def install_hook(self, model: nn.Module) -> str | None:
        """Register :func:`flagging_allreduce_hook` on a DDP ``model``; None if done, else why not (plain words).

        A model that already has a comm hook keeps it (torch allows one): the ranks
        are then named from the local loss alone. FSDP2 (``fully_shard`` modules):
        each module's reduce-scatter is wrapped in :class:`FlaggingReduceScatter`
        instead. Anything else: nothing to do.

        Example (inside an initialized process group)::

            why_not = sync.install_hook(ddp_model)   # None: registered
        """
        compiled = compat.compiled_inner_module(model)  # torch.compile(DDP(model))
        if compiled is not None:
            model = compiled
        if not isinstance(model, nn.parallel.DistributedDataParallel):
            return self._install_fsdp(model)
        self._replica_group = getattr(model, "process_group", None)  # the replicas: DDP's own group
        mine = getattr(model, "_gradwatch_hook", None)
        if isinstance(mine, HookState):  # registered by an earlier Watch of this model: take it over
            mine.sync = self
            self.hooked = True
            self._hook_state = mine
            return None
        if getattr(model, "_comm_hooks", None):
            return "the model already has a DDP communication hook, which is kept"
        state = HookState(self._replica_group, self)  # reduce over DDP's group: the math stays DDP's
        try:
            model.register_comm_hook(state=state, hook=flagging_allreduce_hook)
        except Exception as exc:  # a built-in hook registered, or backward already ran with another
            return (f"DDP's register_comm_hook refused gradwatch's hook ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:160]})")
        model._gradwatch_hook = state
        self._hook_state = state
        self.hooked = True
        return None

    def _install_fsdp(self, model: nn.Module) -> str | None:
        """FSDP2: wrap every ``fully_shard`` module's reduce-scatter in :class:`FlaggingReduceScatter`."""
        modules = [m for m in model.modules() if hasattr(m, "set_custom_reduce_scatter")]
        if not modules:
            return None
        state = getattr(model, "_gradwatch_hook", None)
        if not isinstance(state, HookState):
            state = HookState(self.group, self)
        state.sync = self
        wrapped = 0
        for module in modules:
            comms = compat.fsdp_reduce_scatter_comms(module)
            if comms is not None and not comms:  # no parameters of its own: nothing to reduce-scatter
                wrapped += 1
                continue
            if comms is None or len(comms) != 1:  # unreadable, or several groups (no custom comm then)
                continue
            comm = comms[0]
            if isinstance(comm, FlaggingReduceScatter):
                comm.state = state
                wrapped += 1
                continue
            try:
                module.set_custom_reduce_scatter(FlaggingReduceScatter(comm, state))
                wrapped += 1
            except Exception:  # several param groups (a shard_placement_fn mesh), or an FSDP that refuses
                continue
        if wrapped == 0:
            return "FSDP2's reduce-scatter could not be wrapped"
        model._gradwatch_hook = state
        self._hook_state = state
        self.hooked = wrapped == len(modules)
        return None if self.hooked else f"{len(modules) - wrapped} of {len(modules)} FSDP2 modules keep their reduce-scatter"

    def release_hook(self) -> None:
        """The Watch closed: the comm hook stops flagging (it stays registered, as a plain all-reduce)."""
        state = getattr(self, "_hook_state", None)
        if state is not None and state.sync is self:
            state.sync = None

    def note_local_bucket(self, buffer: torch.Tensor) -> None:
        """Fold one local bucket's finiteness into this step's flag (on the device, no sync).

        Runs inside the backward (a comm hook): an error here is reported once
        (``report``, set by the Watch) and never reaches the training loop.
        """
        try:
            self._note(buffer)
        except Exception as exc:
            if self.report is not None:
                self.report("distributed comm hook", exc)

    def _note(self, buffer: torch.Tensor) -> None:
        with torch.no_grad():
            # nan iff an element is nan or inf (or the float32 sum overflows: |sum| > 3e38, absurd gradients;
            # the flags are read only on a non-finite step). float32: 7x faster than float64 on a CPU.
            bad = torch.sum(buffer.detach(), dtype=torch.float32) * 0.0
            self._local_bad = bad if self._local_bad is None else self._local_bad + bad.to(self._local_bad.device)

    def _flag_words(self, loss64: torch.Tensor, device: torch.device) -> torch.Tensor:
        """This rank's flag words: 2 bits at its own position, all other words 0 (no host sync)."""
        local = self._local_bad
        self._local_bad = None
        bits = (~torch.isfinite(loss64.reshape(()))).to(torch.float64) * LOSS_BIT
        if local is not None:
            bits = bits + torch.isnan(local.to(device)).to(torch.float64) * GRAD_BIT
        words = torch.zeros(self.n_flag_words, dtype=torch.float64, device=device)
        shift = 2 * (self.rank % RANKS_PER_WORD)
        words[self.rank // RANKS_PER_WORD] = bits * float(2 ** shift)
        return words

    def nonfinite_ranks(self) -> dict[str, list[int]]:
        """The ranks whose local loss / local gradients were non-finite on the last measured step.

        Read on the host (a small transfer), so the Watch calls it only on a
        non-finite step. ``"gradients"`` is known only under DDP with gradwatch's
        comm hook (``hooked``); otherwise it is empty.

        Example (on a non-finite step where rank 1's batch held NaN)::

            sync.nonfinite_ranks()   # {'loss': [1], 'gradients': [1]}
        """
        out: dict[str, list[int]] = {"loss": [], "gradients": []}
        if self._flags is None:
            return out
        for w, value in enumerate(self._flags.tolist()):
            if not math.isfinite(value):
                continue
            word = int(value)
            for k in range(RANKS_PER_WORD):
                rank = w * RANKS_PER_WORD + k
                if rank >= self.world_size:
                    break
                if (word >> (2 * k)) & GRAD_BIT:
                    out["gradients"].append(rank)
                if (word >> (2 * k)) & LOSS_BIT:
                    out["loss"].append(rank)
        return out

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

        The all-reduce also carries the per-rank flags (``n_flag_words`` float64
        words, see :meth:`nonfinite_ranks`).

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
        flags = self._flag_words(loss64, powers.device)
        keep_flags = exact and self._flags is not None  # the exact re-measure gets the mean loss: keep the first flags
        if not self.sharded:  # DDP: gradients already identical; agree on the loss, finiteness and the bad ranks
            flag = powers.sum().to(torch.float64).reshape(1) * 0.0  # nan iff a local power is non-finite
            buf = torch.cat([loss64, flag, flags])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            self._flags = self._flags if keep_flags else buf[2:]
            return groups, powers + buf[1].to(powers.dtype), weight_powers, buf[0]
        weight = self._ext_weight.to(powers.device)
        n = self._n_ext
        if math.isinf(float(norm_type)):
            grad_buf = torch.nan_to_num(powers.to(torch.float64), nan=math.inf)  # MAX need not keep nan
            dist.all_reduce(grad_buf, op=dist.ReduceOp.MAX, group=self.group)
            rest = torch.cat([weight_powers.to(torch.float64) * weight, loss64, flags])
            dist.all_reduce(rest, op=dist.ReduceOp.SUM, group=self.group)
            grad_ext, weight_ext, mean_loss = grad_buf, rest[:n], rest[n]
            self._flags = self._flags if keep_flags else rest[n + 1:]
        else:
            buf = torch.cat([powers.to(torch.float64) * weight, weight_powers.to(torch.float64) * weight, loss64, flags])
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
            grad_ext, weight_ext, mean_loss = buf[:n], buf[n : 2 * n], buf[2 * n]
            self._flags = self._flags if keep_flags else buf[2 * n + 1:]
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

    def merge_findings(self, findings: list["Finding"], ranks: dict[str, list[int]] | None = None,
                       bad_step: Any = None, writer: Any = None) -> tuple[list["Finding"], list[dict[str, Any]]]:
        """One list of findings for a non-finite step, the same on every rank; and the bad batches.

        Called by the Watch on every rank for a non-finite step only (rare, so one
        ``all_gather_object`` is affordable). ``ranks`` is :meth:`nonfinite_ranks`
        (the same on every rank). The rank where the non-finite value arose is the
        one whose replay can locate it, so the error-level finding of a flagged
        rank (else the best-located one: op or source line known; lowest rank on
        a tie) replaces rank 0's; it carries ``evidence["rank"]`` and
        ``evidence["nonfinite_ranks"]``, and ``location["rank"]``. Other findings
        are rank 0's (computed from the same agreed numbers on every rank).

        ``bad_step`` (a :class:`gradwatch.nonfinite.badbatches.BadStep` or None) is
        this rank's batch fingerprint, verdict and reproduction bundle: the bundle
        of the chosen rank is sent to the writing rank, whose ``writer`` saves it
        (point-to-point, only when they differ). Returns ``(findings, bad)``:
        ``bad`` lists ``{"rank", "fingerprint", "signature", "verdict", "code"}`` of the flagged ranks
        (every rank when none is flagged).
        """
        from .findings import Finding

        mine = {
            "findings": [f.to_dict() for f in findings],
            "fingerprint": getattr(bad_step, "fingerprint", None),
            "signature": getattr(bad_step, "signature", None),
            "verdict": getattr(bad_step, "verdict", None),
            "code": getattr(bad_step, "code", None),
            "bundle": getattr(bad_step, "bundle_name", None) if getattr(bad_step, "bundle", None) is not None else None,
        }
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, mine, group=self.group)
        per_rank = [[Finding.from_dict(d) for d in ((item or {}).get("findings") or [])] for item in gathered]
        ranks = ranks or {"loss": [], "gradients": []}
        flagged = sorted(set(ranks.get("loss", [])) | set(ranks.get("gradients", [])))

        def score(rank: int, finding: "Finding") -> int:
            loc = finding.location or {}
            located = 2 if (loc.get("op") or loc.get("source")) else 1 if loc else 0
            return located + (10 if rank in flagged else 0)

        best: tuple[int, int, "Finding"] | None = None
        for rank, items in enumerate(per_rank):
            for finding in items:
                if finding.severity == "error" and (best is None or score(rank, finding) > best[0]):
                    best = (score(rank, finding), rank, finding)
        chosen_rank = best[1] if best is not None else (flagged[0] if flagged else 0)
        self._move_bundle(gathered, chosen_rank, bad_step, writer)
        bad = [{key: gathered[r].get(key) for key in ("fingerprint", "signature", "verdict", "code")} | {"rank": r}
               for r in (flagged or range(self.world_size)) if gathered[r] and gathered[r].get("fingerprint")]
        base = per_rank[0]
        if best is None:
            return base, bad
        _, rank, chosen = best
        chosen.evidence = {**chosen.evidence, "rank": rank, "nonfinite_ranks": ranks}
        chosen.location = {**chosen.location, "rank": rank}
        chosen.message += _rank_sentence(ranks, self.world_size, self.hooked)
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
        return merged, bad

    def _move_bundle(self, gathered: list[Any], chosen: int, bad_step: Any, writer: Any) -> None:
        """The chosen rank's reproduction bundle to the writing rank (which saves it over its own)."""
        if not isinstance(self.write_rank, int) or chosen == self.write_rank:
            return  # write_rank="all": every rank saved its own bundle
        name = (gathered[chosen] or {}).get("bundle")
        if not name:
            return
        dist = torch.distributed
        if self.rank == chosen:
            dist.send_object_list([bad_step.bundle], dst=self._global(self.write_rank), group=self.group)
        elif self.rank == self.write_rank:
            box: list[Any] = [None]
            dist.recv_object_list(box, src=self._global(chosen), group=self.group)
            if writer is not None and isinstance(box[0], dict):
                writer.save_bundle(name, box[0])

    def _global(self, rank: int) -> int:
        """A rank of ``group`` as a global rank (send/recv take global ranks)."""
        if self.group is None:
            return rank
        return torch.distributed.get_global_rank(self.group, rank)

    def check_replicas(self, step: int, index: "LayerIndex", clip_coef: float, skipped: bool) -> "Finding | None":
        """``rank_divergence`` if the replicas' weights or clip decision differ (one ``all_gather``, one host sync).

        DDP only (FSDP2 ranks hold shards, not replicas: None without a collective);
        over DDP's own process group when the model is DDP (the ranks named are of that group).
        Called by the Watch on step 1 and every ``agree_every`` steps, on every rank
        (the same finding on each). See :mod:`gradwatch.replicas`.

        Example (inside an initialized process group, DDP)::

            finding = sync.check_replicas(step, watch.index, record.clip_coef, record.skipped)
        """
        from .replicas import divergence_finding, replica_checksums

        if self.sharded:
            return None
        device = self._collective_device()
        coef = clip_coef if math.isfinite(clip_coef) else -1.0  # a skipped step has no coefficient: the same everywhere
        mine = replica_checksums(index.params, index.param_layer, len(index), coef, skipped, device)
        group = self._replica_group if self._replica_group is not None else self.group
        rows = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(rows, mine, group=group)  # ranks below: of DDP's group
        return divergence_finding(step, index.names, torch.stack(rows).cpu().numpy())

    def _collective_device(self) -> torch.device:
        device = self._plan.device if self._plan is not None else torch.device("cpu")
        if torch.distributed.get_backend(self.group) == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank (one tiny all-reduce and a host sync).

        Used only for decisions that depend on per-rank data (a plugin's veto).
        """
        buf = torch.tensor([1.0 if flag else 0.0], device=self._collective_device())
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(buf.item() > 0)


def _rank_sentence(ranks: dict[str, list[int]], world_size: int, hooked: bool) -> str:
    """`` It arose on rank 1 of 2 (its local gradients were non-finite before the all-reduce).``"""
    grads, loss = ranks.get("gradients", []), ranks.get("loss", [])
    flagged = sorted(set(grads) | set(loss))
    if not flagged:
        how = "" if hooked else " (the ranks' local gradients were not checked: see docs/distributed.md)"
        return f" Every rank's local loss was finite, so the rank it arose on is not known{how}."
    names = ", ".join(str(r) for r in flagged)
    what = []
    if loss:
        what.append("local loss")
    if grads:
        what.append("local gradients before the all-reduce")
    its = "its" if len(flagged) == 1 else "their"
    verb = "was" if what == ["local loss"] else "were"
    return f" It arose on rank{'s' if len(flagged) > 1 else ''} {names} of {world_size} ({its} {' and '.join(what)} {verb} non-finite)."
