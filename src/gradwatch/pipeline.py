"""The step pipeline: the named stages of one training step under the Watch, in order.

``Watch.step`` and ``Watch.observe`` share every stage; they differ only in who
applies the update (:class:`OwnUpdate`: the Watch steps the optimizer;
:class:`CallerUpdate`: the caller does, after ``observe()`` returns)::

    begin            refresh the layer index if parameters changed; a new StepContext
    micro_batch      (step / accumulate) clear stale gradients, run the closure under
                     autocast, back-propagate (scaled under fp16)        <- user code
    prepare_grads    depth order known after the first forward; unscale (fp16); the mean
                     over micro-batches; plugins.after_backward
    measure          per-layer gradient and weight norms before clipping and the loss, in
                     ONE host transfer (a second, exact one only if the norm overflowed)
    decide           finite? (agreed across ranks), plugin vetoes, the clip coefficient
    clip             scale the gradients in place when the coefficient is below 1 (AGC: unit-wise)
    before_update    plugins.before_update
    update           optimizer.step() or skip (OwnUpdate), or leave it to the caller
                     (CallerUpdate: dropped gradients on a skip); the update ratio  <- user code
    conclude         history, plugins.after_step (findings), the run directory, prepare(N+1)

Errors: an exception from the user's code (closure, backward, ``optimizer.step``)
propagates unchanged and abandons the step (its gradients are cleared, armed
hooks removed); an exception in gradwatch's own code is reported once and the
step finishes as plain PyTorch would (:meth:`StepPipeline.plain_step`), never
applying an update twice or a non-finite one.
"""

from __future__ import annotations

import enum
import math
import operator
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from . import compat
from . import norms as _norms
from .errors import NonFiniteError, logger
from .findings import Finding
from .plugins import MID_STEP_HOOKS, Closure, MicroBatch, SkipReason, StepContext, WatchPlugin
from .ratio import UpdateRatioMeter, hookable_optimizer
from .records import StepRecord, StepResult

if TYPE_CHECKING:  # pragma: no cover
    from .watch import Watch

_GRAD = operator.attrgetter("grad")
_NO_RESULTS: list[Any] = []  # what PluginBus.call returns when no plugin takes a hook (never appended to)


class StepState(enum.Enum):
    """Where the Watch is between calls (the order of calls is enforced, as GradScaler's ``OptState``)."""

    READY = "ready"  # between steps
    ACCUMULATING = "accumulating"  # watch.accumulate() back-propagated micro-batches; watch.step() applies them
    IN_STEP = "in_step"  # inside step() / accumulate() / observe()
    CLOSED = "closed"


# ----- plugin calls ------------------------------------------------------------------------
class PluginBus:
    """Calls one hook on every plugin that overrides it, in order, each inside the internal-error guard.

    Bound methods are looked up once per hook; a plugin whose ``quiet_step`` is True is not
    called in the mid-step hooks, and when every plugin that takes one is quiet, the step
    makes no mid-step call at all (``quiet_now``).
    """

    def __init__(self, plugins: list[WatchPlugin], report: Callable[[str, BaseException], Any]) -> None:
        self.plugins = plugins
        self._report = report
        self._callers: dict[str, list[tuple[WatchPlugin, Callable[..., Any]]]] = {}
        takers = {id(p) for method in MID_STEP_HOOKS for p, _ in self.callers(method)}
        self._quietable = [p for p in plugins if id(p) in takers]

    def callers(self, method: str) -> list[tuple[WatchPlugin, Callable[..., Any]]]:
        """The plugins that override hook ``method``, with their bound methods (found once per hook)."""
        found = self._callers.get(method)
        if found is None:
            base = getattr(WatchPlugin, method)
            found = [(p, getattr(p, method)) for p in self.plugins if getattr(type(p), method, base) is not base]
            self._callers[method] = found
        return found

    def local_vetoes(self) -> list[WatchPlugin]:
        """The plugins whose veto may differ between ranks (their vetoes need a collective to agree)."""
        return [p for p, _ in self.callers("veto") if not p.veto_is_global]

    def quiet_now(self) -> bool:
        """Whether every plugin that takes a mid-step hook is quiet for the coming step."""
        for plugin in self._quietable:
            if not plugin.quiet_step:
                return False
        return True

    def call(self, method: str, *args: Any) -> list[Any]:
        """The non-empty results of ``method`` on each plugin (errors reported once, then skipped)."""
        callers = self.callers(method)  # this runs ~6 times a step
        if not callers:
            return _NO_RESULTS
        out: list[Any] = []
        quietable = method in MID_STEP_HOOKS
        for plugin, bound in callers:
            if quietable and plugin.quiet_step:
                continue
            try:
                value = bound(*args)
            except NonFiniteError:
                raise
            except Exception as exc:
                self._report(f"{plugin.name}.{method}", exc)
                continue
            if value:
                out.append(value)
        return out


