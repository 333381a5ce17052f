"""CPU fast paths: what keeps the per-step cost of a small CPU model within the overhead goal.

Two tricks, each behind one small interface, each measured (README, "Overhead"):

- :class:`HostWeights`: numpy views that share the memory of float32/float64 CPU
  weights. Their squared norms, the update-ratio snapshot and the difference
  (every ``update_ratio_every`` steps) then cost one ``numpy.dot`` /
  ``copyto`` per tensor instead of a torch dispatch: about a third of the time
  per tensor (on the 7 x Linear(128) benchmark MLP, ~12 us of a ~1.1 ms step
  instead of ~29 us). Anything else (CUDA, half precision, non-contiguous or
  subclassed tensors, models over 16M weights) takes the foreach path in
  :mod:`gradwatch.norms`.
- :func:`format_step_line`: the ``steps.jsonl`` line of a common step (finite
  numbers, no optional field but the clip threshold, the loss scale and the update
  ratio) formatted with one ``%`` from a template: ~1.8 us a line instead of
  ~6 us through ``json.dumps``; any other step returns None and goes through JSON.

Delete either and the numbers stay the same (tests compare both paths); only the
overhead grows.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

_HOST_DTYPES = (torch.float32, torch.float64)


def _host_eligible(p: torch.Tensor) -> bool:
    """A parameter numpy can read in place: a dense, contiguous float32/float64 CPU tensor."""
    return (type(p.data) is torch.Tensor and p.device.type == "cpu" and p.layout == torch.strided  # no DTensor etc.
            and p.dtype in _HOST_DTYPES and p.is_contiguous() and not p.is_conj() and not p.is_neg())


class HostWeights:
    """Flat numpy views of CPU weights, for their squared norms with no torch call per tensor.

    On CPU a foreach kernel is a loop of per-tensor ATen calls (1-2 us each, most
    of it dispatch on a small model); ``numpy.dot`` on a view that shares the
    parameter's memory costs about a third of that (and sums in float32 at least
    as accurately as ``linalg.vector_norm``). The views are built once and
    checked against the parameters' data pointers and sizes on every use, so a
    parameter whose storage was replaced (``p.data = ...``) is read through new
    views; :meth:`of` returns None for parameters numpy cannot read in place
    (CUDA, half precision, non-contiguous): those take the foreach path.

    Example:
        >>> w = [torch.nn.Parameter(torch.tensor([3.0, 4.0])), torch.nn.Parameter(torch.ones(2, 2))]
        >>> host = HostWeights.of(w)
        >>> [float(x) for x in host.squares()]
        [25.0, 4.0]
        >>> with torch.no_grad():
        ...     _ = w[0].mul_(2.0)  # an in-place update is seen through the same view
        >>> host.current(), float(host.squares()[0])
        (True, 100.0)
    """

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = list(params)
        self._bind()

    @classmethod
    def of(cls, params: list[torch.Tensor]) -> HostWeights | None:
        """Views of ``params``, or None when numpy cannot read one of them in place."""
        if not params or not all(_host_eligible(p) for p in params):
            return None
        try:
            return cls(params)
        except (RuntimeError, TypeError, ValueError):  # a tensor numpy refuses after all: the foreach path
            return None

    def _bind(self) -> None:
        # detach().numpy() shares the parameter's memory (and keeps it alive while the view lives)
        self.views = [p.detach().numpy().reshape(-1) for p in self.params]
        self._dots = [v.dot for v in self.views]  # bound methods: v.dot(v) is the sum of squares
        self._numels = list(map(torch.Tensor.numel, self.params))
        self._pointers = list(map(torch.Tensor.data_ptr, self.params))  # last: a failed rebind stays stale

    def current(self) -> bool:
        """Whether the views show the parameters' memory (rebound here if a storage moved);
        False when a parameter can no longer be read in place."""
        # map() over the C methods: this runs on every step
        if list(map(torch.Tensor.data_ptr, self.params)) == self._pointers and list(map(torch.Tensor.numel, self.params)) == self._numels:
            return True
        if not all(_host_eligible(p) for p in self.params):
            return False
        try:
            self._bind()
        except (RuntimeError, TypeError, ValueError):
            return False
        return True

    def squares(self) -> list[Any]:
        """Per parameter ``sum(w ** 2)`` (numpy scalars, the parameter's dtype)."""
        with np.errstate(over="ignore", invalid="ignore"):  # inf, as torch's norm gives, without a warning
            return [dot(v) for dot, v in zip(self._dots, self.views)]

    def copy_into(self, buffers: list[np.ndarray] | None) -> list[np.ndarray]:
        """The weights copied into ``buffers`` (new ones when None or of other sizes)."""
        if buffers is None or len(buffers) != len(self.views) or any(b.shape != v.shape or b.dtype != v.dtype
                                                                     for b, v in zip(buffers, self.views)):
            return [v.copy() for v in self.views]
        copy = np.copyto
        for buffer, view in zip(buffers, self.views):
            copy(buffer, view)
        return buffers

    def delta_squares(self, before: list[np.ndarray]) -> list[float]:
        """Per parameter ``sum((before - w) ** 2)``; ``before`` is overwritten with the difference."""
        dot, subtract = np.dot, np.subtract
        out = []
        with np.errstate(over="ignore", invalid="ignore"):
            for buffer, view in zip(before, self.views):
                subtract(buffer, view, out=buffer)
                out.append(float(dot(buffer, buffer)))
        return out


# ----- preformatted steps.jsonl lines ------------------------------------------------------
_isfinite = math.isfinite
# The line of a common step, by (clip threshold?, loss scale?, update ratio?): one % per line.
_STEP_LINE = {
    (threshold, scale, ratio): (
        '{"step":%d,"loss":%.9g,"grad_norm":%.9g,"clip_coef":%.9g,"clipped":%s,"skipped":%s,"time_ms":%.4f'
        + (',"clip_threshold":%.9g' if threshold else "") + (',"loss_scale":%.9g' if scale else "")
        + (',"update_ratio":[%s]' if ratio else "") + ',"row":%d}\n'
    )
    for threshold in (False, True) for scale in (False, True) for ratio in (False, True)
}


def format_step_line(step: int, loss: float, grad_norm: float, clip_coef: float, clipped: bool, skipped: bool,
                     time_ms: float, threshold: float | None, scale: float | None,
                     ratios: Sequence[float] | None, row: int) -> str | None:
    """The steps.jsonl line of a common step, or None when a number is not finite (then JSON writes it).

    Numbers with 9 significant digits (a float32 exactly), ``time_ms`` with 4
    decimals, update ratios with 5 digits: what ``json.dumps`` of the rounded
    values gives, parsed back.

    Example:
        >>> format_step_line(3, 0.5, 2.0, 0.5, True, False, 1.25, 1.0, None, None, 2)
        '{"step":3,"loss":0.5,"grad_norm":2,"clip_coef":0.5,"clipped":true,"skipped":false,"time_ms":1.2500,"clip_threshold":1,"row":2}\\n'
    """
    if not _isfinite(loss + grad_norm + clip_coef + time_ms  # one check for all (NaN, inf)
                     + (0.0 if threshold is None else threshold) + (0.0 if scale is None else scale)
                     + (0.0 if ratios is None else sum(ratios))):
        return None
    values: tuple[Any, ...] = (step, loss, grad_norm, clip_coef, "true" if clipped else "false",
                               "true" if skipped else "false", time_ms)
    if threshold is not None:
        values += (threshold,)
    if scale is not None:
        values += (scale,)
    if ratios is not None:  # 5 significant digits, as the JSON form writes them
        values += (("%.5g," * len(ratios))[:-1] % tuple(ratios),)
    return _STEP_LINE[threshold is not None, scale is not None, ratios is not None] % (values + (row,))
