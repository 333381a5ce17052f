"""The Watch plugin that explains non-finite steps: replay, classify, roll back, save a bundle.

Healthy steps cost one RNG-state copy when a closure that draws random numbers
(dropout) is given (``before_forward``: ``torch.get_rng_state()``, ~5 KB, plus a
few bytes per GPU) and a few integer updates in ``after_step``; nothing runs per
op. Whether the closure draws random numbers is checked on step 1 and every
``RNG_CHECK_EVERY`` (50) steps by comparing the states before and after
backward; a closure that draws none needs no copy (its state at the end of a
non-finite step is the one it started with, and that is what the replay and
the bundle get). A closure that draws random numbers only now and then, between
two checks, may then replay with other random numbers than the step had. With
``on_nonfinite="rollback"`` a snapshot of the weights and optimizer state (on the
CPU unless ``rollback_device="params"``; its size logged once) is also taken every
``rollback_every`` steps.

On a non-finite step (``record.finite`` is False), ``after_step``:

1. checks the batch (:func:`~.batch.check_batch`);
2. replays the step (closure form) under the checking dispatch mode
   (:func:`~.replay.replay`) with the step's autocast and loss scale;
3. classifies (:func:`~.classify.classify`) into one error-level finding;
4. with ``on_nonfinite="rollback"``, restores the last snapshot and backs off the
   lr (not when the batch itself held NaN/inf: the weights were not at fault, the
   skip already protected them);
5. saves a reproduction bundle (:mod:`.bundle`) in the run directory.

Settings (``gradwatch.Watch(..., nonfinite=gw.NonFiniteConfig(...))``):

- ``rollback_every`` (int, default 100): steps between snapshots (rollback mode only).
- ``rollback_lr_factor`` (float in (0, 1], default 0.5): lr multiplier on a restore.
- ``rollback_device`` (``"cpu"``, default, or ``"params"``): where the snapshot lives.
- ``max_replays`` (int >= 0, default 20): replays per run; later non-finite steps are
  classified without one (a run that is NaN on every step must not triple its cost).
- ``max_bundles`` (int >= 0, default 100): bundles saved per run.

Under gradient accumulation each micro-batch's closure is replayed in turn
until one names the op (each with the RNG state from before it, when kept).

Under fp16 with a loss scaler, a step whose loss is finite but whose scaled
gradients overflowed is the scaler's routine business (it halves the scale): it
is left to the mixed-precision diagnosis and not replayed here.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ..config import NonFiniteConfig
from ..errors import logger
from ..findings import Finding
from ..plugins import MicroBatch, StepContext, WatchPlugin, WatchView
from ..records import StepRecord
from .badbatches import BadStep, fingerprint, signature
from .batch import BatchReport, check_batch
from .bundle import bundle_name, make_bundle
from .classify import StepFacts, classify, forward_overflow_finding, weight_scale
from .replay import ReplayOutcome, capture_rng_state, replay
from .rollback import Rollback

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    try:
        from ..distributed import unwrap_model
    except ImportError:  # pragma: no cover - distributed support not present
        return model
    return unwrap_model(model)


@contextlib.contextmanager
def _rank_local(model: torch.nn.Module) -> Any:
    """A DDP model whose forward and backward issue no collective: a replay on one rank alone.

    ``no_sync()`` keeps the backward local; DDP's own forward is bypassed (its
    bucket rebuild after the first step and its buffer broadcast are collectives
    that the other ranks, not replaying, would never join): the wrapped module
    runs directly, with its own hooks.
    """
    before = vars(model).get("forward")  # an instance attribute already there (rare): put it back after
    inner = getattr(model, "module", None)
    with model.no_sync():
        if inner is not None:
            model.forward = lambda *args, **kwargs: inner(*args, **kwargs)
        try:
            yield
        finally:
            if inner is not None:
                if before is None:
                    del model.forward
                else:
                    model.forward = before


#: Steps between two checks that a closure still draws no random number (step 1 is always checked).
RNG_CHECK_EVERY = 50


def _same_rng_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two captured RNG states are equal (no random number was drawn in between)."""
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, list):
            if len(value) != len(other) or not all(torch.equal(x, y) for x, y in zip(value, other)):
                return False
        elif not torch.equal(value, other):
            return False
    return True

