"""The report's charts, drawn with matplotlib and returned as SVG text.

Each ``fig_*`` function takes one or two :class:`~.prepare.RunView` (two when
comparing: run A solid, run B dashed) and returns the SVG of one chart, or None
when no run has the data it shows. matplotlib is imported here only, never by
``import gradwatch``. Figures are built with ``matplotlib.figure.Figure``
directly (no pyplot, no global state). Every name that comes from the run
(layer names, run labels) goes through :func:`_text`, which escapes ``$`` so
matplotlib never reads a layer name as math; a fixed SVG hash salt makes the
same run give the same bytes.
"""

from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from . import data
from .prepare import RunView

#: Line colour of run A and run B in single-series charts.
RUN_COLORS = ("#1f77b4", "#d62728")
RUN_STYLES = ("-", "--")
SEVERITY_COLORS = {"error": "#d62728", "warning": "#ff7f0e", "info": "#7f7f7f"}
WIDTH = 9.0  # inches at 100 dpi: 900 px, the width of the page's column


@contextmanager
def _style() -> Iterator[None]:
    import matplotlib

    with matplotlib.rc_context({
        "svg.hashsalt": "gradwatch",  # deterministic ids
        "svg.fonttype": "path",  # glyphs as paths: no font needed in the browser
        "font.size": 9,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "figure.dpi": 100,
    }):
        yield


def _new(height: float, **kwargs: Any) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(WIDTH, height), layout="constrained", **kwargs)


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _palette(name: str, count: int, lo: float = 0.15, hi: float = 0.85) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return [cmap(v) for v in (np.linspace(lo, hi, count) if count > 1 else [hi])]


def _depth_ticks(ax: Any, names: Sequence[str], max_labels: int = 24) -> None:
    """Layer ticks without the common prefix; with many layers one label per block, a minor tick per layer."""
    n = len(names)
    if n == 0:
        return
    ticks, labels = data.depth_ticks(names, max_labels)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short(label) for label in labels], rotation=45, ha="right", fontsize=7)
    if n > len(ticks):
        ax.set_xticks(np.arange(n), minor=True)
        ax.tick_params(axis="x", which="minor", length=2)
    ax.set_xlim(-0.5, n - 0.5)


def _prefix_note(names: Sequence[str]) -> str:
    """" (names after 'transformer.')" for an axis label, when every name shares a prefix."""
    prefix = data.common_prefix(names)
    return f" (names after '{_text(prefix)}')" if prefix else ""


