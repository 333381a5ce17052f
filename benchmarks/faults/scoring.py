"""Scoring of the fault benchmark: pure functions from run outcomes to the published figures.

Nothing here runs a model. Every function takes plain data (the ``Outcome``
dicts that :mod:`benchmarks.faults.harness` produces, or hand-made ones in the
tests) and returns plain data, so the arithmetic can be checked by hand.

An outcome is a dict with at least::

    {"name": str, "family": str,
     "expected": str | None,          # None: a healthy control run
     "expected_op": str | None,       # non-finite scenarios: the aten op that first went non-finite
     "expected_module": str | list | None,  # the module it ran in / the layer a finding must name (any of a list)
     "onset": int,                    # the first step at which the fault is present
     "steps": int,                    # steps actually run
     "findings": [{"code", "severity", "step", "location": {...}}, ...],
     "error": str | None}             # the harness itself failed (counted as a miss)

Definitions (the README figures use exactly these):

- *detected*: some finding of the scenario has the expected code (any severity).
- *confusion table*: for each expected code (rows), how many scenarios raised
  each code (columns); a scenario counts once per code it raised.
- *localization*: among detected scenarios that state an expected op (module),
  the share whose first finding with the expected code names that op (module).
  Ops compare without the ``aten.`` prefix and the overload (``aten.log.default``
  equals ``aten.log``); a found module matches when it equals the expected one
  or lies inside it (``blocks.0.attn.q`` is inside ``blocks.0.attn``).
- *time to detect*: step of the first finding with the expected code minus the
  onset step (0: detected on the step the fault appeared).
- *false positives per 1000 healthy steps*: warning and error findings raised on
  the healthy control runs, per 1000 steps run; info findings are counted apart.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

Outcome = dict[str, Any]

#: Severities that count as a false positive on a healthy run.
ALARM_SEVERITIES = ("warning", "error")


def normalize_op(op: str | None) -> str | None:
    """``"aten.log.default"`` -> ``"log"``; ``"aten::_softmax"`` -> ``"_softmax"``; None stays None.

    Example:
        >>> normalize_op("aten.log.default"), normalize_op("aten.div.Tensor"), normalize_op("exp")
        ('log', 'div', 'exp')
    """
    if op is None:
        return None
    text = str(op).strip().lower().replace("::", ".")
    if text.startswith("aten."):
        text = text[len("aten."):]
    return text.split(".", 1)[0] or None


def module_matches(found: str | None, expected: str | None) -> bool:
    """True when ``found`` is the expected module or a submodule of it.

    Example:
        >>> module_matches("blocks.0.attn", "blocks.0.attn"), module_matches("blocks.0.attn.q", "blocks.0.attn")
        (True, True)
        >>> module_matches("blocks.0", "blocks.0.attn"), module_matches("blocks.10", "blocks.1")
        (False, False)
    """
    if found is None or expected is None:
        return False
    found, expected = str(found), str(expected)
    return found == expected or found.startswith(expected + ".")


def _location_modules(location: dict[str, Any]) -> list[str]:
    """Module names a finding's location mentions (``module``, or the ``layers`` list/span text)."""
    names: list[str] = []
    if location.get("module"):
        names.append(str(location["module"]))
    layers = location.get("layers")
    if isinstance(layers, (list, tuple)):
        names.extend(str(x) for x in layers)
    elif isinstance(layers, str):
        names.extend(part.strip() for part in layers.replace("...", "").split(",") if part.strip())
    return names


def _expected_modules(outcome: Outcome) -> list[str]:
    """The accepted module names: ``expected_module`` is one name or a list of alternatives."""
    expected = outcome.get("expected_module")
    if not expected:
        return []
    return [expected] if isinstance(expected, str) else [str(e) for e in expected]


def first_finding(outcome: Outcome, code: str | None) -> dict[str, Any] | None:
    """The earliest finding of ``outcome`` with ``code`` (None if none)."""
    if code is None:
        return None
    hits = [f for f in outcome.get("findings", []) if f.get("code") == code]
    return min(hits, key=lambda f: f.get("step", 0)) if hits else None