# ----- what the stages hand each other ---------------------------------------------------------
@dataclass(slots=True)
class Measurement:
    """What the measure stage brought to the host (per-layer arrays over every layer slot)."""

    loss: float  # NaN when unknown (observe() without a loss)
    loss_scale: float | None
    grad_norm: float  # global, before clipping
    layer_grad_norms: np.ndarray
    layer_weight_norms: np.ndarray
    groups: _norms.TensorGroups  # the gradients, grouped for the in-place clip
    missing_layers: list[str]


def _to_host(scalars: list[torch.Tensor], body: torch.Tensor | list[torch.Tensor]) -> np.ndarray:
    """``scalars`` (one element each) then ``body`` (a vector, or 0-d tensors) in ONE device-to-host transfer.

    float32 or wider (the widest dtype among them); a tensor on another device
    than the body's last one is moved there first.

    Example:
        >>> _to_host([torch.tensor(2.0)], [torch.tensor(3.0), torch.tensor(4.0, dtype=torch.float64)]).tolist()
        [2.0, 3.0, 4.0]
    """
    if isinstance(body, list):
        parts, join = [t if t.ndim == 0 else t.reshape(()) for t in scalars] + body, torch.stack
    else:
        parts, join = [t.reshape(1) for t in scalars] + [body], torch.cat
    try:
        packed = join(parts)  # promotes to the widest dtype
    except RuntimeError:  # a loss (or scale) on another device than the parameters
        device = parts[-1].device
        packed = join([t.to(device) for t in parts])
    if packed.dtype not in (torch.float32, torch.float64):  # numpy has no bfloat16; float16 norms overflow sooner
        packed = packed.float()
    return packed.cpu().numpy()


def check_loss(loss: Any, what: str) -> torch.Tensor:
    """``loss`` if it is a floating-point scalar tensor, else one clear error saying what to return instead.

    Example:
        >>> check_loss(torch.tensor([1.0, 2.0]), "the loss is")
        Traceback (most recent call last):
        ...
        ValueError: the loss is a tensor of shape (2,), not a scalar; reduce it first, e.g. loss.mean()
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} a {type(loss).__name__}, not a tensor; return the scalar loss tensor")
    if loss.numel() != 1:
        raise ValueError(f"{what} a tensor of shape {tuple(loss.shape)}, not a scalar; reduce it first, e.g. loss.mean()")
    if not loss.is_floating_point():
        raise TypeError(f"{what} a tensor of dtype {loss.dtype}; the loss must be a floating-point scalar")
    return loss


# ----- who applies the update ---------------------------------------------------------------
def zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)`` (the user's optimizer: its errors are the user's)."""
    optimizer.zero_grad(set_to_none=True)


class OwnUpdate:
    """``watch.step``: the Watch steps the optimizer (or skips), then clears the gradients."""

    unscales = True  # the Watch scaled the loss, so it unscales

    def apply(self, pipe: "StepPipeline", ctx: StepContext, record: StepRecord, weight_norms: np.ndarray) -> None:
        watch = pipe.watch
        precision = watch.precision
        if record.skipped:
            pipe.guard("precision update", precision.update)
        else:
            before = pipe.guard("update-ratio snapshot", pipe.snapshot, ctx.step) if pipe.ratio.due(ctx.step) else None
            # finite: the scaler's found_inf is 0, no second sync; the user's optimizer may raise
            pipe.user(precision.step, watch.optimizer, True)
            ctx.stepped = True
            pipe.guard("precision update", precision.update)
            if before is not None:
                record.update_ratio = pipe.guard("update ratio", pipe.measure_ratio, before, weight_norms)
        pipe.user(zero_grad, watch.optimizer)
        pipe.clear_unheld()


