"""gradwatch in a notebook: one-line reprs, HTML reprs and tidy pandas frames.

A Jupyter cell that ends with a :class:`~gradwatch.findings.Finding`, a
:class:`~gradwatch.preflight.result.Probe`, a :class:`~gradwatch.rundir.Run`
or a :class:`~gradwatch.watch.Watch` shows it through ``_repr_html_``; those
methods call the functions here. A run shows its summary, its findings by code
and the report's two key charts (gradient magnitude by layer depth, global
norm and clipping) as PNG ``data:`` images, so it needs no file and no
network; ``gw.report(path)`` still writes the whole page. Every name that
comes from the model or the run directory is escaped (:func:`html.escape`).

``Run.to_pandas()`` (:func:`run_frames`) gives the per-step and the per-layer
history as tidy (long) frames; pandas is optional (``pip install pandas``).
Nothing here is imported by ``import gradwatch``; matplotlib and pandas are
imported only when a chart or a frame is asked for.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .report.page import esc, fmt

if TYPE_CHECKING:  # pragma: no cover
    import pandas

    from .findings import Finding
    from .preflight.result import Probe
    from .rundir import Run
    from .watch import Watch

#: Findings listed in a Run's or a Watch's HTML (the table counts all of them).
MAX_LISTED = 20
#: Layers listed in a Probe's HTML table.
MAX_PROBE_ROWS = 200
#: Longest message shown in a one-line repr.
REPR_MESSAGE_CHARS = 100

_BOX = "font:13px/1.4 system-ui,sans-serif;border:1px solid #ddd;border-radius:4px;padding:8px 12px;margin:4px 0"
_TABLE = "border-collapse:collapse;font-size:12px;margin:4px 0"
_CELL = "border:1px solid #e3e3e3;padding:2px 6px;text-align:left;vertical-align:top"
_SEV_COLORS = {"error": "#c62828", "warning": "#ef6c00", "info": "#757575"}


# ----- one-line reprs ---------------------------------------------------------------------
def _cut(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def finding_repr(finding: "Finding") -> str:
    """``Finding(warning vanishing_gradients at step 5: <message, cut>)``: one line under 200 characters.

    Example:
        >>> from gradwatch.findings import Finding
        >>> finding_repr(Finding("loss_spike", "warning", 12, "The loss jumped from 0.9 to 40."))
        "Finding(warning loss_spike at step 12: 'The loss jumped from 0.9 to 40.')"
    """
    return f"Finding({finding.severity} {finding.code} at step {finding.step}: {_cut(finding.message, REPR_MESSAGE_CHARS)!r})"


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _codes(findings: Sequence["Finding"], limit: int = 3) -> str:
    codes: list[str] = []
    for f in findings:
        if f.code not in codes:
            codes.append(f.code)
    shown = ", ".join(codes[:limit]) + (", \u2026" if len(codes) > limit else "")
    return _n(len(findings), "finding") + (f": {shown}" if codes else "")


def probe_repr(probe: "Probe") -> str:
    """``Probe(12 layers, 3 blocks, loss 2.3, predicted gain 0.01, 1 finding: vanishing_gradients)``.

    Example:
        >>> from gradwatch.preflight.result import Probe
        >>> probe_repr(Probe(loss=2.5, layers=[], blocks=[], predicted_gain=None, measured_gain=0.5,
        ...                  layer_gain=None, per_layer_factor=None, theory_factor=None))
        'Probe(0 layers, 0 blocks, loss 2.5, measured gain 0.5, 0 findings)'
    """
    parts = [_n(len(probe.layers), "layer"), _n(len(probe.blocks), "block"), f"loss {probe.loss:.4g}"]
    for name, value in (("predicted gain", probe.predicted_gain), ("measured gain", probe.measured_gain)):
        if value is not None:
            parts.append(f"{name} {value:.3g}")
    return f"Probe({', '.join(parts)}, {_cut(_codes(probe.findings), 80)})"


def run_repr(run: "Run") -> str:
    """``Run('runs/exp1': 30 steps, 75 layers, fp32, 0 findings)``.

    Example:
        >>> run = load_run("runs/exp1")  # doctest: +SKIP
        >>> repr(run)  # doctest: +SKIP
        "Run('runs/exp1': 30 steps, 75 layers, fp32, 0 findings)"
    """
    steps = int(run.steps["step"].size) if "step" in run.steps else 0
    precision = run.meta.get("precision", "?") if isinstance(run.meta, dict) else "?"
    return (f"Run({_cut(str(run.path), 60)!r}: {_n(steps, 'step')}, {_n(len(run.layer_names), 'layer')}, {precision}, "
            f"{_cut(_codes(run.findings), 70)})")


def watch_repr(watch: "Watch") -> str:
    """``Watch(GPT2LMHeadModel, 75 layers, 30 steps, clip_norm=1.0, fp32, run_dir='runs/x', 0 findings)``.

    Example:
        >>> import torch
        >>> from gradwatch import Watch
        >>> model = torch.nn.Linear(3, 1)
        >>> watch_repr(Watch(model, torch.optim.SGD(model.parameters(), lr=0.1)))
        'Watch(Linear, 1 layer, 0 steps, clip_norm=None, fp32, 0 findings)'
    """
    from .distributed import unwrap_model

    parts = [type(unwrap_model(watch.model)).__name__, _n(len(watch.layers), "layer"), _n(watch.steps_taken, "step"),
             f"clip_norm={_cut(repr(watch.clip_norm), 30)}", watch.precision.mode]
    if watch.run_dir is not None:
        parts.append(f"run_dir={_cut(str(watch.run_dir), 50)!r}")
    if watch.closed:
        parts.append("closed")
    return f"Watch({', '.join(parts)}, {_cut(_codes(watch.findings), 60)})"


# ----- HTML pieces ------------------------------------------------------------------------
def _sev(severity: str) -> str:
    color = _SEV_COLORS.get(severity, "#757575")
    return (f'<span style="background:{color};color:#fff;border-radius:3px;padding:0 5px;font-size:11px;'
            f'font-weight:600">{esc(severity)}</span>')


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An HTML table; ``rows`` hold HTML already escaped."""
    th = "".join(f'<th style="{_CELL};background:#f4f4f4">{esc(h)}</th>' for h in head)
    body = "".join("<tr>" + "".join(f'<td style="{_CELL}">{c}</td>' for c in row) + "</tr>" for row in rows)
    return f'<table style="{_TABLE}"><tr>{th}</tr>{body}</table>'


