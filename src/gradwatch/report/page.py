"""HTML assembly: one self-contained page, every user-derived string escaped.

Everything the page needs is inside the file: CSS inline, each chart an SVG in
a ``data:`` URI (an SVG inside ``<img>`` cannot run scripts and its ids cannot
clash with the page's). A Content-Security-Policy meta tag forbids scripts and
any fetch except ``data:`` images, so even a mistake here cannot make the page
reach the network. Every name and text that comes from the model, the data or
the run directory (module names, finding messages, evidence, event text, file
names) goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import logger
from .prepare import RunView

#: Findings listed in full (the summary table counts all of them).
MAX_FINDINGS = 200
#: Events listed.
MAX_EVENTS = 200
#: Reproduction bundles opened to show what they hold (the rest are listed by name).
MAX_BUNDLES_OPENED = 20
MAX_VALUE_CHARS = 400

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:960px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
figure{margin:12px 0}figure img{width:100%;height:auto;display:block}figcaption{color:#555;font-size:12.5px}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,Menlo,Consolas,monospace;background:#f3f3f3;padding:0 3px;word-break:break-all}
.sev{display:inline-block;border-radius:3px;padding:0 6px;color:#fff;font-size:12px;font-weight:600}
.sev-error{background:#c62828}.sev-warning{background:#ef6c00}.sev-info{background:#757575}
.finding{border:1px solid #e3e3e3;border-left:4px solid #999;padding:6px 10px;margin:8px 0}
.finding.error{border-left-color:#c62828}.finding.warning{border-left-color:#ef6c00}
.absent{color:#777;font-style:italic}pre.precision{font-size:12px;background:#f6f6f6;padding:6px;white-space:pre-wrap}
code.file{white-space:nowrap;word-break:normal}.summary td{border:none;padding:1px 12px 1px 0}
.run-a{color:#1f77b4;font-weight:600}.run-b{color:#d62728;font-weight:600}
nav a{margin-right:10px;font-size:12.5px}
"""