def score_outcome(outcome: Outcome) -> dict[str, Any]:
    """Per-scenario verdict: detected, op/module correct (None when not stated), time to detect.

    Example:
        >>> o = {"name": "s", "expected": "loss_numerics", "expected_op": "aten.log", "expected_module": None,
        ...      "onset": 5, "findings": [{"code": "loss_numerics", "severity": "error", "step": 7,
        ...                                "location": {"op": "aten.log.default"}}]}
        >>> v = score_outcome(o); (v["detected"], v["op_correct"], v["module_correct"], v["time_to_detect"])
        (True, True, None, 2)
    """
    expected = outcome.get("expected")
    hit = first_finding(outcome, expected)
    verdict: dict[str, Any] = {
        "name": outcome.get("name"),
        "expected": expected,
        "found": sorted({f["code"] for f in outcome.get("findings", [])}),
        "detected": hit is not None,
        "op_correct": None,
        "module_correct": None,
        "time_to_detect": None,
        "found_op": None,
        "found_module": None,
    }
    if hit is None:
        if outcome.get("expected_op"):
            verdict["op_correct"] = False
        if outcome.get("expected_module"):
            verdict["module_correct"] = False
        return verdict
    location = hit.get("location") or {}
    verdict["time_to_detect"] = int(hit.get("step", 0)) - int(outcome.get("onset", 1))
    if outcome.get("expected_op"):
        verdict["found_op"] = location.get("op")
        verdict["op_correct"] = normalize_op(location.get("op")) == normalize_op(outcome["expected_op"])
    if outcome.get("expected_module"):
        modules = _location_modules(location)
        verdict["found_module"] = ", ".join(modules) if modules else None
        verdict["module_correct"] = any(module_matches(m, e) for m in modules for e in _expected_modules(outcome))
    return verdict


def confusion(outcomes: Iterable[Outcome]) -> tuple[list[str], list[str], dict[str, dict[str, int]]]:
    """Expected code (rows, ``"healthy"`` for controls) x found code (columns, ``"none"`` when nothing).

    Returns:
        (row labels, column labels, counts[row][column]); each scenario adds 1 to
        every column of a code it raised, or to ``"none"`` when it raised nothing.

    Example:
        >>> rows, cols, t = confusion([
        ...     {"expected": "dead_relu", "findings": [{"code": "dead_relu"}, {"code": "vanishing_gradients"}]},
        ...     {"expected": None, "findings": []}])
        >>> rows, cols, t["dead_relu"]["vanishing_gradients"], t["healthy"]["none"]
        (['dead_relu', 'healthy'], ['dead_relu', 'vanishing_gradients', 'none'], 1, 1)
    """
    table: dict[str, dict[str, int]] = {}
    found_codes: set[str] = set()
    none_seen = False
    for o in outcomes:
        row = o.get("expected") or "healthy"
        counts = table.setdefault(row, {})
        codes = {f["code"] for f in o.get("findings", [])}
        if not codes:
            counts["none"] = counts.get("none", 0) + 1
            none_seen = True
        for code in codes:
            counts[code] = counts.get(code, 0) + 1
            found_codes.add(code)
    rows = sorted(r for r in table if r != "healthy") + (["healthy"] if "healthy" in table else [])
    # columns: the expected codes first (so the diagonal reads top-left to bottom-right), then the rest
    cols = [r for r in rows if r in found_codes] + sorted(found_codes - set(rows)) + (["none"] if none_seen else [])
    return rows, cols, table