def _kv(items: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f'<tr><th style="{_CELL};background:#f4f4f4">{esc(k)}</th><td style="{_CELL}">{fmt(v)}</td></tr>'
                   for k, v in items)
    return f'<table style="{_TABLE}">{rows}</table>'


def finding_html(finding: "Finding") -> str:
    """A finding as a person reads it: severity, code, step, message, location, evidence, fixes (escaped).

    Example:
        >>> from gradwatch.findings import Finding
        >>> "&lt;b&gt;" in finding_html(Finding("loss_spike", "warning", 3, "<b>jump</b>"))
        True
    """
    color = _SEV_COLORS.get(finding.severity, "#999")
    parts = [f'<div style="{_BOX};border-left:4px solid {color}">{_sev(finding.severity)} '
             f"<b>{esc(finding.code)}</b> at step {fmt(finding.step)}"
             f'<div style="margin:4px 0">{esc(finding.message)}</div>']
    if finding.location:
        parts.append("<div>location: " + ", ".join(f"{esc(k)}=<code>{fmt(v)}</code>" for k, v in finding.location.items())
                     + "</div>")
    if finding.evidence:
        parts.append("<details><summary>evidence</summary>" + _kv(list(finding.evidence.items())) + "</details>")
    if finding.fixes:
        parts.append("<div>fixes:<ol style=\"margin:2px 0\">" + "".join(f"<li><code>{esc(x)}</code></li>" for x in finding.fixes)
                     + "</ol></div>")
    return "".join(parts) + "</div>"


def findings_table(findings: Sequence["Finding"]) -> str:
    """Findings grouped by code: severity, code, count, first and last step, the first message.

    Example:
        >>> findings_table([])
        '<p><i>No findings.</i></p>'
    """
    if not findings:
        return "<p><i>No findings.</i></p>"
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.code, []).append(f)
    order = {"error": 0, "warning": 1, "info": 2}
    rows = [[_sev(fs[0].severity), esc(code), str(len(fs)), fmt(fs[0].step), fmt(fs[-1].step), esc(_cut(fs[0].message, 160))]
            for code, fs in sorted(groups.items(), key=lambda kv: (order.get(kv[1][0].severity, 3), kv[1][0].step))]
    return _table(("severity", "code", "count", "first step", "last step", "first message"), rows)


