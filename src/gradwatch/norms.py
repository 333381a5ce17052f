"""Fused per-layer norms and clipping: tensors in, numbers out.

This is the pure core of gradwatch's telemetry. Clipping needs one norm per
parameter tensor to get the global norm; per-layer norms fall out of the same
numbers. One pass does all of it:

1. per-tensor norms with the foreach kernels, one call per (device, dtype) group;
2. per-layer powers ``sum |n_i|^p`` (``max`` for ``p = inf``) with one
   ``index_add_`` (``scatter_reduce_``) into a tensor of size n_layers;
3. the global norm from the per-layer powers;
4. one in-place multiply of every gradient by the clamped coefficient
   ``min(1, max_norm / (total + 1e-6))`` - the same formula as
   :func:`torch.nn.utils.clip_grad_norm_`, without a host sync.

Step 2's per-layer powers are what a distributed run all-reduces (one
collective of size n_layers) before step 3. On a single process with the
2-norm (:meth:`MeasurePlan.tensor_norms2`), steps 2-3 run on the host instead:
the per-tensor norms ride in the step's one device-to-host transfer and are
summed per layer there (a few dozen numbers), and on CPU numpy reads float32/
float64 weights in place (:class:`HostWeights`) rather than paying a torch
call per tensor for their norms.

Overflow: per-layer and global sums are kept in float64, so norms that are
finite in float32 never overflow when squared and added. A single float32
tensor whose own sum of squares overflows (elements above ~1.8e19 / sqrt(n))
comes back from the foreach kernel as inf, as from ``clip_grad_norm_``; the
Watch then re-measures that step once with ``exact=True`` (float64
accumulation, about 30x slower on CPU, only on such steps): finite gradients
get their finite, exact norm, and only a gradient holding inf or NaN stays
non-finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from . import compat
from .fastpath import HostWeights

_EPS = 1e-6  # the same epsilon as torch.nn.utils.clip_grad_norm_


@dataclass
class TensorGroups:
    """Tensors grouped by (device, dtype), each with the layer slot of every tensor.

    Build it once per step with :func:`group_tensors` (cheap: a Python pass over
    the list, no kernels).
    """

    tensors: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]
    slots: dict[tuple[torch.device, torch.dtype], list[int]]


def group_tensors(tensors: list[torch.Tensor | None], slots: list[int]) -> TensorGroups:
    """Group non-None tensors by (device, dtype), keeping each one's layer slot.

    Example:
        >>> g = group_tensors([torch.ones(2), None, torch.ones(3, dtype=torch.float64)], [0, 1, 1])
        >>> sorted(len(v) for v in g.tensors.values())
        [1, 1]
    """
    by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    slot_key: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for tensor, slot in zip(tensors, slots):
        if tensor is None:
            continue
        key = (tensor.device, tensor.dtype)
        bucket = by_key.get(key)
        if bucket is None:
            by_key[key] = [tensor]
            slot_key[key] = [slot]
        else:
            bucket.append(tensor)
            slot_key[key].append(slot)
    return TensorGroups(by_key, slot_key)


def dense_values(tensor: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse tensor (duplicates summed), the tensor itself if dense: same norm.

    Example:
        >>> g = torch.sparse_coo_tensor([[0, 0, 2]], [3.0, 1.0, 0.0], (4,), check_invariants=True)  # index 0 twice
        >>> dense_values(g).tolist(), torch.linalg.vector_norm(dense_values(g)).item()
        ([4.0, 0.0], 4.0)
    """
    if tensor.layout == torch.strided:
        return tensor
    if tensor.layout == torch.sparse_coo:
        return tensor.coalesce().values()
    return tensor.values()  # compressed layouts (CSR, ...) keep one value per stored element


def _tensor_norm_list(tensors: list[torch.Tensor], norm_type: float, exact: bool = False) -> list[torch.Tensor]:
    """Per-tensor norms of one (device, dtype) group as 0-d tensors (sparse gradients too).

    ``exact``: accumulate in float64 (finite and exact where a float32 sum of squares overflows).
    """
    return compat.foreach_norm(tensors, norm_type, dtype=torch.float64 if exact else None)