def _finish(fig: Any) -> Any:
    """Plain tick labels on every numeric axis (no offset, no ``1.06×10⁰``: see :func:`.data.tick_text`);
    axes whose ticks were named (layers) keep their labels."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter, ScalarFormatter

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if not isinstance(axis.get_major_formatter(), (ScalarFormatter, LogFormatter)):
                continue
            axis.set_major_formatter(FuncFormatter(lambda v, pos: data.tick_text(v)))
            if axis.get_scale() == "log":
                axis.set_minor_formatter(FuncFormatter(lambda v, pos, axis=axis: _minor_text(axis, v)))
            else:
                axis.set_minor_formatter(NullFormatter())
    return fig


def _minor_text(axis: Any, value: float) -> str:
    """Minor ticks of a log axis are labelled only on a short span (else they crowd): all of them under
    a factor 3, those at 2, 3 and 5 times a power of ten under a factor 30, none beyond."""
    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and value > 0) or hi / lo >= 30:
        return ""
    mantissa = round(value / 10.0 ** np.floor(np.log10(value)), 6)
    return data.tick_text(value) if hi / lo < 3 or mantissa in (2.0, 3.0, 5.0) else ""


def _text(value: object) -> str:
    """A user-derived string made literal for matplotlib (``$`` would start math text)."""
    return str(value).replace("$", "\\$")


class _Depth:
    """The x axis of a by-layer chart: the layer index, or the relative depth (0 first, 1 last)
    when two runs with different layers share the chart (so the first and last layers line up)."""

    def __init__(self, layer_lists: Sequence[Sequence[str]]) -> None:
        lists = [list(names) for names in layer_lists if len(names)]
        self.relative = len(lists) > 1 and any(names != lists[0] for names in lists)
        self.names = max(lists, key=len) if lists else []

    def x(self, n: int) -> np.ndarray:
        if self.relative:
            return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(n)
        return np.arange(n)

    def axis(self, ax: Any, label: str) -> None:
        if self.relative:
            ax.set_xlim(-0.03, 1.03)
            ax.set_xlabel(f"{label}: relative depth (0 = first layer, 1 = last; the runs' layers differ)")
        else:
            _depth_ticks(ax, self.names)
            blocks = len(data.depth_ticks(self.names)[0]) < len(self.names)
            ax.set_xlabel(label + _prefix_note(self.names) + ("; a label marks the first layer of each block" if blocks else ""))


def _short(name: str, limit: int = 28) -> str:
    return _text(name if len(name) <= limit else "\u2026" + name[-(limit - 1):])


def _layer_line(ax: Any, x: np.ndarray, y: np.ndarray, norm: np.ndarray, style: str, color: Any, label: str,
                linewidth: float = 1.3, **kwargs: Any) -> bool:
    """One step's by-layer values: weight layers as one line, normalization layers as their own series
    (hollow diamonds on a thin dotted line), so the line does not zig-zag between the two kinds.
    Returns whether normalization layers were drawn."""
    x, y = np.asarray(x), np.asarray(y)
    norm = np.asarray(norm, dtype=bool) if len(norm) == len(y) else np.zeros(len(y), bool)
    ax.plot(x[~norm], y[~norm], style, color=color, marker="o", markersize=2.5, linewidth=linewidth, label=label, **kwargs)
    if norm.any():
        ax.plot(x[norm], y[norm], linestyle=":", color=color, marker="D", markersize=3, markerfacecolor="none",
                linewidth=0.8, **kwargs)
    return bool(norm.any())


def _norm_legend_entry(ax: Any, drawn: bool) -> None:
    """One legend entry that says how normalization layers are drawn (when some were)."""
    if drawn:
        ax.plot([], [], linestyle=":", color="#555555", marker="D", markersize=3, markerfacecolor="none",
                linewidth=0.8, label="normalization layers (same colours)")


def _positive(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(values) & (values > 0), values, np.nan)


def _top_marks(ax: Any, steps: Sequence[int], color: str, label: str) -> None:
    """Markers along the top edge of ``ax`` at the given steps (x in data, y in axes units)."""
    if not steps:
        return
    transform = ax.get_xaxis_transform()
    ax.plot(steps, np.full(len(steps), 0.97), linestyle="none", marker="x", color=color,
            transform=transform, label=label, clip_on=False)


def _legend(ax: Any, **kwargs: Any) -> None:
    """A legend right of the axes, never over the data; only when something labelled was drawn
    (matplotlib warns otherwise). Constrained layout narrows the axes to make room."""
    kwargs.pop("loc", None)
    kwargs.pop("ncols", None)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kwargs)


def _log_if_positive(ax: Any, base: float = 10) -> None:
    """Log y scale when the axes hold a positive finite value (matplotlib warns otherwise)."""
    for line in ax.get_lines():
        y = np.asarray(line.get_ydata(), dtype=np.float64)
        if line.get_transform() is ax.transData and np.any(np.isfinite(y) & (y > 0)):
            ax.set_yscale("log", base=base)
            return


def _any_positive(values: Any) -> bool:
    values = np.asarray(values, dtype=np.float64)
    return bool(np.any(np.isfinite(values) & (values > 0)))


def _runs_label(views: Sequence[RunView], i: int) -> str:
    return f"{_text(views[i].label)}: " if len(views) > 1 else ""


# ----- charts -----------------------------------------------------------------------------
def draw_depth(views: Sequence[RunView]) -> Any:
    """Gradient RMS by layer depth (log y), one line per checkpoint step, first layer on the left."""
    if not any(v.checkpoints.size for v in views):
        return None
    with _style():
        fig = _new(4.0)
        ax = fig.add_subplot()
        cmaps = ("viridis", "Oranges") if len(views) > 1 else ("viridis",)
        depth = _Depth([v.layer_names for v in views])
        norms = False
        for i, view in enumerate(views):
            rows = view.checkpoints
            if len(views) > 1 and rows.size > 3:  # fewer lines per run when two runs share the chart
                rows = rows[np.unique(np.linspace(0, rows.size - 1, 3).round().astype(int))]
            colors = _palette(cmaps[i], len(rows), 0.1 if i == 0 else 0.45, 0.85 if i == 0 else 0.95)
            for color, row in zip(colors, rows):
                norms |= _layer_line(ax, depth.x(view.rms.shape[1]), _positive(view.rms[row]), view.norm, RUN_STYLES[i],
                                     color, f"{_runs_label(views, i)}step {int(view.steps[row])}", linewidth=1.4)
        _norm_legend_entry(ax, norms)
        ax.set_yscale("log")
        ax.set_ylabel("gradient RMS (before clipping)")
        depth.axis(ax, "layer, in depth (execution) order")
        _legend(ax, ncols=2 if len(views) > 1 else 1, loc="best")
        return _finish(fig)


def draw_heatmap(views: Sequence[RunView]) -> Any:
    """Layer x step heatmap of log10 gradient RMS (one panel per run, shared colour scale)."""
    maps = [data.heatmap(v.rms, v.steps) if v.rms.size else None for v in views]
    if not any(m is not None and np.isfinite(m.z).any() for m in maps):
        return None
    finite = np.concatenate([m.z[np.isfinite(m.z)] for m in maps if m is not None])
    vmin, vmax = float(np.percentile(finite, 1)), float(np.percentile(finite, 99))
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    with _style():
        import matplotlib

        fig = _new(3.4 * len(views))
        cmap = matplotlib.colormaps["magma"].with_extremes(bad="#dddddd")
        image = None
        for i, (view, hm) in enumerate(zip(views, maps)):
            ax = fig.add_subplot(len(views), 1, i + 1)
            ax.grid(False)
            if hm is None or hm.z.size == 0:
                ax.set_title(f"{_text(view.label)}: no per-layer gradients", fontsize=8)
                continue
            extent = (float(hm.step_edges[0]) - 0.5, float(hm.step_edges[-1]) - 0.5, hm.z.shape[0], 0)
            image = ax.imshow(hm.z, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, extent=extent,
                              interpolation="nearest")
            layer_ticks, labels = data.depth_ticks(view.layer_names, 16)
            row_of = np.searchsorted(hm.layer_rows, layer_ticks, side="right") - 1  # the row holding each layer
            ax.set_yticks(row_of + 0.5)
            ax.set_yticklabels([_short(label) for label in labels], fontsize=7)
            ax.set_ylabel("layer (first at top)" + _prefix_note(view.layer_names))
            if len(views) > 1:
                ax.set_title(_text(view.label), fontsize=8)
            if i == len(views) - 1:
                ax.set_xlabel("step")
        if image is not None:
            fig.colorbar(image, ax=fig.axes, label="log10 gradient RMS", shrink=0.9)
        return _finish(fig)


def draw_grad_norm(views: Sequence[RunView]) -> Any:
    """Global gradient norm before clipping, the clip threshold, clipped share and skipped steps."""
    if not any(v.n_steps for v in views):
        return None
    with _style():
        fig = _new(4.2)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        for i, view in enumerate(views):
            if not view.n_steps:
                continue
            xs, ys = data.minmax_downsample(view.steps, _positive(view.grad_norm))
            top.plot(xs, ys, RUN_STYLES[i], color=RUN_COLORS[i], linewidth=1.0,
                     label=f"{_runs_label(views, i)}global norm (pre-clip)")
            if view.threshold is not None:
                top.axhline(view.threshold, color=RUN_COLORS[i], linestyle=":", linewidth=1.2,
                            label=f"{_runs_label(views, i)}clip threshold {view.threshold:g}")
            elif view.threshold_per_step is not None and _any_positive(view.threshold_per_step):
                # adaptive clipping (AutoClip, ZClip): the threshold each step applied, as recorded
                xs, ys = data.minmax_downsample(view.steps, _positive(view.threshold_per_step))
                top.plot(xs, ys, linestyle=":", color=RUN_COLORS[i], linewidth=1.2,
                         label=f"{_runs_label(views, i)}clip threshold (adaptive)")
            else:  # older runs without per-step thresholds: norm x coefficient where it clipped
                with np.errstate(invalid="ignore"):
                    applied = np.where(view.clipped, view.grad_norm * view.clip_coef, np.nan)
                if _any_positive(applied):
                    xs, ys = data.minmax_downsample(view.steps[view.clipped], _positive(applied[view.clipped]))
                    top.plot(xs, ys, linestyle="none", marker=".", markersize=2.5, color=RUN_COLORS[i], alpha=0.6,
                             label=f"{_runs_label(views, i)}threshold applied (adaptive clipping)")
            bad = view.steps[~np.isfinite(view.grad_norm)]
            _top_marks(top, data.thin_steps(bad.tolist()), SEVERITY_COLORS["error"] if i == 0 else "#9467bd",
                       f"{_runs_label(views, i)}non-finite norm")
            centre, share, _ = data.flag_buckets(view.steps, view.clipped)
            bottom.step(centre, share, where="mid", color=RUN_COLORS[i], linestyle=RUN_STYLES[i], linewidth=1.0,
                        label=f"{_runs_label(views, i)}share clipped")
            skipped = view.steps[view.skipped]
            if skipped.size:
                bottom.plot(data.thin_steps(skipped.tolist()), np.full(min(skipped.size, 300), 1.05), linestyle="none",
                            marker="v", color=SEVERITY_COLORS["error"], markersize=4,
                            label=f"{_runs_label(views, i)}skipped step")
        _log_if_positive(top)
        top.set_ylabel("gradient norm")
        _legend(top, loc="best")
        bottom.set_ylim(-0.05, 1.15)
        bottom.set_ylabel("clipped")
        bottom.set_xlabel("step")
        _legend(bottom, loc="upper left", ncols=2)
        return _finish(fig)


def draw_loss(views: Sequence[RunView]) -> Any:
    """Loss over steps, each finding marked (vertical line coloured by severity) where it happened."""
    if not any(v.n_steps for v in views):
        return None
    with _style():
        fig = _new(3.6)
        ax = fig.add_subplot()
        all_loss = np.concatenate([v.loss[np.isfinite(v.loss)] for v in views])
        log = bool(all_loss.size and all_loss.min() > 0 and all_loss.max() / all_loss.min() > 50)
        for i, view in enumerate(views):
            if not view.n_steps:
                continue
            xs, ys = data.minmax_downsample(view.steps, np.where(np.isfinite(view.loss), view.loss, np.nan))
            ax.plot(xs, ys, RUN_STYLES[i], color=RUN_COLORS[i], linewidth=1.0, label=f"{_runs_label(views, i)}loss")
            bad = view.steps[~np.isfinite(view.loss)]
            _top_marks(ax, data.thin_steps(bad.tolist()), "#9467bd", f"{_runs_label(views, i)}non-finite loss")
            for severity in ("info", "warning", "error"):
                marks = data.thin_steps([f.step for f in view.findings if f.severity == severity])
                if marks:
                    ax.vlines(marks, 0, 1, transform=ax.get_xaxis_transform(), colors=SEVERITY_COLORS[severity],
                              linestyles=RUN_STYLES[i], linewidth=0.8, alpha=0.6,
                              label=f"{_runs_label(views, i)}{severity} finding")
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("loss")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def draw_gain(views: Sequence[RunView]) -> Any:
    """Effective per-layer gain over steps (exp(-slope) of log RMS vs depth); 1 is healthy."""
    if not any(np.isfinite(v.gain).any() for v in views):
        return None
    with _style():
        fig = _new(3.2)
        ax = fig.add_subplot()
        for i, view in enumerate(views):
            xs, ys = data.minmax_downsample(view.steps, _positive(view.gain))
            ax.plot(xs, ys, RUN_STYLES[i], color=RUN_COLORS[i], linewidth=1.0,
                    label=f"{_runs_label(views, i)}effective per-layer gain")
        ax.axhline(1.0, color="#2ca02c", linestyle=":", linewidth=1.2, label="1.0 (gradients flow)")
        ax.set_yscale("log")
        ax.set_ylabel("gain per layer")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def draw_update_ratio(views: Sequence[RunView]) -> Any:
    """Update-to-weight ratio ||dw||/||w|| per layer at a few measured steps, with the 1e-3 guide."""
    if not any(_any_positive(v.update_ratio) for v in views):
        return None
    with _style():
        fig = _new(3.8)
        ax = fig.add_subplot()
        cmaps = ("viridis", "Oranges")
        depth = _Depth([v.layer_names for v in views])
        norms = False
        for i, view in enumerate(views):
            ratio = view.update_ratio
            measured = np.flatnonzero((np.isfinite(ratio) & (ratio > 0)).any(axis=1)) if ratio.size else np.zeros(0, np.int64)
            if not measured.size:
                continue
            picks = data.checkpoint_rows(measured, np.ones(measured.size, bool), 6 if len(views) == 1 else 3)
            values = ratio[measured]
            # a rotating share of the layers per measurement (update_ratio_budget): each line shows
            # every layer's latest ratio as of its step
            rotating = bool((np.isfinite(values).any(axis=0) & ~np.isfinite(values)).any())
            if rotating:
                values = data.carried_forward(values)
            colors = _palette(cmaps[i], len(picks), 0.1 if i == 0 else 0.45, 0.85 if i == 0 else 0.95)
            for color, pick in zip(colors, picks):
                label = f"{_runs_label(views, i)}step {int(view.steps[measured[pick]])}" + (" (latest per layer)" if rotating else "")
                norms |= _layer_line(ax, depth.x(view.update_ratio.shape[1]), _positive(values[pick]), view.norm,
                                     RUN_STYLES[i], color, label, linewidth=1.2)
        _norm_legend_entry(ax, norms)
        ax.axhline(1e-3, color="#7f7f7f", linestyle=":", linewidth=1.2, label="1e-3 (rule of thumb)")
        ax.set_yscale("log")
        ax.set_ylabel("||update|| / ||weight||")
        depth.axis(ax, "layer, in depth order")
        _legend(ax, ncols=2 if len(views) > 1 else 1, loc="best")
        return _finish(fig)


def draw_act_grad(views: Sequence[RunView]) -> Any:
    """Activation-gradient RMS (dL/dh on each layer's output) by depth, on the sampled steps."""
    if not any(v.act_grad is not None and _any_positive(v.act_grad.rms) for v in views):
        return None
    with _style():
        fig = _new(3.8)
        ax = fig.add_subplot()
        cmaps = ("viridis", "Oranges")
        depth = _Depth([v.act_grad.layers for v in views if v.act_grad is not None])
        norms = False
        for i, view in enumerate(views):
            curve = view.act_grad
            if curve is None:
                continue
            usable = (np.isfinite(curve.rms) & (curve.rms > 0)).any(axis=1)
            rows = data.checkpoint_rows(curve.steps, usable, 6 if len(views) == 1 else 3)
            if not rows.size:
                continue
            colors = _palette(cmaps[i], len(rows), 0.1 if i == 0 else 0.45, 0.85 if i == 0 else 0.95)
            for color, row in zip(colors, rows):
                norms |= _layer_line(ax, depth.x(len(curve.layers)), _positive(curve.rms[row]), view.norm_of(curve.layers),
                                     RUN_STYLES[i], color, f"{_runs_label(views, i)}step {int(curve.steps[row])}", linewidth=1.2)
        _norm_legend_entry(ax, norms)
        ax.set_yscale("log")
        ax.set_ylabel("RMS of dL/dh (activation gradient)")
        depth.axis(ax, "layer output, in depth order")
        _legend(ax, ncols=2 if len(views) > 1 else 1, loc="best")
        return _finish(fig)


def draw_activations(views: Sequence[RunView]) -> Any:
    """Dead and saturated fractions per sampled layer: latest sample and mean over samples."""
    stats = [v.activations for v in views]
    kinds = [k for k in ("dead", "saturated") if any(s is not None and k in s.series for s in stats)]
    if not kinds:
        return None
    with _style():
        fig = _new(3.2 * len(kinds))
        axes = fig.subplots(len(kinds), 1, squeeze=False)[:, 0]
        for ax, kind in zip(axes, kinds):
            depth = _Depth([s.layers for s in stats if s is not None and kind in s.series])
            for i, (view, stat) in enumerate(zip(views, stats)):
                if stat is None or kind not in stat.series:
                    continue
                table = stat.series[kind]
                with np.errstate(invalid="ignore"):
                    counts = np.isfinite(table).sum(axis=0)
                    mean = np.where(counts > 0, np.nansum(table, axis=0) / np.maximum(counts, 1), np.nan)
                latest = data.last_finite_rows(table)
                x = depth.x(len(stat.layers))
                ax.plot(x, latest, RUN_STYLES[i], color=RUN_COLORS[i], marker="o", markersize=3,
                        label=f"{_runs_label(views, i)}latest sample (step {int(stat.steps[-1])})")
                ax.plot(x, mean, RUN_STYLES[i], color=RUN_COLORS[i], alpha=0.45, linewidth=1.0,
                        label=f"{_runs_label(views, i)}mean of {stat.steps.size} samples")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(f"{kind} fraction")
            depth.axis(ax, "sampled activation, in depth order")
            _legend(ax, loc="best")
        return _finish(fig)


def draw_loss_scale(views: Sequence[RunView]) -> Any:
    """The fp16 loss scale over steps (log2 y), with the steps the scaler skipped."""
    if not any(v.has_loss_scale for v in views):
        return None
    with _style():
        fig = _new(3.0)
        ax = fig.add_subplot()
        for i, view in enumerate(views):
            if not view.has_loss_scale:
                continue
            xs, ys = data.minmax_downsample(view.steps, _positive(view.loss_scale))
            ax.plot(xs, ys, RUN_STYLES[i], color=RUN_COLORS[i], linewidth=1.2, drawstyle="steps-post",
                    label=f"{_runs_label(views, i)}loss scale")
            _top_marks(ax, data.thin_steps(view.steps[view.skipped].tolist()), SEVERITY_COLORS["error"],
                       f"{_runs_label(views, i)}skipped step")
        ax.set_yscale("log", base=2)
        ax.set_ylabel("loss scale")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def _latest_forecast(view: RunView) -> dict[str, Any] | None:
    """The run's latest fp16 forecast, when it is worth showing (:func:`gradwatch.amp.forecast_matters`)."""
    event = view.forecast
    return event if isinstance(event, dict) and isinstance(event.get("layers"), list) and event["layers"] else None


def _shares(block: Any, key: str, n: int) -> np.ndarray:
    values = (block or {}).get(key) if isinstance(block, dict) else None
    out = np.full(n, np.nan)
    for i, v in enumerate((values or [])[:n]):
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def draw_fp16_forecast(views: Sequence[RunView]) -> Any:
    """Per layer, the share of gradient elements float16 would flush to zero, at the run's
    loss scale and at the reference scale (the precision plugin's latest ``fp16_forecast``)."""
    events = [_latest_forecast(v) for v in views]
    if not any(events):
        return None
    with _style():
        fig = _new(3.4)
        ax = fig.add_subplot()
        depth = _Depth([[str(n) for n in e["layers"]] for e in events if e is not None])
        norms = False
        for i, (view, event) in enumerate(zip(views, events)):
            if event is None:
                continue
            layers = [str(n) for n in event["layers"]]
            x = depth.x(len(layers))
            for key, alpha in (("current", 1.0), ("reference", 0.55)):
                block = event.get(key)
                if not isinstance(block, dict) or block.get("scale") is None:
                    continue
                norms |= _layer_line(ax, x, _shares(block, "flushed", len(layers)), view.norm_of(layers), RUN_STYLES[i],
                                     RUN_COLORS[i], f"{_runs_label(views, i)}flushed at scale {float(block['scale']):g} "
                                     f"(step {event.get('step')})", linewidth=1.0, alpha=alpha)
        _norm_legend_entry(ax, norms)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("share flushed to zero in fp16")
        depth.axis(ax, "layer, in depth order")
        _legend(ax, loc="best")
        return _finish(fig)


# ----- precursor signals (signals.jsonl; docs/precursors.md) -------------------------------
#: Points of a precursor series coloured by their layer (the largest values, when there are more).
MAX_LAYER_POINTS = 600


def _threshold_lines(ax: Any, views: Sequence[RunView], field: str, name: str, negative: bool = False) -> None:
    """The runs' threshold as a horizontal line, labelled with its value (one line when the runs agree);
    ``negative`` also draws it below zero (a rule on an absolute value)."""
    shown: list[float] = []
    for i, view in enumerate(views):
        limits = view.precursor_thresholds
        if limits is None or view.signals is None:
            continue
        value = float(getattr(limits, field))
        if value in shown:
            continue
        shown.append(value)
        source = "" if limits.recorded else " (PrecursorConfig default: not recorded by this run)"
        who = _runs_label(views, i) if len(views) > 1 and len(shown) > 1 else ""
        ax.axhline(value, color="#2ca02c" if i == 0 else "#8c564b", linestyle=":", linewidth=1.3,
                   label=f"{who}{name} = {value:g}{source}")
        if negative:
            ax.axhline(-value, color="#2ca02c" if i == 0 else "#8c564b", linestyle=":", linewidth=1.3)


def _finding_lines(ax: Any, views: Sequence[RunView], code: str) -> None:
    """A vertical line at each step where ``code`` was raised, coloured by the finding's severity."""
    for i, view in enumerate(views):
        for severity in ("info", "warning", "error"):
            marks = data.thin_steps([f.step for f in view.findings if f.code == code and f.severity == severity])
            if marks:
                ax.vlines(marks, 0, 1, transform=ax.get_xaxis_transform(), colors=SEVERITY_COLORS[severity],
                          linestyles=RUN_STYLES[i], linewidth=1.0, alpha=0.8,
                          label=f"{_runs_label(views, i)}{code} raised")


def _series_line(ax: Any, steps: np.ndarray, values: np.ndarray, style: str, color: Any, label: str,
                 linewidth: float = 1.0, **kwargs: Any) -> None:
    """A sparse series (the steps that measured it) as a line, with markers while the points are few."""
    xs, ys = data.minmax_downsample(steps, np.where(np.isfinite(values), values, np.nan))
    ax.plot(xs, ys, style, color=color, linewidth=linewidth, marker="o" if xs.size <= 200 else None,
            markersize=2.5, label=label, **kwargs)


def _log_if_wide(ax: Any, values: Sequence[np.ndarray], factor: float = 30.0) -> None:
    """Log y when every value is positive and they span more than ``factor``."""
    finite = np.concatenate([np.asarray(v, dtype=np.float64)[np.isfinite(v)] for v in values] or [np.zeros(0)])
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > factor:
        ax.set_yscale("log")


def draw_adam_rms(views: Sequence[RunView]) -> Any:
    """Adam's RMS_t, the largest over layers, on each measured step; its points coloured by the layer
    that had it; the ``rms_threshold`` line and the steps ``update_spike_precursor`` was raised."""
    if not any(v.signals is not None and np.isfinite(v.signals.rms_max).any() for v in views):
        return None
    with _style():
        fig = _new(3.6)
        ax = fig.add_subplot()
        markers = ("o", "s")
        for i, view in enumerate(views):
            s = view.signals
            if s is None or not np.isfinite(s.rms_max).any():
                continue
            _series_line(ax, s.rms_steps, s.rms_max, RUN_STYLES[i], RUN_COLORS[i],
                         f"{_runs_label(views, i)}max RMS_t over layers", linewidth=0.9, alpha=0.7)
            values = np.where(np.isfinite(s.rms_max), s.rms_max, -np.inf)
            picks = np.argsort(-values, kind="stable")[:MAX_LAYER_POINTS]
            picks = picks[np.isfinite(values[picks])]
            layers = np.array(s.rms_layer, dtype=object)
            peak_of: dict[str, float] = {}
            for j in picks.tolist():
                peak_of[layers[j]] = max(peak_of.get(layers[j], -np.inf), values[j])
            top = sorted(peak_of, key=lambda name: -peak_of[name])[:6]
            colors = _palette("tab10", 10, 0.0, 1.0)
            for k, layer in enumerate(top):
                rows = picks[layers[picks] == layer]
                ax.plot(s.rms_steps[rows], s.rms_max[rows], linestyle="none", marker=markers[i], markersize=3.5,
                        color=colors[k % 10], label=f"{_runs_label(views, i)}max in {_short(layer)}")
            rest = picks[~np.isin(layers[picks], top)]
            if rest.size:
                ax.plot(s.rms_steps[rest], s.rms_max[rest], linestyle="none", marker=markers[i], markersize=2.5,
                        color="#999999", label=f"{_runs_label(views, i)}max in another layer")
            j = int(np.argmax(values))
            ax.annotate(f"{_short(str(layers[j]))}: {s.rms_max[j]:.3g}", (s.rms_steps[j], s.rms_max[j]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7, color=RUN_COLORS[i])
        _threshold_lines(ax, views, "rms", "rms_threshold")
        _finding_lines(ax, views, data.PRECURSOR_CODES["adam_rms"])
        ax.axhline(1.0, color="#7f7f7f", linestyle="--", linewidth=0.8, label="1 (v tracks g²)")
        _log_if_wide(ax, [v.signals.rms_max for v in views if v.signals is not None])
        ax.set_ylabel("Adam RMS_t = sqrt(mean(g² / v))")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def _signal_tables(views: Sequence[RunView],
                   columns: Callable[[data.PrecursorSeries], tuple[np.ndarray, np.ndarray, list[str]]]
                   ) -> list[tuple[int, np.ndarray, np.ndarray, list[str]]]:
    """``(run index, steps, table, column names)`` of every run whose (steps x columns) signal table
    ``columns`` picks has a finite value; empty: no figure."""
    out = []
    for i, view in enumerate(views):
        if view.signals is not None:
            steps, table, names = columns(view.signals)
            if np.isfinite(table).any():
                out.append((i, steps, table, names))
    return out


def _top_columns(ax: Any, views: Sequence[RunView], i: int, steps: np.ndarray, table: np.ndarray,
                 names: list[str], what: str) -> None:
    """Run ``i``'s (steps x columns) ``table``: a line for each of the six columns with the largest
    peaks, and a thicker one for the max over every column when there are several."""
    with np.errstate(invalid="ignore"):
        finite = np.where(np.isfinite(table), table, -np.inf)
        peaks = finite.max(axis=0)
    order = [j for j in np.argsort(-peaks, kind="stable").tolist() if np.isfinite(peaks[j])]
    top = order[:6]
    colors = [RUN_COLORS[i]] if len(top) == 1 else _palette(
        "viridis" if i == 0 else "Oranges", len(top), 0.1 if i == 0 else 0.45, 0.85 if i == 0 else 0.95)
    for color, j in zip(colors, top):
        measured = np.isfinite(table[:, j])
        _series_line(ax, steps[measured], table[measured, j], RUN_STYLES[i], color,
                     f"{_runs_label(views, i)}{_short(names[j])}", linewidth=0.9)
    if len(order) > 1:
        peak = finite.max(axis=1)
        _series_line(ax, steps, np.where(np.isfinite(peak), peak, np.nan), RUN_STYLES[i], RUN_COLORS[i],
                     f"{_runs_label(views, i)}max over {len(order)} {what}", linewidth=1.8, alpha=0.6)


def draw_attention_logits(views: Sequence[RunView]) -> Any:
    """The max attention logit on each sampled step: per attention site (the six with the largest
    peaks) and the max over every site; the ``attention_logit_threshold`` line and the steps
    ``attention_logit_growth`` was raised."""
    tables = _signal_tables(views, lambda s: (s.attention_steps, s.attention, s.attention_sites))
    if not tables:
        return None
    with _style():
        fig = _new(3.6)
        ax = fig.add_subplot()
        for i, steps, table, sites in tables:
            _top_columns(ax, views, i, steps, table, sites, "sites")
        _threshold_lines(ax, views, "attention_logit", "attention_logit_threshold")
        _finding_lines(ax, views, data.PRECURSOR_CODES["attention"])
        _log_if_wide(ax, [table for _, _, table, _ in tables])
        ax.set_ylabel("max |q kᵀ| · scale")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def draw_log_z(views: Sequence[RunView]) -> Any:
    """log Z = logsumexp(logits) of the output softmax on each sampled step: its mean and the largest
    |log Z|; the ``log_z_threshold`` line (on |mean log Z|) and the steps ``output_logit_divergence``
    was raised."""
    if not any(v.signals is not None and np.isfinite(v.signals.log_z_mean).any() for v in views):
        return None
    with _style():
        fig = _new(3.4)
        ax = fig.add_subplot()
        negative = False
        for i, view in enumerate(views):
            s = view.signals
            if s is None or not s.log_z_steps.size:
                continue
            _series_line(ax, s.log_z_steps, s.log_z_mean, RUN_STYLES[i], RUN_COLORS[i],
                         f"{_runs_label(views, i)}mean log Z", linewidth=1.2)
            if np.isfinite(s.log_z_max).any():
                _series_line(ax, s.log_z_steps, s.log_z_max, RUN_STYLES[i], RUN_COLORS[i],
                             f"{_runs_label(views, i)}max |log Z|", linewidth=0.8, alpha=0.45)
            negative |= bool(np.any(s.log_z_mean[np.isfinite(s.log_z_mean)] < 0))
        _threshold_lines(ax, views, "log_z", "log_z_threshold", negative=negative)
        _finding_lines(ax, views, data.PRECURSOR_CODES["log_z"])
        ax.axhline(0.0, color="#7f7f7f", linestyle="--", linewidth=0.8)
        ax.set_ylabel("log Z of the output softmax")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def draw_output_rms(views: Sequence[RunView]) -> Any:
    """Each layer's output RMS on the sampled steps over its first sampled value (the six layers that grew
    most, and the largest growth over all layers); a recorded signal with no threshold or finding."""
    tables = _signal_tables(views, lambda s: (s.output_steps, s.output_growth, s.output_layers))
    if not tables:
        return None
    with _style():
        fig = _new(3.4)
        ax = fig.add_subplot()
        for i, steps, table, layers in tables:
            _top_columns(ax, views, i, steps, table, layers, "layers")
        ax.axhline(1.0, color="#7f7f7f", linestyle="--", linewidth=0.8, label="1 (as first sampled)")
        _log_if_wide(ax, [table for _, _, table, _ in tables])
        ax.set_ylabel("output RMS / first sampled")
        ax.set_xlabel("step")
        _legend(ax, loc="best")
        return _finish(fig)


def _as_svg(draw: Callable[[Sequence[RunView]], Any]) -> Callable[[Sequence[RunView]], str | None]:
    """The chart ``draw`` makes, as SVG text (None when it has nothing to show)."""

    def svg(views: Sequence[RunView]) -> str | None:
        with _style():
            fig = draw(views)
            return None if fig is None else _svg(fig)

    svg.__name__ = draw.__name__.replace("draw_", "fig_")
    svg.__doc__ = f"SVG of :func:`{draw.__name__}`: {draw.__doc__}"
    return svg


fig_depth, fig_heatmap, fig_grad_norm, fig_loss, fig_gain, fig_update_ratio, fig_act_grad, fig_activations, \
    fig_loss_scale, fig_fp16_forecast = map(_as_svg, (
        draw_depth, draw_heatmap, draw_grad_norm, draw_loss, draw_gain, draw_update_ratio, draw_act_grad,
        draw_activations, draw_loss_scale, draw_fp16_forecast))
fig_adam_rms, fig_attention_logits, fig_log_z, fig_output_rms = map(
    _as_svg, (draw_adam_rms, draw_attention_logits, draw_log_z, draw_output_rms))

#: (figure id, title, function, caption) in page order.
FIGURES = (
    ("fig-depth", "Gradient magnitude by layer depth", fig_depth,
     "Per-layer gradient RMS before clipping at steps spread over the run (log scale), first layer on the left. "
     "A line that rises to the right means vanishing gradients; one that falls means exploding."),
    ("fig-heatmap", "Gradient RMS, layer \u00d7 step", fig_heatmap,
     "log10 gradient RMS of every layer (rows, first at top) over steps (columns; buckets of steps are averaged "
     "in log space for display). Grey: no finite value."),
    ("fig-grad-norm", "Global gradient norm and clipping", fig_grad_norm,
     "Global gradient norm before clipping against the clip threshold; below, the share of steps clipped and "
     "the steps skipped (non-finite). Lines keep each bucket's minimum and maximum, so spikes survive thinning."),
    ("fig-loss", "Loss and findings", fig_loss,
     "Loss over steps; vertical lines mark findings where they were raised (red: error, orange: warning, grey: info)."),
    ("fig-gain", "Effective per-layer gain", fig_gain,
     "exp(-slope) of log gradient RMS against depth, per step: the typical factor by which backpropagation "
     "scales a gradient per layer. Below 1: vanishing; above 1: exploding."),
    ("fig-act-grad", "Activation gradients by depth (sampled steps)", fig_act_grad,
     "RMS of the gradient with respect to each layer's output (dL/dh) on the sampled steps: the weight "
     "gradients above can hide vanishing that this curve shows."),
    ("fig-update-ratio", "Update-to-weight ratio", fig_update_ratio,
     "||w_after - w_before|| / ||w_before|| per layer on the steps where it was measured."),
    ("fig-activations", "Activation statistics", fig_activations,
     "Share of units that are dead (output zero for every example) or saturated (in a flat tail), per sampled layer."),
    ("fig-loss-scale", "Loss scale (fp16)", fig_loss_scale,
     "The dynamic loss scale; the scaler halves it when scaled gradients overflow and skips that step."),
    ("fig-fp16-forecast", "fp16 forecast", fig_fp16_forecast,
     "Per layer, the share of non-zero gradient elements that float16 would flush to zero at the run's loss "
     "scale and at the reference scale (latest sampled forecast; see docs/precision.md)."),
)

#: The precursor signals' charts, in their own section (only when the run measured some; docs/precursors.md).
PRECURSOR_FIGURES = (
    ("fig-adam-rms", "Adam RMS_t (update-spike precursor)", fig_adam_rms,
     "The largest per-layer RMS_t = sqrt(mean(g\u00b2 / v)) of Adam's update on each measured step (rms_every, "
     "and every step while it is high), its points coloured by the layer that had it. About 1 while Adam's second "
     "moment tracks the squared gradient; far above 1 it lags, and a loss spike tends to follow. Dotted: "
     "rms_threshold; vertical lines: update_spike_precursor raised."),
    ("fig-attention-logits", "Max attention logit (attention-logit growth)", fig_attention_logits,
     "The largest |q k\u1d40| \u00b7 scale of each attention module on the sampled steps (the sites with the "
     "largest peaks, and the max over all sites). Growing logits saturate the softmax into one-hot. Dotted: "
     "attention_logit_threshold; vertical lines: attention_logit_growth raised."),
    ("fig-log-z", "log Z of the output softmax (output-logit divergence)", fig_log_z,
     "logsumexp of the logits given to F.cross_entropy on the sampled steps: the mean (solid) and the largest "
     "|log Z| (light). A drift far from 0 is output-logit divergence (z-loss holds it). Dotted: "
     "log_z_threshold on |mean log Z|; vertical lines: output_logit_divergence raised."),
    ("fig-output-rms", "Layer output RMS growth", fig_output_rms,
     "Each layer's output RMS on the sampled steps, divided by its first sampled value (the layers that grew "
     "most). Representations scale up with the learning rate; recorded for reading beside the other signals, "
     "with no threshold and no finding of its own."),
)
