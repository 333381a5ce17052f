"""The Watch: per-layer gradient telemetry, clipping and skip-on-non-finite in one call per step.

``watch.step(closure)`` runs, in order: the closure (under autocast when asked),
backward (scaled under fp16), unscale, per-layer norms *before* clipping, clip,
finite check, ``optimizer.step()`` or skip, ``zero_grad``, record, diagnose.

Cost on a healthy step: the fused norm pass (:mod:`gradwatch.norms`: one
foreach norm over the gradients *and* the weights; on CPU numpy reads the
weights' norms in place), one host sync (the skip decision, which carries the
loss and every per-tensor norm to the host in one small transfer, where they
are summed per layer), the clip multiply only when the coefficient, worked out
on the host, is below 1, and some Python. Every ``update_ratio_every`` steps
(default 10) the weights are also copied before the update (into a buffer kept
between measurements: one copy of the weights stays allocated) to measure
``||dw|| / ||w||`` per layer: one extra copy, subtract and norm over the
weights, and one extra small transfer.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from . import distributed as _distributed
from . import norms as _norms
from .clipping import make_clipper
from .errors import InternalErrorReporter, NonFiniteError, logger
from .findings import Finding
from .layers import LayerIndex
from .plugins import StepContext, WatchPlugin
from .precision import Precision
from .records import StepRecord, StepResult
from .rundir import RunWriter

ON_NONFINITE = ("skip", "rollback", "raise")
_QUIETABLE = frozenset({"before_forward", "after_forward", "after_backward", "veto"})  # see WatchPlugin.quiet_step
_NO_RESULTS: list[Any] = []  # what _call_plugins returns when no plugin takes a hook (never appended to)
Closure = Callable[[], torch.Tensor]


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


def _hookable_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer whose step hooks fire for ``optimizer``: itself, or the one a wrapper
    (accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer) steps; None if there is none.

    Example:
        >>> opt = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1)
        >>> _hookable_optimizer(opt) is opt, _hookable_optimizer(object())
        (True, None)
    """
    for _ in range(4):
        if isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_post_hooks"):
            return optimizer
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if inner is not None else getattr(optimizer, "_optimizer", None)
        if optimizer is None:
            return None
    return None


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Watch:
    """Watch a model's training: per-layer gradient norms, clipping, skip, diagnosis.

    Args:
        model: the ``nn.Module`` being trained.
        optimizer: the optimizer that holds the model's trainable parameters.
        clip_norm: clip the global gradient norm to this value; None measures
            only. Default: 1.0 (the usual transformer default).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast, plus loss
            scaling for fp16). Default: ``"fp32"``.
        scaler: fp16 only: your own ``torch.amp.GradScaler``; None makes a default one.
        on_nonfinite: ``"skip"`` (the update is not applied; weights and optimizer
            state stay bit-identical), ``"rollback"`` or ``"raise"``
            (:class:`~gradwatch.errors.NonFiniteError`). Default: ``"skip"``.
        run_dir: directory for the run's files (see :mod:`gradwatch.rundir`);
            None keeps everything in memory. Default: None.
        norm_type: p of the p-norm (``float('inf')`` for the max norm). Default: 2.0.
        update_ratio_every: measure ``||dw||/||w||`` per layer every this many steps. Default: 10.
        flush_every: write the run directory every this many steps. Default: 50.
        history: number of recent step records kept in memory for the rules. Default: 200.
        plugins: extra :class:`~gradwatch.plugins.WatchPlugin` objects.
        diagnose: run the diagnosis rules. Default: True.
        write_rank: under torch.distributed, the rank that writes ``run_dir``, or
            ``"all"`` (each rank writes ``run_dir/rank<k>``). Default: 0. See
            :mod:`gradwatch.distributed` (DDP and FSDP2 give the same numbers and
            the same skip decisions on every rank).
        distributed: None (default) syncs with the process group when one is
            initialized; False keeps this Watch to its own rank (a Watch that
            only some ranks build must not wait for the others); True requires
            a process group.
        **options: options of gradwatch's own plugins (each plugin factory
            ``watch.options.pop``-s its own keys; an unknown key is a TypeError).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = Watch(model, opt, clip_norm=1.0)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
        >>> result = watch.step(lambda: nn.functional.mse_loss(model(x), y))
        >>> watch.layers, result.skipped
        (['0', '2'], False)
        >>> watch.close()
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        clip_norm: Any = 1.0,
        precision: str = "fp32",
        scaler: "torch.amp.GradScaler | None" = None,
        on_nonfinite: str = "skip",
        run_dir: str | os.PathLike[str] | None = None,
        *,
        norm_type: float = 2.0,
        update_ratio_every: int = 10,
        flush_every: int = 50,
        history: int = 200,
        plugins: Sequence[WatchPlugin] = (),
        diagnose: bool = True,
        **options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {on_nonfinite!r}")
        if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 0:
            raise ValueError(f"norm_type must be a positive number or float('inf'), got {norm_type!r}")
        self.options = dict(options)
        # torch.distributed: None in a single process (see gradwatch.distributed)
        self._dist = _distributed.DistSync.detect(self.options.pop("write_rank", 0), enabled=self.options.pop("distributed", None))
        self.update_ratio_every = _check_positive_int("update_ratio_every", update_ratio_every)
        self.history_size = _check_positive_int("history", history)
        self.norm_type = float(norm_type)
        self.clipper = make_clipper(clip_norm)
        self.clip_norm = clip_norm
        self.on_nonfinite = on_nonfinite
        self.model = model
        self.optimizer = optimizer

        self.index = LayerIndex(_distributed.unwrap_model(model))  # names as in the eager, unwrapped model
        if not self.index.params:
            raise ValueError(
                "model has no trainable parameters (none with requires_grad=True); "
                "gradwatch measures gradients, so unfreeze at least one parameter"
            )
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        held = sum(1 for p in self.index.params if id(p) in in_optimizer)
        if held == 0:
            raise ValueError(
                "optimizer does not hold any of the model's trainable parameters; "
                "build it from this model, e.g. torch.optim.AdamW(model.parameters())"
            )
        self.device = self.index.params[0].device
        self.precision = Precision(precision, self.device.type, scaler)

        self.errors = InternalErrorReporter()
        self.findings: list[Finding] = []
        self.history: list[StepRecord] = []
        self._step = 0
        self._closed = False
        self._plan: _norms.MeasurePlan | None = None  # built once the depth order is known
        self._before: list[torch.Tensor] | None = None  # the update-ratio snapshot buffer
        self._caller_update: Any = None  # observe(): the one-shot optimizer hook that measures the update

        self._hook_cache: dict[str, list[tuple[WatchPlugin, Callable[..., Any]]]] = {}
        self._quietable: list[WatchPlugin] | None = None  # plugins with a quietable hook (found on first use)
        self.diagnose = bool(diagnose)
        self.plugins: list[WatchPlugin] = self._default_plugins(self.diagnose)
        self.plugins.extend(plugins)
        if self.options:  # every extra keyword must be taken by a plugin factory
            raise TypeError(
                f"Watch() got unexpected keyword argument(s) {sorted(self.options)}; "
                "see help(gradwatch.Watch) for the accepted arguments"
            )
        # Everything is validated: only now touch the disk.
        flush_every = _check_positive_int("flush_every", flush_every)
        if run_dir is not None and self._dist is not None:  # only write_rank writes (default: rank 0)
            run_dir = self._dist.run_dir(run_dir) if self._dist.writes else None
        self.writer = RunWriter(run_dir, flush_every=flush_every) if run_dir is not None else None
        self.run_dir = self.writer.path if self.writer is not None else None
        for plugin in self.plugins:
            plugin.attach(self)

        if self.writer is not None:
            self.writer.write_meta(self._meta())
        self.index.start_order_tracking()  # the first forward may run before step() is called
        self._call_plugins("prepare", 1)

    # ----- public API -------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Measured layer names in depth (execution) order."""
        return list(self.index.names)

    @property
    def layer_table(self) -> list[dict[str, Any]]:
        """Every layer (frozen ones too) with type, depth, shapes and parameter counts."""
        return [layer.to_dict() for layer in self.index.layers]

    @property
    def steps_taken(self) -> int:
        """Number of calls to :meth:`step` so far."""
        return self._step

    def step(self, closure_or_loss: Closure | torch.Tensor, batch: Any = None) -> StepResult:
        """Run (or finish) one training step under the Watch.

        Args:
            closure_or_loss: a closure that computes and returns the loss (the
                Watch runs it, backward and the update), or a loss tensor,
                already back-propagated or not (then no replay of a non-finite
                step is possible).
            batch: the step's input batch, kept for diagnosing a non-finite step.

        Returns:
            a :class:`~gradwatch.records.StepResult`.

        Raises:
            TypeError / ValueError: the closure or loss is not a scalar tensor.
            NonFiniteError: a non-finite step with ``on_nonfinite="raise"``.

        Example:
            >>> model = nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> watch = Watch(model, opt)
            >>> loss = model(torch.randn(8, 3)).pow(2).mean()
            >>> watch.step(loss).grad_norm > 0
            True
        """
        if self._closed:
            raise RuntimeError("this Watch is closed; make a new gradwatch.Watch to keep measuring")
        closure = closure_or_loss if callable(closure_or_loss) and not isinstance(closure_or_loss, torch.Tensor) else None
        if closure is None and not isinstance(closure_or_loss, torch.Tensor):
            raise TypeError(
                "watch.step() takes a closure that returns the loss, or the loss tensor; "
                f"got {type(closure_or_loss).__name__}"
            )
        started = time.perf_counter()
        self._step += 1
        ctx = StepContext(step=self._step, closure=closure, batch=batch, quiet=self._quiet_now())
        if not ctx.quiet:
            self._call_plugins("before_forward", ctx)
        try:
            loss = self._forward_backward(ctx, closure_or_loss)
        except BaseException:  # the user's closure or backward raised: let plugins remove what they armed
            self._call_plugins("abort", ctx)
            raise

        try:
            record = self._measure_and_update(ctx, loss, started)
        except NonFiniteError:
            raise
        except Exception as exc:  # an error inside gradwatch: report once, train as plain PyTorch would
            self.errors.report("watch.step", exc)
            return self._plain_step(ctx, loss, started)
        return record

    def _forward_backward(self, ctx: StepContext, closure_or_loss: Closure | torch.Tensor) -> torch.Tensor:
        """Run the closure (under autocast) and backward (scaled under fp16), or take the given loss."""
        if ctx.closure is not None:
            with self.precision.autocast():
                loss = ctx.closure()
            if not ctx.quiet:
                self._call_plugins("after_forward", ctx)
            self._check_loss(loss, "the closure passed to watch.step() returned")
            backward_needed = True
        else:
            loss = closure_or_loss
            self._check_loss(loss, "the loss passed to watch.step() is")
            backward_needed = loss.requires_grad and not any(p.grad is not None for p in self.index.params)
        ctx.loss = loss
        if backward_needed:
            if not loss.requires_grad:
                raise ValueError(
                    "the loss does not require grad, so no gradient can flow; "
                    "compute it from the model's output without torch.no_grad() or .detach()"
                )
            self.precision.backward(loss)
        return loss

    def observe(self, loss: torch.Tensor | float | None = None, batch: Any = None) -> StepResult:
        """Measure the gradients already in ``.grad`` for a loop that takes the optimizer step itself.

        For Lightning, the Hugging Face Trainer or your own loop: call it after
        backward (and after unscaling, under fp16), before ``optimizer.step()``.
        It records the per-layer norms *before* clipping, clips in place when
        ``clip_norm`` is set, decides whether the step must be skipped (the same
        decision on every rank under torch.distributed), records and diagnoses.
        It never calls ``optimizer.step()`` or ``zero_grad()``: on a step to skip
        it sets every gradient to None, so the ``optimizer.step()`` that follows
        leaves the weights and the optimizer state unchanged (torch optimizers
        pass over parameters without a gradient). ``update_ratio`` (every
        ``update_ratio_every`` steps) is measured when the caller's
        ``optimizer.step()`` has run, by a one-shot optimizer hook (not under
        torch.distributed on this path).

        Args:
            loss: the step's loss (tensor or float), for the record and the
                rules; None when unknown. Default: None.
            batch: the step's input batch, kept for diagnosis. Default: None.

        Returns:
            a :class:`~gradwatch.records.StepResult`; ``result.skipped`` says
            that the gradients were dropped.

        Raises:
            ValueError: the Watch was built with ``precision="fp16"`` (the caller
                owns loss scaling here: build it with ``precision="fp32"``).
            NonFiniteError: a non-finite step with ``on_nonfinite="raise"``.

        Example:
            >>> model = nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> watch = Watch(model, opt, clip_norm=None)
            >>> loss = model(torch.randn(8, 3)).pow(2).mean(); loss.backward()
            >>> result = watch.observe(loss)       # measure, record, diagnose
            >>> opt.step(); opt.zero_grad()        # the loop's own step
            >>> result.skipped, result.grad_norm > 0
            (False, True)
        """
        if self._closed:
            raise RuntimeError("this Watch is closed; make a new gradwatch.Watch to keep measuring")
        if self.precision.scaling:
            raise ValueError(
                "watch.observe() measures gradients whose loss scaling the caller owns; "
                "build this Watch with precision='fp32' (or 'bf16') and unscale before calling observe()"
            )
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        elif loss is not None:
            self._check_loss(loss, "the loss passed to watch.observe() is")
        self._drop_caller_update()  # still armed: no optimizer.step() followed the last observe()
        started = time.perf_counter()
        self._step += 1
        ctx = StepContext(step=self._step, closure=None, batch=batch, quiet=self._quiet_now())
        if loss is None:
            ctx.scratch["loss_unknown"] = True
            loss = torch.zeros((), dtype=torch.float64)
        ctx.loss = loss
        if not ctx.quiet:
            self._call_plugins("before_forward", ctx)
        try:
            return self._measure_and_update(ctx, loss, started, apply=False)
        except NonFiniteError:
            raise
        except Exception as exc:  # an error inside gradwatch: report once, let the loop step as it would
            self.errors.report("watch.observe", exc)
            return StepResult(step=ctx.step, loss=math.nan, grad_norm=math.nan, clipped=False, skipped=False, findings=[])

    def close(self) -> None:
        """Remove hooks, close plugins and flush the run directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._drop_caller_update()
        self.index.finish_order_tracking()
        for plugin in self.plugins:
            try:
                plugin.close()
            except Exception as exc:
                self.errors.report(f"{plugin.name}.close", exc)
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """Step counter, clipper and precision state (to resume a run)."""
        return {
            "step": self._step,
            "clipper": self.clipper.state_dict(),
            "precision": self.precision.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._step = int(state["step"])
        self.clipper.load_state_dict(state.get("clipper", {}))
        self.precision.load_state_dict(state.get("precision", {}))

    def add_finding(self, finding: Finding) -> None:
        """Record a finding (in memory, in the run directory, and in the log)."""
        self.findings.append(finding)
        if self.writer is not None:
            self.writer.append_finding(finding)
        if finding.severity != "info":
            logger.warning("%s", finding)

    # ----- internals --------------------------------------------------------------------
    def _default_plugins(self, diagnose: bool) -> list[WatchPlugin]:
        plugins: list[WatchPlugin] = []
        for factory, always in _PLUGIN_FACTORIES:
            plugin = factory(self)  # every factory validates (and pops) its own options
            if plugin is not None and (diagnose or always):
                plugins.append(plugin)
        return plugins

    def _meta(self) -> dict[str, Any]:
        return {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": type(_distributed.unwrap_model(self.model)).__name__,
            "optimizer": type(self.optimizer).__name__,
            "clip_norm": self.clip_norm if isinstance(self.clip_norm, (int, float, str, type(None))) else repr(self.clip_norm),
            "precision": self.precision.mode,
            "on_nonfinite": self.on_nonfinite,
            "norm_type": self.norm_type,
            "update_ratio_every": self.update_ratio_every,
            "torch": torch.__version__,
            "device": str(self.device),
            **(self._dist.meta() if self._dist is not None else {}),
        }

    @staticmethod
    def _check_loss(loss: Any, what: str) -> None:
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"{what} a {type(loss).__name__}, not a tensor; return the scalar loss tensor")
        if loss.numel() != 1:
            raise ValueError(
                f"{what} a tensor of shape {tuple(loss.shape)}, not a scalar; reduce it first, e.g. loss.mean()"
            )
        if not loss.is_floating_point():
            raise TypeError(f"{what} a tensor of dtype {loss.dtype}; the loss must be a floating-point scalar")

    def _quiet_now(self) -> bool:
        """Whether every plugin that takes a mid-step hook is quiet for the coming step (see
        ``WatchPlugin.quiet_step``): the Watch then skips those hooks altogether."""
        plugins = self._quietable
        if plugins is None:  # the plugins that override one of the quietable hooks, found once
            takers = {id(p) for method in _QUIETABLE for p, _ in self._callers(method)}
            plugins = self._quietable = [p for p in self.plugins if id(p) in takers]
        for plugin in plugins:
            if not plugin.quiet_step:
                return False
        return True

    def _callers(self, method: str) -> list[tuple[WatchPlugin, Callable[..., Any]]]:
        """The plugins that override hook ``method``, with their bound methods (found once per hook)."""
        callers = self._hook_cache.get(method)
        if callers is None:
            base = getattr(WatchPlugin, method)
            callers = [(p, getattr(p, method)) for p in self.plugins if getattr(type(p), method, base) is not base]
            self._hook_cache[method] = callers
        return callers

    def _call_plugins(self, method: str, *args: Any) -> list[Any]:
        callers = self._callers(method)  # this runs ~6 times a step
        if not callers:
            return _NO_RESULTS
        out: list[Any] = []
        quietable = method in _QUIETABLE
        for plugin, bound in callers:
            if quietable and plugin.quiet_step:
                continue
            try:
                value = bound(*args)
            except NonFiniteError:
                raise
            except Exception as exc:
                self.errors.report(f"{plugin.name}.{method}", exc)
                continue
            if value:
                out.append(value)
        return out

    def _measure_and_update(self, ctx: StepContext, loss: torch.Tensor, started: float, apply: bool = True) -> StepResult:
        index = self.index
        if index.tracking:  # first step: the depth order is now known
            index.finish_order_tracking()
            self._plan = None
            if self.writer is not None:
                self.writer.write_layers(self.layer_table)
        if apply:  # observe(): the caller unscaled (if it scales at all)
            self.precision.unscale_(self.optimizer)
        if not ctx.quiet:
            self._call_plugins("after_backward", ctx)

        with torch.no_grad():
            n_layers = len(index)
            grads = [p.grad for p in index.params]
            groups, norms, loss, on_host = self._measure(grads, loss)
            scale = self.precision.loss_scale_tensor()
            head = [loss] if scale is None else [loss, scale]  # under no_grad: no detach needed
            host = _to_host(head, norms)  # the one host sync of the step
        width = len(head)
        scalars = host[:width].tolist()
        loss_value = scalars[0]
        scale_value = scalars[1] if scale is not None else math.nan
        # the fast path brought per-tensor norms: per-layer and global norms from them, here
        values = host[width:] if on_host is None else on_host(host[width:])
        layer_values = values[:n_layers]
        weight_values = values[n_layers : 2 * n_layers]
        total_value = values[2 * n_layers].item()
        if ctx.scratch.get("loss_unknown"):  # observe() without a loss
            loss_value = math.nan
        loss_finite = math.isfinite(loss_value) or bool(ctx.scratch.get("loss_unknown"))
        finite = loss_finite and math.isfinite(total_value)  # under torch.distributed: the same on every rank

        # Clip with the coefficient worked out on the host from the norm just read: the same
        # min(1, max_norm / (total + 1e-6)) as clip_grad_norm_, and no multiply at all when it is 1.
        threshold = self.clipper.threshold()
        coef_value = self.clipper.coefficient(total_value, threshold) if threshold is not None and finite else 1.0
        if coef_value < 1.0 or self.clipper.unitwise:
            with torch.no_grad():
                if coef_value < 1.0:
                    _norms.scale_(groups, coef_value)
                if self.clipper.unitwise:  # AGC: per-unit clip, after the pre-clip norms were taken
                    self.clipper.clip_unitwise_(index)

        nonfinite_layers = [] if finite else [index.names[i] for i in np.flatnonzero(~np.isfinite(layer_values))]
        missing = []  # the fast path (on_host) runs only when every parameter has a gradient
        if on_host is None and any(g is None for g in grads):
            missing = [index.names[i] for i in sorted({index.param_layer[j] for j, g in enumerate(grads) if g is None})]
        record = StepRecord(
            step=ctx.step,
            loss=loss_value,
            grad_norm=total_value,
            clip_coef=coef_value if finite else math.nan,
            clip_threshold=threshold,
            clipped=bool(finite and threshold is not None and coef_value < 1.0),
            skipped=not finite,
            loss_finite=loss_finite,
            layer_names=index.names,
            layer_grad_norms=layer_values,
            layer_weight_norms=weight_values,
            loss_scale=scale_value if scale is not None else None,
            nonfinite_layers=nonfinite_layers,
            missing_layers=missing,
        )
        vetoes = self._call_plugins("veto", ctx, record) if finite and not ctx.quiet else []
        skip = (not finite) or (self._agree_veto(bool(vetoes)) if finite else bool(vetoes))
        record.skipped = skip

        measure_update = finite and not skip and ctx.step % self.update_ratio_every == 0
        hookable = None
        if not apply and measure_update:  # observe(): the caller's optimizer.step() makes the update (a one-shot hook)
            hookable = _hookable_optimizer(self.optimizer) if self._dist is None else None
            measure_update = hookable is not None
        before = self._snapshot_weights() if measure_update else None
        if not apply:  # observe(): the caller steps; a skipped step must leave weights and optimizer state as they are
            if skip:
                self._drop_grads()
            elif before is not None and hookable is not None:
                self._measure_caller_update(hookable, before, record, weight_values)
        elif skip:
            self.precision.update()
        else:
            self.precision.step(self.optimizer, grads_finite=True)  # finite: the scaler's found_inf is 0, no 2nd sync
            ctx.stepped = True
            self.precision.update()
            if before is not None:
                record.update_ratio = self._update_ratio(before, weight_values)
        if apply:
            self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.clipper.observe(total_value)

        record.time_ms = (time.perf_counter() - started) * 1e3
        self.history.append(record)
        if len(self.history) > self.history_size:
            del self.history[: len(self.history) - self.history_size]
        findings: list[Finding] = []
        for found in self._call_plugins("after_step", ctx, record):
            findings.extend(found)
        if self._dist is not None and not finite:  # the rank that saw the NaN can locate it: share its finding
            try:
                findings = self._dist.merge_findings(findings)
            except Exception as exc:
                self.errors.report("distributed findings", exc)
        for finding in findings:
            self.add_finding(finding)
        if self.writer is not None:
            self.writer.append_step(
                record.to_json_line, {"grad_norms": record.layer_grad_norms, "weight_norms": record.layer_weight_norms}
            )
            if self.writer.error is not None:
                error, self.writer._error = self.writer.error, None
                self.errors.report("run directory writer", error)
        self._call_plugins("prepare", ctx.step + 1)

        result = StepResult(
            step=ctx.step,
            loss=loss_value,
            grad_norm=total_value,
            clipped=record.clipped,
            skipped=record.skipped,
            findings=findings,
            loss_scale=record.loss_scale,
            record=record,
        )
        # fp16: a scaled-gradient overflow (finite loss) is the loss scaler's normal business (skip and
        # back off), not an error to raise, until the scale falls below 1 (see docs/precision.md).
        scaler_overflow = self.precision.scaling and loss_finite and record.loss_scale is not None and record.loss_scale >= 1.0
        if not finite and self.on_nonfinite == "raise" and not scaler_overflow:
            finding = next((f for f in findings if f.severity == "error"), findings[0] if findings else None)
            where = f"; non-finite gradients in {', '.join(nonfinite_layers[:5])}" if nonfinite_layers else ""
            raise NonFiniteError(
                f"step {ctx.step} is non-finite (loss={loss_value}, grad_norm={total_value}{where}); "
                "the update was not applied. Pass on_nonfinite='skip' to skip such steps instead of raising.",
                record=record,
                finding=finding,
            )
        return result

    def _measure(
        self, grads: list[torch.Tensor | None], loss: torch.Tensor
    ) -> tuple[_norms.TensorGroups, torch.Tensor | list[torch.Tensor], torch.Tensor, Callable[[np.ndarray], np.ndarray] | None]:
        """(gradient groups, norms, loss, on_host). No host sync.

        ``norms`` is [per-layer gradient norms, per-layer weight norms, global norm]
        as one tensor, or (the 2-norm fast path) the per-tensor norms as 0-d tensors
        with ``on_host`` the function that turns their values into those numbers once
        the step's one transfer has brought them over. Under torch.distributed the
        norms are global and the loss is the mean over ranks (one collective, see
        :class:`gradwatch.distributed.DistSync`).
        """
        if self._dist is not None:
            groups, powers, weight_powers, loss = self._dist.measure(self.index, grads, loss, self.norm_type, self.device)
        else:
            plan = self._plan
            if plan is None:
                plan = self._plan = _norms.MeasurePlan(self.index.params, self.index.param_layer, len(self.index), self.device)
            fast = plan.tensor_norms2(grads) if self.norm_type == 2.0 else None
            if fast is not None:
                return fast[0], fast[1], loss, fast[2]
            groups, powers, weight_powers = plan.measure(grads, self.norm_type)
        layer_norms, total = _norms.finalize_norms(powers, self.norm_type)
        norms = torch.cat([layer_norms, weight_powers.sqrt().to(layer_norms.dtype), total.reshape(1)])
        return groups, norms, loss, None

    def _agree_veto(self, vetoed: bool) -> bool:
        """torch.distributed: skip on every rank if a plugin vetoed on any rank.

        Costs a collective and a host sync only when some plugin overrides ``veto``
        without declaring ``veto_is_global = True``.
        """
        if self._dist is None or not any(self._veto_may_differ(p) for p in self.plugins):
            return vetoed
        return self._dist.agree(vetoed)

    @staticmethod
    def _veto_may_differ(plugin: WatchPlugin) -> bool:
        """Whether ``plugin``'s veto may differ between ranks (it overrides veto, not marked global)."""
        return type(plugin).veto is not WatchPlugin.veto and not getattr(plugin, "veto_is_global", False)

    def _drop_grads(self) -> None:
        """Set every gradient to None: the caller's ``optimizer.step()`` then changes nothing."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        for p in self.index.params:
            p.grad = None

    def _snapshot_weights(self) -> list[torch.Tensor] | list[np.ndarray]:
        """The weights before the update, copied into one buffer kept between measurements.

        One copy of the weights lives on (allocated at the first measurement):
        copying into it is one foreach kernel (on CPU, with the weights numpy
        reads in place, one ``numpy.copyto`` per tensor: a third of the cost),
        where fresh clones every ``update_ratio_every`` steps cost twice as much
        on small models and the same memory at their peak.
        """
        host = self._plan.host if self._dist is None and self._plan is not None else None
        if host is not None and host.current():
            before = self._before
            self._before = host.copy_into(before if before and isinstance(before[0], np.ndarray) else None)
            return self._before
        with torch.no_grad():
            params = self.index.params if self._dist is None else self._dist.local_params(self.index.params)
            before = self._before
            if before is not None and len(before) == len(params) and isinstance(before[0], torch.Tensor):
                try:
                    torch._foreach_copy_(before, params)
                    return before
                except (RuntimeError, NotImplementedError):  # a resized parameter, a backend without foreach
                    pass
            self._before = [p.detach().clone() for p in params]
            return self._before

    def _measure_caller_update(self, optimizer: torch.optim.Optimizer, before: list[torch.Tensor] | list[np.ndarray],
                               record: StepRecord, weight_norms: np.ndarray) -> None:
        """observe(): fill ``record.update_ratio`` once the caller's ``optimizer.step()`` ran.

        A one-shot ``register_step_post_hook`` on ``optimizer`` (the one the caller steps) measures the update
        and calls the plugins' ``after_update``; the record's ``steps.jsonl`` line is
        encoded at a later flush, so it carries the ratio. If no ``optimizer.step()``
        follows (a GradScaler that found inf, a skipped step), the next ``observe()``
        removes the hook and this step keeps no ratio.
        """
        self._drop_caller_update()

        def measure(stepped: Any, args: Any, kwargs: Any) -> None:
            self._drop_caller_update()
            try:
                record.update_ratio = self._update_ratio(before, weight_norms)
                for found in self._call_plugins("after_update", record):
                    for finding in found:
                        self.add_finding(finding)
            except Exception as exc:  # never break the caller's optimizer step
                self.errors.report("update ratio after optimizer.step()", exc)

        self._caller_update = optimizer.register_step_post_hook(measure)

    def _drop_caller_update(self) -> None:
        handle, self._caller_update = self._caller_update, None
        if handle is not None:
            handle.remove()

    def _update_ratio(self, before: list[torch.Tensor] | list[np.ndarray], weight_norms: np.ndarray) -> np.ndarray | None:
        """Per layer ||w_after - w_before|| / ||w_before|| (NaN for an all-zero layer); one extra small transfer.

        ``weight_norms`` are this step's per-layer weight norms (host values, before the update).
        The per-tensor norms of the difference come over in one transfer and are summed per layer
        on the host (a few dozen numbers: cheaper than a chain of small device ops). None when
        numpy took the snapshot and a weight can no longer be read by numpy after the update
        (it left the CPU or changed its dtype inside the optimizer step).
        """
        with torch.no_grad():
            params = self.index.params if self._dist is None else self._dist.local_params(self.index.params)
            host = self._plan.host if self._dist is None and self._plan is not None else None
            if isinstance(before[0], np.ndarray):  # numpy copied the weights: numpy takes the difference
                if host is None or not host.current():  # a weight left what numpy reads during the update
                    return None
                tensor_squares = host.delta_squares(before)
            else:
                torch._foreach_sub_(before, params)  # before := before - after = -dw
                if self._dist is not None:  # sharded: sum the local parts across ranks (one collective)
                    layer_squares = self._dist.layer_sq_norms(self.index, before, self.device).cpu().tolist()
                    return np.array([math.sqrt(d) / w if w > 0 else math.nan for d, w in zip(layer_squares, weight_norms.tolist())])
                tensor_squares = [n * n for n in _norms._tensor_norms(before, 2.0).cpu().tolist()]
        squares = [0.0] * len(self.index)
        for slot, square in zip(self.index.param_layer, tensor_squares):
            squares[slot] += square
        return np.array([math.sqrt(d) / w if w > 0 else math.nan for d, w in zip(squares, weight_norms.tolist())])

    def _plain_step(self, ctx: StepContext, loss: torch.Tensor, started: float) -> StepResult:
        """Finish the step as plain PyTorch would (after an internal error)."""
        if ctx.stepped:  # the error came after the update: never apply it twice
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(step=ctx.step, loss=float(loss.detach()), grad_norm=math.nan, clipped=False,
                              skipped=False, findings=[])
        params = list(self.index.params)
        try:
            if self.precision.scaling and not self.precision._unscaled:
                self.precision.unscale_(self.optimizer)
            threshold = self.clipper.threshold()
            norm = torch.nn.utils.clip_grad_norm_(params, threshold if threshold is not None else math.inf)
            grad_norm = float(norm)
        except Exception:
            grad_norm = math.nan
        finite = math.isfinite(grad_norm)
        if finite:  # never write a non-finite update into the weights, even on this path
            self.precision.step(self.optimizer)
        self.precision.update()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        return StepResult(
            step=ctx.step,
            loss=loss_value,
            grad_norm=grad_norm,
            clipped=False,
            skipped=not finite,
            findings=[],
        )


#: Factories for the default plugins (diagnosis rules, NaN root cause, ...): each
#: takes the Watch and returns a plugin or None. Modules register themselves here
#: at import time (gradwatch/__init__.py imports them). A factory reads its own
#: keyword options with ``watch.options.pop(name, default)`` and validates them.
#: Every factory runs (so that each validates its own options); with
#: ``Watch(diagnose=False)`` only the plugins of factories registered with
#: ``always=True`` are kept (those that change behaviour, not only report), and
#: a factory may read ``watch.diagnose``.
_PLUGIN_FACTORIES: list[tuple[Callable[[Watch], WatchPlugin | None], bool]] = []


def register_default_plugin(
    factory: Callable[[Watch], WatchPlugin | None] | None = None, *, always: bool = False
) -> Any:
    """Add a default plugin factory (used by gradwatch's own modules); usable as a decorator.

    Example:
        >>> @register_default_plugin(always=True)  # doctest: +SKIP
        ... def _make(watch): return MyPlugin() if watch.options.pop("my_option", False) else None
    """

    def add(f: Callable[[Watch], WatchPlugin | None]) -> Callable[[Watch], WatchPlugin | None]:
        _PLUGIN_FACTORIES.append((f, always))
        return f

    return add(factory) if factory is not None else add
