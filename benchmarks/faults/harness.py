"""Run one scenario under ``gradwatch`` as a user would, and record what it said.

For each scenario: seed, build (:class:`~benchmarks.faults.scenarios.Setup`),
run the pre-flight probe (``gw.probe(model, batch, loss_fn)``, when this
gradwatch has it), then train with ``gw.Watch(model, optimizer, **options)``
and ``watch.step(closure, batch=batch)`` for the scenario's steps. The closure
reads its batch from the enclosing scope, so a non-finite step can be replayed.

A run stops early (to keep the suite fast) ``GRACE`` steps after the expected
code was first raised, or after ``DEAD_AFTER`` consecutive skipped steps (the
run is dead: with ``on_nonfinite="skip"`` nothing changes any more). Healthy
runs always run every step.

The result is an *outcome*: plain data, scored by :mod:`benchmarks.faults.scoring`.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import traceback
import warnings
from typing import Any

import torch

import gradwatch as gw

from .scenarios import Scenario

GRACE = 20  # steps run after the first detection, to see what else is raised
DEAD_AFTER = 25  # consecutive skipped steps after which a run is dead


def _probe_fn() -> Any:
    """``gw.probe`` (DESIGN.md's pre-flight check), or None in a gradwatch without it."""
    return getattr(gw, "probe", None)


def _finding_dict(f: Any, source: str) -> dict[str, Any]:
    d = f.to_dict()
    return {
        "code": d["code"],
        "severity": d["severity"],
        "step": d["step"],
        "message": d["message"],
        "location": d.get("location") or {},
        "source": source,
    }


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def run_scenario(sc: Scenario, seed: int = 0, steps: int | None = None, probe: bool = True) -> dict[str, Any]:
    """Run ``sc`` and return its outcome (see :mod:`benchmarks.faults.scoring` for the fields)."""
    outcome: dict[str, Any] = {
        "name": sc.name,
        "family": sc.family,
        "arch": sc.arch,
        "cause": sc.cause,
        "expected": sc.expected,
        "expected_op": sc.expected_op,
        "expected_module": list(sc.expected_module) if sc.expected_module else None,
        "expected_node": sc.expected_node,
        "onset": sc.onset if sc.onset is not None else 1,
        "steps": 0,
        "findings": [],
        "probe": None,
        "skipped_steps": 0,
        "first_nonfinite_step": None,
        "loss_first": math.nan,
        "loss_last": math.nan,
        "accuracy": None,
        "seconds": 0.0,
        "error": None,
        "warnings": [],
    }
    gw_logger = logging.getLogger("gradwatch")
    old_level = gw_logger.level
    gw_logger.setLevel(logging.ERROR)  # findings are collected below, not printed as they happen
    started = time.perf_counter()
    watch = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(seed)
            setup = sc.build()
            outcome["probe"] = _run_probe(sc, setup, outcome) if probe else None
            watch = gw.Watch(setup.model, setup.optimizer, **setup.watch)
            _train(sc, setup, watch, outcome, steps or sc.steps)
            if setup.evaluate is not None:
                setup.model.eval()
                with torch.no_grad():
                    outcome["accuracy"] = setup.evaluate(setup.model)
                setup.model.train()
        outcome["warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:160]}" for w in caught})
    except Exception as exc:  # a broken scenario or a gradwatch crash: recorded, scored as a miss
        outcome["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    finally:
        if watch is not None:
            try:
                outcome["findings"].extend(_finding_dict(f, "watch") for f in watch.findings)
                watch.close()
            except Exception as exc:
                outcome["error"] = outcome["error"] or f"close: {type(exc).__name__}: {exc}"
        gw_logger.setLevel(old_level)
        outcome["findings"].sort(key=lambda f: f["step"])
        outcome["seconds"] = time.perf_counter() - started
    return outcome


def _run_probe(sc: Scenario, setup: Any, outcome: dict[str, Any]) -> dict[str, Any]:
    fn = _probe_fn()
    if fn is None:
        return {"available": False}
    t0 = time.perf_counter()
    batch = setup.batch(1)
    try:
        result = fn(setup.model, batch if isinstance(batch, dict) else batch[:2], loss_fn=setup.probe_loss)
    except Exception as exc:
        return {"available": True, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    found = [_finding_dict(f, "probe") for f in getattr(result, "findings", [])]
    outcome["findings"].extend(found)
    return {"available": True, "findings": len(found), "seconds": time.perf_counter() - t0}


def _train(sc: Scenario, setup: Any, watch: Any, outcome: dict[str, Any], n_steps: int) -> None:
    losses: list[float] = []
    detected_at = None
    dead = 0
    for step in range(1, n_steps + 1):
        batch = setup.batch(step)
        closure = functools.partial(setup.loss, setup.model, batch)  # re-runnable: a replay sees the same batch
        result = watch.step(closure, batch=batch)
        outcome["steps"] = step
        losses.append(float(result.loss))
        if result.skipped:
            outcome["skipped_steps"] += 1
            dead += 1
            nonfinite = not (math.isfinite(result.loss) and math.isfinite(result.grad_norm))
            if nonfinite and outcome["first_nonfinite_step"] is None:
                outcome["first_nonfinite_step"] = step
        else:
            dead = 0
        if sc.healthy:
            continue
        if detected_at is None and any(f.code == sc.expected for f in watch.findings):
            detected_at = step
        if detected_at is not None and step - detected_at >= GRACE:
            break
        if dead >= DEAD_AFTER:
            break
    if sc.onset is None:  # a latent bug: the fault shows at the first non-finite step
        outcome["onset"] = outcome["first_nonfinite_step"] or 1
    outcome["loss_first"] = _mean(losses[:10])
    outcome["loss_last"] = _mean(losses[-10:])