def esc(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute.

    Example:
        >>> esc("<script>alert(1)</script>")
        '&lt;script&gt;alert(1)&lt;/script&gt;'
    """
    return html.escape(str(value), quote=True)


def fmt(value: Any) -> str:
    """A number as a person reads it (4 significant digits; nan/inf spelled out), escaped.

    Example:
        >>> fmt(0.000123456), fmt(float("nan")), fmt(12), fmt("a<b")
        ('0.0001235', 'nan', '12', 'a&lt;b')
    """
    if isinstance(value, bool) or value is None:
        return esc(value)
    if isinstance(value, (int, np.integer)):
        return esc(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return esc(repr(value) if not math.isfinite(value) else f"{value:.4g}")
    if isinstance(value, (list, tuple)):
        shown = ", ".join(fmt(v) for v in list(value)[:12])
        return f"[{shown}{', ...' if len(value) > 12 else ''}]"
    text = value if isinstance(value, str) else json.dumps(value, default=str) if isinstance(value, dict) else str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "\u2026"
    return esc(text)


def svg_img(svg: str, alt: str) -> str:
    """An ``<img>`` holding ``svg`` as a base64 data URI (no network, no script)."""
    payload = base64.b64encode(svg.encode("utf-8")).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/svg+xml;base64,{payload}">'


def _kv_table(items: Iterable[tuple[Any, Any]], cls: str = "") -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v)}</td></tr>" for k, v in items)
    return f'<table class="{cls}">{rows}</table>' if rows else ""


def _run_span(views: Sequence[RunView], i: int) -> str:
    return f'<span class="run-{"ab"[i]}">{esc(views[i].label)}</span>'


# ----- sections -------------------------------------------------------------------------
def _summary(view: RunView) -> str:
    meta = view.meta
    finite = np.isfinite(view.grad_norm)
    by_sev = {s: sum(1 for f in view.findings if f.severity == s) for s in ("error", "warning", "info")}
    items = [
        ("run directory", str(view.path)),
        ("model", meta.get("model", "?")),
        ("optimizer", meta.get("optimizer", "?")),
        ("precision", meta.get("precision", "?")),
        ("clip_norm", meta.get("clip_norm")),
        ("steps", view.n_steps),
        ("measured layers", len(view.layer_names)),
        ("skipped steps", int(view.skipped.sum())),
        ("clipped steps", f"{int(view.clipped.sum())} ({100.0 * view.clipped.mean():.1f}%)" if view.n_steps else "0"),
        ("last loss", view.loss[np.isfinite(view.loss)][-1] if np.isfinite(view.loss).any() else float("nan")),
        ("median global norm", float(np.median(view.grad_norm[finite])) if finite.any() else float("nan")),
        ("median effective gain", float(np.nanmedian(view.gain)) if np.isfinite(view.gain).any() else float("nan")),
        ("findings", f"{by_sev['error']} error, {by_sev['warning']} warning, {by_sev['info']} info"),
    ]
    table = _kv_table(items, "summary")
    lines = _precision_lines(view)
    return table + (f'<pre class="precision">{esc(chr(10).join(lines))}</pre>' if lines else "")


def _precision_lines(view: RunView) -> list[str]:
    """The precision plugin's text for its latest fp16 forecast (only when worth acting on) and bf16 events."""
    try:
        from ..amp.summary import forecast_lines, lost_update_lines

        return [str(line) for line in forecast_lines(view.forecast) + lost_update_lines(view.lost_updates)]
    except Exception:  # a malformed event must not cost the whole report
        return []


def _finding_html(finding: Any) -> str:
    evidence = _kv_table(finding.evidence.items()) if finding.evidence else ""
    location = ", ".join(f"{esc(k)}=<code>{fmt(v)}</code>" for k, v in finding.location.items())
    fixes = "".join(f"<li>{esc(fix)}</li>" for fix in finding.fixes)
    sev = esc(finding.severity)
    return (
        f'<div class="finding {sev}"><span class="sev sev-{sev}">{sev}</span> '
        f"<b>{esc(finding.code)}</b> at step {fmt(finding.step)}"
        f'<p class="message">{esc(finding.message)}</p>'
        + (f"<div>location: {location}</div>" if location else "")
        + (f"<div>evidence:{evidence}</div>" if evidence else "")
        + (f"<div>fixes:<ol>{fixes}</ol></div>" if fixes else "")
        + "</div>"
    )


def _findings(view: RunView) -> str:
    if not view.findings:
        return '<p class="absent">No findings: no rule raised anything on this run.</p>'
    codes: dict[str, list[Any]] = {}
    for f in view.findings:
        codes.setdefault(f.code, []).append(f)
    order = {"error": 0, "warning": 1, "info": 2}
    rows = "".join(
        f'<tr><td><span class="sev sev-{esc(fs[0].severity)}">{esc(fs[0].severity)}</span></td><td>{esc(code)}</td>'
        f'<td class="num">{len(fs)}</td><td class="num">{fmt(fs[0].step)}</td><td class="num">{fmt(fs[-1].step)}</td></tr>'
        for code, fs in sorted(codes.items(), key=lambda kv: (order.get(kv[1][0].severity, 3), kv[1][0].step))
    )
    table = ("<table><tr><th>severity</th><th>code</th><th>count</th><th>first step</th><th>last step</th></tr>"
             f"{rows}</table>")
    # Per code: its first finding in full, the others folded under <details> (no script needed),
    # up to MAX_FINDINGS in all.
    groups = sorted(codes.values(), key=lambda fs: (order.get(fs[0].severity, 3), fs[0].step))
    budget = start = max(0, MAX_FINDINGS - len(groups))
    parts = []
    for fs in groups:
        parts.append(_finding_html(fs[0]))
        rest = fs[1:1 + budget]
        budget -= len(rest)
        if rest:
            parts.append(f"<details><summary>{len(rest)} more {esc(fs[0].code)} finding{'s' if len(rest) > 1 else ''}"
                         f"</summary>{''.join(_finding_html(f) for f in rest)}</details>")
    shown = len(groups) + start - budget
    more = len(view.findings) - shown
    note = (f'<p class="absent">{more} more findings are not listed here; all are in findings.jsonl '
            f"(<code>gradwatch doctor {esc(view.path)}</code>).</p>") if more > 0 else ""
    return table + "".join(parts) + note


#: Bundle keys whose (small) dict content is shown in full: where the step went non-finite.
_BUNDLE_DETAIL_KEYS = ("localization", "location", "finding")


def _brief(value: Any) -> Any:
    """A bundle value summarized: tensors by shape and dtype, containers by size."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(str(_brief(v)) for v in list(value)[:4])
        return f"{type(value).__name__} of {len(value)}: [{inner}{', ...' if len(value) > 4 else ''}]"
    if isinstance(value, dict):
        return f"dict of {len(value)}: {', '.join(str(k) for k in list(value)[:8])}"
    return value


def _bundle_summary(path: Path) -> str:
    try:
        import torch

        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a bundle that cannot be read is shown, not fatal
        return f'<span class="absent">could not be read with torch.load(weights_only=True): {esc(type(exc).__name__)}: {esc(str(exc)[:200])}</span>'
    if not isinstance(payload, dict):
        return f"<code>{esc(type(payload).__name__)}</code>"
    parts = []
    for key, value in payload.items():
        if key in _BUNDLE_DETAIL_KEYS and isinstance(value, dict):
            if key == "finding":
                value = {k: value.get(k) for k in ("code", "severity", "message") if k in value}
            detail = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(_brief(v))}</td></tr>" for k, v in value.items())
            parts.append(f"<tr><th>{esc(key)}</th><td><table>{detail}</table></td></tr>")
        else:
            parts.append(f"<tr><th>{esc(key)}</th><td>{fmt(_brief(value))}</td></tr>")
    return f"<table>{''.join(parts)}</table>"


def _bundles(view: RunView) -> str:
    if not view.bundles:
        return '<p class="absent">No reproduction bundles: no step was non-finite (or the run kept none).</p>'
    rows = []
    for i, path in enumerate(view.bundles):
        content = _bundle_summary(path) if i < MAX_BUNDLES_OPENED else '<span class="absent">not opened</span>'
        size = path.stat().st_size if path.exists() else 0
        rows.append(f"<tr><td><code class=\"file\">{esc(path.name)}</code></td><td class=\"num\">{size / 1024:.1f} KiB</td><td>{content}</td></tr>")
    return ("<p>Load one with <code>torch.load(path, weights_only=True)</code> to replay the step.</p>"
            "<table><tr><th>bundle</th><th>size</th><th>contents</th></tr>" + "".join(rows) + "</table>")


def _layer_table(views: Sequence[RunView]) -> str:
    same = len(views) > 1 and all(v.layer_names == views[0].layer_names for v in views)
    if len(views) > 1 and not same:
        return "".join(f"<h3>{_run_span(views, i)}</h3>" + _layer_table([v]) for i, v in enumerate(views))
    view = views[0]
    last = {name: [v.last_rms[j] for v in views] for j, name in enumerate(view.layer_names)}
    rms_heads = "".join(f"<th>last grad RMS{(' ' + _run_span(views, i)) if len(views) > 1 else ''}</th>"
                        for i in range(len(views)))
    rows = []
    measured_depth = {name: i for i, name in enumerate(view.layer_names)}
    layers = view.layers or [{"name": n, "depth": i} for i, n in enumerate(view.layer_names)]
    for layer in sorted(layers, key=lambda l: (l.get("depth", 0) if isinstance(l.get("depth"), int) else 0)):
        name = str(layer.get("name", ""))
        values = last.get(name)
        cells = "".join(f'<td class="num">{fmt(v)}</td>' for v in values) if values else \
            f'<td colspan="{len(views)}" class="absent">{"frozen" if not layer.get("measured", True) else "not measured"}</td>'
        rows.append(
            f'<tr><td class="num">{fmt(layer.get("depth", measured_depth.get(name, "")))}</td><td><code>{esc(name)}</code></td>'
            f'<td>{esc(layer.get("type", ""))}</td><td class="num">{fmt(layer.get("numel", ""))}</td>'
            f'<td class="num">{fmt(layer.get("trainable_numel", ""))}</td>{cells}</tr>'
        )
    if not rows:
        return '<p class="absent">No layer table (layers.json is missing).</p>'
    return ("<table><tr><th>depth</th><th>name</th><th>type</th><th>parameters</th><th>trainable</th>"
            f"{rms_heads}</tr>{''.join(rows)}</table>")


#: Severity of each kind of ``events.jsonl`` line in the timeline (unknown kinds: info).
EVENT_SEVERITY = {"rollback": "warning", "lr_backoff": "warning"}


def _lr(values: Any) -> str:
    return ", ".join(f"{float(v):.3g}" for v in values) if isinstance(values, list) else str(values)


def event_message(event: dict[str, Any]) -> str:
    """One plain sentence for one ``events.jsonl`` line (unknown kinds: their fields as ``key=value``).

    Example:
        >>> event_message({"event": "lr_backoff", "step": 9, "lr_before": [0.1], "lr_after": [0.05], "lost_steps": [3, 7]})
        'lr lowered from 0.1 to 0.05 after lost steps 3, 7'
        >>> event_message({"event": "custom", "step": 2, "a": 1})
        'a=1'
    """
    kind = event.get("event", event.get("kind", event.get("type")))
    if kind == "lr_backoff":
        lost = ", ".join(str(s) for s in event.get("lost_steps") or [])
        return f"lr lowered from {_lr(event.get('lr_before'))} to {_lr(event.get('lr_after'))}" + (f" after lost steps {lost}" if lost else "")
    if kind == "rollback":
        return (f"rolled back to the weights after step {event.get('restored_step')}; "
                f"lr lowered from {_lr(event.get('lr_before'))} to {_lr(event.get('lr_after'))}")
    if kind in ("fp16_forecast", "bf16_lost_updates"):
        from ..amp.summary import forecast_lines, lost_update_lines

        lines = forecast_lines(event) if kind == "fp16_forecast" else lost_update_lines(event)
        return " ".join(line.strip() for line in lines[1:])
    rest = {k: v for k, v in event.items() if k not in ("step", "kind", "event", "type")}
    return "; ".join(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v, default=str)}" for k, v in rest.items())


def _timeline(view: RunView) -> list[tuple[Any, str, str, str]]:
    """(step, code, severity, message): every finding and every event that applies, in step order."""
    rows: list[tuple[Any, str, str, str]] = [(f.step, f.code, f.severity, f.message) for f in view.findings]
    for event in view.events:
        if not isinstance(event, dict):
            continue
        kind = str(event.get("event", event.get("kind", event.get("type", "event"))))
        if kind == "fp16_forecast" and event is not view.forecast:
            continue  # forecasts that say nothing worth acting on (gradwatch.amp.forecast_matters) stay out
        try:
            message = event_message(event)
        except Exception:  # a malformed event is shown as its fields
            message = json.dumps(event, default=str)
        rows.append((event.get("step", ""), kind, EVENT_SEVERITY.get(kind, "info"), message))
    return sorted(rows, key=lambda r: r[0] if isinstance(r[0], int) else -1)


def _events(view: RunView) -> str:
    rows = _timeline(view)
    if not rows:
        return '<p class="absent">Nothing happened: no findings, rollbacks, LR backoffs or precision events.</p>'
    body = "".join(
        f'<tr><td class="num">{fmt(step)}</td><td>{esc(code)}</td>'
        f'<td><span class="sev sev-{esc(severity)}">{esc(severity)}</span></td><td>{fmt(message)}</td></tr>'
        for step, code, severity, message in rows[:MAX_EVENTS])
    more = len(rows) - MAX_EVENTS
    note = (f'<p class="absent">{more} more rows: all findings are in findings.jsonl, all events in events.jsonl.</p>'
            if more > 0 else "")
    return ('<table class="events"><tr><th>step</th><th>code</th><th>severity</th><th>message</th></tr>'
            + body + "</table>" + note)


# ----- page -------------------------------------------------------------------------------
Figures = Sequence[tuple[str, str, Callable[..., "str | None"], str]]


def _charts(views: Sequence[RunView], figures: Figures, absent_id: str, absent_text: str) -> list[str]:
    """Each chart with its heading and caption; one that does not apply is left out and named once at the end."""
    out: list[str] = []
    absent = []
    for fig_id, heading, draw, caption in figures:
        try:
            svg = draw(views)
        except Exception as exc:  # one chart that fails must not cost the whole report
            logger.warning("gradwatch report: chart %s could not be drawn: %r", fig_id, exc)
            out.append(f'<h3>{esc(heading)}</h3><p class="absent" id="{esc(fig_id)}-error">This chart could not be drawn '
                       f"({esc(type(exc).__name__)}: {esc(str(exc)[:300])}).</p>")
            continue
        if svg is None:
            absent.append(f'<span id="{esc(fig_id)}-absent">{esc(heading)}</span>')
        else:
            out.append(f'<h3>{esc(heading)}</h3>')
            out.append(f'<figure id="{esc(fig_id)}">{svg_img(svg, heading)}<figcaption>{esc(caption)}</figcaption></figure>')
    if absent:
        out.append(f'<p class="absent" id="{esc(absent_id)}">{esc(absent_text)}, so not drawn: {", ".join(absent)}.</p>')
    return out


def _precursor_note(views: Sequence[RunView]) -> str:
    """Which thresholds the precursor charts draw, and where they come from (meta.json or the defaults)."""
    parts = []
    for i, view in enumerate(views):
        limits = view.precursor_thresholds
        if view.signals is None or limits is None:
            continue
        source = ("as recorded in the run's meta.json" if limits.recorded else
                  "PrecursorConfig's defaults: this run's meta.json does not record its thresholds")
        who = f"{_run_span(views, i)}: " if len(views) > 1 else ""
        parts.append(f"<li>{who}<code>rms_threshold</code> {fmt(limits.rms)}, <code>attention_logit_threshold</code> "
                     f"{fmt(limits.attention_logit)}, <code>log_z_threshold</code> {fmt(limits.log_z)} ({esc(source)})</li>")
    return ('<p id="precursor-thresholds">Signals measured before a loss spike (see docs/precursors.md), each '
            f"with the threshold its finding uses:</p><ul>{''.join(parts)}</ul>")


def build_page(views: Sequence[RunView], figures: Figures, precursor_figures: Figures = ()) -> str:
    """The whole HTML page for one run, or two overlaid (``views[0]`` is run A).

    ``precursor_figures`` are drawn in their own section, only when some run measured precursor signals.

    Example:
        >>> from gradwatch.report.figures import FIGURES  # doctest: +SKIP
        >>> page = build_page([prepare(load_run("runs/exp1"))], FIGURES)  # doctest: +SKIP
    """
    compare = len(views) > 1
    signals = bool(precursor_figures) and any(getattr(v, "signals", None) is not None for v in views)
    title = (f"gradwatch: {views[0].label} vs {views[1].label}" if compare else f"gradwatch: {views[0].label}")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f'<p>Report written {esc(time.strftime("%Y-%m-%d %H:%M:%S"))} by gradwatch. '
        + (f"Run A {_run_span(views, 0)} is drawn solid, run B {_run_span(views, 1)} dashed.</p>" if compare else "</p>"),
        '<nav><a href="#summary">summary</a><a href="#findings">findings</a><a href="#charts">charts</a>'
        + ('<a href="#precursors">early warning</a>' if signals else "")
        + ('<a href="#bundles">bundles</a>' if any(v.bundles for v in views) else "")
        + '<a href="#layers">layers</a><a href="#events">events</a></nav>',
        '<section id="summary"><h2>Summary</h2>',
    ]
    for i, view in enumerate(views):
        out.append((f"<h3>{_run_span(views, i)}</h3>" if compare else "") + _summary(view))
    out.append('</section><section id="findings"><h2>Findings</h2>')
    for i, view in enumerate(views):
        out.append((f"<h3>{_run_span(views, i)}</h3>" if compare else "") + _findings(view))
    out.append('</section><section id="charts"><h2>Charts</h2>')
    out.extend(_charts(views, figures, "charts-absent", "Not recorded in this run, so not drawn"))
    if signals:  # only for a run that measured precursor signals: no empty section, no empty charts
        out.append('</section><section id="precursors"><h2>Early warning: precursor signals</h2>')
        out.append(_precursor_note(views))
        out.extend(_charts(views, precursor_figures, "precursors-absent", "Not measured in this run"))
    if any(view.bundles for view in views):
        out.append('</section><section id="bundles"><h2>Reproduction bundles of non-finite steps</h2>')
        for i, view in enumerate(views):
            out.append((f"<h3>{_run_span(views, i)}</h3>" if compare else "") + _bundles(view))
    out.append('</section><section id="layers"><h2>Layers</h2>' + _layer_table(views))
    out.append('</section><section id="events"><h2>Events: findings, rollbacks, LR backoffs, precision</h2>')
    for i, view in enumerate(views):
        out.append((f"<h3>{_run_span(views, i)}</h3>" if compare else "") + _events(view))
    out.append("</section></main></body></html>\n")
    return "\n".join(out)