def detection_rates(verdicts: Sequence[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """code -> (detected, scenarios) over fault verdicts.

    Example:
        >>> detection_rates([{"expected": "a", "detected": True}, {"expected": "a", "detected": False},
        ...                  {"expected": None, "detected": False}])
        {'a': (1, 2)}
    """
    out: dict[str, tuple[int, int]] = {}
    for v in verdicts:
        code = v.get("expected")
        if code is None:
            continue
        hit, total = out.get(code, (0, 0))
        out[code] = (hit + bool(v["detected"]), total + 1)
    return dict(sorted(out.items()))


def localization(verdicts: Sequence[dict[str, Any]], key: str) -> tuple[int, int]:
    """(correct, stated) for ``key`` in ("op_correct", "module_correct") among detected scenarios.

    A scenario that states an op but was not detected is left out here (it is a
    miss in the detection rate already); use :func:`score_outcome` for both.

    Example:
        >>> localization([{"detected": True, "op_correct": True}, {"detected": True, "op_correct": False},
        ...               {"detected": False, "op_correct": False}, {"detected": True, "op_correct": None}],
        ...              "op_correct")
        (1, 2)
    """
    stated = [v for v in verdicts if v.get("detected") and v.get(key) is not None]
    return sum(1 for v in stated if v[key]), len(stated)


def false_positives(healthy: Iterable[Outcome]) -> dict[str, Any]:
    """Alarms on healthy runs: counts, steps, rate per 1000 steps, and which codes.

    Example:
        >>> fp = false_positives([
        ...     {"steps": 300, "findings": [{"code": "loss_spike", "severity": "warning"},
        ...                                 {"code": "fp16_underflow", "severity": "info"}]},
        ...     {"steps": 200, "findings": []}])
        >>> fp["alarms"], fp["steps"], fp["per_1000_steps"], fp["info"], fp["runs_with_alarm"], fp["codes"]
        (1, 500, 2.0, 1, 1, {'loss_spike': 1})
        >>> fp["by_source"]
        {'watch': 1}
    """
    alarms = info = steps = runs_with_alarm = runs = 0
    codes: dict[str, int] = {}
    sources: dict[str, int] = {}
    for o in healthy:
        runs += 1
        steps += int(o.get("steps", 0))
        n = 0
        for f in o.get("findings", []):
            if f.get("severity") in ALARM_SEVERITIES:
                n += 1
                codes[f["code"]] = codes.get(f["code"], 0) + 1
                source = f.get("source", "watch")
                sources[source] = sources.get(source, 0) + 1
            else:
                info += 1
        alarms += n
        runs_with_alarm += n > 0
    rate = 1000.0 * alarms / steps if steps else math.nan
    return {
        "runs": runs,
        "steps": steps,
        "alarms": alarms,
        "info": info,
        "per_1000_steps": rate,
        "runs_with_alarm": runs_with_alarm,
        "codes": dict(sorted(codes.items())),
        "by_source": dict(sorted(sources.items())),  # "probe" (pre-flight, step 0) or "watch" (training)
    }


def time_to_detect(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median and max steps from onset to the first finding with the expected code, over detections.

    Example:
        >>> time_to_detect([{"time_to_detect": 0}, {"time_to_detect": 4}, {"time_to_detect": None}])
        {'detections': 2, 'median': 2.0, 'max': 4}
    """
    values = [v["time_to_detect"] for v in verdicts if v.get("time_to_detect") is not None]
    if not values:
        return {"detections": 0, "median": None, "max": None}
    return {"detections": len(values), "median": float(statistics.median(values)), "max": max(values)}


def without_source(outcome: Outcome, source: str) -> Outcome:
    """The outcome with the findings of one source (``"probe"``: the pre-flight check) left out.

    Example:
        >>> o = {"findings": [{"code": "a", "source": "probe"}, {"code": "b"}]}
        >>> [f["code"] for f in without_source(o, "probe")["findings"]]
        ['b']
    """
    return {**outcome, "findings": [f for f in outcome.get("findings", []) if f.get("source", "watch") != source]}


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """All figures of the benchmark from its outcomes (what ``--json`` writes, what the tables print).

    ``watch_only`` repeats detection and time to detect with the pre-flight probe's findings left
    out: what a user who never calls ``gw.probe`` gets from the Watch alone.
    """
    faults = [o for o in outcomes if o.get("expected")]
    healthy = [o for o in outcomes if not o.get("expected")]
    verdicts = [score_outcome(o) for o in faults]
    watch_verdicts = [score_outcome(without_source(o, "probe")) for o in faults]
    rows, cols, table = confusion(outcomes)
    detected = sum(1 for v in verdicts if v["detected"])
    return {
        "scenarios": len(faults),
        "healthy_runs": len(healthy),
        "families": sorted({o.get("family", "?") for o in outcomes}),
        "detected": detected,
        "detection_rate": detected / len(faults) if faults else math.nan,
        "per_code": detection_rates(verdicts),
        "op_localization": localization(verdicts, "op_correct"),
        "module_localization": localization(verdicts, "module_correct"),
        "time_to_detect": time_to_detect(verdicts),
        "false_positives": false_positives(healthy),
        "confusion": {"rows": rows, "cols": cols, "counts": table},
        "verdicts": verdicts,
        "watch_only": {
            "detected": sum(1 for v in watch_verdicts if v["detected"]),
            "per_code": detection_rates(watch_verdicts),
            "time_to_detect": time_to_detect(watch_verdicts),
            "false_positives": false_positives(without_source(o, "probe") for o in healthy),
        },
        "errors": {o["name"]: o["error"] for o in outcomes if o.get("error")},
    }
