"""Clipping strategies: which threshold applies on this step.

A clipper answers one question per step, ``threshold()``: the max norm to clip
the global gradient norm to (None: measure only), computed on the host from the
norms of *previous* steps, so that asking costs no host sync. After the step's
one host sync the Watch calls ``observe(grad_norm)`` with the pre-clip norm, for
finite steps only: a NaN or inf norm never enters any statistic.

Strategies (``Watch(clip_norm=...)``):

- a float: :class:`FixedClip`, the rule of :func:`torch.nn.utils.clip_grad_norm_`.
- ``"autoclip"``: :class:`AutoClip` (Seetharaman et al. 2020, "AutoClip: Adaptive
  Gradient Clipping for Source Separation Networks"): the p-th percentile
  (default 10) of the norm history.
- ``"zclip"``: :class:`ZClip` (Kumar et al. 2025, "ZClip: Adaptive Spike
  Mitigation for LLM Pre-Training"): EMA mean and variance of the norm, a
  z-score threshold of 2.5 after 25 warm-up steps, a static max as backstop.
- :class:`AGC` (Brock et al. 2021, "High-Performance Large-Scale Image
  Recognition Without Normalization", NFNets): unit-wise adaptive gradient
  clipping, ``||G_i|| / max(||W_i||, eps) <= lambda`` per output unit, the final
  classifier left unclipped.
"""

from __future__ import annotations

import bisect
import math
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import norms as _norms

if TYPE_CHECKING:  # pragma: no cover
    from .layers import LayerIndex

CLIP_NAMES = ("autoclip", "zclip")