def probe_html(probe: "Probe") -> str:
    """The probe's gains, per-layer table and findings as HTML.

    Example:
        >>> from gradwatch.preflight.result import Probe
        >>> "measured gain" in probe_html(Probe(1.0, [], [], None, 0.5, None, None, None))
        True
    """
    gains = _kv([("loss", probe.loss), ("predicted gain (product of block gains)", probe.predicted_gain),
                 ("measured gain (first block input / last block output)", probe.measured_gain),
                 ("first/last layer activation-gradient ratio", probe.layer_gain),
                 ("per-layer factor", probe.per_layer_factor), ("mean-field \u221a\u03c71", probe.theory_factor)])
    rows = []
    for r in probe.layers[:MAX_PROBE_ROWS]:
        std = r.act_std if r.act_std is not None else r.out_std
        rows.append([str(r.depth), f"<code>{esc(r.name)}</code>", esc(r.type), esc(r.activation or "-"), fmt(std),
                     fmt(r.dead_fraction), fmt(r.saturated_fraction), fmt(r.act_grad_norm), fmt(r.backward_factor),
                     fmt(r.init_ratio)])
    more = len(probe.layers) - MAX_PROBE_ROWS
    layers = _table(("depth", "layer", "type", "act", "act std", "dead", "sat", "grad norm", "factor", "init\u00d7"), rows)
    return (f'<div style="{_BOX}"><b>gradwatch probe</b>: {esc(probe_repr(probe))}{gains}'
            + "".join(finding_html(f) for f in probe.findings)
            + f"<details><summary>{len(probe.layers)} layers</summary>{layers}"
            + (f"<p><i>{more} more layers: print(probe.table()).</i></p>" if more > 0 else "")
            + "</details></div>")


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, metadata={"Software": None})
    payload = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img style="max-width:100%" alt="chart" src="data:image/png;base64,{payload}">'


