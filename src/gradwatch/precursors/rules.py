"""Precursor rules: numbers in, findings out, one finding per episode (pure: no hooks, no I/O).

An *episode* starts when a signal crosses its threshold and ends once it has stayed
below it for ``quiet_steps`` steps; a finding is raised at the start of each
episode only, with every layer or site above the threshold in its evidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..diagnosis.rules import Episode  # the diagnosis rules' episode: fire once, re-arm after quiet steps
from ..findings import Finding

#: log Z is not judged while the cross-entropy of those logits is below this (nats; p(target) ~ 0.99 on
#: average): log Z = z_target + loss, so a model that gets its targets right with near-certainty has log Z at
#: its target logit, which grows with confidence (a memorized batch: |log Z| 30 at a loss of 3e-6), not drift
CONFIDENT_LOSS = 1e-2


@dataclass
class RmsRule:
    """``update_spike_precursor``: a layer's Adam RMS_t above ``threshold`` on ``consecutive`` steps in a row.

    Steps before ``warmup`` (Adam's own step count) are not judged: the bias-corrected
    second moment of the first steps averages a handful of gradients.

    Example:
        >>> rule = RmsRule(threshold=4.0, consecutive=2, warmup=0, quiet_steps=5)
        >>> rule.check(30, {"fc1": 5.0, "fc2": 1.0}, adam_step=30) is None  # one step above: not yet
        True
        >>> rule.check(31, {"fc1": 6.0, "fc2": 1.1}, adam_step=31).code
        'update_spike_precursor'
    """

    threshold: float
    consecutive: int
    warmup: int
    quiet_steps: int
    episode: Episode = field(init=False)
    _run: dict[str, int] = field(init=False, default_factory=dict)
    _first: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.episode = Episode(self.quiet_steps)

    def check(self, step: int, rms: dict[str, float], adam_step: int, beta2: float | None = None,
              lr: float | None = None) -> Finding | None:
        if adam_step < self.warmup:
            return None
        hot: dict[str, float] = {}
        for name, value in rms.items():
            if math.isfinite(value) and value > self.threshold:
                run = self._run.get(name, 0) + 1
                self._run[name] = run
                self._first.setdefault(name, step)
                if run >= self.consecutive:
                    hot[name] = value
            else:
                self._run.pop(name, None)
                self._first.pop(name, None)
        if not self.episode.update(bool(hot), step):
            return None
        worst = max(hot, key=hot.__getitem__)
        bound = 1.0 / math.sqrt(1.0 - beta2) if beta2 is not None and beta2 < 1 else None
        layers = sorted(hot, key=hot.__getitem__, reverse=True)
        shown = ", ".join(f"{n} {hot[n]:.3g}" for n in layers[:5]) + (f" (+{len(layers) - 5} more)" if len(layers) > 5 else "")
        msg = (f"Adam's second moment lags the gradient: RMS of g/sqrt(v) is {hot[worst]:.3g} on {worst} "
               f"(1 when v tracks g^2; above {self.threshold:g} for {self.consecutive}+ steps since step "
               f"{self._first[worst]}), so its updates are larger than Adam intends: a loss spike tends to follow "
               f"within a few steps. Layers: {shown}.")
        evidence = {"layers": {n: hot[n] for n in layers}, "worst_layer": worst, "rms": hot[worst],
                    "since_step": self._first[worst], "threshold": self.threshold, "beta2": beta2,
                    "rms_bound": bound, "lr": lr}
        fixes = [
            "lower the learning rate, or add (or lengthen) warm-up",
            "clip each update by its RMS (StableAdamW): gw.Watch(..., on_precursor='clip_update')",
            "a lower beta2 (e.g. 0.95) lets v follow sudden gradient changes; a larger eps damps tiny-v layers",
        ]
        return Finding("update_spike_precursor", "warning", step, msg, evidence, {"module": worst}, fixes)


@dataclass
class ThresholdRule:
    """A sampled signal per site (attention logits) or one value (log Z) above ``threshold``: one finding per
    episode; an episode ends ``quiet_steps`` steps (not measurements: the sampling cadence varies) after
    the last measurement above the threshold.

    Example:
        >>> rule = ThresholdRule("attention_logit_growth", threshold=50.0, quiet_steps=3)
        >>> rule.check(10, {"h.0.attn": 12.0}) is None, rule.check(20, {"h.0.attn": 80.0}).code
        (True, 'attention_logit_growth')
    """

    code: str
    threshold: float
    quiet_steps: int
    episode: Episode = field(init=False)
    history: dict[str, list[tuple[int, float]]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.episode = Episode(self.quiet_steps)

    def check(self, step: int, values: dict[str, float], loss: float | None = None) -> Finding | None:
        """The finding of a new episode, else None. ``loss`` (log Z only): the cross-entropy of the
        logits measured; below :data:`CONFIDENT_LOSS` no value counts as above the threshold."""
        for site, value in values.items():
            series = self.history.setdefault(site, [])
            series.append((step, value))
            del series[:-8]
        confident = loss is not None and math.isfinite(loss) and loss < CONFIDENT_LOSS
        hot = {} if confident else {s: v for s, v in values.items() if math.isfinite(v) and abs(v) > self.threshold}
        if not self.episode.update(bool(hot), step):
            return None
        worst = max(hot, key=lambda s: abs(hot[s]))
        trail = {s: [(k, round(v, 4)) for k, v in self.history[s]] for s in hot}
        if self.code == "attention_logit_growth":
            return _attention_finding(step, hot, worst, self.threshold, trail)
        return _log_z_finding(step, hot[worst], self.threshold, trail.get(worst, []), loss)


def _attention_finding(step: int, hot: dict[str, float], worst: str, threshold: float,
                       trail: dict[str, list[tuple[int, float]]]) -> Finding:
    sites = sorted(hot, key=hot.__getitem__, reverse=True)
    saturation = math.exp(min(hot[worst], 700.0))
    msg = (f"Attention logits have grown to {hot[worst]:.3g} in {worst} (max |q k^T| / sqrt(d); above {threshold:g}): "
           f"one key outweighs another by up to e^{hot[worst]:.0f} = {saturation:.2g}x, so the softmax is one-hot and "
           f"its gradient vanishes; the loss tends to spike or plateau next. Sites: {', '.join(sites[:5])}"
           + (f" (+{len(sites) - 5} more)." if len(sites) > 5 else "."))
    evidence = {"sites": {s: hot[s] for s in sites}, "worst_site": worst, "max_logit": hot[worst],
                "threshold": threshold, "recent": trail}
    fixes = ["normalize queries and keys (qk-layernorm: nn.LayerNorm(head_dim) on q and k before the dot product)",
             "lower the learning rate (or add warm-up)"]
    return Finding("attention_logit_growth", "warning", step, msg, evidence, {"module": worst}, fixes)


def _log_z_finding(step: int, value: float, threshold: float, trail: list[tuple[int, float]],
                   loss: float | None = None) -> Finding:
    at_loss = f" at a cross-entropy of {loss:.3g}" if loss is not None else ""
    msg = (f"The output softmax's log-normalizer log Z = logsumexp(logits) averages {value:.3g}{at_loss} (|log Z| "
           f"above {threshold:g}; it stays near 0 in a stable run with z-loss): the output logits are drifting as a "
           "whole, which precedes output-logit divergence and loss spikes.")
    evidence = {"log_z_mean": value, "threshold": threshold, "recent": trail, "cross_entropy": loss,
                "confident_below": CONFIDENT_LOSS}
    fixes = [
        "add z-loss 1e-4: z = torch.logsumexp(logits, dim=-1); loss = F.cross_entropy(logits, y) + 1e-4 * (z ** 2).mean()",
        "lower the learning rate; weight decay on the output layer",
    ]
    return Finding("output_logit_divergence", "warning", step, msg, evidence, {"module": "output logits"}, fixes)
