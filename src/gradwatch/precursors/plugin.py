"""The precursor plugin: measures the signals of :mod:`gradwatch.precursors.signals` inside the step,
judges them with :mod:`gradwatch.precursors.rules`, writes ``signals.jsonl``, and (``on_precursor=
"clip_update"``) scales Adam's update by ``1 / max(1, RMS_t)`` per tensor, as StableAdamW does.

Where each signal is taken:

- Adam RMS_t: in ``before_update``, from the step's final gradients (unscaled, clipped) and
  the optimizer's ``exp_avg_sq`` before the update; every ``rms_every`` steps, and on every
  step while the last measurement was above half of ``rms_threshold``. Cost: five foreach
  passes over the gradients and one small device-to-host copy (one float per parameter
  tensor), about 0.2-0.6 ms for the 16 tensors of a 7-layer MLP on 2 CPU threads (so not every step by default).
- attention logits and log Z: on sampled steps only, a :class:`torch.overrides.TorchFunctionMode`
  is active during the model's forward (entered by a forward pre-hook on the model and, for
  ``watch.step(closure)``, around the closure, so a loss computed outside the model counts);
  it sees each ``F.scaled_dot_product_attention`` call (named after the innermost module
  running it) and each ``F.cross_entropy`` call, and computes the statistic beside the
  call, leaving the call itself unchanged. An attention written as explicit matmuls (an
  "eager" attention) is seen at its softmax: a 4-d input normalized over its last dimension
  gives the largest (signed, finite) logit it received.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..compat import OwnMode, compiled_inner_module, no_torch_function, own_ops
from ..config import PrecursorConfig
from ..findings import Finding
from ..plugins import StepContext, WatchPlugin, WatchView
from ..ratio import hookable_optimizer
from ..records import StepRecord
from . import rules, signals

ON_PRECURSOR = (None, "clip_update")
#: the softmax entry points an eager attention calls (``F.softmax``, ``torch.softmax``, ``x.softmax``)
_SOFTMAXES = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})


def _keep_max(store: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    """``store[key]`` becomes the larger of its value and ``value`` (0-d tensors, on the device: no sync)."""
    old = store.get(key)
    store[key] = value if old is None else torch.maximum(old, value)


class _SampledMode(OwnMode):
    """Catches attention and cross-entropy calls on a sampled step; computes their statistic beside them."""

    def __init__(self, plugin: "PrecursorPlugin") -> None:
        super().__init__()
        self.plugin = plugin

    def __torch_function__(self, func: Callable, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.plugin.config.attention_logits:
            with no_torch_function():
                self.plugin._record_attention(args, kwargs)
        elif func is F.cross_entropy and self.plugin.config.log_z:
            with no_torch_function():
                self.plugin._record_log_z(args, kwargs, out)
        elif func in _SOFTMAXES and self.plugin.config.attention_logits:
            with no_torch_function():
                self.plugin._record_eager_attention(args, kwargs)
        return out


class PrecursorPlugin(WatchPlugin):
    """Precursor signals of loss spikes and their findings (``update_spike_precursor``,
    ``attention_logit_growth``, ``output_logit_divergence``).

    Args:
        config: the :class:`gradwatch.PrecursorConfig`.
        on_precursor: None (measure and warn) or ``"clip_update"``: on an Adam-family
            optimizer, every tensor whose RMS_t is above 1 gets its update divided by RMS_t
            (StableAdamW's update clipping), applied right after ``optimizer.step()``.

    Example:
        >>> plugin = PrecursorPlugin(PrecursorConfig(sample_every=5))
        >>> plugin.is_sampled(1), plugin.is_sampled(5), plugin.is_sampled(7), plugin.is_sampled(10)
        (True, True, False, True)
    """

    name = "precursors"

    def __init__(self, config: PrecursorConfig = PrecursorConfig(), on_precursor: str | None = None) -> None:
        if on_precursor not in ON_PRECURSOR:
            raise ValueError(f"on_precursor must be one of {ON_PRECURSOR}, got {on_precursor!r}")
        self.config = config
        self.on_precursor = on_precursor
        self.rms_rule = rules.RmsRule(config.rms_threshold, config.rms_consecutive, config.rms_warmup,
                                      config.quiet_steps)
        self.attention_rule = rules.ThresholdRule("attention_logit_growth", config.attention_logit_threshold,
                                                  config.quiet_steps)
        self.log_z_rule = rules.ThresholdRule("output_logit_divergence", config.log_z_threshold, config.quiet_steps)
        self._mode: _SampledMode | None = None
        self._mode_depth = 0
        self._sampling = False
        self._hooks: list[Any] = []
        self._stack: list[str] = []
        self._names: dict[int, str] = {}
        self._compiled = False
        self._adam = True
        self._model: nn.Module | None = None
        self._seen_attention: bool | None = None  # None: not sampled yet
        self._seen_log_z: bool | None = None
        self._hook_modules = False
        self._use_mode = False  # this sampled step enters the TorchFunctionMode (attention or cross_entropy)
        self._window = False  # an integration holds the mode open around its own training step
        self._sample_escalated = False  # the last sampled attention logit was above half its threshold
        self._outputs: dict[str, torch.Tensor] = {}  # layer -> output RMS (0-d tensor) of this sampled step
        #: each layer's first sampled output RMS, the reference of its growth
        self.output_rms_first: dict[str, float] = {}
        self._attention: dict[str, torch.Tensor] = {}
        self._log_z: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # (mean, max |.|, the loss)
        #: the last measured per-layer RMS_t (layer name -> value; None: not measured yet)
        self.rms: dict[str, float] | None = None
        self._rms_step = 0  # the step self.rms was measured on
        self._rms_due = config.adam_rms
        self._escalated = False  # the last measurement, past rms_warmup, was above half the threshold
        self._grad_sq_ema: float | None = None  # EMA of the squared global gradient norm (Adam's v, in one number)
        self._adam_step = 0
        self._beta2: float | None = None
        self._clip_handle: Any = None
        self._slot_of: dict[int, int] = {}  # id(parameter) -> its layer slot, made again when the index changes
        self._slot_key: Any = None
        self.last: dict[str, Any] = {}  # the last step's signals (what signals.jsonl got)

    # ----- cadence -----------------------------------------------------------------------
    def is_sampled(self, step: int) -> bool:
        """Whether ``step`` samples attention logits, log Z and output RMS by the fixed cadence: each of the
        first ``sample_every`` steps (a run that diverges from the start shows it there) and every
        ``sample_every`` steps after (and, beyond this, every step while a sampled value was above half its
        threshold)."""
        return step <= self.config.sample_every or step % self.config.sample_every == 0

    def attach(self, view: WatchView) -> None:
        super().attach(view)
        # torch.compile: a TorchFunctionMode and hooks inside the compiled forward would break or
        # recompile its graph, so the sampled signals are off there (Adam RMS_t is not in the forward)
        self._compiled = compiled_inner_module(view.model) is not None
        self._model = view.layers.model  # unwrapped (DDP's module): names without "module."
        # an optimizer without Adam's betas (SGD, Adagrad, ...) has no second moment to read: never due
        self._adam = any(isinstance(g.get("betas"), (tuple, list)) for g in view.optimizer.param_groups)
        self._names = {id(m): n or "(root)" for n, m in self._model.named_modules()}
        self._modules = dict(self._model.named_modules())  # name -> module: where the output-RMS hooks go

    def prepare(self, next_step: int) -> None:
        self._disarm()
        # after the first sampled step, only what the model showed: no attention call, no module hooks;
        # neither attention nor cross_entropy, no mode either (a plain MLP with MSE pays nothing)
        wants_attention = self.config.attention_logits and self._seen_attention is not False
        wants_log_z = self.config.log_z and self._seen_log_z is not False
        self._use_mode = wants_attention or wants_log_z
        wants_sample = (self._use_mode or self.config.output_rms) and not self._compiled
        self._hook_modules = wants_attention
        # output RMS alone (no attention, no cross_entropy seen): step 1 and every sample_every steps, without
        # the dense first steps (each sampled step costs one small transfer; a plain MLP pays it once per 50)
        cadence = (self.is_sampled(next_step) if self._use_mode
                   else next_step == 1 or next_step % self.config.sample_every == 0)
        self._sampling = wants_sample and (cadence or self._sample_escalated)
        # every rms_every steps; every step while the last measurement was above half the threshold (a lag
        # episode builds over steps: measured densely once it starts) and under clip_update (it acts on each)
        rms_due = self.config.adam_rms and self._adam and (next_step % self.config.rms_every == 0 or self.on_precursor is not None
                                            or self._escalated)
        self.quiet_step = not (self._sampling or rms_due)
        self._rms_due = rms_due
        if self._sampling:
            self._arm()

    # ----- sampled signals: the mode and the module stack ----------------------------------
    def _arm(self) -> None:
        model = self._model
        self._attention, self._log_z, self._outputs = {}, [], {}
        if self._use_mode:
            self._hooks.append(model.register_forward_pre_hook(lambda m, a: self._enter()))
            self._hooks.append(model.register_forward_hook(lambda m, a, o: self._exit()))
        if self.config.output_rms:
            for name in self.view.layers.names:
                module = self._modules.get(name)
                if module is not None and name:
                    self._hooks.append(module.register_forward_hook(self._output_hook(name)))
        if self._hook_modules:  # the module stack names each attention call (sampled steps only)
            for module in model.modules():
                self._hooks.append(module.register_forward_pre_hook(self._push))
                self._hooks.append(module.register_forward_hook(self._pop))

    def _disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._window = False
        while self._mode_depth:
            self._exit()
        self._stack = []

    def _push(self, module: nn.Module, args: Any) -> None:
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if id(module) in self._names and self._stack:
            self._stack.pop()

    def _output_hook(self, name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled():  # an evaluation pass is not the step's forward
                return
            with own_ops():  # every tensor call here, numel() included, unseen by the sampling modes
                tensor = signals.first_tensor(output)
                if tensor is not None and tensor.numel():
                    _keep_max(self._outputs, name, signals.output_rms(tensor))  # a layer run twice (weight sharing): its larger output
        return record

    def _enter(self) -> None:
        if not torch.is_grad_enabled():  # evaluation passes between steps are not this step's forward
            return
        if self._mode_depth == 0:
            self._mode = _SampledMode(self)
            self._mode.__enter__()
        self._mode_depth += 1

    def _exit(self) -> None:
        if self._mode_depth == 0:
            return
        self._mode_depth -= 1
        if self._mode_depth == 0 and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def open_window(self) -> None:
        """For an integration whose loss is computed outside the model's forward (Lightning's
        ``training_step``): on a sampled step, the sampling mode stays on from now until
        :meth:`close_window` (the model's own forward hooks nest inside it), so a ``F.cross_entropy``
        there is seen. No effect on other steps; the next step's ``prepare`` closes a window left open.

        Example:
            >>> plugin = PrecursorPlugin()
            >>> plugin.open_window(); plugin.close_window()  # not attached, not sampling: nothing happens
        """
        if self._sampling and self._use_mode and not self._window:
            depth = self._mode_depth
            self._enter()
            self._window = self._mode_depth > depth  # _enter does nothing under torch.no_grad()

    def close_window(self) -> None:
        """End what :meth:`open_window` began (before backward: the mode watches forward calls)."""
        if self._window:
            self._window = False
            self._exit()

    def before_forward(self, ctx: StepContext) -> None:
        if self._sampling and self._use_mode and ctx.current.closure is not None:
            self._enter()

    def after_forward(self, ctx: StepContext) -> None:
        if self._sampling and self._use_mode and ctx.current.closure is not None:
            self._exit()

    def _record_attention(self, args: Any, kwargs: dict[str, Any]) -> None:
        q = args[0] if len(args) > 0 else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
            return
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        site = self._stack[-1] if self._stack else "attention"
        value = signals.attention_logit_max(q, k, scale)
        _keep_max(self._attention, site, value)

    def _record_eager_attention(self, args: Any, kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not signals.is_attention_softmax(x, dim):
            return
        site = self._stack[-1] if self._stack else "attention"
        value = signals.softmax_logit_max(x)
        _keep_max(self._attention, site, value)

    def _record_log_z(self, args: Any, kwargs: dict[str, Any], out: Any = None) -> None:
        logits = args[0] if args else kwargs.get("input")
        if isinstance(logits, torch.Tensor) and logits.dim() >= 1 and logits.is_floating_point():
            # F.cross_entropy takes (N, C) or (N, C, d1, ...): the class dimension is 1 when dim > 1
            z_input = logits if logits.dim() <= 2 else logits.movedim(1, -1)
            mean, peak = signals.log_z(z_input)
            self._log_z.append((mean, peak, signals.mean_loss(out, kwargs.get("reduction", args[6] if len(args) > 6 else "mean"))))

    # ----- Adam RMS_t ----------------------------------------------------------------------
    def _adam_tensors(self) -> tuple[list[signals.AdamTensor], list[int], list[int], list[nn.Parameter]]:
        optimizer = self.view.optimizer
        layers = self.view.layers
        key = (id(layers), layers.version)  # the index bumps version on every change of what it measures
        if self._slot_key != key:  # the layer index changed (a group added, layers unfrozen): map again
            self._slot_of = {id(p): s for p, s in zip(layers.params, layers.param_layer)}
            self._slot_key = key
        slot_of = self._slot_of
        tensors, numels, slots, params = [], [], [], []
        for group in optimizer.param_groups:
            betas = group.get("betas")
            if not isinstance(betas, (tuple, list)) or len(betas) != 2:
                continue
            beta2, eps = float(betas[1]), float(group.get("eps", 1e-8))
            if not 0.0 < beta2 < 1.0:
                continue
            for p in group["params"]:
                state = optimizer.state.get(p)
                if p.grad is None or not state or id(p) not in slot_of:
                    continue
                v = state.get("exp_avg_sq")
                if not isinstance(v, torch.Tensor) or v.shape != p.shape or p.grad.is_sparse:
                    continue
                step = state.get("step", 0)
                step = int(step.item()) if isinstance(step, torch.Tensor) else int(step)
                tensors.append(signals.AdamTensor(p.grad, v, beta2, eps, step + 1))
                numels.append(p.numel())
                slots.append(slot_of[id(p)])
                params.append(p)
                self._adam_step = max(self._adam_step, step + 1)
                self._beta2 = beta2
        return tensors, numels, slots, params

    def before_update(self, ctx: StepContext, record: StepRecord) -> None:
        if not self._rms_due or record.skipped or not self.config.adam_rms:
            return
        tensors, numels, slots, params = self._adam_tensors()
        if not tensors:
            return
        sums = signals.adam_rms(tensors).tolist()
        names = self.view.layers.names
        per_layer = signals.layer_rms(sums, numels, slots, len(names))
        self.rms = {names[i]: v for i, v in enumerate(per_layer) if not math.isnan(v)}
        self._rms_step = ctx.step
        self._escalated = (bool(self.rms) and self._adam_step >= self.config.rms_warmup
                           and max(self.rms.values()) > self.config.rms_threshold / 2)
        if self.on_precursor == "clip_update":
            self._arm_clip(params, [math.sqrt(s / n) for s, n in zip(sums, numels)])

    def _arm_clip(self, params: list[nn.Parameter], rms: list[float]) -> None:
        """Snapshot the tensors whose RMS_t is above 1; right after the optimizer's step, scale their update."""
        hot = [(p, r) for p, r in zip(params, rms) if r > 1.0 and math.isfinite(r)]
        optimizer = hookable_optimizer(self.view.optimizer)
        if not hot or optimizer is None:
            return
        with torch.no_grad():
            before = [(p, p.detach().clone(), r) for p, r in hot]

        def scale_updates(*_: Any) -> None:  # inside the user's optimizer.step(): never raise there
            handle, self._clip_handle = self._clip_handle, None
            if handle is not None:
                handle.remove()
            try:
                with torch.no_grad():
                    for p, old, r in before:  # p = old + (p - old) / r
                        p.sub_(old).mul_(1.0 / r).add_(old)
            except Exception as exc:
                self.view.errors.report("precursors clip_update", exc)

        if self._clip_handle is not None:
            self._clip_handle.remove()
        self._clip_handle = optimizer.register_step_post_hook(scale_updates)

    # ----- judging and writing -------------------------------------------------------------
    def _watch_gradient_jump(self, record: StepRecord) -> None:
        """Between two RMS_t measurements: a global gradient norm far above its running RMS (an EMA of its
        square with Adam's beta2, a one-number stand-in for v) makes the next step measure RMS_t, whose
        lag lasts for many steps after such a jump. Host-side, from the step's own norm: no cost on the device."""
        norm = record.grad_norm
        if record.skipped or not math.isfinite(norm) or not (self.config.adam_rms and self._adam):
            return
        square = norm * norm
        ema = self._grad_sq_ema
        if ema is not None and ema > 0 and self._adam_step >= self.config.rms_warmup:
            if square > (self.config.rms_threshold / 2) ** 2 * ema:
                self._escalated = True
        beta = self._beta2 if self._beta2 is not None else 0.99
        self._grad_sq_ema = square if ema is None else beta * ema + (1 - beta) * square

    def after_step(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        self._watch_gradient_jump(record)
        if self._clip_handle is not None and (ctx.stepped or record.skipped):
            self._clip_handle.remove()  # the step did not run (skipped): nothing to scale
            self._clip_handle = None
        found: list[Finding] = []
        entry: dict[str, Any] = {"step": ctx.step}
        if self.rms and self._rms_step == ctx.step:
            worst = max(self.rms, key=self.rms.__getitem__)
            entry["adam_rms_max"] = round(self.rms[worst], 5)
            entry["adam_rms_layer"] = worst
            if self.is_sampled(ctx.step) or self.rms[worst] > self.config.rms_threshold:
                entry["adam_rms"] = {n: round(v, 5) for n, v in self.rms.items()}
            finding = self.rms_rule.check(ctx.step, self.rms, self._adam_step, self._beta2, self.view.lr())
            if finding is not None:
                found.append(finding)
        if self._sampling and not record.skipped:
            if self._seen_attention is None:
                self._seen_attention, self._seen_log_z = bool(self._attention), bool(self._log_z)
            if self._attention:
                logits = {site: float(v) for site, v in self._attention.items()}
                entry["attention_logit_max"] = {s: round(v, 4) for s, v in logits.items()}
                finding = self.attention_rule.check(ctx.step, logits)
                if finding is not None:
                    found.append(finding)
            if self._log_z:
                mean = sum(float(m) for m, _, _ in self._log_z) / len(self._log_z)
                peak = max(float(p) for _, p, _ in self._log_z)
                entry["log_z_mean"], entry["log_z_max"] = round(mean, 5), round(peak, 5)
                losses = [float(c) for _, _, c in self._log_z if c is not None]
                loss = sum(losses) / len(losses) if losses else None
                if loss is not None:
                    entry["log_z_loss"] = round(loss, 6)
                finding = self.log_z_rule.check(ctx.step, {"output logits": mean}, loss=loss)
                if finding is not None:
                    found.append(finding)
            if self._outputs:
                names = list(self._outputs)
                device = self._outputs[names[0]].device
                values = torch.stack([self._outputs[n].to(device) for n in names]).tolist()  # one transfer
                rms = {n: v for n, v in zip(names, values) if math.isfinite(v)}
                for n, v in rms.items():
                    if v > 0:
                        self.output_rms_first.setdefault(n, v)
                growth = {n: v / self.output_rms_first[n] for n, v in rms.items() if n in self.output_rms_first}
                entry["output_rms"] = {n: round(v, 5) for n, v in rms.items()}
                if growth:
                    worst = max(growth, key=growth.__getitem__)
                    entry["output_rms_growth_max"], entry["output_rms_growth_layer"] = round(growth[worst], 5), worst
            # attention logits can grow within a few steps: followed step by step from half the threshold.
            # Not log Z: a healthy untrained model's |log Z| sits near 20 (GPT-style init), and its
            # divergence is a slow drift that the every-sample_every cadence follows well enough
            self._sample_escalated = self.config.dense_sampling and any(
                v > self.config.attention_logit_threshold / 2 for v in entry.get("attention_logit_max", {}).values())
            self._attention, self._log_z, self._outputs = {}, [], {}
        self.last = entry
        if len(entry) > 1:
            writer = self.view.writer
            if writer is not None:
                writer.append("signals", entry)
        return found

    def abort(self, ctx: StepContext) -> None:
        if self._clip_handle is not None:
            self._clip_handle.remove()
            self._clip_handle = None
        self._disarm()

    def close(self) -> None:
        self.abort(None)  # type: ignore[arg-type]
