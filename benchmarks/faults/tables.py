"""Markdown tables of the fault benchmark (what ``python -m benchmarks.faults`` prints)."""

from __future__ import annotations

from typing import Any, Sequence

from .scoring import score_outcome

SHORT = {  # column headers of the confusion table
    "vanishing_gradients": "vanish",
    "exploding_gradients": "explode",
    "init_scale_too_large": "init",
    "lr_too_high": "lr",
    "degenerate_batch": "batch",
    "loss_numerics": "loss_num",
    "nonfinite_forward": "nf_fwd",
    "nonfinite_backward": "nf_bwd",
    "fp16_overflow": "fp16_ovf",
    "fp16_underflow": "fp16_unf",
    "dead_relu": "dead",
    "saturated_activations": "satur",
    "loss_spike": "spike",
    "missing_gradients": "missing",
    "clipping_always_active": "clip",
    "missing_normalization": "no_norm",
    "internal_error": "internal",
    "bf16_lost_updates": "bf16",
}


def _md(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100.0 * a / b:.0f}%)" if b else "-"


def summary_lines(summary: dict[str, Any], seconds: float, command: str) -> str:
    fp = summary["false_positives"]
    ttd = summary["time_to_detect"]
    op, mod = summary["op_localization"], summary["module_localization"]
    lines = [
        f"Command: `{command}` ({seconds:.0f} s wall)",
        f"Fault scenarios: {summary['scenarios']} in {len(summary['families'])} families "
        f"({', '.join(summary['families'])}); healthy runs: {summary['healthy_runs']} ({fp['steps']} steps).",
        f"Detected: {_pct(summary['detected'], summary['scenarios'])}; by the Watch alone (no pre-flight probe): "
        f"{_pct(summary['watch_only']['detected'], summary['scenarios'])}.",
        f"Localization among detections that state it: op {_pct(*op)}, module {_pct(*mod)}.",
        f"Time to detect (steps after onset, over detections; -1 = before training, by the probe): median "
        f"{ttd['median']}, max {ttd['max']}; Watch alone: median {summary['watch_only']['time_to_detect']['median']}, "
        f"max {summary['watch_only']['time_to_detect']['max']}.",
        f"False positives on healthy runs: {fp['alarms']} warning/error findings in {fp['steps']} steps = "
        f"{fp['per_1000_steps']:.2f} per 1000 steps ({fp['runs_with_alarm']}/{fp['runs']} runs; "
        f"codes {fp['codes'] or '-'}; by source {fp['by_source'] or '-'}); info findings: {fp['info']}.",
    ]
    if summary["errors"]:
        lines.append(f"Harness errors: {', '.join(summary['errors'])}.")
    return "\n".join(lines[:1] + [""] + [f"- {line}" for line in lines[1:]])


def confusion_table(summary: dict[str, Any]) -> str:
    conf = summary["confusion"]
    header = ["expected \\ found"] + [SHORT.get(c, c) for c in conf["cols"]] + ["n"]
    n_by_row: dict[str, int] = {}
    for v in summary["verdicts"]:
        n_by_row[v["expected"]] = n_by_row.get(v["expected"], 0) + 1
    n_by_row["healthy"] = summary["healthy_runs"]
    rows = []
    for r in conf["rows"]:
        counts = conf["counts"].get(r, {})
        rows.append([r] + [counts.get(c, "") or "." for c in conf["cols"]] + [n_by_row.get(r, 0)])
    return _md(rows, header)


def per_code_table(summary: dict[str, Any]) -> str:
    by_code: dict[str, list[dict[str, Any]]] = {}
    for v in summary["verdicts"]:
        by_code.setdefault(v["expected"], []).append(v)
    rows = []
    watch = summary["watch_only"]["per_code"]
    for code, (hit, total) in summary["per_code"].items():
        vs = by_code[code]
        ops = [v for v in vs if v["detected"] and v["op_correct"] is not None]
        mods = [v for v in vs if v["detected"] and v["module_correct"] is not None]
        ttds = sorted(v["time_to_detect"] for v in vs if v["time_to_detect"] is not None)
        rows.append([
            code,
            _pct(hit, total),
            _pct(*watch.get(code, (0, total))),
            _pct(sum(bool(v["op_correct"]) for v in ops), len(ops)),
            _pct(sum(bool(v["module_correct"]) for v in mods), len(mods)),
            (f"median {sorted(ttds)[len(ttds) // 2]} (range {min(ttds)}..{max(ttds)})" if ttds else "-"),
        ])
    return _md(rows, ["code", "detected", "Watch alone", "op correct", "module correct", "steps to detect"])


def _base(name: str) -> str:
    """``"mlp_x@2"`` -> ``"mlp_x"`` (runs of one scenario with several seeds share a row)."""
    return name.split("@", 1)[0]