class CallerUpdate:
    """``watch.observe``: the caller steps the optimizer; a skipped step drops every gradient first."""

    unscales = False  # the caller owns loss scaling and has unscaled

    def apply(self, pipe: "StepPipeline", ctx: StepContext, record: StepRecord, weight_norms: np.ndarray) -> None:
        watch = pipe.watch
        if record.skipped:  # torch optimizers pass over parameters without a gradient: nothing changes
            pipe.drop_grads()
            return
        if not pipe.ratio.due(ctx.step) or watch._dist is not None:  # a collective inside the user's step could hang
            return
        optimizer = hookable_optimizer(watch.optimizer)
        if optimizer is None:
            return
        before = pipe.guard("update-ratio snapshot", pipe.snapshot, ctx.step)
        if before is None:
            return

        def on_update(snapshot: Any) -> None:  # runs inside the caller's optimizer.step(): never raise there
            try:
                record.update_ratio = pipe.measure_ratio(snapshot, weight_norms)
                for found in pipe.bus.call("after_update", record):
                    for finding in found:
                        watch.add_finding(finding)
            except Exception as exc:
                watch.errors.report("update ratio after optimizer.step()", exc)

        pipe.ratio.arm_caller(optimizer, before, on_update)


OWN_UPDATE = OwnUpdate()
CALLER_UPDATE = CallerUpdate()