def _check_number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float inside (low, high] (bounds as asked); a clear error naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if math.isnan(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open or math.isinf(high) else "]"
        raise ValueError(f"{name} must be in {left}{low:g}, {high:g}{right}, got {value!r}")
    return value


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_max_norm(value: Any) -> float | None:
    if value is None:
        return None
    value = _check_number("max_norm", value, low=0.0)
    if math.isinf(value):
        raise ValueError(f"max_norm must be a positive finite float or None, got {value!r}")
    return value


class NoClip:
    """Measure only, never clip.

    Example:
        >>> NoClip().threshold() is None
        True
    """

    name = "none"
    #: True for a clipper that also clips unit-wise (AGC): the Watch then calls
    #: ``clip_unitwise_(index)`` after the pre-clip norms are measured.
    unitwise = False

    def threshold(self) -> float | None:
        """The max global norm for this step (None: do not clip)."""
        return None

    def coefficient(self, total: float, threshold: float) -> float:
        """The clip coefficient ``min(1, threshold / (total + 1e-6))`` for the finite pre-clip global norm ``total``.

        A host-side number: the Watch reads the norms in its one host sync, then
        multiplies the gradients only when the coefficient is below 1.

        Example:
            >>> FixedClip(1.0).coefficient(4.0, 1.0) == 1.0 / (4.0 + 1e-6), FixedClip(1.0).coefficient(0.5, 1.0)
            (True, 1.0)
        """
        return min(1.0, threshold / (total + _norms._EPS))

    def observe(self, grad_norm: float) -> None:
        """Learn from a finite pre-clip global norm (the Watch never passes NaN or inf)."""

    def bind(self, owner: object) -> None:
        """Bind this clipper to the Watch that uses it; a second Watch gets a clear error.

        A clipper keeps per-run state (AutoClip's history, ZClip's averages, AGC's
        plan of one model): shared by two Watches it would mix two models' norms.

        Raises:
            ValueError: the clipper is already used by another Watch.

        Example:
            >>> clip = AutoClip(); clip.bind("watch A"); clip.bind("watch A")
            >>> clip.bind("watch B")
            Traceback (most recent call last):
            ...
            ValueError: this AutoClip(percentile=10, window=None, max_norm=None) is already used by another Watch ...
        """
        bound = getattr(self, "_owner", None)
        if bound is not None and bound() is not None and bound() is not owner:
            raise ValueError(
                f"this {self!r} is already used by another Watch (a clipper keeps the state of one run); "
                f"give each Watch its own, e.g. clip_norm=copy.deepcopy(clipper) or a new {type(self).__name__}(...)"
            )
        try:
            self._owner = weakref.ref(owner)
        except TypeError:  # an owner that cannot be weakly referenced (a str in the example)
            self._owner = lambda: owner

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FixedClip(NoClip):
    """Clip the global norm to a fixed ``max_norm`` (torch.nn.utils.clip_grad_norm_'s rule).

    Example:
        >>> FixedClip(1.0).threshold()
        1.0
    """

    name = "fixed"

    def __init__(self, max_norm: float) -> None:
        self.max_norm = float(max_norm)

    def threshold(self) -> float | None:
        return self.max_norm

    def __repr__(self) -> str:
        return f"FixedClip({self.max_norm!r})"


class AutoClip(NoClip):
    """AutoClip: clip to the ``percentile``-th percentile of the finite norm history.

    The threshold on step t is the percentile (numpy's default linear
    interpolation) of the pre-clip norms of steps before t, so the current norm
    cannot raise its own threshold (the original adds it first; a spike then
    lifts its own ceiling a little). Until one norm is known, nothing is clipped
    unless ``max_norm`` is given, which also caps the threshold on every step.
    Keeping the history sorted (``bisect``) makes a step cost O(log n) to look up
    plus a memmove to insert.

    Args:
        percentile: p in (0, 100]. Default: 10 (the paper's recommendation).
        window: keep only the last ``window`` norms; None keeps all (as the
            paper). Default: None.
        max_norm: optional static cap on the threshold. Default: None.

    Example:
        >>> clip = AutoClip(percentile=50)
        >>> for norm in [1.0, 3.0, 2.0]:
        ...     clip.observe(norm)
        >>> clip.threshold()
        2.0
    """

    name = "autoclip"

    def __init__(self, percentile: float = 10.0, window: int | None = None, max_norm: float | None = None) -> None:
        self.percentile = _check_number("percentile", percentile, low=0.0, high=100.0)
        self.window = None if window is None else _check_int("window", window, 1)
        self.max_norm = _check_max_norm(max_norm)
        self._sorted: list[float] = []
        self._order: deque[float] = deque()

    def threshold(self) -> float | None:
        values = self._sorted
        n = len(values)
        if n == 0:
            return self.max_norm
        rank = self.percentile / 100.0 * (n - 1)
        lo = int(math.floor(rank))
        hi = min(lo + 1, n - 1)
        value = values[lo] + (values[hi] - values[lo]) * (rank - lo)
        return value if self.max_norm is None else min(value, self.max_norm)

    def observe(self, grad_norm: float) -> None:
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):  # never let NaN/inf into the history
            return
        bisect.insort(self._sorted, grad_norm)
        if self.window is not None:
            self._order.append(grad_norm)
            if len(self._order) > self.window:
                old = self._order.popleft()
                del self._sorted[bisect.bisect_left(self._sorted, old)]

    @property
    def history_size(self) -> int:
        return len(self._sorted)

    def state_dict(self) -> dict[str, Any]:
        history = list(self._order) if self.window is not None else list(self._sorted)
        return {"percentile": self.percentile, "window": self.window, "max_norm": self.max_norm, "history": history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._sorted, self._order = [], deque()
        for value in state.get("history", []):
            self.observe(value)

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile:g}, window={self.window}, max_norm={self.max_norm})"


