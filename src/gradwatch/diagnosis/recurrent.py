"""``exploding_gradients`` through time: a vanilla RNN whose recurrent weight grows the gradient each time step.

Backpropagation through T time steps of ``h_t = f(W_hh h_{t-1} + W_ih x_t)``
multiplies the hidden state's gradient by ``W_hh^T diag(f')`` once per step: with
a spectral radius rho(W_hh) above 1 it grows like rho^T (a linear RNN with
W = 1.1 x orthogonal gains 117x over 50 steps, THEORY.md). Finite gradients of
1e18 are this, not a numerics bug and not a non-deterministic op, and the cure
is the recurrent weight's init (orthogonal: every singular value 1) and
clipping, not a Kaiming fan-in init.

The rule is silent until a layer holding a vanilla ``nn.RNN`` (tanh or ReLU)
has a finite gradient norm of at least ``HUGE_FIRST_NORM`` (1e3; healthy RNNs:
0.01-10). Only then it reads the recurrent weights (one small eigenvalue
computation per weight, and a host transfer) and raises the finding when one of
them has rho > ``RECURRENT_RADIUS``. LSTM and GRU gates bound their recurrent
gain: they are not judged here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..findings import Finding
from .patterns import HUGE_FIRST_NORM
from .rules import Episode

RECURRENT_RADIUS = 1.0  # rho(W_hh) above 1: the gradient grows with every time step (default init: ~0.58)


def recurrent_weights(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """The recurrent weights of the vanilla RNNs of ``model``: {"rnn.weight_hh_l0": ("rnn", weight), ...}.

    Example:
        >>> model = nn.Sequential(nn.RNN(4, 8, num_layers=2), nn.LSTM(8, 8))
        >>> sorted(recurrent_weights(model))
        ['0.weight_hh_l0', '0.weight_hh_l1']
    """
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.RNN):  # nn.LSTM / nn.GRU are RNNBase, not RNN
            for pname, param in module.named_parameters(recurse=False):
                if pname.startswith("weight_hh"):
                    out[f"{name}.{pname}" if name else pname] = (name, param)
    return out


def spectral_radius(weights: list[torch.Tensor]) -> list[float]:
    """max |eigenvalue| of each square matrix, in float64 on the host (one transfer; a sync).

    Example:
        >>> spectral_radius([2.0 * torch.eye(3), torch.tensor([[0.0, 1.0], [-1.0, 0.0]])])
        [2.0, 1.0]
    """
    with torch.no_grad():
        host = [w.detach().to("cpu", torch.float64) for w in weights]
        return [float(torch.linalg.eigvals(w).abs().max()) if torch.isfinite(w).all() else math.inf for w in host]


class RecurrentRule:
    """``exploding_gradients`` from a vanilla RNN's recurrent weight (see the module docstring).

    Args:
        weights: :func:`recurrent_weights` of the model (no vanilla RNN: the rule is a no-op).

    Example:
        >>> rule = RecurrentRule(recurrent_weights(nn.Linear(2, 2)))
        >>> rule.enabled
        False
    """

    TRANSIENT = ("weights",)  # references to the model's parameters

    def __init__(self, weights: dict[str, tuple[str, torch.Tensor]]) -> None:
        self.weights = weights
        self.enabled = bool(weights)
        self.episode = Episode(quiet=20)
        self.before_update: tuple[int, dict[str, float]] | None = None  # (step, radii) read before its update

    def measure_before_update(self, step: int) -> None:
        """Read the radii now, after backward and before the optimizer step (the plugin does on step 1,
        when the weights are the init: the finding then names the init's radius, not the updated one's)."""
        if self.enabled:
            names = list(self.weights)
            self.before_update = (step, dict(zip(names, spectral_radius([self.weights[n][1] for n in names]))))

    def check(self, record: Any, step: int, clip: float | None) -> list[Finding]:
        """The finding of this step, if a vanilla RNN layer's finite gradient is huge and its rho(W_hh) > 1."""
        if not self.enabled or not record.finite:
            return []
        modules = {module for module, _ in self.weights.values()}
        norms = dict(zip(record.layer_names, record.layer_grad_norms.tolist()))
        huge = {m: norms[m] for m in modules if m in norms and norms[m] >= HUGE_FIRST_NORM}
        if not huge:
            if self.episode.active:
                self.episode.update(False)
            return []
        if self.episode.active:
            self.episode.update(True)
            return []
        names = [n for n, (m, _) in self.weights.items() if m in huge]
        if self.before_update is not None and self.before_update[0] == step:
            radii = {n: self.before_update[1][n] for n in names}
        else:  # the weights after this step's update (the gradient was computed with the ones before)
            radii = dict(zip(names, spectral_radius([self.weights[n][1] for n in names])))
        over = {n: r for n, r in radii.items() if r > RECURRENT_RADIUS}
        if not self.episode.update(bool(over)) or not over:
            return []
        worst = max(over, key=over.get)
        module = self.weights[worst][0]
        rho = over[worst]
        message = (
            f"The gradients explode through time in {module}: its recurrent weight {worst} has spectral radius "
            f"{rho:.3g} (> 1), so the backward pass multiplies the hidden state's gradient by up to about {rho:.3g} "
            f"at every time step; the layer's gradient norm is {huge[module]:.2e} (global {record.grad_norm:.2e}), "
            "finite but on its way to overflow."
        )
        fixes = [f"nn.init.orthogonal_({worst}) (every singular value 1: the gradient neither grows nor shrinks "
                 "through time), or scale it below spectral radius 1"]
        if clip is None:
            fixes.append("clip_norm=1.0 bounds each step meanwhile")
        fixes.append("or use nn.LSTM / nn.GRU, whose gates bound the recurrent gain")
        return [Finding(
            "exploding_gradients", "error" if clip is None else "warning", step, message,
            evidence={"recurrent_weight": worst, "spectral_radius": {n: round(r, 4) for n, r in radii.items()},
                      "radius_threshold": RECURRENT_RADIUS, "layer_grad_norm": huge[module],
                      "grad_norm": record.grad_norm, "huge_norm_threshold": HUGE_FIRST_NORM, "clip_norm": clip,
                      "curve": "through_time"},
            location={"layer": module, "parameter": worst},
            fixes=fixes,
        )]