class StepPipeline:
    """The stages of one step (see the module docstring), run by the Watch that owns it."""

    def __init__(self, watch: "Watch") -> None:
        self.watch = watch
        self.bus = PluginBus(watch.plugins, watch.errors.report)
        self.ratio = UpdateRatioMeter(watch.update_ratio_every, watch.update_ratio_budget)
        self.state = StepState.READY
        self.pending: StepContext | None = None  # the step being accumulated
        self._plan: _norms.MeasurePlan | None = None
        self._plan_version = -1
        self._unmeasured = np.zeros(0, dtype=np.intp)
        self._clear: list[torch.Tensor] = []  # every parameter whose gradient a step starts without
        self._refresh_due = False
        self._said_unheld = False
        self._user_error: BaseException | None = None
        self._layers_written = False

    def begin_run(self) -> None:
        """At construction: watch the first forward for the depth order; plugins prepare step 1."""
        self.watch.index.start_order_tracking()  # the first forward may run before step() is called
        self._rebuild_plan()
        self.bus.call("prepare", 1)

    def resumed(self) -> None:
        """After ``load_state_dict``: plugins prepare the step that now comes next."""
        self.bus.call("prepare", self.watch.steps_taken + 1)

    # ----- the two kinds of code -----------------------------------------------------------
    def user(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the user's code (closure, backward, optimizer): its exception propagates unchanged."""
        try:
            return fn(*args)
        except BaseException as exc:
            self._user_error = exc  # the guards re-raise it as it is
            raise

    def refuse(self, exc: BaseException) -> None:
        """Raise an error about the user's input (a bad closure result, an ambiguous call) to the user."""
        self._user_error = exc
        raise exc

    def is_users(self, exc: BaseException) -> bool:
        return exc is self._user_error or isinstance(exc, NonFiniteError)

    def guard(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run gradwatch's own ``fn``; an internal error is reported once and gives None."""
        try:
            return fn(*args)
        except Exception as exc:
            if self.is_users(exc):
                raise
            self.watch.errors.report(where, exc)
            return None

    # ----- stage: begin ----------------------------------------------------------------------
    def begin(self) -> StepContext:
        """A new step: the layer index refreshed if parameters changed, the step counted."""
        watch = self.watch
        index = watch.index
        if self._refresh_due or index.stale():
            self._refresh_due = False
            self.guard("layer refresh", self.refresh)
        if index.version != self._plan_version:
            self.guard("measure plan", self._rebuild_plan)
        watch._step += 1
        return StepContext(step=watch._step, quiet=self.bus.quiet_now())

    def refresh(self) -> None:
        """Rebuild the layer index (a layer unfrozen, a param group added) and everything built on it."""
        watch = self.watch
        grew = watch.index.refresh()
        self._rebuild_plan()
        if grew and watch.writer is not None and self._layers_written:
            watch.writer.write_layers(watch.layer_table)

    def _rebuild_plan(self) -> None:
        index = self.watch.index
        self._plan = None  # built at the first measurement (the depth order is known by then)
        self._plan_version = index.version
        self._unmeasured = np.array([i for i, layer in enumerate(index.layers) if not layer.measured], dtype=np.intp)
        candidates = list(index.params) + [p for _, p in index.unheld] + [
            p for group in self.watch.optimizer.param_groups for p in group["params"]]
        self._clear = list({id(p): p for p in candidates}.values())  # each once, in order
        if index.unheld and not self._said_unheld:
            self._said_unheld = True
            names = [n for n, _ in index.unheld]
            logger.warning(
                "gradwatch: %d trainable parameter(s) of the model are not held by the optimizer (%s%s): their "
                "gradients are never applied; the Watch clears them after every step so that they do not "
                "accumulate. Freeze them (requires_grad_(False)) to save the backward work, or add them to "
                "the optimizer (add_param_group) to train them.",
                len(names), ", ".join(names[:5]), ", ..." if len(names) > 5 else "")

    # ----- stage: micro-batch ------------------------------------------------------------------
    def has_grads(self) -> bool:
        """Whether any measured parameter holds a gradient (one C-level pass over their ``.grad``)."""
        grads = list(map(_GRAD, self.watch.index.params))
        return grads.count(None) != len(grads)

    def clear_grads(self) -> None:
        """Set every gradient the step measures (and those the optimizer holds) to None, as ``zero_grad()``."""
        for p in self._clear:
            if p.grad is not None:
                p.grad = None

    def clear_unheld(self) -> None:
        for _, p in self.watch.index.unheld:
            p.grad = None

    def drop_grads(self) -> None:
        """Set every gradient to None: the caller's ``optimizer.step()`` then changes nothing."""
        for group in self.watch.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.clear_grads()

    def micro_batch(self, ctx: StepContext, closure: Closure | None, loss: torch.Tensor | None, batch: Any,
                    backward: bool) -> None:
        """One forward (the closure, under autocast) and backward (scaled under fp16) into ``.grad``."""
        watch = self.watch
        first = not ctx.micro
        ctx.micro.append(MicroBatch(closure, batch))
        if not ctx.quiet:
            self.bus.call("before_forward", ctx)
        if closure is not None:
            if first:
                self.clear_grads()  # nothing from a failed step or another model's backward enters this one
            with watch.precision.autocast():
                loss = self.user(closure)
            if not ctx.quiet:
                self.bus.call("after_forward", ctx)
            self._checked(loss, "the closure passed to watch.step() returned")
            if first and self.has_grads():
                self.refuse(ValueError(
                    "the closure passed to watch.step() ran backward() itself (parameters received gradients "
                    "before it returned); return the loss without calling backward() - the Watch "
                    "back-propagates it (scaled under fp16) - or call loss.backward() yourself and then "
                    "watch.step(loss, backward=False)"))
        else:
            self._checked(loss, "the loss passed to watch.step() is")
            if backward and first and self.has_grads():
                self.refuse(ValueError(
                    "watch.step(loss) was asked to back-propagate this loss, but parameters already hold "
                    "gradients from a backward the Watch did not run, and it cannot tell what they are. "
                    "If they are earlier micro-batches of this step, back-propagate each micro-batch with "
                    "watch.accumulate(loss_or_closure) instead (or, having run every backward yourself, "
                    "call watch.step(loss, backward=False)); if they are stale (another model's backward, a "
                    "failed step), clear them first with watch.zero_grad() or optimizer.zero_grad()"))
        assert loss is not None  # internal invariant: a closure returned one, or one was given
        ctx.micro[-1].loss = loss
        if backward:
            if not loss.requires_grad:
                self.refuse(ValueError(
                    "the loss does not require grad, so no gradient can flow; compute it from the model's "
                    "output without torch.no_grad() or .detach()"))
            self.user(watch.precision.backward, loss)

    def _checked(self, loss: Any, what: str) -> None:
        try:
            check_loss(loss, what)
        except (TypeError, ValueError) as exc:
            self.refuse(exc)

    # ----- stages after backward: measure, decide, clip, update, conclude ------------------------
    def finish(self, ctx: StepContext, updater: OwnUpdate | CallerUpdate, started: float) -> StepResult:
        """Every stage after the gradients are in place; the step's result."""
        watch = self.watch
        try:
            self.prepare_grads(ctx, updater)
            measured = self.measure(ctx)
            record = self.decide(ctx, measured)
            if not record.skipped:
                self.clip(measured, record)
            if not ctx.quiet:
                self.bus.call("before_update", ctx, record)
        except Exception as exc:
            if self.is_users(exc):
                raise
            watch.errors.report("watch.step" if updater is OWN_UPDATE else "watch.observe", exc)
            return self.plain_step(ctx, updater)
        updater.apply(self, ctx, record, measured.layer_weight_norms)
        record.time_ms = (time.perf_counter() - started) * 1e3
        try:
            return self.conclude(ctx, record)
        except Exception as exc:
            if self.is_users(exc):
                raise
            watch.errors.report("watch.step (recording)", exc)
            return StepResult(step=ctx.step, loss=record.loss, grad_norm=record.grad_norm, clipped=record.clipped,
                              skipped=record.skipped, findings=[], loss_scale=record.loss_scale, record=record)

    def prepare_grads(self, ctx: StepContext, updater: OwnUpdate | CallerUpdate) -> None:
        """Depth order (first step), unscale (fp16), the mean over micro-batches, ``after_backward``."""
        watch = self.watch
        index = watch.index
        if index.tracking:  # first step: the depth order is now known
            index.finish_order_tracking()
            self._rebuild_plan()
        if not self._layers_written and watch.writer is not None:
            self._layers_written = True
            watch.writer.write_layers(watch.layer_table)
        if updater.unscales:
            watch.precision.unscale_(watch.optimizer)
        n = len(ctx.micro)
        if n > 1:  # gradient accumulation: the mean of the micro-batches' gradients
            grads = [p.grad for p in index.params if p.grad is not None]
            if grads:
                with torch.no_grad():
                    for group in _norms.group_tensors(grads, [0] * len(grads)).tensors.values():
                        compat.foreach_mul_(group, 1.0 / n)
        if not ctx.quiet:
            self.bus.call("after_backward", ctx)

    def _plan_for(self) -> _norms.MeasurePlan:
        plan = self._plan
        if plan is None:
            index = self.watch.index
            plan = self._plan = _norms.MeasurePlan(index.params, index.param_layer, len(index), self.watch.device)
        return plan

    def _norms(self, grads: list[torch.Tensor | None], loss: torch.Tensor, exact: bool = False,
               weights: bool = True) -> tuple[
            _norms.TensorGroups, torch.Tensor | list[torch.Tensor], torch.Tensor, Callable[[np.ndarray], np.ndarray] | None]:
        """(gradient groups, norms, loss, on_host); no host sync. See :mod:`gradwatch.norms`.
        ``weights=False``: the fast path reads no weight (their norms come back NaN)."""
        watch = self.watch
        norm_type = watch.norm_type
        if watch._dist is not None:
            groups, powers, weight_powers, loss = watch._dist.measure(watch.index, grads, loss, norm_type, watch.device, exact)
        else:
            plan = self._plan_for()
            fast = plan.tensor_norms2(grads, weights) if norm_type == 2.0 and not exact else None
            if fast is not None:
                return fast[0], fast[1], loss, fast[2]
            groups, powers, weight_powers = plan.measure(grads, norm_type, exact)
        layer_norms, total = _norms.finalize_norms(powers, norm_type)
        norms = torch.cat([layer_norms, weight_powers.sqrt().to(layer_norms.dtype), total.reshape(1)])
        return groups, norms, loss, None

    def weights_due(self, step: int) -> bool:
        """Whether step ``step`` measures the weight norms: the steps that measure the update ratio (which
        divides by them), the first ``update_ratio_every`` and every ``update_ratio_every``-th. Reading every
        weight on every step cost the benchmark MLP ~45 us of a ~2.3 ms step (README, "Overhead")."""
        return self.ratio.due(step)

    def measure(self, ctx: StepContext) -> Measurement:
        """Per-layer norms before clipping, weight norms (NaN on steps that do not measure them, see
        :meth:`weights_due`), the global norm and the loss: the step's one host sync."""
        watch = self.watch
        index = watch.index
        n_layers = len(index)
        weights = self.weights_due(ctx.step)
        with torch.no_grad():
            grads = [p.grad for p in index.params]
            losses = [m.loss for m in ctx.micro if m.loss is not None]
            loss = losses[0] if len(losses) == 1 else torch.stack([t.detach().reshape(()) for t in losses]).mean()
            groups, norms, loss, on_host = self._norms(grads, loss, weights=weights)
            scale = watch.precision.loss_scale_tensor()
            head = [loss] if scale is None else [loss, scale]
            if on_host is not None and self._plan is not None and self._plan.on_cpu and loss.device.type == "cpu":
                # CPU: nothing to transfer; reading each value in place costs ~8 us in the step against
                # ~27 us for the stack and copy of the one-transfer path
                scalars = [t.item() for t in head]
                values = on_host([t.item() for t in norms])  # type: ignore[union-attr]
            else:
                host = _to_host(head, norms)  # the one host sync of the step
                width = len(head)
                scalars = host[:width].tolist()
                values = host[width:] if on_host is None else on_host(host[width:])
            if not math.isfinite(values[2 * n_layers]) and any(g is not None for g in grads):
                # a float32 sum of squares may have overflowed: measure once more, exactly (rare)
                groups, norms, _, _ = self._norms(grads, loss, exact=True)
                values = _to_host([], norms)
        loss_value = scalars[0] if ctx.loss_known else math.nan
        layer_values = values[:n_layers]
        weight_values = values[n_layers: 2 * n_layers]
        if not weights:  # the same on every path: the distributed and general paths read them anyway
            weight_values[:] = math.nan
        if self._unmeasured.size:  # layers not measured now: frozen, or not held by the optimizer
            layer_values[self._unmeasured] = math.nan
            weight_values[self._unmeasured] = math.nan
        missing: list[str] = []  # the fast path (on_host) runs only when every parameter has a gradient
        if on_host is None and any(g is None for g in grads):
            missing = [index.names[i] for i in sorted({index.param_layer[j] for j, g in enumerate(grads) if g is None})]
            if index.measured_frozen():  # a parameter was frozen: rebuild the index before the next step
                self._refresh_due = True
        return Measurement(
            loss=loss_value,
            loss_scale=scalars[1] if scale is not None else None,
            grad_norm=values[2 * n_layers].item(),
            layer_grad_norms=layer_values,
            layer_weight_norms=weight_values,
            groups=groups,
            missing_layers=missing,
        )

    def decide(self, ctx: StepContext, m: Measurement) -> StepRecord:
        """Finite? (the same on every rank), vetoes, the clip coefficient: the step's record."""
        watch = self.watch
        precision = watch.precision
        index = watch.index
        loss_finite = math.isfinite(m.loss) or not ctx.loss_known
        finite = loss_finite and math.isfinite(m.grad_norm)
        # The clip coefficient on the host from the norm just read: the same min(1, max_norm / (total + 1e-6))
        # as clip_grad_norm_; the gradients are multiplied only when it is below 1.
        threshold = watch.clipper.threshold()
        coef = watch.clipper.coefficient(m.grad_norm, threshold) if threshold is not None and finite else 1.0
        external = getattr(watch, "external_clip", None) if threshold is None else None
        value_clipped = False
        if external is not None:  # the framework clips after observe(): record it, apply nothing (see clip)
            threshold = float(external[0])
            if finite and external[1] == "value":
                value_clipped = self._any_grad_above(threshold)
            elif finite:
                coef = min(1.0, threshold / (m.grad_norm + 1e-6))
        record = StepRecord(
            step=ctx.step,
            loss=m.loss,
            grad_norm=m.grad_norm,
            clip_coef=coef if finite else math.nan,
            clip_threshold=threshold,
            clipped=bool(finite and threshold is not None and (coef < 1.0 or value_clipped)),
            skipped=not finite,
            loss_finite=loss_finite,
            layer_names=index.names,
            layer_grad_norms=m.layer_grad_norms,
            layer_weight_norms=m.layer_weight_norms,
            loss_scale=m.loss_scale,
            nonfinite_layers=[] if finite else [index.names[i] for i in np.flatnonzero(
                ~np.isfinite(m.layer_grad_norms)) if i not in self._unmeasured],
            missing_layers=m.missing_layers,
            skipped_by=ctx.skip_reasons,
            micro_batches=len(ctx.micro),
        )
        if not finite:
            if precision.scaling and loss_finite:  # the scaler's routine business: skip and back off
                ctx.skip_reasons.append(SkipReason.SCALER_OVERFLOW)
                precision.overflow_skips += 1
                record.overflow_skips = precision.overflow_skips
            else:
                ctx.skip_reasons.append(SkipReason.NONFINITE)
            if watch._dist is not None:  # which rank(s): read on the host on such steps only
                ctx.nonfinite_ranks = self.guard("non-finite ranks", watch._dist.nonfinite_ranks)
            return record
        vetoed = bool(self.bus.call("veto", ctx, record)) if not ctx.quiet else False
        if self._veto_agreed(vetoed):
            if not ctx.skip_reasons:
                ctx.skip_reasons.append(SkipReason.VETO)
            record.skipped = True
            record.clipped = False
        return record

    def _veto_agreed(self, vetoed: bool) -> bool:
        """torch.distributed: skip on every rank if a plugin vetoed on any rank (a collective only when a
        plugin's veto may differ between ranks)."""
        dist = self.watch._dist
        if dist is None or not self.bus.local_vetoes():
            return vetoed
        return dist.agree(vetoed)

    def _any_grad_above(self, value: float) -> bool:
        """Whether any gradient element exceeds ``value`` in magnitude (clip_grad_value_ would change it)."""
        with torch.no_grad():
            peaks = [p.grad.detach().abs().max() for g in self.watch.optimizer.param_groups for p in g["params"]
                     if p.grad is not None and p.grad.numel()]
            return bool(peaks) and bool((torch.stack([x.float().cpu() for x in peaks]).max() > value).item())

    def clip(self, m: Measurement, record: StepRecord) -> None:
        """Scale the gradients in place by the clip coefficient (only when below 1); AGC unit-wise."""
        clipper = self.watch.clipper
        if getattr(self.watch, "external_clip", None) is not None and clipper.threshold() is None:
            return  # the framework (Lightning's gradient_clip_val) clips after observe()
        if record.clip_coef < 1.0 or clipper.unitwise:
            with torch.no_grad():
                if record.clip_coef < 1.0:
                    _norms.scale_(m.groups, record.clip_coef)
                if clipper.unitwise:  # after the pre-clip norms were taken
                    clipper.clip_unitwise_(self.watch.index)

    def snapshot(self, step: int) -> Any:
        """Step ``step``'s round of weights, copied before the update (:mod:`gradwatch.ratio`)."""
        watch = self.watch
        plan = self._plan if watch._dist is None else None
        return self.ratio.snapshot(watch.index, plan.host if plan is not None else None, watch._dist, step)

    def measure_ratio(self, before: Any, weight_norms: np.ndarray) -> np.ndarray | None:
        watch = self.watch
        plan = self._plan if watch._dist is None else None
        return self.ratio.measure(before, watch.index, plan.host if plan is not None else None, watch._dist,
                                  watch.device, weight_norms)

    def conclude(self, ctx: StepContext, record: StepRecord) -> StepResult:
        """History, findings (plugins.after_step), the run directory, ``prepare`` of the next step."""
        watch = self.watch
        if record.finite:  # a NaN or inf norm never enters a clipper's statistics
            watch.clipper.observe(record.grad_norm)
        history = watch.history
        history.append(record)
        if len(history) > watch.history_size:
            del history[: len(history) - watch.history_size]
        findings: list[Finding] = []
        for found in self.bus.call("after_step", ctx, record):
            findings.extend(found)
        bad: list[dict[str, Any]] | None = None
        if watch._dist is not None and not record.finite:  # the rank that saw the NaN can locate it: share its finding
            merged = self.guard("distributed findings", watch._dist.merge_findings, findings, ctx.nonfinite_ranks,
                                ctx.bad_step, watch.writer)
            if merged is not None:
                findings, bad = merged
        if ctx.bad_step is not None and watch.writer is not None:
            self.guard("bad batches", self._note_bad_batches, ctx, bad)
        if watch._dist is not None and watch.agree_every and (ctx.step == 1 or ctx.step % watch.agree_every == 0):
            diverged = self.guard("replica check", watch._dist.check_replicas, ctx.step, watch.index,
                                  record.clip_coef, record.skipped)
            if diverged is not None:
                findings.append(diverged)
        for finding in findings:
            watch.add_finding(finding)
        writer = watch.writer
        if writer is not None:
            writer.append_step(record.to_json_line,
                               {"grad_norms": record.layer_grad_norms, "weight_norms": record.layer_weight_norms},
                               step=ctx.step)
            error = writer.take_error()
            if error is not None:
                watch.errors.report("run directory writer", error)
        self.bus.call("prepare", ctx.step + 1)
        result = StepResult(step=ctx.step, loss=record.loss, grad_norm=record.grad_norm, clipped=record.clipped,
                            skipped=record.skipped, findings=findings, loss_scale=record.loss_scale, record=record)
        # fp16: a scaled-gradient overflow (finite loss) is the loss scaler's normal business (skip and back off),
        # not an error to raise, until the scale falls below 1 (see docs/precision.md).
        scaler_overflow = SkipReason.SCALER_OVERFLOW in record.skipped_by and (record.loss_scale or 0.0) >= 1.0
        if not record.finite and watch.on_nonfinite == "raise" and not scaler_overflow:
            finding = next((f for f in findings if f.severity == "error"), findings[0] if findings else None)
            where = f"; non-finite gradients in {', '.join(record.nonfinite_layers[:5])}" if record.nonfinite_layers else ""
            raise NonFiniteError(
                f"step {ctx.step} is non-finite (loss={record.loss}, grad_norm={record.grad_norm}{where}); "
                "the update was not applied. Pass on_nonfinite='skip' to skip such steps instead of raising.",
                record=record, finding=finding)
        return result

    def _note_bad_batches(self, ctx: StepContext, bad: list[dict[str, Any]] | None) -> None:
        """One line per bad batch in ``RUN_DIR/bad_batches.jsonl`` (under torch.distributed: the flagged ranks')."""
        from .nonfinite.badbatches import BadBatch, append_bad_batch

        step = ctx.bad_step
        if bad is None:  # one process
            bad = [{"rank": None, "fingerprint": step.fingerprint, "signature": step.signature}]
        for item in bad:
            if item.get("fingerprint"):
                append_bad_batch(self.watch.writer.path, BadBatch(
                    step=ctx.step, fingerprint=item["fingerprint"], signature=item.get("signature"),
                    verdict=item.get("verdict") or step.verdict, code=item.get("code") or step.code,
                    rank=item.get("rank")))

    # ----- when a step cannot go on --------------------------------------------------------------
    def abandon(self, ctx: StepContext | None) -> None:
        """The user's code raised: remove what plugins armed, clear the step's gradients, settle the scaler."""
        if ctx is not None:
            self.bus.call("abort", ctx)
        self.guard("abandoned step", self._settle)

    def _settle(self) -> None:
        watch = self.watch
        if watch.precision.unscaled:  # GradScaler refuses a second unscale_ before update()
            watch.precision.update()
        self.clear_grads()

    def plain_step(self, ctx: StepContext, updater: OwnUpdate | CallerUpdate) -> StepResult:
        """Finish the step as plain PyTorch would (after an internal error); never a second or a non-finite update."""
        watch = self.watch
        loss = ctx.loss
        loss_value = math.nan
        if loss is not None and ctx.loss_known:
            loss_value = self.guard("loss value", lambda: float(loss.detach())) or math.nan
        if updater is CALLER_UPDATE or ctx.stepped:  # the caller steps; or the update already happened
            if ctx.stepped:
                self.user(zero_grad, watch.optimizer)
            return StepResult(step=ctx.step, loss=loss_value, grad_norm=math.nan, clipped=False, skipped=False,
                              findings=[])
        precision = watch.precision
        grad_norm = math.nan
        try:
            if precision.scaling and not precision.unscaled:
                precision.unscale_(watch.optimizer)
            threshold = watch.clipper.threshold()
            params = [p for group in watch.optimizer.param_groups for p in group["params"]]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, threshold if threshold is not None else math.inf))
        except Exception as exc:
            watch.errors.report("plain step", exc)
        finite = math.isfinite(grad_norm)
        if finite:  # never write a non-finite update into the weights, even on this path
            self.user(precision.step, watch.optimizer)
            ctx.stepped = True
        self.guard("precision update", precision.update)
        self.user(zero_grad, watch.optimizer)
        self.clear_unheld()
        return StepResult(step=ctx.step, loss=loss_value, grad_norm=grad_norm, clipped=False, skipped=not finite,
                          findings=[])