def _tensor_norms(tensors: list[torch.Tensor], norm_type: float, exact: bool = False) -> torch.Tensor:
    """Per-tensor norms of one (device, dtype) group as one 1-D tensor (sparse gradients too)."""
    return torch.stack(_tensor_norm_list(tensors, norm_type, exact))


def _accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for per-layer sums (a float32 sum of squares overflows at a norm of ~1.8e19), where the device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def layer_powers(
    groups: TensorGroups,
    n_layers: int,
    norm_type: float = 2.0,
    device: torch.device | None = None,
    exact: bool = False,
) -> torch.Tensor:
    """Per-layer ``sum_i |norm_i|^p`` (or ``max_i |norm_i|`` for ``p = inf``), float64 on ``device`` (float32 on MPS).

    Layers without any tensor get 0. No host sync. ``exact``: per-tensor norms accumulated in
    float64 too (for gradients whose float32 sum of squares overflows; slower).

    Example:
        >>> g = group_tensors([torch.tensor([3.0]), torch.tensor([4.0])], [0, 0])
        >>> layer_powers(g, 1).tolist()
        [25.0]
    """
    norm_type = float(norm_type)
    if device is None:
        device = next(iter(groups.tensors))[0] if groups.tensors else torch.device("cpu")
    acc_dtype = _accumulator_dtype(device)
    out = torch.zeros(n_layers, dtype=acc_dtype, device=device)
    for key, tensors in groups.tensors.items():
        norms = _tensor_norms(tensors, norm_type, exact).to(device=device, dtype=acc_dtype)
        index = torch.tensor(groups.slots[key], dtype=torch.long, device=device)
        if math.isinf(norm_type):
            out.scatter_reduce_(0, index, norms, reduce="amax", include_self=True)
        else:
            out.index_add_(0, index, norms if norm_type == 1.0 else norms.pow(norm_type))
    return out


def finalize_norms(powers: torch.Tensor, norm_type: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """From per-layer powers to (per-layer norms, global norm). No host sync.

    Example:
        >>> layer, total = finalize_norms(torch.tensor([9.0, 16.0]))
        >>> layer.tolist(), total.item()
        ([3.0, 4.0], 5.0)
    """
    norm_type = float(norm_type)
    if math.isinf(norm_type):
        total = powers.max() if powers.numel() else powers.new_zeros(())
        return powers, total
    total_pow = powers.sum()
    if norm_type == 1.0:
        return powers, total_pow
    if norm_type == 2.0:
        return powers.sqrt(), total_pow.sqrt()
    inv = 1.0 / norm_type
    return powers.pow(inv), total_pow.pow(inv)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (total + 1e-6))`` as a tensor, as clip_grad_norm_ computes it.

    Example:
        >>> round(clip_coefficient(torch.tensor(4.0), 1.0).item(), 6), clip_coefficient(torch.tensor(0.5), 1.0).item()
        (0.25, 1.0)
    """
    return (total_norm + _EPS).reciprocal_().mul_(max_norm).clamp_(max=1.0)


def scale_(groups: TensorGroups, coefficient: torch.Tensor | float) -> None:
    """Multiply every tensor in ``groups`` in place by ``coefficient`` (a 0-d tensor or a number). No host sync.

    Example:
        >>> g = group_tensors([torch.ones(2), torch.ones(1)], [0, 1])
        >>> scale_(g, 0.5); [t.tolist() for t in g.tensors[(torch.device("cpu"), torch.float32)]]
        [[0.5, 0.5], [0.5]]
    """
    for (device, _dtype), tensors in groups.tensors.items():
        coef = coefficient.to(device) if isinstance(coefficient, torch.Tensor) else coefficient
        compat.foreach_mul_(tensors, coef)


def per_layer_grad_norms_(
    grads: list[torch.Tensor | None],
    slots: list[int],
    n_layers: int,
    max_norm: float | None = None,
    norm_type: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-layer and global gradient norms before clipping, then clip in place.

    The one-call form of the fused pass (the Watch calls the steps itself so that
    a distributed run can reduce the per-layer powers in between).

    Args:
        grads: gradient tensors (None for a parameter without a gradient).
        slots: the layer slot of each entry of ``grads``.
        n_layers: number of layers (size of the result).
        max_norm: clip threshold; None measures only. Default: None.
        norm_type: p of the p-norm, ``float('inf')`` for the max norm. Default: 2.0.

    Returns:
        ``(layer_norms, total_norm, clip_coef)``, all tensors, norms measured
        *before* clipping; ``clip_coef`` is 1 when nothing was clipped.

    Example:
        >>> g = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])]
        >>> layers, total, coef = per_layer_grad_norms_(g, [0, 1], 2, max_norm=1.0)
        >>> layers.tolist(), total.item(), round(g[0][0].item(), 4)
        ([3.0, 4.0], 5.0, 0.6)
    """
    groups = group_tensors(grads, slots)
    powers = layer_powers(groups, n_layers, norm_type)
    layer_norms, total = finalize_norms(powers, norm_type)
    if max_norm is None:
        return layer_norms, total, torch.ones((), dtype=total.dtype, device=total.device)
    coef = clip_coefficient(total, max_norm)
    scale_(groups, coef)
    return layer_norms, total, coef


