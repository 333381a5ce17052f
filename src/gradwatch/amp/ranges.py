"""Float16 and bfloat16 range arithmetic on fp32 gradients and weights: the pure core.

Everything here is tensors in, numbers out, with no state and no Watch. Two
questions are answered:

1. **What would float16 do to these gradients at loss scale S?** One pass over
   the gradients builds a per-layer histogram of binary exponents
   (:func:`exponent_histogram`); from it the share of each layer's non-zero
   elements that float16 would flush to zero, store as subnormals or overflow
   follows for *every* power-of-two scale by shifting the histogram
   (:func:`fp16_shares`), and so does the scale that brings them into range
   (:func:`recommend_scale`).
2. **Which weight updates would bfloat16 weights lose to rounding?**
   (:func:`lost_update_counts`): ``bf16(w + dw) == bf16(w)`` with ``dw != 0``.

Float16 (IEEE binary16), see THEORY.md: largest finite 65504, smallest normal
2^-14 ~ 6.10e-5, smallest subnormal 2^-24 ~ 5.96e-8. Rounding to nearest even
makes fp16(2^-25) = 0 and fp16(65520) = inf.

Histogram bins are half-open on the left: bin ``e`` counts elements with
``2^(e-1) < |g| <= 2^e``. With this choice the flush decision is exact at every
power-of-two scale (``|g| S <= 2^-25`` flushes, ties to even included). The
subnormal and overflow boundaries are exact up to values within one float16 ulp
of the boundary (an element exactly equal to 2^-14 counts as subnormal; one in
[65520, 65536] counts as finite). A scale that is not a power of two is rounded
down to one (a conservative choice for underflow). float32 subnormals (below
2^-126) share the bin of 2^-126: float16 flushes them at any scale up to 2^100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..norms import dense_values

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14  # 6.10e-5: below it fp16 keeps fewer than 11 significant bits
FP16_MIN_SUBNORMAL = 2.0**-24  # 5.96e-8: at or below half of it a value flushes to zero
BF16_MAX = 3.3895313892515355e38
BF16_MIN_NORMAL = 2.0**-126

# Exponent e of a bin means 2^(e-1) < |x| <= 2^e.
_FLUSH_E = -25  # |x| <= 2^-25 rounds to 0 in fp16 (2^-25 itself is a tie, rounded to even: 0)
_NORMAL_E = -14  # |x| <= 2^-14: subnormal (or flushed)
_OVERFLOW_E = 17  # |x| > 2^16: inf in fp16
_HEADROOM_E = 15  # a recommended scale keeps every element <= 2^15, one GradScaler growth below overflow

EXP_LO = -160  # below fp32's smallest subnormal (2^-149); float64 values beyond are clamped
EXP_HI = 140  # above fp32's largest exponent (128)
N_BINS = EXP_HI - EXP_LO + 1
ZERO_SLOT = N_BINS  # column of exact zeros
NONFINITE_SLOT = N_BINS + 1  # column of inf / nan elements
_CHUNK = 1 << 22  # elements per pass, bounds the transient memory of the int64 bin index


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise: counts are per rank."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _bin_index_fp32(flat: torch.Tensor) -> torch.Tensor:
    """:func:`_bin_index` for contiguous float32, read from the bits (about 2x faster than frexp).

    A normal float32 ``1.m * 2^(E-127)`` lies in ``(2^(E-127), 2^(E-126)]`` unless
    its mantissa bits are zero (an exact power of two, one bin down). float32
    subnormals (below 2^-126) all go to the bin of 2^-126: float16 flushes them
    at every scale up to 2^100.
    """
    bits = flat.view(torch.int32)
    biased = (bits >> 23) & 0xFF
    power_of_two = (bits & 0x7FFFFF) == 0
    index = biased - (126 + EXP_LO) - power_of_two.to(torch.int32)
    index = torch.where(biased == 0, torch.where(power_of_two, ZERO_SLOT, -126 - EXP_LO), index)
    return torch.where(biased == 255, NONFINITE_SLOT, index)


def _bin_index(flat: torch.Tensor) -> torch.Tensor:
    """Histogram column of every element of a 1-D floating tensor."""
    if flat.dtype != torch.float64:
        flat = flat.float()  # fp16 and bf16 values are exact in fp32
        if flat.is_contiguous():
            return _bin_index_fp32(flat)
    mantissa, exponent = torch.frexp(flat)  # |x| = |m| 2^e, |m| in [0.5, 1)
    exponent = exponent.to(torch.int64) - (mantissa.abs() == 0.5).to(torch.int64)  # exact powers go one bin down
    index = exponent.clamp_(EXP_LO, EXP_HI) - EXP_LO
    index = torch.where(flat == 0, torch.full_like(index, ZERO_SLOT), index)
    return torch.where(torch.isfinite(flat), index, torch.full_like(index, NONFINITE_SLOT))


def exponent_histogram(
    tensors: Sequence[torch.Tensor | None],
    slots: Sequence[int],
    n_layers: int,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Per-layer histogram of binary exponents, as an int64 tensor of shape (n_layers, N_BINS + 2).

    Column ``i < N_BINS`` counts the finite non-zero elements with
    ``2^(e-1) < |x| <= 2^e`` for ``e = EXP_LO + i``; column ``ZERO_SLOT`` counts
    exact zeros and ``NONFINITE_SLOT`` inf/nan. No host sync; one ``frexp`` and
    one ``bincount`` per tensor (per chunk of 4M elements).

    Args:
        tensors: gradients (or any tensors); None entries are skipped.
        slots: the layer of each entry.
        n_layers: number of layers (rows).
        device: device of the result. Default: the first tensor's.

    Example:
        >>> h = exponent_histogram([torch.tensor([0.0, 1.0, 0.75, float("inf")])], [0], 1)
        >>> int(h[0, ZERO_SLOT]), int(h[0, NONFINITE_SLOT]), int(h[0, 0 - EXP_LO])
        (1, 1, 2)
    """
    if device is None:
        device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    fused = _fused_histogram(tensors, slots, n_layers, device)
    if fused is not None:
        return fused
    hist = torch.zeros(n_layers, N_BINS + 2, dtype=torch.int64, device=device)
    for tensor, slot in zip(tensors, slots):
        if tensor is None or tensor.numel() == 0:
            continue
        flat = dense_values(_local(tensor.detach())).reshape(-1)  # a sparse gradient: its stored values
        for start in range(0, flat.numel(), _CHUNK):
            counts = torch.bincount(_bin_index(flat[start : start + _CHUNK]), minlength=N_BINS + 2)
            hist[slot].add_(counts.to(device))
    return hist


