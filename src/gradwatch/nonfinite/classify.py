"""Classify a non-finite step: which of DESIGN.md's codes, with the evidence that decided it.

Inputs are plain facts gathered on the failing step (:class:`StepFacts`), the
batch checks (:mod:`.batch`) and, when a closure was given, the replay's
:class:`~.replay.ReplayOutcome`. The decision, in order:

1. ``degenerate_batch`` - the batch holds NaN/inf; or it is all zeros / constant
   (or has constant examples) and the replay implicates it: a whole feature
   tensor is degenerate and the first non-finite value appeared in the forward
   pass, or the non-finite rows of the first bad op are exactly the constant
   examples (or there is no replay to blame anything else). The location still
   names the op (``aten.div``).
2. ``init_scale_too_large`` / ``lr_too_high`` - the gradient-norm pattern of
   :func:`gradwatch.diagnosis.patterns.norm_pattern`: huge on the very first
   step vs growth step over step after updates. A non-finite *first* step counts
   as init only with more evidence (weights far above their fan-in scale, or an
   overflow to inf inside the model), since a log(0) on step 1 is a loss bug.
3. From the replay: ``nonfinite_backward`` when the forward made a NaN/inf that
   a later op masked out (``torch.where(m, x / y, 0)``: the loss is finite, the
   backward computes 0 * inf); ``loss_numerics`` (model output finite, loss not),
   ``nonfinite_forward`` (first non-finite inside the model),
   ``nonfinite_backward`` (forward finite, backward not).
4. Without a replay: the loss finite but gradients not is ``nonfinite_backward``;
   a non-finite loss is reported as ``nonfinite_forward`` (forward pass or
   loss), and the message says that a closure gives the op and line.

Pure: facts in, one :class:`~gradwatch.findings.Finding` out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..diagnosis.patterns import HUGE_FIRST_NORM, norm_pattern
from ..findings import Finding
from .batch import BatchReport
from .replay import Localization, ReplayOutcome

#: rms(W) * sqrt(fan_in): PyTorch's default init gives 0.58, Kaiming normal 1.41,
#: Xavier for a square layer 1.0; ten times that is "far above the fan-in scale".
WEIGHT_SCALE_TOO_LARGE = 10.0

CLOSURE_HINT = (
    "pass a closure, watch.step(lambda: loss_fn(model(x), y), batch=(x, y)), "
    "to get the op, module and source line"
)


@dataclass
class WeightScale:
    """The layer whose weights sit furthest above their fan-in scale."""

    layer: str
    ratio: float  # rms(W) * sqrt(fan_in)
    rms: float
    fan_in: int


def weight_scale(model: nn.Module) -> WeightScale | None:
    """The Linear/Conv layer with the largest ``rms(W) * sqrt(fan_in)`` (None if there is none).

    Embeddings are left out: their rows are looked up, not summed over a fan-in.

    Example:
        >>> layer = nn.Linear(100, 10)
        >>> round(weight_scale(nn.Sequential(layer)).ratio, 1)  # default init: 1/sqrt(3)
        0.6
    """
    best: WeightScale | None = None
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim < 2 or w.numel() == 0:
                continue
            fan_in = w[0].numel()
            rms = float(w.detach().float().pow(2).mean().sqrt())
            ratio = rms * math.sqrt(fan_in)
            if not math.isfinite(ratio):
                ratio = math.inf
            if best is None or ratio > best.ratio:
                best = WeightScale(layer=name or "(root)", ratio=ratio, rms=rms, fan_in=fan_in)
    return best


@dataclass
class StepFacts:
    """What the Watch knows about the failing step (host numbers only)."""

    step: int
    loss: float
    grad_norm: float
    nonfinite_layers: list[str] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)  # pre-clip global norms of steps 1..N (N = this step)
    skipped: list[bool] = field(default_factory=list)
    updates_applied: int = 0
    closure_given: bool = False
    lr: float | None = None
    weight_scale: WeightScale | None = None
    bundle: str | None = None
    loss_known: bool = True  # False for watch.observe() without a loss
    replay_note: str | None = None  # why no replay ran although a closure was given

    @property
    def loss_finite(self) -> bool:
        return math.isfinite(self.loss)


def _fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.3g}"


# ----- op-specific causes and fixes -----------------------------------------------------------
_LOG = {"log", "log2", "log10", "xlogy", "special_xlogy"}
#: inputs this large are far outside any healthy activation scale: an op that overflows on them (x ** 4,
#: a cumulative product) is a symptom of values grown out of range upstream, not a missing eps
OVERFLOW_INPUT = 1e12
_DIV = {"div", "div_", "reciprocal", "remainder", "fmod", "true_divide", "floor_divide"}
_ROOT = {"sqrt", "rsqrt", "pow"}
_EXP = {"exp", "exp2", "expm1", "sinh", "cosh", "special_exp2"}
_MEAN = {"mean", "var", "std", "var_mean", "std_mean", "nanmean"}
_SOFTMAX = {"_softmax", "_log_softmax", "softmax", "log_softmax"}
_INV_TRIG = {"acos", "asin", "atanh", "acosh"}
_LINEAR = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mul", "convolution", "_convolution",
           "conv2d", "conv1d", "_scaled_dot_product_flash_attention_for_cpu",
           "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention", "sum", "add"}


def _at(loc: Localization) -> str:
    return f" at {loc.source}" if loc.source else ""


def _op_name(loc: Localization) -> str:
    return loc.op.split(".", 1)[-1]


def _forward_cause_and_fixes(loc: Localization) -> tuple[str, list[str]]:
    """Why a forward/loss op went non-finite, and what to change (concrete, with the line)."""
    op, at = _op_name(loc), _at(loc)
    facts = loc.facts or {}
    if facts.get("all_targets_ignored"):
        ii = facts["ignore_index"]
        return (f"every one of the batch's {facts['targets']} targets is ignore_index ({ii}), so the mean loss "
                f"is 0 / 0 valid targets: the batch has nothing to learn from (often padding or truncation that "
                f"masked every label)", [
            f"skip such batches before the step: if (labels != {ii}).any(): watch.step(...)",
            "check the label masking: a sequence cut before its first answer token has every label masked",
            "or use reduction='sum' divided by the count of valid targets clamped to 1",
        ])
    if facts.get("too_few_for_variance"):
        n, c = facts["count"], facts["correction"]
        dims = f" over dim {facts['dims'][0] if len(facts['dims']) == 1 else facts['dims']}" if facts["dims"] else ""
        return (f"a {op}{dims} of {n} value{'s' if n != 1 else ''} with Bessel's correction {c:g} divides by "
                f"{n} - {c:g} = {n - c:g}: often a batch of one example (the last, smaller batch of an epoch)", [
            f"use correction=0 (unbiased=False){at}, or skip the statistic when there are fewer than 2 values",
            "drop the incomplete last batch: DataLoader(..., drop_last=True)",
        ])
    if (loc.kind in ("inf", "nan+inf") and op not in _EXP | _LINEAR | _DIV and loc.max_abs_input is not None
            and loc.max_abs_input >= OVERFLOW_INPUT):
        where = f" entering {loc.module}" if loc.module else ""
        return (f"its inputs were already huge (largest {_fmt(loc.max_abs_input)}), so {loc.op} left float32's "
                f"range (3.4e38): the values grew out of range upstream", [
            f"normalize the activations{where} (nn.LayerNorm / BatchNorm)",
            "lower the initialization scale or the learning rate",
            "clip_norm=1.0",
        ])
    if op in _LOG:
        return ("log of a negative number is NaN" if loc.kind == "nan" else "log of 0 is -inf", [
            "use torch.log_softmax / F.cross_entropy instead of log(softmax(x))",
            f"clamp the argument{at}: torch.log(p.clamp_min(1e-12))",
        ])
    if op in _DIV:
        return ("0/0 is NaN" if loc.kind == "nan" else "a division by zero", [
            f"add eps to the denominator{at}, e.g. x / (d + 1e-8)",
            "guard an empty count: total / count.clamp_min(1) (a mean over an empty selection divides by 0)",
        ])
    if op in _MEAN:
        return ("a mean over an empty selection is 0/0", [
            f"guard the empty case{at}: x[mask].sum() / mask.sum().clamp_min(1)",
        ])
    if op in _ROOT:
        return ("a root of a negative number (or 0 to a negative power)", [
            f"clamp the argument{at}: torch.sqrt(x.clamp_min(0) + 1e-12)",
        ])
    if op in _EXP:
        big = f" (largest argument {_fmt(loc.max_abs_input)})" if loc.max_abs_input is not None else ""
        return (f"exp overflows float32 above 88.7 and float16 above 11.1{big}", [
            "subtract the max before exp, or use torch.logsumexp / softmax / log_softmax, which do",
            f"clamp the argument{at}: x.clamp(max=80).exp()",
        ])
    if op in _SOFTMAX:
        return ("a softmax over a row that is entirely -inf (every position masked) is NaN", [
            "make sure every row keeps at least one unmasked position",
            "mask with torch.finfo(x.dtype).min instead of -inf",
        ])
    if op in _INV_TRIG:
        return ("an inverse trigonometric function outside its domain", [
            f"clamp the argument{at} to (-1 + 1e-6, 1 - 1e-6)",
        ])
    if op in _LINEAR:
        big = f" (largest input {_fmt(loc.max_abs_input)})" if loc.max_abs_input is not None else ""
        where = f" {loc.module}" if loc.module else ""
        return (f"activations overflowed{big}", [
            f"normalize the activations entering{where or ' this layer'} (nn.LayerNorm / BatchNorm)",
            "lower the initialization scale or the learning rate",
            "clip_norm=1.0",
        ])
    return (f"{loc.op} produced {loc.kind}", [f"clamp the inputs of {loc.op}{at} or add an eps"])


def _backward_cause_and_fixes(loc: Localization) -> tuple[str, list[str]]:
    node = (loc.node or "").replace("Backward0", "").replace("Backward1", "").lower()
    at = _at(loc)
    if node in {"sqrt", "rsqrt", "pow", "norm", "linalgvectornorm"}:
        return ("the derivative of sqrt at 0 is infinite (a norm of a zero vector)", [
            f"add eps inside the root{at}: torch.sqrt(x + 1e-12)",
            "use torch.linalg.vector_norm(x) (its gradient at 0 is 0) instead of a hand-written x.pow(2).sum().sqrt()",
        ])
    if node in {"div", "reciprocal"}:
        return ("the derivative of a / b is infinite where b is 0", [f"add eps to the denominator{at}"])
    if node in {"log", "log2", "log10"}:
        return ("the derivative of log at 0 is infinite", [f"clamp the argument{at}: torch.log(x.clamp_min(1e-12))"])
    if node in {"acos", "asin", "atanh"}:
        return ("the derivative of an inverse trigonometric function at +-1 is infinite", [
            f"clamp the argument{at} to (-1 + 1e-6, 1 - 1e-6)",
        ])
    if node == "atan2":
        return ("the derivative of atan2(0, 0) is undefined", [f"add eps to both arguments{at}"])
    return (f"the backward of {loc.node or loc.op} produced {loc.kind}", [
        f"make the forward op{at} differentiable where it is evaluated (add an eps or clamp its input)",
    ])


# ----- the decision -----------------------------------------------------------------------
def _implicated(batch: BatchReport, loc: Localization | None, reproduced: bool) -> bool:
    degenerate = batch.degenerate
    if not degenerate:
        return False
    if loc is None:
        return not reproduced  # nothing else to blame
    if any(t.whole for t in degenerate) and loc.phase == "forward":
        return True  # e.g. an all-zero batch divided by its own std inside the model
    rows = loc.nonfinite_rows
    return bool(rows) and set(rows) <= batch.constant_rows


def _init_evidence(facts: StepFacts, loc: Localization | None) -> str | None:
    """Why a non-finite first step is an init problem (None if it need not be)."""
    ws = facts.weight_scale
    if ws is not None and ws.ratio >= WEIGHT_SCALE_TOO_LARGE:
        return (f"the weights of {ws.layer} are {ws.ratio:.3g}x their fan-in scale "
                f"(rms {ws.rms:.3g} vs 1/sqrt({ws.fan_in}) = {1 / math.sqrt(ws.fan_in):.3g})")
    if loc is not None and loc.phase == "forward" and loc.created and loc.kind in ("inf", "-inf") and not loc.before_model \
            and _op_name(loc) in _LINEAR:
        return f"activations overflowed to inf at {loc.op} in {loc.module} before any update"
    return None


def verdict(outcome: ReplayOutcome | None, note: str | None = None) -> tuple[str, str]:
    """Was the non-finite step reproducible? ``(verdict, reason)``; the verdict is one of
    ``"reproduced"``, ``"not reproduced"``, ``"not replayed"``.

    Reproduced: the replay of the same batch, weights and RNG state made the same
    non-finite value again (deterministic: the op and line). Not reproduced: the
    replay was finite (transient: suspect the hardware - a bit flip, a failing
    GPU - or a non-deterministic kernel; or a closure that reads changing data).

    Example:
        >>> verdict(None, "not replayed: no closure")
        ('not replayed', 'not replayed: no closure')
        >>> verdict(ReplayOutcome(localization=None, loss=0.5, grads_finite=True))[0]
        'not reproduced'
    """
    if outcome is None:
        return "not replayed", note or "no closure was given, so the step could not be replayed"
    if outcome.localization is not None:
        loc = outcome.localization
        at = f" at {loc.source}" if loc.source else ""
        return "reproduced", f"deterministic: the replay made {loc.kind} again at {loc.op}{at}"
    if outcome.error:
        return "not replayed", f"the replay failed: {outcome.error}"
    return "not reproduced", ("transient: the replay of the same batch, weights and RNG state was finite; suspect "
                              "the hardware (a bit flip, a failing GPU) or a non-deterministic kernel")


def classify(facts: StepFacts, batch: BatchReport | None, outcome: ReplayOutcome | None) -> Finding:
    """Turn a non-finite step's facts into one error-level :class:`Finding`.

    Args:
        facts: host numbers of the failing step and the norm history.
        batch: the batch checks (None when no batch was passed to ``watch.step``).
        outcome: the replay's outcome (None when no replay ran: no closure given).

    Returns:
        the finding: code, a one-sentence message, evidence, location, fixes.

    Example:
        >>> facts = StepFacts(step=7, loss=float("nan"), grad_norm=float("nan"), norms=[1.0] * 7)
        >>> from gradwatch.nonfinite.batch import check_batch
        >>> x = torch.ones(4, 3); x[1, 2] = float("nan")
        >>> f = classify(facts, check_batch((x,)), None)
        >>> f.code, f.location["first_nonfinite"]
        ('degenerate_batch', 'batch[0][1, 2]')
    """
    loc = outcome.localization if outcome is not None else None
    reproduced = outcome is not None and outcome.reproduced
    evidence: dict[str, Any] = {
        "loss": facts.loss,
        "grad_norm": facts.grad_norm,
        "nonfinite_layers": facts.nonfinite_layers[:10],
        "closure": facts.closure_given,
        "updates_applied": facts.updates_applied,
    }
    if outcome is not None:
        evidence["replay"] = {
            "reproduced": reproduced,
            "ops_checked": outcome.ops_checked,
            "loss": outcome.loss,
            "model_output_finite": outcome.model_output_finite,
            "grads_finite": outcome.grads_finite,
            "error": outcome.error,
        }
    evidence["verdict"], evidence["verdict_reason"] = verdict(outcome, facts.replay_note)
    if loc is not None:
        evidence["localization"] = loc.to_dict()
    if batch is not None:
        evidence["batch"] = batch.to_dict()
    if facts.bundle:
        evidence["bundle"] = facts.bundle
    if facts.weight_scale is not None:
        evidence["weight_scale"] = asdict(facts.weight_scale)
    pattern = None
    if facts.norms:
        try:
            pattern = norm_pattern(facts.norms, facts.skipped if len(facts.skipped) == len(facts.norms) else None)
        except ValueError:
            pattern = None
    evidence["norm_pattern"] = pattern
    location: dict[str, Any] = loc.location() if loc is not None else {}
    if not location and facts.nonfinite_layers:
        location["layers"] = facts.nonfinite_layers[:10]
    hint = "" if facts.closure_given else f"; {CLOSURE_HINT}"
    n = facts.step

    def done(code: str, decided_by: str, message: str, fixes: list[str]) -> Finding:
        evidence["decided_by"] = decided_by
        if evidence["verdict"] == "not reproduced":
            fixes = fixes + ["the replay was finite (transient): if such steps recur on the same machine or GPU, "
                             "check its health (memory test, ECC errors); a restart from a checkpoint can leave the "
                             "batch out with Watch(..., skip_bad_batches=True) and watch.should_skip(batch)"]
        if facts.bundle:
            fixes = fixes + [f"reproduce it from the bundle {facts.bundle} (torch.load(path, weights_only=True))"]
        return Finding(code, "error", n, message, evidence=evidence, location=location, fixes=fixes)

    # 1. the batch
    if batch is not None and batch.nonfinite:
        t = batch.nonfinite[0]
        location = {**location, "tensor": t.path, "first_nonfinite": t.first_nonfinite}
        kinds = "NaN" if t.nan else "inf"
        count = t.nan if t.nan else t.posinf + t.neginf
        fixes = [f"drop or repair batches with {kinds} features; {count} {kinds} value{'s' if count > 1 else ''} "
                 f"at {t.first_nonfinite}" + (" (first)" if count > 1 else ""),
                 "find where the data pipeline makes them (check the source files and any normalization that divides)"]
        if t.nan:
            fixes.append("if NaN marks missing values, impute them at load time (torch.nan_to_num or a mask feature)")
        return done("degenerate_batch", "batch_nonfinite",
                    f"Step {n} was skipped because its input batch is itself non-finite: {t.describe()}.", fixes)
    if batch is not None and _implicated(batch, loc, reproduced):
        t = batch.degenerate[0]
        location = {**location, "tensor": t.path}
        then = f", and that made {loc.describe()}" if loc is not None else ""
        fixes = []
        if loc is not None:
            fixes.extend(_forward_cause_and_fixes(loc)[1][:1] if loc.phase != "backward" else _backward_cause_and_fixes(loc)[1][:1])
        fixes += [f"drop or filter such batches before the model ({t.describe()})",
                  "normalize with nn.LayerNorm / BatchNorm (they add eps) instead of a hand-written x / x.std()"]
        return done("degenerate_batch", "batch_degenerate", f"Step {n}: {t.describe()}{then}{hint}.", fixes)

    # 2. the gradient-norm pattern
    first = facts.norms[0] if facts.norms else math.nan
    if pattern == "init_scale_too_large":
        why = None
        if math.isfinite(first) and first > HUGE_FIRST_NORM:
            why = f"the first gradient norm was {first:.3g} before any update (a healthy network starts near 0.1-10)"
        elif facts.updates_applied == 0:
            why = _init_evidence(facts, loc)
        if why is not None:
            where = f"; the first non-finite value was {loc.describe()}" if loc is not None else ""
            return done("init_scale_too_large", "norm_pattern",
                        f"Step {n} is non-finite and {why}: the initialization is too large{where}{hint}.",
                        ["re-initialize with nn.init.kaiming_normal_ (ReLU) or xavier_normal_ (tanh, sigmoid), "
                         "or keep PyTorch's default init",
                         "clip_norm=1.0 to survive the first steps",
                         "add normalization layers (nn.LayerNorm / BatchNorm)"])
    # A NaN the loss made itself (log(0), 0/0) is the loss's fault; a loss that overflowed to inf from
    # finite but huge outputs (their squares past float range) is the growth the norm pattern saw.
    loss_overflowed = (loc is not None and loc.phase == "loss" and loc.kind in ("inf", "-inf")
                       and loc.max_abs_input is not None and math.isfinite(loc.max_abs_input))
    if pattern == "lr_too_high" and not (loc is not None and loc.phase == "loss" and not loss_overflowed):
        finite = [v for v in facts.norms if math.isfinite(v)]
        grew = f" (from {min(finite[-8:]):.3g} to {finite[-1]:.3g})" if finite else ""
        where = f"; the first non-finite value was {loc.describe()}" if loc is not None else ""
        lr = facts.lr
        lower = f"lower lr from {lr:.3g} to {lr / 10:.3g}" if lr else "lower the learning rate by 10x"
        return done("lr_too_high", "norm_pattern",
                    f"The gradient norm grew step over step after updates{grew} until step {n} went non-finite: "
                    f"the learning rate is too high{where}{hint}.",
                    [lower, "add or lengthen the learning-rate warm-up", "clip_norm=1.0",
                     "on_nonfinite='rollback' to restore the last good weights and back off the lr"])

    # 3. the replay
    if loc is not None and loc.phase != "backward" and loc.created and facts.loss_known and facts.loss_finite:
        # The forward made inf/NaN that a later op masked out (torch.where, indexing): the loss was
        # finite, but the backward multiplies the zero gradient of the masked entries by it: 0 * inf = NaN.
        at = _at(loc)
        return done("nonfinite_backward", "replay_masked",
                    f"Step {n}: the loss was finite but the gradients were not: {loc.describe()} in the forward "
                    "pass, a later op masked it out (torch.where or indexing), and the backward multiplied the "
                    f"masked entries' zero gradient by it (0 * inf = NaN).",
                    [f"keep the masked-out entries finite before the op{at}, e.g. "
                     "x / torch.where(mask, y, torch.ones_like(y)) inside torch.where(mask, ..., 0) (the double-where pattern)",
                     "or compute the op only on the valid entries: x[mask] / y[mask]"])
    if loc is not None:
        if loc.phase == "backward":
            cause, fixes = _backward_cause_and_fixes(loc)
            created = f" by `{loc.code}`" if loc.code else ""
            return done("nonfinite_backward", "replay",
                        f"Step {n}: the forward pass was finite but the backward of {loc.node or 'an op'} ({loc.op}) "
                        f"produced {loc.kind}: {cause}; the node was created{created}{_at(loc)}"
                        f"{f' in module {loc.module}' if loc.module else ''}.", fixes)
        cause, fixes = _forward_cause_and_fixes(loc)
        # a loss computed inside the model's forward (transformers' labels=) is still the loss's numerics
        if loc.phase == "loss" or (loc.facts or {}).get("all_targets_ignored"):
            return done("loss_numerics", "replay",
                        f"Step {n}: the model's output was finite but the loss became {loc.kind} at {loc.op}"
                        f"{f' in {loc.function}' if loc.function else ''}{_at(loc)}: {cause}.", fixes)
        if not loc.created:
            cause = f"its inputs were already non-finite ({cause})"
        return done("nonfinite_forward", "replay", f"Step {n}: {loc.describe()} in the forward pass: {cause}.", fixes)

    # 4. no localization
    not_reproduced = f" ({facts.replay_note})" if facts.replay_note and outcome is None else ""
    if outcome is not None:
        not_reproduced = (f" (the replay failed: {outcome.error})" if outcome.error else
                          " (not reproduced: the replay of the same batch, weights and RNG state was finite, so the "
                          "fault was transient: suspect the hardware or a non-deterministic kernel, or a closure "
                          "that reads changing data)")
    layers = ", ".join(facts.nonfinite_layers[:5]) or "unknown layers"
    if not facts.loss_known:
        return done("nonfinite_backward", "no_replay",
                    f"Step {n}: the gradients of {layers} were non-finite; no loss was given, so gradwatch cannot "
                    f"tell whether the forward pass or the backward made them{not_reproduced}; pass the loss to "
                    "watch.observe(loss), or a closure to watch.step(), to learn more.",
                    ["look for sqrt, norm, division or log of values that can reach 0 in the forward of " + layers,
                     "check the batch for NaN/inf (pass batch= to have it checked)"])
    if facts.loss_finite:
        return done("nonfinite_backward", "no_replay",
                    f"Step {n}: the loss was finite ({facts.loss:.4g}) but the gradients of {layers} were not, "
                    f"so the backward pass produced the first non-finite value{not_reproduced}{hint}.",
                    ["look for sqrt, norm, division or log of values that can reach 0 in the forward of " + layers,
                     "add an eps inside them (torch.sqrt(x + 1e-12), x / (d + 1e-8))"])
    return done("nonfinite_forward", "no_replay",
                f"Step {n}: the loss is {facts.loss} (the forward pass or the loss function made it){not_reproduced}{hint}.",
                ["check the loss function for log(0) and divisions by zero",
                 "use F.cross_entropy / log_softmax instead of log(softmax(x))"])


def forward_overflow_finding(step: int, loc: Localization, loss_scale: float | None) -> Finding:
    """``fp16_overflow`` for a forward pass that overflows float16 but is finite in float32 (pure).

    Loss scaling only scales the backward pass: the scaler halves its scale on every such
    step and never recovers, so every step is skipped. The fix is range, not scale.

    Example:
        >>> loc = Localization(phase="forward", op="aten.mul", kind="inf", created=True, module="mlp.fc",
        ...                    dtype="float16", max_abs_input=3.1e4)
        >>> f = forward_overflow_finding(3, loc, 16384.0)
        >>> f.code, f.severity, f.location["module"]
        ('fp16_overflow', 'error', 'mlp.fc')
    """
    module = loc.module or "(the model)"
    big = f" (largest input {_fmt(loc.max_abs_input)})" if loc.max_abs_input is not None else ""
    message = (f"Step {step}: the forward pass overflows float16: {loc.describe()}{big} is beyond float16's "
               f"largest value 65504, while the same step is finite in float32. Loss scaling only scales the "
               f"gradients, so it cannot fix this: the scaler halves its scale and skips every such step.")
    evidence: dict[str, Any] = {"localization": loc.to_dict(), "loss_scale": loss_scale, "decided_by": "fp32_replay"}
    return Finding("fp16_overflow", "error", step, message, evidence=evidence, location=loc.location(),
                   fixes=["train in bfloat16 instead: precision='bf16' has float32's range and needs no loss scaling",
                          f"keep {module} in float32: wrap it in torch.autocast(device_type, enabled=False) and "
                          "cast its input with .float()",
                          "keep the activations small: a normalization layer (nn.LayerNorm) before it, or a "
                          "smaller init or learning rate if they grew during training"])