class ZClip(NoClip):
    """ZClip: z-score clipping against an EMA of the norm's mean and variance.

    Warm-up: the first ``warmup`` finite norms are collected (clipped only by
    ``max_norm``); their mean and (population) variance start the EMA. After
    that, with ``sigma = sqrt(var)`` and ``z = (g - mean) / (sigma + eps)``, a
    norm with ``z > z_threshold`` is clipped to

    - ``rule="adaptive"`` (the reference implementation's default,
      ``adaptive_scaling``): ``mean + z_threshold**2 * sigma / z`` - the larger
      the spike, the harder the clip;
    - ``rule="boundary"``: ``mean + z_threshold * sigma``.

    The clip value is also capped by the static ``max_norm`` backstop. The EMA
    (``mean <- a*mean + (1-a)*x``, then ``var <- a*var + (1-a)*(x - mean)**2``)
    is updated with the norm as clipped by the z rule (the spike itself never
    enters). NaN and inf norms are never observed. ``threshold()`` returns the
    z boundary ``mean + z_threshold*sigma`` (capped by ``max_norm``), the norm
    above which this step clips; the adaptive clip value is computed on the
    device from the step's norm (no host sync).

    Args:
        z_threshold: z above which a norm is a spike. Default: 2.5 (the paper's).
        alpha: EMA smoothing factor in (0, 1). Default: 0.97 (the paper's).
        warmup: finite steps collected before the EMA starts. Default: 25.
        max_norm: static backstop (None: none). Default: 1.0 (the reference's
            ``max_grad_norm``, the usual transformer clip).
        rule: ``"adaptive"`` or ``"boundary"``. Default: ``"adaptive"``.
        eps: added to sigma in the z-score. Default: 1e-6.

    Example:
        >>> clip = ZClip(warmup=3, max_norm=None)
        >>> for norm in [1.0, 2.0, 3.0]:
        ...     clip.observe(norm)
        >>> round(clip.mean, 3), round(clip.threshold(), 3)
        (2.0, 4.041)
    """

    name = "zclip"
    RULES = ("adaptive", "boundary")

    def __init__(
        self,
        z_threshold: float = 2.5,
        alpha: float = 0.97,
        warmup: int = 25,
        max_norm: float | None = 1.0,
        rule: str = "adaptive",
        eps: float = 1e-6,
    ) -> None:
        self.z_threshold = _check_number("z_threshold", z_threshold, low=0.0)
        if math.isinf(self.z_threshold):
            raise ValueError(f"z_threshold must be a positive finite float, got {z_threshold!r}")
        self.alpha = _check_number("alpha", alpha, low=0.0, high=1.0, high_open=True)
        self.warmup = _check_int("warmup", warmup, 1)
        self.max_norm = _check_max_norm(max_norm)
        if rule not in self.RULES:
            raise ValueError(f"rule must be one of {self.RULES}, got {rule!r}")
        self.rule = rule
        self.eps = _check_number("eps", eps, low=0.0, low_open=False)
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    @property
    def initialized(self) -> bool:
        return self.mean is not None

    @property
    def sigma(self) -> float:
        return math.sqrt(self.var) if self.var is not None else math.nan

    def _boundary(self) -> float:
        assert self.mean is not None  # internal invariant: only called once initialized
        return self.mean + self.z_threshold * (self.sigma + self.eps)

    def threshold(self) -> float | None:
        if self.mean is None:
            return self.max_norm
        # Clip value at the z boundary itself (z = z_threshold): mean + z_threshold * sigma.
        bound = self.mean + self.z_threshold * self.sigma
        return bound if self.max_norm is None else min(bound, self.max_norm)

    def clip_value(self, grad_norm: float) -> float | None:
        """The z rule's clip value for ``grad_norm`` (None: not a spike), without ``max_norm``.

        Example:
            >>> clip = ZClip(warmup=1, max_norm=None); clip.observe(1.0)
            >>> clip.clip_value(1.0) is None, clip.clip_value(5.0)
            (True, 1.0)
        """
        if self.mean is None:
            return None
        sigma = self.sigma
        z = (grad_norm - self.mean) / (sigma + self.eps)
        if not z > self.z_threshold:
            return None
        if self.rule == "boundary":
            return self.mean + self.z_threshold * sigma
        return self.mean + self.z_threshold * sigma / (z / self.z_threshold)

    def coefficient(self, total: float, threshold: float) -> float:
        """Above the z boundary clip to the rule's value (:meth:`clip_value`), else not at all; then ``max_norm``."""
        if self.mean is None:
            return super().coefficient(total, threshold)
        clip_to = self.clip_value(total)
        if clip_to is None:
            clip_to = math.inf
        if self.max_norm is not None:
            clip_to = min(clip_to, self.max_norm)
        return min(1.0, clip_to / (total + _norms._EPS))

    def observe(self, grad_norm: float) -> None:
        grad_norm = float(grad_norm)
        if not math.isfinite(grad_norm):  # never let NaN/inf into the statistics
            return
        if self.mean is None:
            self.buffer.append(grad_norm)
            if len(self.buffer) >= self.warmup:
                n = len(self.buffer)
                self.mean = sum(self.buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / n
                self.buffer = []
            return
        clipped = self.clip_value(grad_norm)
        x = grad_norm if clipped is None else clipped
        assert self.var is not None
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": list(self.buffer), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [float(v) for v in state.get("buffer", [])]
        self.mean = None if state.get("mean") is None else float(state["mean"])
        self.var = None if state.get("var") is None else float(state["var"])

    def __repr__(self) -> str:
        return (
            f"ZClip(z_threshold={self.z_threshold:g}, alpha={self.alpha:g}, warmup={self.warmup}, "
            f"max_norm={self.max_norm}, rule={self.rule!r})"
        )


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """NFNets' unit-wise norm: the whole tensor for scalars and vectors, else per output unit (dim 0).

    Example:
        >>> unitwise_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]])).flatten().tolist()
        [5.0, 1.0]
    """
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


class AGC(NoClip):
    """Unit-wise adaptive gradient clipping (NFNets), as ``Watch(clip_norm=gw.AGC(0.01))``.

    For every output unit i of every parameter (a row of a Linear weight, an
    output channel of a conv kernel, a whole bias or gain vector), if
    ``||G_i|| / max(||W_i||, eps) > clipping`` the unit's gradient is rescaled to
    ``clipping * max(||W_i||, eps) / ||G_i|| * G_i``. The final classifier is
    not clipped (NFNets): by default the last ``nn.Linear`` to run forward on the
    first step (found with forward hooks that live for that step only; a model
    without any ``nn.Linear`` has nothing excluded); name parameters in
    ``exclude`` to choose yourself. Norms are recorded before
    clipping. On the device, no host sync; one small kernel chain per parameter.

    Args:
        clipping: lambda, the largest allowed gradient-to-weight norm ratio.
            Default: 0.01 (NFNets' value for large batches).
        eps: floor of the weight norm (keeps zero-initialized units trainable).
            Default: 1e-3.
        exclude: ``"classifier"`` (skip the final classifier) or an iterable of
            parameter names (``model.named_parameters()``) to leave unclipped;
            ``()`` clips everything. Default: ``"classifier"``.
        max_norm: optional global-norm clip applied as well. Default: None.

    Example:
        >>> import gradwatch as gw
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = gw.Watch(model, opt, clip_norm=gw.AGC(0.01))
        >>> _ = watch.step(lambda: model(torch.randn(16, 4)).square().mean())
        >>> watch.clipper.excluded
        ['2.weight', '2.bias']
        >>> watch.close()
    """

    name = "agc"
    unitwise = True

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Any = "classifier", max_norm: float | None = None) -> None:
        self.clipping = _check_number("clipping", clipping, low=0.0)
        if math.isinf(self.clipping):
            raise ValueError(f"clipping must be a positive finite float, got {clipping!r}")
        self.eps = _check_number("eps", eps, low=0.0, low_open=False)
        if isinstance(exclude, str):
            if exclude != "classifier":
                raise ValueError(f"exclude must be 'classifier' or an iterable of parameter names, got {exclude!r}")
            self._exclude_names: list[str] | None = None
        else:
            try:
                names = list(exclude)
            except TypeError:
                raise TypeError(f"exclude must be 'classifier' or an iterable of parameter names, got {exclude!r}") from None
            if not all(isinstance(n, str) for n in names):
                raise TypeError(f"exclude must hold parameter names (str), got {names!r}")
            self._exclude_names = names
        self.max_norm = _check_max_norm(max_norm)
        self._hooks: list[Any] = []
        self._ran: list[nn.Module] = []
        self._plan: list[tuple[torch.Tensor, bool]] | None = None
        self.excluded: list[str] = []

    def threshold(self) -> float | None:
        return self.max_norm

    # ----- finding the final classifier --------------------------------------------------
    def track(self, model: nn.Module) -> None:
        """Check ``exclude`` against the model; with ``"classifier"``, arm forward pre-hooks on every
        ``nn.Linear`` to see which runs last (removed at the first clip). Called when the Watch is built.

        Raises:
            ValueError: ``exclude`` names a parameter the model does not have.
        """
        if self._exclude_names is not None:
            named = dict(model.named_parameters(remove_duplicate=False))
            unknown = [n for n in self._exclude_names if n not in named]
            if unknown:
                raise ValueError(
                    f"AGC(exclude=...) names no parameter of the model: {unknown}; "
                    "pass names from model.named_parameters()"
                )
            return
        if self._hooks or self._plan is not None:
            return

        def hook(module: nn.Module, args: Any) -> None:
            self._ran.append(module)

        for module in model.modules():
            if isinstance(module, nn.Linear):
                self._hooks.append(module.register_forward_pre_hook(hook))

    def untrack(self) -> None:
        """Remove the hooks armed by :meth:`track`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _classifier_params(self, model: nn.Module) -> set[int]:
        """ids of the final classifier's parameters: the last Linear to run (else the last registered)."""
        if self._ran:
            last = self._ran[-1]
        else:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            if not linears:
                return set()
            last = linears[-1]
        return {id(p) for p in last.parameters()}

    def _build_plan(self, index: "LayerIndex") -> None:
        self.untrack()
        if self._exclude_names is None:
            skip = self._classifier_params(index.model)
        else:
            named = dict(index.model.named_parameters(remove_duplicate=False))
            skip = {id(named[n]) for n in self._exclude_names if n in named}
        self._plan = [(p, id(p) not in skip) for p in index.params]
        self.excluded = [n for n, (p, clip) in zip(index.param_names, self._plan) if not clip]

    # ----- clipping ----------------------------------------------------------------------
    def clip_unitwise_(self, index: "LayerIndex") -> None:
        """Clip every (non-excluded) parameter's gradient unit-wise, in place. No host sync."""
        if self._plan is None or len(self._plan) != len(index.params):
            self._build_plan(index)
        assert self._plan is not None
        with torch.no_grad():
            for param, clip in self._plan:
                grad = param.grad
                if not clip or grad is None:
                    continue
                agc_clip_(param, grad, self.clipping, self.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps}

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping:g}, eps={self.eps:g})"