_ROW_OFFSETS: dict[tuple, torch.Tensor] = {}  # (device, slots, sizes) -> each element's row offset


def _fused_histogram(
    tensors: Sequence[torch.Tensor | None], slots: Sequence[int], n_layers: int, device: torch.device
) -> torch.Tensor | None:
    """:func:`exponent_histogram` in one pass for small models: contiguous float32 tensors on ``device``,
    at most one chunk of elements in all. One ``cat``, the bit arithmetic once, one ``bincount`` over
    ``row * width + column`` (the row offsets are built once per parameter list). None when it does not apply.
    """
    present = [(t, slot) for t, slot in zip(tensors, slots) if t is not None and t.numel() > 0]
    if not present:
        return None
    flats = [_local(t.detach()) for t, _ in present]
    if any(f.layout != torch.strided or f.dtype != torch.float32 or f.device != device or not f.is_contiguous() for f in flats):
        return None
    sizes = tuple(f.numel() for f in flats)
    if sum(sizes) > _CHUNK:
        return None
    width = N_BINS + 2
    key = (device, tuple(slot for _, slot in present), sizes)
    offsets = _ROW_OFFSETS.get(key)
    if offsets is None:
        rows = torch.tensor([slot * width for _, slot in present], dtype=torch.int64, device=device)
        offsets = torch.repeat_interleave(rows, torch.tensor(sizes, device=device))
        if len(_ROW_OFFSETS) >= 8:
            _ROW_OFFSETS.clear()
        _ROW_OFFSETS[key] = offsets
    flat = torch.cat([f.reshape(-1) for f in flats])
    index = _bin_index_fp32(flat).to(torch.int64).add_(offsets)
    return torch.bincount(index, minlength=n_layers * width).view(n_layers, width)


def _log2_floor(scale: float) -> int:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    mantissa, exponent = math.frexp(scale)
    return exponent - 1  # exact for powers of two, rounds down otherwise


@dataclass
class Fp16Shares:
    """Shares of each layer's non-zero finite elements that float16 would mistreat at one scale.

    Attributes:
        scale: the loss scale (rounded down to a power of two).
        flushed: per layer, share rounded to zero (``|g| S <= 2^-25``).
        subnormal: per layer, share stored as a subnormal (``2^-25 < |g| S <= 2^-14``):
            kept, with fewer than 11 significant bits.
        overflow: per layer, share that becomes inf (``|g| S > 65536``).
        nonzero: per layer, number of finite non-zero elements (the denominator).
    """

    scale: float
    flushed: np.ndarray
    subnormal: np.ndarray
    overflow: np.ndarray
    nonzero: np.ndarray

    @property
    def below_normal(self) -> np.ndarray:
        """Flushed plus subnormal, per layer."""
        return self.flushed + self.subnormal