#: up to this many parameter tensors the host side of a step runs in plain Python (MeasurePlan.on_cpu)
FEW_TENSORS = 64


class MeasurePlan:
    """A fixed parameter list, grouped once, for one fused norm pass per step.

    On the common path (2-norm, every parameter has a gradient) each (device,
    dtype) group makes ONE foreach norm call over its gradients *and* its
    weights (:meth:`tensor_norms2`, per-layer sums on the host; on CPU the
    weights' norms come from numpy, :class:`HostWeights`). The distributed
    path (:meth:`measure`) makes the same call and ``index_add_`` into a
    tensor of 2 x n_layers + 1: per-layer gradient powers, weight powers and
    the global power together, ready for one all-reduce. Index tensors are
    built once. Any other case takes the general path (:func:`group_tensors`
    + :func:`layer_powers` twice).

    Example:
        >>> w = [torch.nn.Parameter(torch.tensor([3.0])), torch.nn.Parameter(torch.tensor([4.0]))]
        >>> plan = MeasurePlan(w, [0, 1], 2)
        >>> groups, g, wp = plan.measure([torch.tensor([1.0]), torch.tensor([2.0])])
        >>> g.tolist(), wp.tolist()
        ([1.0, 4.0], [9.0, 16.0])
    """

    def __init__(self, params: list[torch.Tensor], slots: list[int], n_layers: int, device: torch.device | None = None) -> None:
        self.params = list(params)
        self.slots = list(slots)
        self.n_layers = n_layers
        self.device = device if device is not None else (self.params[0].device if self.params else torch.device("cpu"))
        members: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            members.setdefault((p.device, p.dtype), []).append(i)
        self.members = members
        self.acc_dtype = _accumulator_dtype(self.device)
        self._fused_index = {
            key: torch.tensor([self.slots[i] for i in idx] + [self.slots[i] + n_layers for i in idx], dtype=torch.long, device=self.device)
            for key, idx in members.items()
        }
        self._slots_by_key = {key: [self.slots[i] for i in idx] for key, idx in members.items()}
        self._weight_groups = TensorGroups({k: [self.params[i] for i in idx] for k, idx in members.items()}, dict(self._slots_by_key))
        # every gradient of a group also adds into the last slot: the global power
        self._total_index = {key: torch.full((len(idx),), 2 * n_layers, dtype=torch.long, device=self.device)
                             for key, idx in members.items()}
        # tensor_norms2's order on the host: per group its gradients (layer slot), then its weights (n_layers + slot)
        self._host_slots = np.array([s for idx in members.values() for s in
                                     [self.slots[i] for i in idx] + [self.slots[i] + n_layers for i in idx]], dtype=np.intp)
        #: CPU weights that numpy reads in place (None otherwise): their norms are taken on the host
        self.host = HostWeights.of(self.params)
        # ... then the device brings the gradients only (group order) and numpy adds the weights (parameter order)
        self._grad_then_weight_slots = np.array([self.slots[i] for idx in members.values() for i in idx]
                                                + [s + n_layers for s in self.slots], dtype=np.intp)
        # A small model's host side in plain Python: a few dozen floats cost less than five numpy calls
        # (~10 us against ~33 us in the step on the benchmark MLP's 16 tensors); many tensors take numpy.
        self._few = len(self.params) <= FEW_TENSORS
        self._grad_slot_list = [int(s) for s in self._grad_then_weight_slots[: len(self.params)]]
        self._weight_slot_list = [int(s) for s in self._grad_then_weight_slots[len(self.params):]]
        squares = np.empty(2 * len(self.params))  # numpy's buffer: (all, the gradients' part, the weights' part)
        self._host_squares = (squares, squares[: len(self.params)], squares[len(self.params) :])
        self._all_cpu = all(key[0].type == "cpu" for key in members)

    #: False: the one-transfer path even on the CPU (what a model on an accelerator takes; tests count its transfers)
    read_on_cpu: ClassVar[bool] = True

    @property
    def on_cpu(self) -> bool:
        """Every parameter on the CPU and at most :data:`FEW_TENSORS` of them: the Watch reads the
        norms' values in place (one ``item()`` each, ~8 us in the step against ~27 us for the stack and
        copy on 16 tensors; the stack is cheaper for many tensors). Nothing to transfer either way."""
        return self._all_cpu and self._few and self.read_on_cpu

    def measure(
        self, grads: list[torch.Tensor | None], norm_type: float = 2.0, exact: bool = False
    ) -> tuple[TensorGroups, torch.Tensor, torch.Tensor]:
        """Gradient groups (for clipping), per-layer gradient powers and per-layer squared weight norms. No host sync.

        ``exact``: per-tensor norms accumulated in float64 (about 30x slower on CPU): finite and
        exact for finite gradients whose float32 sum of squares overflows. The Watch re-measures
        this way only a step whose norm came back non-finite.
        """
        if float(norm_type) == 2.0:
            fused = self._fused(grads, exact)
            if fused is not None:
                groups, out = fused
                return groups, out[: self.n_layers], out[self.n_layers : 2 * self.n_layers]
        groups = group_tensors(grads, self.slots)
        powers = layer_powers(groups, self.n_layers, norm_type, self.device, exact)
        weights = layer_powers(self._weight_groups, self.n_layers, 2.0, self.device, exact)
        return groups, powers, weights

    def tensor_norms2(
        self, grads: list[torch.Tensor | None], weights: bool = True
    ) -> tuple[TensorGroups, list[torch.Tensor], Callable[[np.ndarray], np.ndarray]] | None:
        """The 2-norm fast path, device side: ``(gradient groups, per-tensor norms, on_host)``,
        or None when a parameter has no gradient.

        Per (device, dtype) group ONE foreach norm over its gradients and its
        weights (its gradients only when numpy reads the weights in place, see
        :class:`HostWeights`); the norms come back as 0-d tensors. ``on_host``
        turns their values, once the step's one transfer has brought them over,
        into [per-layer gradient norms, per-layer weight norms, global norm]
        (:meth:`layer_norms2`). No host sync, no other kernel. ``weights=False``:
        the gradients only, the weight norms NaN (a step that does not need them
        reads no weight at all).

        Example:
            >>> w = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
            >>> _, norms, on_host = MeasurePlan(w, [0, 1], 2).tensor_norms2([torch.tensor([3.0, 0.0]), torch.tensor([4.0])])
            >>> on_host(torch.stack(norms).numpy()).round(4).tolist()  # gradients 3, 4; weights sqrt(2), 1; total 5
            [3.0, 4.0, 1.4142, 1.0, 5.0]
        """
        grad_groups = self._grad_groups(grads)
        if grad_groups is None:
            return None
        host = weights and self.host is not None and self.host.current()
        with_weights = weights and not host  # the device reads the weights too
        norms: list[torch.Tensor] = []
        for key, bucket in grad_groups.items():
            norms += _tensor_norm_list(bucket + self._weight_groups.tensors[key] if with_weights else bucket, 2.0)
        on_host = self.layer_norms2 if with_weights else self._layer_norms2_host if host else self._layer_norms2_grads
        return TensorGroups(grad_groups, self._slots_by_key), norms, on_host

    def layer_norms2(self, tensor_norms: np.ndarray) -> np.ndarray:
        """Host side of the fast path: [per-layer gradient norms, per-layer weight norms, global
        gradient norm] (float64, size 2 x n_layers + 1) from the values of :meth:`tensor_norms2`'s
        norms (each group's gradients, then its weights).

        Squares summed in float64 per layer (one ``bincount``), the global norm from
        the per-layer gradient sums: the numbers clip_grad_norm_ takes from the same
        per-tensor norms, with no float32 overflow of their squares.

        Example:
            >>> w = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))]
            >>> MeasurePlan(w, [0, 0], 1).layer_norms2(np.array([3.0, 4.0, 1.0, 0.0])).tolist()
            [5.0, 1.0, 5.0]
        """
        return self._finish(np.square(tensor_norms, dtype=np.float64), self._host_slots)

    def _layer_norms2_host(self, grad_norms: Sequence[float]) -> np.ndarray:
        """:meth:`layer_norms2` when the device brought the gradients' norms only: the weights' squares come from numpy."""
        return self._sum_by_layer(grad_norms, self.host.squares())

    def _layer_norms2_grads(self, grad_norms: Sequence[float]) -> np.ndarray:
        """:meth:`layer_norms2` of a step that read no weight: their norms NaN (not measured)."""
        return self._sum_by_layer(grad_norms, None)

    def _sum_by_layer(self, grad_norms: Sequence[float], weight_squares: Sequence[Any] | None) -> np.ndarray:
        """[per-layer gradient norms, per-layer weight norms (NaN: None), global norm] from per-tensor
        gradient norms (group order) and weight squares (parameter order); float64 sums. Up to
        :data:`FEW_TENSORS` tensors in plain Python (on the benchmark MLP's 16, ~10 us in the step
        against ~33 us for the numpy calls), numpy's ``bincount`` for more."""
        n = self.n_layers
        if not self._few:
            squares, grad_part, weight_part = self._host_squares
            np.square(grad_norms, out=grad_part, dtype=np.float64)
            if weight_squares is None:
                powers = self._finish(grad_part, self._grad_then_weight_slots[: len(grad_part)])
                powers[n: 2 * n] = math.nan
                return powers
            weight_part[:] = weight_squares
            return self._finish(squares, self._grad_then_weight_slots)
        if isinstance(grad_norms, np.ndarray):
            grad_norms = grad_norms.tolist()
        sums = [0.0] * (2 * n + 1)
        for value, slot in zip(grad_norms, self._grad_slot_list):
            sums[slot] += value * value
        sums[2 * n] = sum(sums[:n])
        if weight_squares is None:
            sums[n: 2 * n] = [math.nan] * n
        else:
            for square, slot in zip(weight_squares, self._weight_slot_list):
                sums[slot] += float(square)
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.array(sums))

    def _finish(self, squares: np.ndarray, slots: np.ndarray) -> np.ndarray:
        n = self.n_layers
        powers = np.bincount(slots, weights=squares, minlength=2 * n + 1)
        powers[2 * n] = powers[:n].sum()
        return np.sqrt(powers, out=powers)

    def _grad_groups(self, grads: list[torch.Tensor | None]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] | None:
        """The gradients split like the parameters, or None when one of them is None."""
        grad_groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for key, idx in self.members.items():
            bucket = [grads[i] for i in idx]
            if any(g is None for g in bucket):  # autograd keeps a gradient on its parameter's device and dtype
                return None
            grad_groups[key] = bucket
        return grad_groups

    def _fused(self, grads: list[torch.Tensor | None], exact: bool = False) -> tuple[TensorGroups, torch.Tensor] | None:
        """(gradient groups, powers [per-layer gradient, per-layer weight, global gradient]), or None
        when a parameter has no gradient."""
        grad_groups = self._grad_groups(grads)
        if grad_groups is None:
            return None
        out = torch.zeros(2 * self.n_layers + 1, dtype=self.acc_dtype, device=self.device)
        for key, bucket in grad_groups.items():
            norms = _tensor_norms(bucket + self._weight_groups.tensors[key], 2.0, exact)  # sparse gradients too
            if norms.device != self.device or norms.dtype != self.acc_dtype:
                norms = norms.to(device=self.device, dtype=self.acc_dtype)
            norms.mul_(norms)
            out.index_add_(0, self._fused_index[key], norms)
            out.index_add_(0, self._total_index[key], norms[: len(bucket)])
        return TensorGroups(grad_groups, self._slots_by_key), out