def agc_clip_(param: torch.Tensor, grad: torch.Tensor, clipping: float, eps: float) -> None:
    """Clip one gradient unit-wise against its parameter, in place (NFNets' rule).

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); g = torch.tensor([[1.0, 0.0], [0.0, 0.001]])
        >>> agc_clip_(w, g, 0.01, 1e-3); g.tolist()
        [[0.009999999776482582, 0.0], [0.0, 0.0010000000474974513]]
    """
    max_norm = unitwise_norm(param.detach()).clamp(min=eps).mul_(clipping)
    grad_norm = unitwise_norm(grad)
    # multiply by min(1, max_norm / grad_norm): a clamped factor instead of a branch (no sync)
    factor = torch.clamp(max_norm / grad_norm.clamp(min=1e-6), max=1.0)
    grad.mul_(factor.to(grad.dtype))


def make_clipper(clip_norm: Any) -> NoClip:
    """Build the clipper for ``Watch(clip_norm=...)``.

    Args:
        clip_norm: None (measure only), a positive finite float (fixed clip),
            ``"autoclip"`` (:class:`AutoClip`), ``"zclip"`` (:class:`ZClip`), or a
            clipper object (:class:`AutoClip`, :class:`ZClip`, :class:`AGC`, ...)
            not used by another Watch.

    Raises:
        ValueError / TypeError: for a negative, zero, non-finite or unknown value.

    Example:
        >>> make_clipper(1.0).threshold(), make_clipper(None).threshold()
        (1.0, None)
        >>> make_clipper("autoclip")
        AutoClip(percentile=10, window=None, max_norm=None)
    """
    if clip_norm is None:
        return NoClip()
    if isinstance(clip_norm, NoClip):
        return clip_norm
    if isinstance(clip_norm, str):
        if clip_norm == "autoclip":
            return AutoClip()
        if clip_norm == "zclip":
            return ZClip()
        if clip_norm == "auto":
            raise ValueError("clip_norm='auto' is now spelled clip_norm='autoclip' (AutoClip: the 10th percentile "
                             "of past norms); 'auto' was ambiguous with the integrations' clip settings")
        raise ValueError(
            f"clip_norm must be None, a positive float, one of {CLIP_NAMES} or a clipper such as "
            f"gradwatch.AGC(0.01); got {clip_norm!r}"
        )
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)):
        raise TypeError(
            f"clip_norm must be None, a positive float, one of {CLIP_NAMES} or a clipper such as "
            f"gradwatch.AGC(0.01); got {clip_norm!r}"
        )
    if not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ValueError(f"clip_norm must be a positive finite float (or None to measure only), got {clip_norm!r}")
    return FixedClip(float(clip_norm))