class NonFinitePlugin(WatchPlugin):
    """Explain every non-finite step: replay, localize, classify, roll back, bundle.

    Made by the Watch for every run (it changes behaviour under
    ``on_nonfinite="rollback"``, so it is on even with ``diagnose=False``).

    Args:
        config: :class:`gradwatch.NonFiniteConfig` (replays, bundles, rollback snapshots).

    Attributes:
        replays: number of replays run so far (0 on a healthy run).
        repeats: non-finite steps not reported again because the step before had the
            same cause (a run stuck on NaN gets one finding per cause, not per step).
        rollback: the :class:`~.rollback.Rollback` keeper (rollback mode), else None.

    Example:
        >>> import gradwatch as gw
        >>> model = torch.nn.Linear(3, 1); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> watch = gw.Watch(model, opt)
        >>> x = torch.randn(4, 3); y = torch.zeros(4, 1)
        >>> r = watch.step(lambda: torch.log(model(x) * 0).mean(), batch=(x, y))  # log(0)
        >>> r.skipped, r.findings[0].code, r.findings[0].location["op"]
        (True, 'loss_numerics', 'aten.log')
        >>> watch.close()
    """

    name = "nonfinite"

    def __init__(self, config: NonFiniteConfig = NonFiniteConfig()) -> None:
        if not isinstance(config, NonFiniteConfig):
            raise TypeError(f"config must be a gradwatch.NonFiniteConfig, got {type(config).__name__}")
        self.config = config
        self.max_replays = config.max_replays
        self.max_bundles = config.max_bundles
        self.replays = 0
        self.bundles = 0
        self._fp16_overflows = 0  # steps found to be float16 range overflows (finite in float32)
        self._forward_overflow_said = False  # fp16_overflow raised for a forward-pass overflow
        self.rollback: Rollback | None = None
        self._rng_used: bool | None = None  # does the closure draw random numbers? None: not checked yet
        self._rng_check = False
        self._first_norm: float | None = None
        self._updates = 0
        self._last_bad_step = -1
        self._episode_key: tuple[Any, ...] | None = None
        self.repeats = 0  # non-finite steps not reported again (same cause as the step before)
        self._replay_note: str | None = None

    def attach(self, view: WatchView) -> None:
        super().attach(view)
        if view.on_nonfinite == "rollback":
            self.rollback = Rollback(view.model, view.optimizer, every=self.config.snapshot_every,
                                     lr_factor=self.config.lr_factor, device=self.config.snapshot_device)
            #: what one snapshot holds (logged once, here: the memory rollback costs)
            self.rollback_cost = self.rollback.cost()
            logger.warning("gradwatch: %s", self.rollback_cost.describe())

    # ----- healthy path ---------------------------------------------------------------------
    def before_forward(self, ctx: StepContext) -> None:
        # The RNG state before each micro-batch, for a replay of a non-finite step. A closure that draws
        # no random number (no dropout: checked on step 1 and every RNG_CHECK_EVERY steps) needs none:
        # the state at the end of such a step is the state it started with, read then if needed.
        micro = ctx.current
        first = len(ctx.micro) == 1
        if first:
            self._rng_check = False
        if micro.closure is not None and (self._rng_used is not False or ctx.step % RNG_CHECK_EVERY == 0):
            micro.rng_before = self._capture()
            self._rng_check = first and self._rng_used is not True or self._rng_check
        if first and self.rollback is not None and not self.rollback.has_snapshot:
            self.rollback.snapshot(ctx.step - 1)  # the weights before the first step we see

    def after_backward(self, ctx: StepContext) -> None:
        first = ctx.micro[0].rng_before if ctx.micro else None
        if self._rng_check and first is not None:  # did the closure draw random numbers?
            self._rng_used = not _same_rng_state(first, self._capture())
            self._rng_check = False

    def _quiet_next(self, step: int) -> None:
        """Nothing to do before or after the forward of ``step``: no RNG copy, no check, no first snapshot."""
        self._rng_check = False
        self.quiet_step = (self._rng_used is False and step % RNG_CHECK_EVERY != 0
                           and (self.rollback is None or self.rollback.has_snapshot))

    def abort(self, ctx: StepContext) -> None:
        """The user's closure or backward raised: drop what was kept for this step."""
        self._quiet_next(ctx.step + 1)

    def _capture(self) -> dict[str, Any]:
        return capture_rng_state(self.view.device)

    def after_step(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        if ctx.step == 1:
            self._first_norm = record.grad_norm  # norm_pattern needs step 1's norm after history trims it
        if record.finite:
            if not record.skipped:
                self._updates += 1
                keeper = self.rollback
                groups_changed = keeper is not None and keeper.group_count != len(self.view.optimizer.param_groups)
                if keeper is not None and (keeper.due(ctx.step) or groups_changed) \
                        and keeper.weights_finite():  # (add_param_group: a snapshot now)
                    keeper.snapshot(ctx.step)
            self._quiet_next(ctx.step + 1)
            return []
        self._quiet_next(ctx.step + 1)
        now = None
        for micro in ctx.micro:  # not kept: the closure draws no random number, the state now replays it
            if micro.rng_before is None and micro.closure is not None:
                micro.rng_before = now = now or self._capture()
        return self._explain(ctx, record)

    # ----- a non-finite step -------------------------------------------------------------------
    def _explain(self, ctx: StepContext, record: StepRecord) -> list[Finding]:
        watch = self.view
        precision = watch.precision
        if precision.scaling and record.loss_finite:
            return []  # an fp16 overflow of the scaled gradients: the scaler's (and the AMP diagnosis's) business
        batch = self._check_batch(ctx.batch)
        outcome, micro = self._replay(ctx, record)
        if self._fp16_range_overflow(micro, outcome):
            self._fp16_overflows += 1
            assert outcome is not None and outcome.localization is not None  # (a range overflow was located)
            if outcome.localization.phase != "backward" and not self._forward_overflow_said:
                self._forward_overflow_said = True  # the scaler cannot fix it, and never reports it: say it here
                return [forward_overflow_finding(ctx.step, outcome.localization, record.loss_scale)]
            return []  # gradients out of float16 range: the scaler's business, the AMP plugin reports it
        if outcome is None and self._fp16_overflows and (batch is None or not batch.degenerate):
            return []  # replays used up on a run whose failures were float16 range overflows: still the AMP plugin's
        history = [r for r in watch.history if r.step <= ctx.step]
        norms = [r.grad_norm for r in history]
        skipped = [r.skipped for r in history]
        if history and history[0].step != 1 and self._first_norm is not None:
            norms, skipped = [self._first_norm] + norms, [False] + skipped
        name = bundle_name(ctx.step) if watch.keeps_bundles and self.bundles < self.max_bundles else None
        facts = StepFacts(
            step=ctx.step,
            loss=record.loss,
            grad_norm=record.grad_norm,
            nonfinite_layers=list(record.nonfinite_layers),
            norms=norms,
            skipped=skipped,
            updates_applied=self._updates,
            closure_given=ctx.closure is not None,
            lr=self._lr(),
            weight_scale=weight_scale(watch.model) if self._updates == 0 else None,
            bundle=f"nonfinite/{name}" if name else None,
            loss_known=ctx.loss_known,
            replay_note=self._replay_note if ctx.closure is not None and outcome is None else None,
        )
        finding = classify(facts, batch, outcome)
        if len(ctx.micro) > 1:
            finding.evidence["micro_batches"] = len(ctx.micro)
            if micro is not None:
                finding.evidence["micro_batch"] = ctx.micro.index(micro) + 1
        self._note_buffers(finding)
        self._maybe_roll_back(ctx, finding)
        ctx.bad_step = self._bad_step(ctx, micro, finding)
        if name is not None:
            self._save_bundle(name, ctx, micro, record, finding, outcome)
        return [finding] if self._new_episode(ctx.step, finding) else []

    def _bad_step(self, ctx: StepContext, micro: MicroBatch | None, finding: Finding) -> BadStep:
        """This rank's batch fingerprint and the replay's verdict, for ``bad_batches.jsonl``."""
        batch = micro.batch if micro is not None else ctx.batch
        fp = sig = None
        if batch is not None:
            try:
                fp, sig = fingerprint(batch), signature(batch)
            except Exception as exc:  # a batch that cannot be hashed is still explained
                self.view.errors.report("nonfinite.fingerprint", exc)
        return BadStep(step=ctx.step, fingerprint=fp, signature=sig,
                       verdict=str(finding.evidence.get("verdict", "not replayed")), code=finding.code)

    def _new_episode(self, step: int, finding: Finding) -> bool:
        """False for a repeat: the step right after a non-finite one, with the same code and place.

        A run stuck on NaN (every step skipped) gets one finding per cause, not one per
        step; every skipped step is still in steps.jsonl and has its bundle. A rollback
        starts a new episode (the weights changed).
        """
        keys = ("op", "module", "node", "source", "tensor", "layers")
        key = (finding.code, tuple((k, str(finding.location.get(k))) for k in keys))
        repeat = (self._last_bad_step == step - 1 and key == self._episode_key
                  and finding.evidence.get("action") != "rollback")
        self._last_bad_step = step
        self._episode_key = key
        if repeat:
            self.repeats += 1
        return not repeat

    def _check_batch(self, batch: Any) -> BatchReport | None:
        if batch is None:
            return None
        try:
            return check_batch(batch)
        except Exception as exc:  # never let a strange batch stop the explanation
            self.view.errors.report("nonfinite.check_batch", exc)
            return None

    def _replay(self, ctx: StepContext, record: StepRecord) -> tuple[ReplayOutcome | None, MicroBatch | None]:
        """Replay the step's micro-batches in turn (closure form) until one names the first non-finite op.

        Returns the outcome and the micro-batch it came from (the first replayed, if none located).
        """
        self._replay_note = None
        micros = [m for m in ctx.micro if m.closure is not None]
        if not micros:
            return None, None
        ranks = ctx.nonfinite_ranks
        flagged = sorted(set(ranks["loss"]) | set(ranks["gradients"])) if ranks else []
        if flagged and self.view.rank not in flagged:  # torch.distributed: the rank(s) where it arose replay it
            self._replay_note = (f"not replayed on rank {self.view.rank}: its local values were finite; "
                                 f"rank{'s' if len(flagged) > 1 else ''} {', '.join(map(str, flagged))} replayed the step")
            return None, micros[0]
        first: tuple[ReplayOutcome | None, MicroBatch | None] = (None, None)
        for micro in micros:
            outcome = self._replay_one(micro, record)
            if outcome is None:
                return first if first[0] is not None else (None, micro)
            if outcome.localization is not None:
                return outcome, micro
            if first[0] is None:
                first = (outcome, micro)
        return first

    def _replay_one(self, micro: MicroBatch, record: StepRecord) -> ReplayOutcome | None:
        if self.replays >= self.max_replays:
            self._replay_note = f"not replayed: the run used its max_replays={self.max_replays} replays"
            return None
        view = self.view
        model = view.model
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        no_sync = getattr(model, "no_sync", None)
        if distributed and no_sync is None:
            self._replay_note = "not replayed: a replay under this distributed wrapper could deadlock the ranks"
            return None  # FSDP: a replay that stops early on one rank would leave the others in a collective
        self.replays += 1
        precision = view.precision
        autocast = precision.autocast if precision.mode != "fp32" else None
        scale = record.loss_scale if precision.scaling and record.loss_scale and math.isfinite(record.loss_scale) else None
        try:
            with (_rank_local(model) if distributed else contextlib.nullcontext()):
                return replay(_unwrap(model), micro.closure, micro.rng_before, autocast_ctx=autocast, loss_scale=scale)
        except Exception as exc:  # the replay machinery itself failed: classify without it
            view.errors.report("nonfinite.replay", exc)
            self._replay_note = f"the replay failed: {type(exc).__name__}"
            return None

    def _fp16_range_overflow(self, micro: MicroBatch | None, outcome: ReplayOutcome | None) -> bool:
        """fp16 autocast: the first non-finite value was a float16 one and the same step is finite in float32."""
        where = outcome.localization if outcome is not None else None
        if self.view.precision.mode != "fp16" or where is None or where.dtype != "float16" or micro is None:
            return False
        model = self.view.model
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1 and hasattr(model, "no_sync")
        try:
            with (_rank_local(model) if distributed else contextlib.nullcontext()):
                return replay(_unwrap(model), micro.closure, micro.rng_before).localization is None
        except Exception as exc:
            self.view.errors.report("nonfinite.replay", exc)
            return False

    def _lr(self) -> float | None:
        return self.view.lr()

    def _note_buffers(self, finding: Finding) -> None:
        """Say which buffers (BatchNorm running statistics) the failing forward left non-finite."""
        bad = []
        with torch.no_grad():
            for name, buf in self.view.model.named_buffers():
                if buf.is_floating_point() and buf.numel() and not bool(torch.isfinite(buf).all()):
                    bad.append(name)
        if not bad:
            return
        finding.evidence["nonfinite_buffers"] = bad[:10]
        if self.rollback is None:
            finding.fixes.append(
                f"the failing forward left non-finite buffers ({', '.join(bad[:3])}); "
                "on_nonfinite='rollback' restores them with the weights"
            )

    def _maybe_roll_back(self, ctx: StepContext, finding: Finding) -> None:
        keeper = self.rollback
        step = ctx.step
        if keeper is None:
            return
        if finding.evidence.get("decided_by") == "batch_nonfinite":
            finding.evidence["action"] = "skip"
            finding.message += " The weights were not at fault, so the step was skipped without a rollback."
            return
        if keeper.group_count != len(self.view.optimizer.param_groups):  # a group added since the snapshot
            finding.evidence["action"] = "skip"
            finding.message += (" A param group was added since the last snapshot, which cannot be restored into "
                                "this optimizer: the step was skipped without a rollback.")
            return
        event = keeper.restore(step)
        ctx.rollback = event  # the lr backoff, after this plugin, sees it
        finding.evidence["action"] = "rollback"
        finding.evidence["rollback"] = event.to_dict()
        lr_from = ", ".join(f"{v:.3g}" for v in event.lr_before)
        lr_to = ", ".join(f"{v:.3g}" for v in event.lr_after)
        finding.message += (f" Rolled back to the weights and optimizer state after step {event.restored_step} "
                            f"and lowered lr from {lr_from} to {lr_to}.")
        if self.view.writer is not None:
            self.view.writer.append("events", event.to_dict())

    def _save_bundle(self, name: str, ctx: StepContext, micro: MicroBatch | None, record: StepRecord,
                     finding: Finding, outcome: ReplayOutcome | None) -> None:
        """Save this rank's bundle (if it writes); under torch.distributed also keep it on ``ctx.bad_step``,
        for the writing rank to get when this rank's finding is the one kept."""
        writer = self.view.writer
        shared = self.view.rank is not None and ctx.bad_step is not None
        if writer is None and not shared:
            return
        loc = outcome.localization if outcome is not None else None
        try:
            payload = make_bundle(
                step=ctx.step,
                finding=finding.to_dict(),
                batch=micro.batch if micro is not None else ctx.batch,
                rng=micro.rng_before if micro is not None else None,
                loss=record.loss,
                grad_norm=record.grad_norm,
                nonfinite_layers=record.nonfinite_layers,
                localization=loc.to_dict() if loc is not None else None,
            )
            if writer is not None:
                writer.save_bundle(name, payload)
            if shared:
                ctx.bad_step.bundle_name, ctx.bad_step.bundle = name, payload
            self.bundles += 1
        except Exception as exc:  # a bundle that cannot be written must not hide the finding
            finding.evidence.pop("bundle", None)
            finding.fixes = [fix for fix in finding.fixes if name not in fix]
            self.view.errors.report("nonfinite.save_bundle", exc)

    def state_dict(self) -> dict[str, Any]:
        """Counters and what the plugin learnt about the closure. The rollback snapshot is not in it
        (the checkpoint holds the weights): a resumed rollback run snapshots before its first step."""
        return {"replays": self.replays, "bundles": self.bundles, "updates": self._updates,
                "first_norm": self._first_norm, "rng_used": self._rng_used, "repeats": self.repeats,
                "fp16_overflows": self._fp16_overflows, "forward_overflow_said": self._forward_overflow_said}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replays = int(state.get("replays", 0))
        self.bundles = int(state.get("bundles", 0))
        self._updates = int(state.get("updates", 0))
        self._first_norm = state.get("first_norm")
        self._rng_used = state.get("rng_used")
        self.repeats = int(state.get("repeats", 0))
        self._fp16_overflows = int(state.get("fp16_overflows", 0))
        self._forward_overflow_said = bool(state.get("forward_overflow_said", False))