def _grouped(outcomes: Sequence[dict[str, Any]], healthy: bool) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for o in outcomes:
        if bool(o.get("expected")) != healthy:
            groups.setdefault(_base(o["name"]), []).append(o)
    return groups


def _span(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}..{fmt.format(hi)}"


def scenario_table(outcomes: Sequence[dict[str, Any]]) -> str:
    """One row per scenario (its seeds together): detected k/n, codes raised, localization, steps to detect."""
    rows = []
    for name, runs in _grouped(outcomes, healthy=False).items():
        o = runs[0]
        verdicts = [score_outcome(r) for r in runs]
        found = sorted({c for v in verdicts for c in v["found"]})
        hits = sum(v["detected"] for v in verdicts)
        mark = f"{hits}/{len(runs)}" if len(runs) > 1 else ("yes" if hits else "MISSED")
        if any(r.get("error") for r in runs):
            mark += " ERROR"
        op = "" if not o.get("expected_op") else (
            f"{o['expected_op']} / " + ", ".join(sorted({str(v["found_op"] or "-") for v in verdicts})))
        mod = "" if not o.get("expected_module") else (
            f"{'|'.join(o['expected_module'])} / " + ", ".join(sorted({str(v["found_module"] or "-") for v in verdicts})))
        ttd = ", ".join(str(v["time_to_detect"]) for v in verdicts if v["time_to_detect"] is not None)
        rows.append([name, o["family"], SHORT.get(o["expected"], o["expected"]), mark,
                     ", ".join(SHORT.get(c, c) for c in found) or "-", op, mod, ttd,
                     f"{sum(r['seconds'] for r in runs):.1f}"])
    return _md(rows, ["scenario", "family", "expected", "detected", "found", "op exp / found",
                      "module exp / found", "ttd", "s"])


def healthy_table(outcomes: Sequence[dict[str, Any]]) -> str:
    """One row per healthy run (its seeds together): losses, held-out accuracy, alarms (``seed:code@step``)."""
    rows = []
    for name, runs in _grouped(outcomes, healthy=True).items():
        alarms = [f"{r['name'].split('@')[1] + ':' if '@' in r['name'] else ''}{f['code']}@{f['step']}"
                  for r in runs for f in r["findings"] if f["severity"] in ("warning", "error")]
        info = sum(1 for r in runs for f in r["findings"] if f["severity"] not in ("warning", "error"))
        accs = [r["accuracy"] for r in runs if r.get("accuracy") is not None]
        rows.append([
            name, runs[0]["family"], f"{len(runs)} x {runs[0]['steps']}",
            _span([r["loss_first"] for r in runs], "{:.3f}"), _span([r["loss_last"] for r in runs], "{:.3f}"),
            _span(accs), ", ".join(alarms) or "none", info,
            "ERROR" if any(r.get("error") for r in runs) else f"{sum(r['seconds'] for r in runs):.1f}",
        ])
    return _md(rows, ["healthy run", "family", "runs x steps", "loss first 10", "loss last 10", "held-out acc",
                      "warnings/errors", "info", "s"])


def misses(outcomes: Sequence[dict[str, Any]]) -> str:
    """One line per scenario missed or mislocalized (seeds with the same result together): expected vs found."""
    lines: dict[str, list[str]] = {}
    for o in outcomes:
        if not o.get("expected"):
            continue
        v = score_outcome(o)
        if v["detected"] and v["op_correct"] is not False and v["module_correct"] is not False:
            continue
        name = _base(o["name"])
        if not v["detected"]:
            alarms = [f for f in o["findings"] if f["severity"] in ("warning", "error")]
            first = alarms[0] if alarms else None
            found = (f"found {', '.join(v['found'])}; first: {first['code']} at step {first['step']}: "
                     f"{first['message'][:200]}") if first else f"found {', '.join(v['found']) or 'nothing'}"
            text = (f"- `{name}` ({o['cause']}): expected `{o['expected']}`"
                    + (f" at `{o['expected_op']}`" if o.get("expected_op") else "") + f"; {found}")
        else:
            hit = next(f for f in o["findings"] if f["code"] == o["expected"])
            parts = []
            if v["op_correct"] is False:
                parts.append(f"op `{o['expected_op']}` expected, `{v['found_op']}` named")
            if v["module_correct"] is False:
                parts.append(f"module {'|'.join(o['expected_module'])} expected, {v['found_module']} named")
            text = (f"- `{name}` ({o['cause']}): `{o['expected']}` raised at step {hit['step']}, but "
                    + "; ".join(parts) + f" (location {hit['location']})")
        if o.get("error"):
            text += f"\n  harness error: {o['error'].splitlines()[0]}"
        lines.setdefault(text, []).append(o["name"].split("@")[1] if "@" in o["name"] else "")
    out = []
    for text, seeds in lines.items():
        seeds = [x for x in seeds if x]
        out.append(text + (f" [seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)}]" if seeds else ""))
    return "\n".join(out) or "none"