def _as_numpy(hist: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(hist, torch.Tensor):
        hist = hist.cpu().numpy()
    hist = np.asarray(hist, dtype=np.int64)
    if hist.ndim != 2 or hist.shape[1] != N_BINS + 2:
        raise ValueError(f"hist must have shape (n_layers, {N_BINS + 2}) as made by exponent_histogram, got {hist.shape}")
    return hist


def fp16_shares(hist: torch.Tensor | np.ndarray, scale: float = 1.0) -> Fp16Shares:
    """What float16 would do to the histogrammed values multiplied by ``scale``.

    Args:
        hist: from :func:`exponent_histogram` (a tensor is copied to the host: a sync).
        scale: the loss scale. Default: 1.0 (no scaling).

    Returns:
        an :class:`Fp16Shares` (per-layer numpy arrays; NaN for a layer without
        any non-zero finite element).

    Example:
        >>> g = torch.tensor([2.0**-26, 2.0**-20, 1.0, 2.0**17])
        >>> s = fp16_shares(exponent_histogram([g], [0], 1), scale=1.0)
        >>> s.flushed.tolist(), s.subnormal.tolist(), s.overflow.tolist()
        ([0.25], [0.25], [0.25])
    """
    counts = _as_numpy(hist)[:, :N_BINS].astype(np.float64)
    k = _log2_floor(scale)
    exps = np.arange(EXP_LO, EXP_HI + 1) + k  # exponent of each bin after scaling
    nonzero = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        flushed = counts[:, exps <= _FLUSH_E].sum(axis=1) / nonzero
        subnormal = counts[:, (exps > _FLUSH_E) & (exps <= _NORMAL_E)].sum(axis=1) / nonzero
        overflow = counts[:, exps >= _OVERFLOW_E].sum(axis=1) / nonzero
    return Fp16Shares(float(2.0**k), flushed, subnormal, overflow, nonzero.astype(np.int64))


def _min_k_per_layer(counts: np.ndarray, share: float) -> np.ndarray:
    """Per layer, the smallest k such that the share at or below 2^-14 after scaling by 2^k is <= share."""
    nonzero = counts.sum(axis=1)
    cum = np.cumsum(counts, axis=1)  # cum[:, i]: elements with exponent <= EXP_LO + i
    out = np.full(counts.shape[0], np.nan)
    for layer in np.flatnonzero(nonzero > 0):
        allowed = share * nonzero[layer]
        # below normal at scale 2^k: exponent <= -14 - k, i.e. index <= -14 - k - EXP_LO
        ok = np.flatnonzero(cum[layer] > allowed)  # indices where too many lie at or below
        if ok.size == 0:
            out[layer] = _NORMAL_E - EXP_HI  # nothing anywhere: any scale works
            continue
        first_bad = ok[0]  # smallest index i with cum > allowed: need -14 - k < EXP_LO + i
        out[layer] = _NORMAL_E - (EXP_LO + first_bad) + 1
    return out


@dataclass
class ScaleAdvice:
    """The loss scale that brings gradients into float16's normal range.

    Attributes:
        recommended: a power of two: the smallest scale at which every layer's
            share below 2^-14 is at most ``share``, capped at ``max_safe``
            (and at least 1 unless ``max_safe`` is below 1).
        max_safe: the largest power of two that keeps every element at or below
            2^15 (one GradScaler growth below overflow).
        needed: the smallest power of two every layer needs (None: no gradients).
        fits: False when ``needed > max_safe``: the gradients span more than
            float16's range; no single scale serves every layer (use bf16).
        per_layer: per layer, the scale it needs (NaN: no non-zero element).
    """

    recommended: float
    max_safe: float
    needed: float | None
    fits: bool
    per_layer: np.ndarray = field(repr=False)


def recommend_scale(hist: torch.Tensor | np.ndarray, share: float = 0.05) -> ScaleAdvice:
    """The power-of-two loss scale that brings gradients into float16's range.

    Args:
        hist: from :func:`exponent_histogram` of the *unscaled* gradients.
        share: the share of a layer's non-zero elements allowed below 2^-14. Default: 0.05.

    Returns:
        a :class:`ScaleAdvice`.

    Example:
        >>> g = torch.full((100,), 1e-7)  # every element would be subnormal at scale 1
        >>> advice = recommend_scale(exponent_histogram([g], [0], 1))
        >>> advice.recommended, advice.fits
        (1024.0, True)
    """
    if not (isinstance(share, (int, float)) and 0 <= share < 1):
        raise ValueError(f"share must be a number in [0, 1), got {share!r}")
    counts = _as_numpy(hist)[:, :N_BINS]
    per_layer_k = _min_k_per_layer(counts, float(share))
    occupied = np.flatnonzero(counts.sum(axis=0) > 0)
    e_max = EXP_LO + int(occupied[-1]) if occupied.size else None
    k_safe = _HEADROOM_E - e_max if e_max is not None else 24
    finite_k = per_layer_k[np.isfinite(per_layer_k)]
    k_needed = int(finite_k.max()) if finite_k.size else None
    k_rec = min(max(k_needed if k_needed is not None else 0, 0), k_safe)
    return ScaleAdvice(
        recommended=float(2.0**k_rec),
        max_safe=float(2.0**k_safe),
        needed=float(2.0**k_needed) if k_needed is not None else None,
        fits=k_needed is None or k_needed <= k_safe,
        per_layer=np.where(np.isfinite(per_layer_k), 2.0 ** np.nan_to_num(per_layer_k), np.nan),
    )


def compact_histogram(hist: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """The occupied exponent range of a histogram, as JSON-ready lists.

    Returns ``{"lo": e, "counts": [[...] per layer], "zeros": [...], "nonfinite": [...]}``
    where ``counts[l][i]`` is the number of elements of layer ``l`` with
    ``2^(lo+i-1) < |x| <= 2^(lo+i)``.
    """
    data = _as_numpy(hist)
    counts = data[:, :N_BINS]
    occupied = np.flatnonzero(counts.sum(axis=0) > 0)
    lo, hi = (int(occupied[0]), int(occupied[-1])) if occupied.size else (0, -1)
    return {
        "lo": EXP_LO + lo,
        "counts": counts[:, lo : hi + 1].tolist(),
        "zeros": data[:, ZERO_SLOT].tolist(),
        "nonfinite": data[:, NONFINITE_SLOT].tolist(),
    }


def lost_update_counts(
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    slots: Sequence[int],
    n_layers: int,
    intended: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Per layer, how many weight updates bfloat16 weights lose entirely to rounding.

    For a float32 (or float64) weight, with ``dw = after - before``: an update is
    intended when ``dw != 0`` and lost when ``bf16(bf16(before) + dw) ==
    bf16(before)`` (what ``model.to(torch.bfloat16)`` would have done). For a
    weight already in bfloat16 the update happened in bf16: it is lost when the
    weight did not change although ``intended`` (a boolean mask, e.g.
    ``grad != 0`` captured before the step) says it should have.

    Args:
        before / after: the weights before and after the optimizer step.
        slots: the layer of each weight.
        n_layers: number of layers.
        intended: per weight, an optional boolean mask of elements meant to
            change, e.g. ``grad != 0``. For bf16 weights it defines the intended
            updates (None: every element); for fp32 weights it widens ``dw != 0``
            (an update that float32 already lost is lost in bf16 as well).

    Returns:
        an int64 tensor of shape (2, n_layers): row 0 lost, row 1 intended. No host sync.

    Example:
        >>> w = torch.tensor([1.0, 1.0, 1.0])
        >>> lost_update_counts([w], [w + torch.tensor([2**-9, 2**-8, 2**-6])], [0], 1).tolist()
        [[2], [3]]
    """
    device = before[0].device if before else torch.device("cpu")
    out = torch.zeros(2, n_layers, dtype=torch.int64, device=device)
    masks = intended if intended is not None else [None] * len(before)
    for w0, w1, slot, mask in zip(before, after, slots, masks):
        w0, w1 = _local(w0.detach()), _local(w1.detach())
        mask = _local(mask) if mask is not None else None
        if w0.dtype == torch.bfloat16:
            want = mask if mask is not None else torch.ones_like(w0, dtype=torch.bool)
            lost = want & (w1 == w0)
        else:
            dw = w1 - w0
            want = dw != 0
            if mask is not None:  # an update float32 itself already lost (dw == 0) is lost in bf16 too
                want = want | mask
            w16 = w0.to(torch.bfloat16)
            lost = want & ((w16.to(dw.dtype) + dw).to(torch.bfloat16) == w16)
        out[0, slot] += lost.sum()
        out[1, slot] += want.sum()
    return out
