"""Precursor signals, the pure core: tensors in, numbers out (no hooks, no I/O).

Three quantities that the literature finds move *before* a loss spike:

- :func:`adam_rms`: per tensor, ``RMS_t = sqrt(mean(g_t^2 / v_hat_t))``, the ratio of the
  squared gradient to Adam's bias-corrected second moment *including* this step's
  gradient (Wortsman et al. 2023, arXiv 2304.13013, StableAdamW). It is about 1 while
  ``v`` tracks ``g^2``; well above 1 when the second moment lags a sudden rise of the
  gradient, so the coming update ``m/sqrt(v)`` is larger than Adam's design assumes. With
  ``beta2`` it is bounded by ``1/sqrt(1 - beta2)`` (about 31.6 at 0.999).
- :func:`attention_logit_max`: ``max |q k^T| * scale`` of one attention call, the logit
  whose growth saturates the softmax into one-hot (Wortsman et al. 2023, arXiv 2309.14322;
  Dehghani et al. 2023).
  In an "eager" attention (explicit matmuls, then softmax), :func:`softmax_logit_max`
  reads the softmax's input instead.
- :func:`log_z`: the mean and the largest ``|log Z|`` of the output softmax,
  ``log Z = logsumexp(logits)``: its drift far from 0 is output-logit divergence, which
  z-loss (``1e-4 * log Z ** 2``, PaLM) holds in place.
- :func:`output_rms`: the RMS of a layer's output, whose growth over training (the residual
  stream, the logits) shows representations scaling up with the learning rate.

Each runs under ``torch.no_grad()`` and returns tensors on the input's device: the
caller decides when to read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import compat

_CHUNK_BYTES = 32 * 2**20  # temporaries of adam_rms: at most ~2 x this many bytes at once


@dataclass(frozen=True)
class AdamTensor:
    """One parameter's inputs to :func:`adam_rms`: its gradient, Adam's ``exp_avg_sq`` before the step, and
    the group's ``beta2``, ``eps`` and the 1-based step number the coming update will have."""

    grad: torch.Tensor
    exp_avg_sq: torch.Tensor
    beta2: float
    eps: float
    step: int


def adam_rms(tensors: list[AdamTensor]) -> torch.Tensor:
    """``sum(g^2 / v_hat)`` of each tensor (float32, one value per tensor, on the gradients' device).

    ``v_hat = (beta2 * v + (1 - beta2) * g^2) / (1 - beta2 ** step)`` is the second moment
    the coming Adam update divides by, floored at ``eps ** 2`` as StableAdamW does. The
    per-tensor RMS is ``sqrt(sum / numel)``; a layer's is ``sqrt(sum of sums / sum of numels)``.
    Computed with five multi-tensor (foreach) kernels per chunk, the last a norm, in chunks that keep
    the temporaries under ~64 MiB.

    Example:
        >>> g = torch.tensor([2.0, 2.0]); v = torch.tensor([1.0, 1.0])  # v lags g^2 = 4
        >>> s = adam_rms([AdamTensor(g, v, beta2=0.5, eps=1e-8, step=1000)])
        >>> round(float(s[0]), 4)  # v_hat = 0.5 * 1 + 0.5 * 4 = 2.5: 2 x 4 / 2.5
        3.2
    """
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].grad.device
    norms: list[torch.Tensor] = []
    chunk: list[AdamTensor] = []
    size = 0
    for t in tensors:
        chunk.append(t)
        size += t.grad.numel() * 4
        if size >= _CHUNK_BYTES:
            norms.extend(_chunk_norms(chunk))
            chunk, size = [], 0
    if chunk:
        norms.extend(_chunk_norms(chunk))
    scales = torch.tensor([(1.0 - t.beta2 ** t.step) / t.beta2 for t in tensors], dtype=torch.float32)
    stacked = torch.stack([n.to(device) for n in norms])
    return stacked.square_().mul_(scales.to(device))


def _chunk_norms(chunk: list[AdamTensor]) -> list[torch.Tensor]:
    """``||g / sqrt(d)||`` per tensor of ``chunk``, ``d = v + (1 - beta2) / beta2 * g^2`` floored at
    ``eps^2 * correction / beta2`` (:func:`adam_rms` squares it and multiplies by ``correction / beta2``).

    Why foreach: five multi-tensor kernels for the whole chunk instead of five ops per tensor,
    and ``rsqrt`` instead of a square root and a division. On the benchmark MLP (16 tensors,
    CPU, 2 threads) 207 us against 360 us for the per-tensor loop (the rest is the arithmetic
    itself). The loop stays as the fallback for tensors the kernels refuse.
    """
    with torch.no_grad():
        g = [t.grad.detach().float() for t in chunk]
        v = [t.exp_avg_sq.detach().float() for t in chunk]
        weights = [(1.0 - t.beta2) / t.beta2 for t in chunk]
        floors = [t.eps * t.eps * (1.0 - t.beta2 ** t.step) / t.beta2 for t in chunk]
        norms = compat.foreach_chain([
            ("addcmul", (v, g, g, weights)),  # d = v + w * g^2 (new tensors)
            ("clamp_min_", (..., floors)),
            ("rsqrt_", (...,)),
            ("mul_", (..., g)),  # d := g / sqrt(d)
            ("norm", (...,)),
        ])
        if norms is not None:
            return norms
        return [torch.linalg.vector_norm(gi * torch.addcmul(vi, gi, gi, value=w).clamp_min_(floor).rsqrt_())
                for gi, vi, w, floor in zip(g, v, weights, floors)]