def run_figures_html(run: "Run") -> str:
    """The report's two key charts of ``run`` as PNG ``data:`` images ("" without matplotlib).

    Example:
        >>> run_figures_html(load_run("runs/exp1")).startswith("<img")  # doctest: +SKIP
        True
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "<p><i>Charts need matplotlib: pip install 'gradwatch[report]'.</i></p>"
    from .report import figures
    from .report.prepare import prepare

    view = prepare(run)
    parts = []
    for draw in (figures.draw_depth, figures.draw_grad_norm):
        try:
            with figures._style():
                fig = draw([view])
                if fig is not None:
                    parts.append(_png(fig))
        except Exception as exc:  # a chart that fails must not cost the cell's output
            parts.append(f"<p><i>chart could not be drawn: {esc(type(exc).__name__)}: {esc(str(exc)[:200])}</i></p>")
    return "".join(parts)


def run_html(run: "Run", charts: bool = True) -> str:
    """A run's summary, findings by code and (``charts``) its two key charts, as HTML.

    Example:
        >>> html = run_html(load_run("runs/exp1"))  # doctest: +SKIP
    """
    steps = run.steps
    n = int(steps["step"].size)
    finite = np.isfinite(steps["grad_norm"]) if n else np.zeros(0, bool)
    loss = steps["loss"][np.isfinite(steps["loss"])] if n else np.zeros(0)
    meta = run.meta if isinstance(run.meta, dict) else {}
    summary = _kv([
        ("model", meta.get("model", "?")), ("optimizer", meta.get("optimizer", "?")),
        ("precision", meta.get("precision", "?")), ("clip_norm", meta.get("clip_norm")),
        ("steps", n), ("measured layers", len(run.layer_names)),
        ("skipped steps", int(steps["skipped"].sum()) if n else 0),
        ("clipped steps", int(steps["clipped"].sum()) if n else 0),
        ("last loss", float(loss[-1]) if loss.size else math.nan),
        ("median global norm", float(np.median(steps["grad_norm"][finite])) if finite.any() else math.nan),
    ])
    listed = "".join(finding_html(f) for f in run.findings[:MAX_LISTED])
    more = len(run.findings) - MAX_LISTED
    return (f'<div style="{_BOX}"><b>gradwatch run</b> <code>{esc(run.path)}</code>'
            f'<div style="display:flex;gap:16px;flex-wrap:wrap"><div>{summary}</div><div>{findings_table(run.findings)}</div></div>'
            + (run_figures_html(run) if charts and n else "")
            + (f"<details><summary>{min(len(run.findings), MAX_LISTED)} findings in full</summary>{listed}"
               + (f"<p><i>{more} more: gradwatch doctor {esc(run.path)}</i></p>" if more > 0 else "") + "</details>"
               if run.findings else "")
            + f'<p style="color:#666;font-size:12px">The whole report: <code>gw.report({esc(repr(str(run.path)))})</code>; '
            "the history as frames: <code>run.to_pandas()</code>.</p></div>")


def watch_html(watch: "Watch") -> str:
    """A Watch's state: options, last step, layers and the latest findings, as HTML.

    Example:
        >>> import torch
        >>> from gradwatch import Watch
        >>> model = torch.nn.Linear(3, 1)
        >>> "0 steps" in watch_html(Watch(model, torch.optim.SGD(model.parameters(), lr=0.1)))
        True
    """
    last = watch.history[-1] if watch.history else None
    items: list[tuple[str, Any]] = [("steps", watch.steps_taken), ("measured layers", len(watch.layers)),
                                    ("clip_norm", repr(watch.clip_norm)), ("precision", watch.precision.mode),
                                    ("run_dir", str(watch.run_dir) if watch.run_dir is not None else "None (in memory)"),
                                    ("state", "closed" if watch.closed else watch.state.name)]
    if last is not None:
        items += [("last step", last.step), ("last loss", last.loss), ("last global norm (pre-clip)", last.grad_norm),
                  ("last step clipped", last.clipped), ("last step skipped", last.skipped)]
    latest = watch.findings[-MAX_LISTED:]
    names = watch.layers
    shown = ", ".join(names[:6]) + (f", \u2026 ({len(names) - 8} more) \u2026, " + ", ".join(names[-2:]) if len(names) > 8
                                    else ", ".join([""] + names[6:]) if len(names) > 6 else "")
    return (f'<div style="{_BOX}"><b>gradwatch Watch</b>: {esc(watch_repr(watch))}{_kv(items)}'
            f"<div>layers (depth order): <code>{esc(shown)}</code></div>"
            f"{findings_table(watch.findings)}"
            + (f"<details><summary>latest {len(latest)} findings in full</summary>"
               + "".join(finding_html(f) for f in latest) + "</details>" if latest else "")
            + "</div>")


# ----- pandas -------------------------------------------------------------------------------
@dataclass
class RunFrames:
    """A run's history as two tidy pandas frames.

    ``steps``: one row per step (``step``, ``loss``, ``grad_norm`` (pre-clip),
    ``clip_coef``, ``clip_threshold``, ``clipped``, ``skipped``, ``loss_scale``,
    ``time_ms``). ``layers``: one row per (step, layer), long format (``step``,
    ``layer`` (ordered by depth), ``depth``, ``type``, ``grad_norm`` (pre-clip),
    ``grad_rms`` (norm / sqrt(trainable elements)), ``weight_norm`` and
    ``update_ratio`` (both NaN on steps where they were not measured: the weight norms
    on every update-ratio step, the ratio on each layer's share of them)).
    """

    steps: "pandas.DataFrame"
    layers: "pandas.DataFrame"


STEP_COLUMNS = ("step", "loss", "grad_norm", "clip_coef", "clip_threshold", "clipped", "skipped", "loss_scale", "time_ms")


def run_frames(run: "Run") -> RunFrames:
    """``Run.to_pandas()``: the per-step and per-layer history as tidy frames.

    Raises:
        ImportError: pandas is not installed (``pip install pandas``, or ``pip install 'gradwatch[notebook]'``).

    Example:
        >>> frames = run_frames(load_run("runs/exp1"))  # doctest: +SKIP
        >>> frames.layers.pivot(index="step", columns="layer", values="grad_norm")  # doctest: +SKIP
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("Run.to_pandas() needs pandas: pip install pandas "
                          "(or pip install 'gradwatch[notebook]')") from exc
    steps = run.steps
    n = int(steps["step"].size)
    step_frame = pd.DataFrame({key: steps[key] if key in steps else np.full(n, np.nan) for key in STEP_COLUMNS})
    names = list(run.layer_names)
    width = len(names)
    types = {str(layer.get("name")): str(layer.get("type", "")) for layer in run.layers if isinstance(layer, dict)}

    def flat(key: str) -> np.ndarray:  # (S, L) -> S * L, row-major: every layer of step 1, then step 2...
        values = steps.get(key)
        if values is None or values.shape != (n, width):
            return np.full(n * width, np.nan)
        return np.asarray(values, dtype=np.float64).reshape(-1)

    rms = run.layer_rms() if width else np.zeros((n, 0))
    layer_frame = pd.DataFrame({
        "step": np.repeat(steps["step"], width),
        "layer": pd.Categorical(np.tile(np.array(names, dtype=object), n), categories=names, ordered=True),
        "depth": np.tile(np.arange(width), n),
        "type": np.tile(np.array([types.get(name, "") for name in names], dtype=object), n),
        "grad_norm": flat("layer_grad_norms"),
        "grad_rms": np.asarray(rms, dtype=np.float64).reshape(-1),
        "weight_norm": flat("layer_weight_norms"),
        "update_ratio": flat("update_ratio"),
    })
    return RunFrames(steps=step_frame, layers=layer_frame)
