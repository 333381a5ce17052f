"""DiagnosisPlugin: runs the rules on every step and the activation sampler on sampled steps.

Every ``Watch(...)`` with ``diagnose=True`` (the default) gets one; its
settings are :class:`gradwatch.DiagnosisConfig`:

- ``sample_every`` (default 50): sample activation statistics and activation
  gradients on step 1 and every this many steps (hooks only on those steps).
- ``check_every`` (default 50, the sampling interval): fit the
  gradient-by-depth curve every this many steps (and on every sampled step,
  when a fresh activation-gradient curve is there too).

Per step cost on an unsampled step: a few Python comparisons and the three
rules that keep per-step state (loss spike, clipping share, norm growth);
the curve fit only every ``check_every`` steps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..compat import compiled_inner_module
from ..config import check_positive_int
from ..distributed import local_tensor
from ..findings import Finding
from ..persist import load_object_state, object_state
from ..plugins import StepContext, WatchPlugin, WatchView
from .rules import (
    ActivationRule,
    ClippingRule,
    DepthCurveRule,
    InitScaleRule,
    LossSpikeRule,
    LrRule,
    MissingGradRule,
    RuleInput,
)
from .recurrent import RecurrentRule, recurrent_weights
from .sampler import ActivationSample, ActivationSampler, is_curve_layer


class DiagnosisPlugin(WatchPlugin):
    """The diagnosis rules of gradwatch as a :class:`~gradwatch.plugins.WatchPlugin`.

    Args:
        sample_every: sample activations every this many steps (and step 1). Default: 50.
        check_every: fit the depth curve every this many steps. Default: 50.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> import gradwatch as gw
        >>> watch = gw.Watch(model, opt, diagnosis=gw.DiagnosisConfig(sample_every=10))  # added by default
        >>> [p.name for p in watch.plugins if isinstance(p, DiagnosisPlugin)]
        ['diagnosis']
        >>> watch.close()
    """

    name = "diagnosis"

    def __init__(self, sample_every: int = 50, check_every: int = 50) -> None:
        self.sample_every = check_positive_int("sample_every", sample_every)
        self.check_every = check_positive_int("check_every", check_every)
        self.sample: ActivationSample | None = None
        self.samples: list[ActivationSample] = []
        self._sampled_pending: int | None = None
        self._curve: tuple[list[str], list[int], np.ndarray] | None = None
        self._weight_scales: dict[str, float] = {}
        self._kinds: set[str] = set()
        self._input: RuleInput | None = None
        self._version = -1  # the layer index version the curve layers were found for

    def attach(self, view: WatchView) -> None:
        super().attach(view)
        index = view.layers
        # Curve layers are measured layers only: a weight tied to an embedding (a GPT head) is not one.
        self.sampler = self._make_sampler()
        self._kinds = {kind for _, kind in self.sampler.act_modules.values()}
        self.depth_rule = DepthCurveRule(self.check_every)
        self.init_rule = InitScaleRule()
        self.recurrent_rule = RecurrentRule(recurrent_weights(index.model))
        self.lr_rule = LrRule()
        self.missing_rule = MissingGradRule(list(index.param_names), self._layer_of())
        self.clip_rule = ClippingRule(fixed_threshold=getattr(view.clipper, "name", "fixed") == "fixed")
        self.spike_rule = LossSpikeRule()
        self.activation_rule = ActivationRule()
        self._version = index.version

    def _make_sampler(self) -> ActivationSampler:
        """The sampler over the unwrapped model (DDP's ``module``), but over ``torch.compile``'s wrapper
        as given: there the module names carry the wrapper's prefix, so no weight-layer hook (whose
        tensor hooks would break the graph) is armed, only the activation-module hooks, which dynamo
        traces without recompiling."""
        index = self.view.layers
        model = self.view.model if compiled_inner_module(self.view.model) is not None else index.model
        return ActivationSampler(model, [n for n in index.measured_names if n != "(root)"])

    def _layer_of(self) -> dict[str, str]:
        index = self.view.layers
        return {pname: index.names[slot] for pname, slot in zip(index.param_names, index.param_layer)}

    def _layers_changed(self) -> None:
        """A layer was unfrozen or a param group added: the curve layers and the watched parameters follow."""
        index = self.view.layers
        self._version = index.version
        self._curve = None
        self._input = None
        functional = self.sampler.functional  # what the forward calls does not change with the layer list
        self.sampler = self._make_sampler()
        self.sampler.functional = functional
        self.missing_rule.watch_more(list(index.param_names), self._layer_of())

    def is_sampled(self, step: int) -> bool:
        """Step 1 and every ``sample_every`` steps."""
        return step == 1 or step % self.sample_every == 0

    # ----- hooks ------------------------------------------------------------------------
    # (these run on every step: the unsampled path is kept to a few attribute reads)
    def prepare(self, next_step: int) -> None:
        if self.view.layers.version != self._version:
            self._layers_changed()
        sampled = next_step == 1 or next_step % self.sample_every == 0
        if sampled:
            self.sampler.arm()
        elif self.sampler.armed:  # armed for a step that will not come (a resumed run)
            self.sampler.disarm()
        # the mid-step hooks matter on sampled steps, on step 1 and while the missing-gradient rule watches
        self.quiet_step = not (sampled or self.sampler._handles or self.missing_rule.watching)

    def before_forward(self, ctx: StepContext) -> None:
        if self.sampler._handles and ctx.closure is not None:
            self.sampler.enter_mode()

    def after_forward(self, ctx: StepContext) -> None:
        if self.sampler._mode is not None:  # functional activations are forward ops; backward runs without the mode
            self.sampler.exit_mode(forward_complete=True)

    def after_backward(self, ctx: StepContext) -> None:
        if self.sampler._handles:
            self.sampler.disarm()
            self._sampled_pending = ctx.step
        if self.missing_rule.watching:
            index = self.view.layers
            self.missing_rule.observe({n for n, p in zip(index.param_names, index.params) if p.grad is None})
        if ctx.step == 1:
            self._weight_scales = self._measure_weight_scales()
            self.recurrent_rule.measure_before_update(1)

    def after_step(self, ctx: StepContext, record: Any) -> list[Finding]:
        sampled_now = self._sampled_pending == ctx.step
        if sampled_now:
            self._sampled_pending = None
            self.sample = self.sampler.collect(ctx.step)
            self._kinds |= {a["kind"] for a in self.sample.activations.values()}
            if self.view.writer is not None:
                self.view.writer.append("activations", self.sample.to_json())
        inp = self._input
        if inp is None:  # one RuleInput, updated in place each step (this runs on every step)
            names, slots, numel = self._curve_layers()
            inp = self._input = RuleInput(step=0, record=None, history=self.view.history, layer_names=names,
                                          curve_index=slots, curve_numel=numel, sample=self.sample, sampled_now=False,
                                          activation_kinds=self._kinds)
        inp.step, inp.record, inp.skipped_by, inp.sampled_now = ctx.step, record, record.skipped_by, sampled_now
        if sampled_now or inp.history is not self.view.history:
            inp.history, inp.sample, inp.activation_kinds = self.view.history, self.sample, self._kinds
        # Every step: the rules that keep per-step state. The others only on the steps where they
        # can say something (each would return [] at once otherwise; this runs on every step).
        findings: list[Finding] = []
        if self.recurrent_rule.enabled:  # exploding_gradients through time (a vanilla RNN's recurrent weight)
            findings += self.recurrent_rule.check(record, ctx.step, record.clip_threshold)
        if not self.init_rule.done:  # a huge first norm the recurrent rule explained is not reported twice
            findings += self.init_rule.check(inp, self._weight_scales, record.clip_threshold,
                                             explained=bool(findings))
        findings += self.lr_rule.check(inp, self._lr)  # lr_too_high: norm growth, loss trend, update ratio
        if sampled_now or ctx.step % self.check_every == 0:
            findings += self.depth_rule.check(inp)
        if not self.missing_rule.done:
            index = self.view.layers
            findings += self.missing_rule.check(inp, {layer.name for layer in index.layers if layer.ran_forward},
                                                    index.no_graph_output)
        findings += self.clip_rule.check(inp)
        findings += self.spike_rule.check(inp)
        if sampled_now:
            findings += self.activation_rule.check(inp)
        return findings

    def after_update(self, record: Any) -> list[Finding]:
        """observe(): the update ratio arrived after the step's rules ran (the caller stepped)."""
        inp = self._input
        if inp is None or inp.record is not record:  # not this step's
            return []
        return self.lr_rule.check_update(inp, self._lr)

    def abort(self, ctx: StepContext) -> None:
        self.sampler.disarm()  # the closure raised: never leave hooks or the function mode behind

    def close(self) -> None:
        self.sampler.disarm()

    # ----- helpers ----------------------------------------------------------------------
    def _curve_layers(self) -> tuple[list[str], list[int], np.ndarray]:
        """Curve layers in depth order (known after step 1's forward), cached."""
        if self._curve is None:
            index = self.view.layers
            measured = set(index.measured_slots)
            slots = [i for i, n in enumerate(index.names)
                     if i in measured and n not in ("(root)", "(outside model)") and is_curve_layer(index.module(n))]
            names = [index.names[i] for i in slots]
            numel = np.array([index.layer_numel[i] for i in slots], dtype=np.float64)
            self._curve = (names, slots, numel)
        return self._curve

    def _measure_weight_scales(self) -> dict[str, float]:
        """Per curve layer: std(W) * sqrt(fan_in) / sqrt(2), i.e. the weight scale in units of Kaiming's ReLU scale.

        Runs once, on step 1 before the update (one host transfer).
        """
        names, stds, fans = [], [], []
        for name, module in self.sampler.curve_layers.items():
            weight = next((p for _, p in module.named_parameters(recurse=False) if p.dim() >= 2), None)
            if weight is None or weight.numel() < 2:
                continue
            names.append(name)
            # FSDP2: this rank's shard of the weight (a sample of the same init distribution)
            stds.append(local_tensor(weight.detach()).float().std().reshape(1))
            fans.append(math.prod(weight.shape[1:]))
        if not names:
            return {}
        device = stds[0].device
        values = torch.cat([s.to(device) for s in stds]).cpu().tolist()
        return {n: s * math.sqrt(f) / math.sqrt(2.0) for n, s, f in zip(names, values, fans) if math.isfinite(s)}

    def _lr(self) -> float | None:
        return self.view.lr()

    # ----- resuming -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rules = {name: object_state(rule) for name, rule in self._rules().items()}
        return {"rules": rules, "weight_scales": dict(self._weight_scales), "kinds": sorted(self._kinds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("rules", {})
        for name, rule in self._rules().items():
            if name in saved:
                load_object_state(rule, saved[name])
        self._weight_scales = {str(k): float(v) for k, v in state.get("weight_scales", {}).items()}
        self._kinds |= set(state.get("kinds", []))
        self._input = None

    def _rules(self) -> dict[str, Any]:
        return {"depth": self.depth_rule, "init": self.init_rule, "lr": self.lr_rule, "recurrent": self.recurrent_rule,
                "missing": self.missing_rule, "clip": self.clip_rule, "spike": self.spike_rule,
                "activation": self.activation_rule}