def layer_rms(sums: list[float], numels: list[int], slots: list[int], n_layers: int) -> list[float]:
    """Per-layer RMS from per-tensor sums (:func:`adam_rms`), their sizes and layer slots; NaN: no tensor.

    Example:
        >>> layer_rms([4.0, 12.0, 9.0], [1, 3, 1], [0, 0, 1], 3)
        [2.0, 3.0, nan]
    """
    total = [0.0] * n_layers
    count = [0] * n_layers
    for s, n, slot in zip(sums, numels, slots):
        total[slot] += s
        count[slot] += n
    return [math.sqrt(t / c) if c else math.nan for t, c in zip(total, count)]


def attention_logit_max(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                        chunk: int = 256) -> torch.Tensor:
    """``max |q k^T| * scale`` over every batch, head, query and key (0-d float32 tensor).

    ``q`` is ``(..., L, E)``, ``k`` is ``(..., S, E)`` as for
    :func:`torch.nn.functional.scaled_dot_product_attention`; ``scale`` defaults to
    ``1/sqrt(E)`` as there. Grouped-query keys (fewer heads in ``k``) are repeated to
    ``q``'s heads. Queries go ``chunk`` at a time, so the logits never exist at once.

    Example:
        >>> q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]); k = torch.tensor([[[3.0, 0.0], [0.0, -4.0]]])
        >>> round(float(attention_logit_max(q, k)), 4)  # |2 x -4| / sqrt(2)
        5.6569
    """
    with torch.no_grad():
        q, k = q.detach(), k.detach()
        if q.dim() >= 3 and k.dim() == q.dim() and k.shape[-3] != q.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        peak = torch.zeros((), dtype=torch.float32, device=q.device)
        kt = k.float().transpose(-2, -1)
        for start in range(0, q.shape[-2], chunk):
            logits = torch.matmul(q[..., start:start + chunk, :].float(), kt)
            peak = torch.maximum(peak, logits.abs().amax())
        return peak * scale


def is_attention_softmax(x: object, dim: object) -> bool:
    """Whether a softmax call is an "eager" attention's: a 4-d floating tensor ``(batch, heads, queries,
    keys)`` normalized over its last dimension, as explicit-matmul attention implementations
    (``transformers``' ``attn_implementation="eager"``, nanoGPT's slow path) write it.

    Example:
        >>> is_attention_softmax(torch.zeros(2, 4, 8, 8), -1), is_attention_softmax(torch.zeros(2, 10, 8, 8), 1)
        (True, False)
    """
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
            and isinstance(dim, int) and dim in (-1, 3))


def softmax_logit_max(logits: torch.Tensor) -> torch.Tensor:
    """The largest finite logit given to an eager attention's softmax (0-d float32 tensor).

    Signed, not ``|.|`` as :func:`attention_logit_max`: masked positions arrive as ``-inf``, the
    dtype's minimum or BERT's additive ``-10000``, and only the largest logit of a row decides
    how one-hot its softmax is. Any mask the model applied is respected; the scale is the model's own.

    Example:
        >>> x = torch.tensor([[[[1.0, 7.5], [2.0, float("-inf")]]]])
        >>> float(softmax_logit_max(x))
        7.5
    """
    with torch.no_grad():
        x = logits.detach().float()
        return torch.where(torch.isfinite(x), x, torch.full((), -math.inf, device=x.device)).amax()


def log_z(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, max |.|) of ``logsumexp(logits)`` over the last dimension (0-d float32 tensors).

    Example:
        >>> mean, peak = log_z(torch.zeros(2, 4))  # uniform logits: log Z = log 4
        >>> round(float(mean), 4), round(float(peak), 4)
        (1.3863, 1.3863)
    """
    with torch.no_grad():
        z = torch.logsumexp(logits.detach().float(), dim=-1)
        return z.mean(), z.abs().amax()


def mean_loss(loss: Any, reduction: Any = "mean") -> torch.Tensor | None:
    """The mean per-example loss from what ``F.cross_entropy`` returned (0-d float32, on its device; no
    sync), or None when it cannot be told (a sum over an unknown count of targets, not a tensor).

    Example:
        >>> float(mean_loss(torch.tensor([0.5, 1.5]), "none")), float(mean_loss(torch.tensor(0.25)))
        (1.0, 0.25)
        >>> mean_loss(torch.tensor(4.0), "sum") is None
        True
    """
    if not isinstance(loss, torch.Tensor) or not loss.is_floating_point() or not loss.numel():
        return None
    with torch.no_grad():
        if reduction == "mean":
            return loss.detach().float().reshape(())
        if reduction == "none":
            return loss.detach().float().mean()
    return None


def first_tensor(output: object) -> torch.Tensor | None:
    """The floating-point tensor a module's forward returned: the output itself, or the first
    element of a tuple/list or the first value of a mapping (``transformers``' ``ModelOutput``).

    Example:
        >>> first_tensor((torch.ones(2), None)).shape, first_tensor({"a": torch.ones(3)}).shape
        (torch.Size([2]), torch.Size([3]))
    """
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    if isinstance(output, dict) and output:
        return first_tensor(next(iter(output.values())))
    return None


def output_rms(output: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean(output^2))`` in float32, as a 0-d tensor on the output's device.

    Example:
        >>> float(output_rms(torch.tensor([3.0, -4.0])))  # sqrt((9 + 16) / 2)
        3.535533905029297
    """
    with torch.no_grad():  # one reduction (the norm), then one scalar division
        return torch.linalg.vector_norm(output.detach(), dtype=torch.float32) / math.sqrt(output.numel())
