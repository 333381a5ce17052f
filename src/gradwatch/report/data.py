"""Pure data preparation for the report: what each chart shows, as numpy arrays.

Nothing here draws or writes HTML, and nothing here imports matplotlib: every
function takes arrays (or a :class:`~gradwatch.rundir.Run`) and returns arrays,
so it is tested with plain arithmetic. The report *downsamples for display
only*: the run directory is never changed, and every statistic (the effective
per-layer gain, the last gradient RMS of a layer, counts of clipped and skipped
steps) is computed from every step before anything is thinned.

Downsampling keeps what a person must not miss:

- line series keep the minimum *and* the maximum of each bucket (a one-step
  spike survives a 100,000 to 2,000 point reduction);
- the heatmap averages log10 values per bucket of steps (a geometric mean);
- steps with flags (clipped, skipped, non-finite) are counted per bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..config import PrecursorConfig

#: Points per line after downsampling: ~1000 buckets x (min, max); a chart is ~900 px wide.
MAX_LINE_POINTS = 2000
#: Step columns of the layer x step heatmap (about one per horizontal pixel).
MAX_HEATMAP_COLS = 600
#: Layer rows of the heatmap; deeper models average neighbouring layers.
MAX_HEATMAP_ROWS = 400
#: Rows (steps) processed at a time by the whole-run computations, to bound memory.
CHUNK_ROWS = 8192


def checkpoint_rows(steps: np.ndarray, usable: np.ndarray, count: int = 6) -> np.ndarray:
    """A handful of row indices spread evenly over the run, each on a usable row.

    Args:
        steps: step numbers, one per row (only its length is used).
        usable: bool per row (e.g. the row has at least one finite positive value).
        count: how many rows to pick at most. Default: 6 (a readable number of lines).

    Returns:
        sorted unique row indices (first and last usable rows included).

    Example:
        >>> checkpoint_rows(np.arange(1, 101), np.ones(100, bool), count=3).tolist()
        [0, 50, 99]
    """
    candidates = np.flatnonzero(np.asarray(usable, dtype=bool))
    if candidates.size == 0 or count < 1:
        return np.zeros(0, dtype=np.int64)
    if candidates.size <= count:
        return candidates.astype(np.int64)
    targets = np.linspace(candidates[0], candidates[-1], count)
    picks = candidates[np.searchsorted(candidates, targets).clip(0, candidates.size - 1)]
    return np.unique(picks).astype(np.int64)


def minmax_downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_LINE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Thin a line to at most ``max_points`` points, keeping each bucket's min and max.

    Non-finite values of ``y`` are ignored (a bucket with none finite gives NaN,
    which draws as a gap).

    Example:
        >>> x = np.arange(10_000); y = np.zeros(10_000); y[1234] = 5.0
        >>> xs, ys = minmax_downsample(x, y, max_points=100)
        >>> len(xs) <= 100, float(ys.max()), int(xs[ys.argmax()])
        (True, 5.0, 1234)
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    if n <= max_points:
        return x, y
    buckets = max(1, max_points // 2)
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    size = int(np.max(np.diff(edges)))
    # Pad every bucket to the same width so the reduction is one vectorized call.
    index = edges[:-1, None] + np.arange(size)[None, :]  # (buckets, size)
    valid = index < edges[1:, None]
    index = np.minimum(index, n - 1)
    values = y[index]
    finite = valid & np.isfinite(values)
    low = np.where(finite, values, np.inf)
    high = np.where(finite, values, -np.inf)
    arg_low = low.argmin(axis=1)
    arg_high = high.argmax(axis=1)
    rows = np.arange(buckets)
    any_finite = finite.any(axis=1)
    first = np.minimum(arg_low, arg_high)
    second = np.maximum(arg_low, arg_high)
    pos = np.stack([index[rows, first], index[rows, second]], axis=1).reshape(-1)
    out_y = y[pos].copy()
    out_y[np.repeat(~any_finite, 2)] = np.nan
    return x[pos], out_y


def bucket_edges(n: int, max_buckets: int) -> np.ndarray:
    """Row boundaries of at most ``max_buckets`` contiguous buckets over ``n`` rows.

    Example:
        >>> bucket_edges(10, 3).tolist()
        [0, 3, 6, 10]
    """
    buckets = max(1, min(n, max_buckets))
    return np.linspace(0, n, buckets + 1).astype(np.int64)


def bucket_mean(values: np.ndarray, edges: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean of the finite values of each bucket along ``axis`` (NaN where a bucket has none).

    Example:
        >>> bucket_mean(np.array([1.0, 3.0, np.nan, 5.0]), np.array([0, 2, 4])).tolist()
        [2.0, 5.0]
    """
    values = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0)
    finite = np.isfinite(values)
    sums = np.add.reduceat(np.where(finite, values, 0.0), edges[:-1], axis=0)
    counts = np.add.reduceat(finite.astype(np.int64), edges[:-1], axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return np.moveaxis(out, 0, axis)


def log10_positive(values: np.ndarray) -> np.ndarray:
    """log10 of the finite positive entries, NaN elsewhere (zeros and NaN do not warn)."""
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values) & (values > 0)
    out = np.full(values.shape, np.nan)
    out[ok] = np.log10(values[ok])
    return out


@dataclass
class Heatmap:
    """A layer x step heatmap of log10 values, ready to draw.

    ``z`` is (rows, cols) with row 0 the first layer; ``step_edges`` are the
    first step of each column and one past the last; ``layer_rows`` are the
    first layer index of each row and one past the last.
    """

    z: np.ndarray
    step_edges: np.ndarray
    layer_rows: np.ndarray


def heatmap(matrix: np.ndarray, steps: np.ndarray, max_cols: int = MAX_HEATMAP_COLS,
            max_rows: int = MAX_HEATMAP_ROWS) -> Heatmap:
    """Layer x step heatmap of log10(matrix): geometric means over buckets of steps (and layers).

    Args:
        matrix: steps x layers, positive values (e.g. gradient RMS); others are gaps.
        steps: step number of each row of ``matrix``.

    Example:
        >>> m = np.tile([1.0, 10.0, 100.0], (1000, 1))
        >>> h = heatmap(m, np.arange(1, 1001), max_cols=10)
        >>> h.z.shape, h.z[:, 0].tolist()
        ((3, 10), [0.0, 1.0, 2.0])
    """
    matrix = np.asarray(matrix)
    n_steps, n_layers = matrix.shape
    cols = bucket_edges(n_steps, max_cols)
    rows = bucket_edges(n_layers, max_rows)
    z = np.zeros((0, n_layers))
    if n_steps:
        # Buckets of steps in chunks of about CHUNK_ROWS rows: memory stays bounded on long runs.
        parts, start = [], 0
        while start < len(cols) - 1:
            stop = start + 1
            while stop < len(cols) - 1 and cols[stop + 1] - cols[start] <= CHUNK_ROWS:
                stop += 1
            logs = log10_positive(matrix[cols[start]:cols[stop]])  # (rows of these buckets, L)
            parts.append(bucket_mean(logs, cols[start:stop + 1] - cols[start], axis=0))
            start = stop
        z = np.concatenate(parts, axis=0)  # (C, L)
    if n_layers and n_steps:
        z = bucket_mean(z, rows, axis=1)  # (C, R)
    steps = np.asarray(steps)
    step_edges = np.append(steps[cols[:-1]], steps[-1] + 1) if n_steps else np.zeros(0, dtype=np.int64)
    return Heatmap(z=np.asarray(z).T, step_edges=step_edges, layer_rows=rows)


def effective_gain(rms: np.ndarray) -> np.ndarray:
    """Effective per-layer gain of every step: exp(-slope) of log RMS against depth.

    Backpropagation multiplies one Jacobian per layer, so a gradient reaching
    layer ``l`` of ``L`` scales like ``sigma**(L - l)``: log RMS is a line in
    depth of slope ``-log(sigma)``. The least-squares slope over the finite,
    positive entries of each row gives ``sigma`` (below 1: vanishing, above 1:
    exploding). Rows with fewer than two usable layers give NaN.

    Args:
        rms: steps x layers, layers in depth order.

    Example:
        >>> depth = np.arange(10)
        >>> rms = np.stack([0.5 ** (9 - depth), 2.0 ** (9 - depth)])
        >>> np.round(effective_gain(rms), 6).tolist()
        [0.5, 2.0]
    """
    rms = np.asarray(rms, dtype=np.float64)
    if rms.shape[0] > CHUNK_ROWS:  # bounded memory on long runs: the fit is row by row anyway
        return np.concatenate([effective_gain(rms[i:i + CHUNK_ROWS]) for i in range(0, rms.shape[0], CHUNK_ROWS)])
    ok = np.isfinite(rms) & (rms > 0)
    logs = np.full(rms.shape, np.nan)
    logs[ok] = np.log(rms[ok])  # (S, L)
    mask = ok
    depth = np.arange(logs.shape[1], dtype=np.float64)[None, :]
    w = mask.astype(np.float64)
    y = np.where(mask, logs, 0.0)
    n = w.sum(axis=1)
    sx = (w * depth).sum(axis=1)
    sy = y.sum(axis=1)
    sxx = (w * depth * depth).sum(axis=1)
    sxy = (y * depth).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        den = n * sxx - sx * sx
        slope = np.where((n >= 2) & (den > 0), (n * sxy - sx * sy) / np.where(den > 0, den, 1.0), np.nan)
        return np.exp(-slope)


def carried_forward(matrix: np.ndarray) -> np.ndarray:
    """Each NaN cell replaced by the last finite value above it in its column (NaN if none yet).

    For per-layer values measured on a rotating share of the layers (the update ratio within
    its memory budget): row ``i`` then holds every layer's latest value as of row ``i``.

    Example:
        >>> carried_forward(np.array([[1.0, np.nan], [np.nan, 2.0], [3.0, np.nan]])).tolist()
        [[1.0, nan], [1.0, 2.0], [3.0, 2.0]]
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        return matrix.copy()
    rows = np.arange(matrix.shape[0])[:, None]
    last = np.maximum.accumulate(np.where(np.isfinite(matrix), rows, -1), axis=0)
    out = matrix[last.clip(0), np.arange(matrix.shape[1])]
    out[last < 0] = np.nan
    return out


def last_finite_rows(matrix: np.ndarray) -> np.ndarray:
    """Per column, the last finite value (NaN if the column has none).

    Example:
        >>> last_finite_rows(np.array([[1.0, 2.0], [3.0, np.nan]])).tolist()
        [3.0, 2.0]
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.size == 0:
        return np.full(matrix.shape[1] if matrix.ndim == 2 else 0, np.nan)
    finite = np.isfinite(matrix)
    last = matrix.shape[0] - 1 - np.argmax(finite[::-1], axis=0)
    out = matrix[last, np.arange(matrix.shape[1])]
    out[~finite.any(axis=0)] = np.nan
    return out


def flag_buckets(steps: np.ndarray, flags: np.ndarray, max_buckets: int = MAX_LINE_POINTS // 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Share and count of flagged steps per bucket: (bucket centre step, share, count).

    Example:
        >>> centre, share, count = flag_buckets(np.arange(1, 11), np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 1], bool), 2)
        >>> share.tolist(), count.tolist()
        ([0.4, 0.2], [2, 1])
    """
    steps = np.asarray(steps)
    flags = np.asarray(flags, dtype=bool)
    if steps.size == 0:
        empty = np.zeros(0)
        return empty, empty, empty.astype(np.int64)
    edges = bucket_edges(steps.size, max_buckets)
    count = np.add.reduceat(flags.astype(np.int64), edges[:-1])
    size = np.diff(edges)
    centre = (steps[edges[:-1]] + steps[edges[1:] - 1]) / 2.0
    return centre, count / size, count


def thin_steps(marks: Sequence[int], max_marks: int = 300) -> list[int]:
    """At most ``max_marks`` of the given steps, evenly chosen (sorted, unique).

    Example:
        >>> thin_steps(range(1000), max_marks=4)
        [0, 333, 666, 999]
    """
    unique = sorted(set(int(m) for m in marks))
    if len(unique) <= max_marks:
        return unique
    picks = np.linspace(0, len(unique) - 1, max_marks).round().astype(int)
    return [unique[i] for i in picks]


# ----- the run, prepared ----------------------------------------------------------------
@dataclass
class ActivationStats:
    """Sampled activation statistics: per layer, the latest dead and saturated fractions.

    ``series`` maps a statistic name (``"dead"``, ``"saturated"``) to a
    samples x layers array over ``steps``.
    """

    layers: list[str]
    steps: np.ndarray
    series: dict[str, np.ndarray]


_ACT_KEYS = {
    "dead": ("dead", "dead_fraction", "frac_dead", "zero_fraction"),
    "saturated": ("saturated", "saturated_fraction", "frac_saturated"),
}


def _stat_value(stats: dict[str, Any], names: Sequence[str]) -> float:
    for name in names:
        if name in stats and stats[name] is not None:
            try:
                return float(stats[name])
            except (TypeError, ValueError):
                return math.nan
    return math.nan


def activation_stats(records: list[dict[str, Any]]) -> ActivationStats | None:
    """Read ``activations.jsonl`` records into arrays (None when nothing was sampled).

    Accepts one object per sampled step with a ``step`` and per-site stats
    under ``activations`` (what the diagnosis sampler writes:
    ``{"activations": {site: {"kind": "relu", "dead": f}}}``), ``layers`` or
    ``modules``, as a dict by name or a list of ``{"name": ..., ...}``;
    unknown keys are ignored.

    Example:
        >>> s = activation_stats([{"step": 5, "layers": {"relu1": {"dead": 0.9}}}])
        >>> s.layers, s.series["dead"].tolist()
        (['relu1'], [[0.9]])
    """
    order: dict[str, int] = {}
    rows: list[tuple[int, dict[str, dict[str, Any]]]] = []
    for record in records:
        if not isinstance(record, dict):
            continue
        entries = record.get("activations", record.get("layers", record.get("modules")))
        per: dict[str, dict[str, Any]] = {}
        if isinstance(entries, dict):
            per = {str(k): v for k, v in entries.items() if isinstance(v, dict)}
        elif isinstance(entries, list):
            for item in entries:
                if isinstance(item, dict) and ("name" in item or "module" in item):
                    per[str(item.get("name", item.get("module")))] = item
        if not per:
            continue
        for name in per:
            order.setdefault(name, len(order))
        try:
            step = int(record.get("step", len(rows)))
        except (TypeError, ValueError):
            step = len(rows)
        rows.append((step, per))
    if not rows:
        return None
    names = list(order)
    series = {}
    for stat, keys in _ACT_KEYS.items():
        table = np.full((len(rows), len(names)), np.nan)
        for i, (_, per) in enumerate(rows):
            for name, stats in per.items():
                table[i, order[name]] = _stat_value(stats, keys)
        if np.isfinite(table).any():
            series[stat] = table
    if not series:
        return None
    return ActivationStats(layers=names, steps=np.array([s for s, _ in rows]), series=series)


def clip_threshold(meta: dict[str, Any]) -> float | None:
    """The fixed clip threshold of a run, if it had one (None for none or adaptive clipping).

    Example:
        >>> clip_threshold({"clip_norm": 1.0}), clip_threshold({"clip_norm": None})
        (1.0, None)
    """
    value = meta.get("clip_norm")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


@dataclass
class SampledCurve:
    """Activation-gradient RMS ``||dL/dh||/sqrt(numel)`` per layer on sampled steps (samples x layers)."""

    layers: list[str]
    steps: np.ndarray
    rms: np.ndarray


def activation_grad_curve(records: list[dict[str, Any]], layer_order: Sequence[str] = ()) -> SampledCurve | None:
    """The ``grad_rms`` maps of ``activations.jsonl`` as a matrix, layers in depth order.

    Layers named in ``layer_order`` come first, in that order; others follow as met.

    Example:
        >>> c = activation_grad_curve([{"step": 1, "grad_rms": {"fc2": 1.0, "fc1": 0.1}}], ["fc1", "fc2"])
        >>> c.layers, c.rms.tolist()
        (['fc1', 'fc2'], [[0.1, 1.0]])
    """
    rows = [(r.get("step"), r["grad_rms"]) for r in records
            if isinstance(r, dict) and isinstance(r.get("grad_rms"), dict) and r["grad_rms"]]
    if not rows:
        return None
    seen = {str(name) for _, values in rows for name in values}
    names = [n for n in layer_order if n in seen]
    names += sorted(seen - set(names))
    column = {name: j for j, name in enumerate(names)}
    table = np.full((len(rows), len(names)), np.nan)
    steps = np.zeros(len(rows), dtype=np.int64)
    for i, (step, values) in enumerate(rows):
        try:
            steps[i] = int(step)
        except (TypeError, ValueError):
            steps[i] = i
        for name, value in values.items():
            try:
                table[i, column[str(name)]] = float(value)
            except (TypeError, ValueError):
                pass
    return SampledCurve(layers=names, steps=steps, rms=table)


# ----- layer names and kinds, for many-layer charts ----------------------------------------
#: Type names (a substring of the module's class name) of normalization layers: drawn as their own series.
NORM_TYPE_MARKERS = ("Norm",)  # LayerNorm, RMSNorm, BatchNorm1d, GroupNorm, LlamaRMSNorm, T5LayerNorm...


def common_prefix(names: Sequence[str]) -> str:
    """The dotted prefix every name shares (whole components only, ending in ``.``; "" if none).

    No name is ever reduced to nothing: the prefix stops before the last component of the shortest name,
    and before the container of a block index (``h.`` stays in ``h.0.attn``, so a label still says which block).

    Example:
        >>> common_prefix(["transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.ln_f"])
        'transformer.'
        >>> common_prefix(["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"])
        'transformer.'
        >>> common_prefix(["encoder", "encoder.layer"]), common_prefix(["fc1"])
        ('', '')
    """
    parts = [str(n).split(".") for n in names]
    if len(parts) < 2:
        return ""
    shared: list[str] = []
    for column in zip(*(p[:-1] for p in parts)):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    while shared and len(shared) < min(len(p) for p in parts) and parts[0][len(shared)].isdigit():
        shared.pop()  # keep the container of a block index: "h.0...", never "0..."
    return ".".join(shared) + "." if shared else ""


def short_names(names: Sequence[str]) -> tuple[str, list[str]]:
    """The names without their common dotted prefix: ``(prefix, short names)``.

    Example:
        >>> short_names(["model.layers.0.mlp", "model.layers.1.mlp", "model.norm"])
        ('model.', ['layers.0.mlp', 'layers.1.mlp', 'norm'])
    """
    prefix = common_prefix(names)
    return prefix, [str(n)[len(prefix):] for n in names]


def block_of(name: str) -> str | None:
    """The repeated block a (short) layer name belongs to: its path up to the first integer component
    that has something after it (``layers.3`` or ``0`` of a ``Sequential`` is a layer, not a block).

    Example:
        >>> block_of("h.11.attn.c_proj"), block_of("layers.3"), block_of("wte")
        ('h.11', None, None)
    """
    parts = str(name).split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def depth_ticks(names: Sequence[str], max_labels: int = 24) -> tuple[list[int], list[str]]:
    """Tick positions and labels of a by-layer axis: short names, one per block when there are many layers.

    Up to ``max_labels`` layers every layer is labelled. With more, the first layer of
    each repeated block is labelled with the block (``h.0``, ``h.1``...), layers
    outside blocks with their own name, and blocks are thinned evenly when they
    are still too many. Labels never carry the common prefix.

    Example:
        >>> names = ["t.wte"] + [f"t.h.{b}.{p}" for b in range(12) for p in ("ln_1", "attn", "ln_2", "mlp")] + ["t.ln_f"]
        >>> ticks, labels = depth_ticks(names)
        >>> labels[:4], labels[-1], ticks[:3]
        (['h.0', 'h.1', 'h.2', 'h.3'], 'ln_f', [1, 5, 9])
        >>> depth_ticks([str(i) for i in range(23)], max_labels=16)[0]
        [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22]
        >>> depth_ticks([str(i) for i in range(30)], max_labels=8)[0]
        [0, 4, 8, 12, 16, 20, 24, 29]
        >>> depth_ticks(names, max_labels=8)[1]
        ['h.0', 'h.2', 'h.3', 'h.5', 'h.6', 'h.8', 'h.9', 'h.11', 'ln_f']
    """
    _, short = short_names(names)
    n = len(short)
    if n <= max_labels:
        return list(range(n)), short
    starts: list[tuple[int, str]] = []
    loose: list[tuple[int, str]] = []
    previous: str | None = None
    for i, name in enumerate(short):
        block = block_of(name)
        if block is None:
            loose.append((i, name))
        elif block != previous:
            starts.append((i, block))
        previous = block
    if len(starts) < 2:  # no repeated blocks: every k-th name, and the last layer
        every = math.ceil(n / max_labels)
        picks = list(range(0, n, every))
        if picks[-1] != n - 1:
            picks[-1 if n - 1 - picks[-1] <= every / 2 else len(picks):] = [n - 1]
        return picks, [short[i] for i in picks]
    if len(starts) > max_labels:
        keep = np.unique(np.linspace(0, len(starts) - 1, max_labels).round().astype(int))
        starts = [starts[i] for i in keep]
    # Layers outside blocks (embeddings, the final norm) are labelled where they do not crowd a block label.
    gap = n / (2.0 * max_labels)
    pairs = list(starts)
    for i, name in loose:
        if all(abs(i - j) >= gap for j, _ in pairs):
            pairs.append((i, name))
    pairs.sort()
    return [i for i, _ in pairs], [label for _, label in pairs]


def norm_mask(names: Sequence[str], layers: Sequence[dict[str, Any]]) -> np.ndarray:
    """Per name, whether it is a normalization layer (its type from ``layers.json`` contains "Norm").

    Example:
        >>> norm_mask(["fc", "ln"], [{"name": "fc", "type": "Linear"}, {"name": "ln", "type": "LayerNorm"}]).tolist()
        [False, True]
    """
    types = {str(layer.get("name")): str(layer.get("type", "")) for layer in layers if isinstance(layer, dict)}
    return np.array([any(m in types.get(str(n), "") for m in NORM_TYPE_MARKERS) for n in names], dtype=bool)


def tick_text(value: float) -> str:
    """An axis tick as a person writes it: ``0.5``, ``1.012``, ``2000``; powers of ten beyond that as ``10^k``.

    Example:
        >>> [tick_text(v) for v in (0.5, 1.012, 1.0, 20000.0, 1e-5, 3e-7, 0.0)]
        ['0.5', '1.012', '1', '20000', '$10^{-5}$', '3e-07', '0']
    """
    value = float(value)
    if not math.isfinite(value):
        return ""
    if value == 0:
        return "0"
    size = abs(value)
    if 1e-3 <= size < 1e7:
        return f"{value:.6g}"
    exponent = round(math.log10(size))
    if math.isclose(size, 10.0 ** exponent, rel_tol=1e-9):
        return f"$-10^{{{exponent}}}$" if value < 0 else f"$10^{{{exponent}}}$"
    return f"{value:.2g}"


# ----- precursor signals (signals.jsonl) -----------------------------------------------------
#: The finding each precursor signal raises (docs/precursors.md).
PRECURSOR_CODES = {"adam_rms": "update_spike_precursor", "attention": "attention_logit_growth",
                   "log_z": "output_logit_divergence"}


def _number(value: Any) -> float:
    """A signals.jsonl value as a float (non-finite floats are written as strings); NaN if not a number."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class PrecursorSeries:
    """The precursor signals of one run as arrays, each over the steps that measured it.

    ``attention`` is (measured steps x sites), NaN where a site was not seen on a step;
    ``rms_layer`` names the layer of each ``rms_max``.
    """

    rms_steps: np.ndarray
    rms_max: np.ndarray
    rms_layer: list[str]
    attention_steps: np.ndarray
    attention_sites: list[str]
    attention: np.ndarray
    log_z_steps: np.ndarray
    log_z_mean: np.ndarray
    log_z_max: np.ndarray
    output_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    output_layers: list[str] = field(default_factory=list)
    #: (sampled steps x layers): each layer's output RMS over its first sampled value, NaN where not sampled
    output_growth: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def attention_max(self) -> np.ndarray:
        """The largest logit over every site, per measured step."""
        if not self.attention.size:
            return np.zeros(0)
        with np.errstate(invalid="ignore"):
            finite = np.where(np.isfinite(self.attention), self.attention, -np.inf)
            peak = finite.max(axis=1)
        return np.where(np.isfinite(peak), peak, np.nan)


def precursor_series(records: list[dict[str, Any]]) -> PrecursorSeries | None:
    """The lines of ``signals.jsonl`` as arrays; None when no line holds a signal.

    A step written twice (a resumed run) keeps its last line; lines without a step are skipped.

    Example:
        >>> s = precursor_series([{"step": 1, "attention_logit_max": {"h.0": 3.0}, "log_z_mean": 1.5, "log_z_max": 2.0},
        ...                       {"step": 50, "adam_rms_max": 1.1, "adam_rms_layer": "fc",
        ...                        "attention_logit_max": {"h.0": 4.0, "h.1": 9.0}}])
        >>> s.rms_steps.tolist(), s.rms_layer, s.attention_sites, s.attention_max.tolist(), s.log_z_steps.tolist()
        ([50], ['fc'], ['h.0', 'h.1'], [3.0, 9.0], [1])
    """
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            by_step[step] = record
    rms: list[tuple[int, float, str]] = []
    attention: list[tuple[int, dict[str, Any]]] = []
    log_z: list[tuple[int, float, float]] = []
    outputs: list[tuple[int, dict[str, Any]]] = []
    for step in sorted(by_step):
        record = by_step[step]
        if "adam_rms_max" in record:
            rms.append((step, _number(record["adam_rms_max"]), str(record.get("adam_rms_layer", ""))))
        sites = record.get("attention_logit_max")
        if isinstance(sites, dict) and sites:
            attention.append((step, sites))
        if "log_z_mean" in record or "log_z_max" in record:
            log_z.append((step, _number(record.get("log_z_mean")), _number(record.get("log_z_max"))))
        layers = record.get("output_rms")
        if isinstance(layers, dict) and layers:
            outputs.append((step, layers))
    if not (rms or attention or log_z or outputs):
        return None
    output_layers: list[str] = []
    for _, layers in outputs:
        output_layers.extend(str(n) for n in layers if str(n) not in output_layers)
    growth = np.full((len(outputs), len(output_layers)), np.nan)
    for i, (_, layers) in enumerate(outputs):
        for name, value in layers.items():
            growth[i, output_layers.index(str(name))] = _number(value)
    for j in range(growth.shape[1]):  # relative to each layer's first sampled (positive, finite) value
        column = growth[:, j]
        firsts = column[np.isfinite(column) & (column > 0)]
        growth[:, j] = column / firsts[0] if firsts.size else np.nan
    names: list[str] = []
    for _, sites in attention:
        names.extend(str(s) for s in sites if str(s) not in names)
    column = {name: j for j, name in enumerate(names)}
    table = np.full((len(attention), len(names)), np.nan)
    for i, (_, sites) in enumerate(attention):
        for site, value in sites.items():
            table[i, column[str(site)]] = _number(value)
    return PrecursorSeries(
        rms_steps=np.array([s for s, _, _ in rms], dtype=np.int64),
        rms_max=np.array([v for _, v, _ in rms], dtype=np.float64),
        rms_layer=[layer for _, _, layer in rms],
        attention_steps=np.array([s for s, _ in attention], dtype=np.int64),
        attention_sites=names,
        attention=table,
        log_z_steps=np.array([s for s, _, _ in log_z], dtype=np.int64),
        log_z_mean=np.array([m for _, m, _ in log_z], dtype=np.float64),
        log_z_max=np.array([p for _, _, p in log_z], dtype=np.float64),
        output_steps=np.array([s for s, _ in outputs], dtype=np.int64),
        output_layers=output_layers,
        output_growth=growth,
    )


@dataclass(frozen=True)
class PrecursorThresholds:
    """The thresholds a run's precursor findings used; ``recorded``: read from its meta.json (else the
    :class:`gradwatch.PrecursorConfig` defaults: a run written before meta.json recorded them)."""

    rms: float
    attention_logit: float
    log_z: float
    recorded: bool


def precursor_thresholds(meta: dict[str, Any]) -> PrecursorThresholds:
    """The precursor thresholds of a run: meta.json's ``precursors`` block, else PrecursorConfig's defaults.

    Example:
        >>> precursor_thresholds({"precursors": {"rms_threshold": 4.0, "attention_logit_threshold": 80.0}})
        PrecursorThresholds(rms=4.0, attention_logit=80.0, log_z=30.0, recorded=True)
        >>> precursor_thresholds({}).recorded
        False
    """
    default = PrecursorConfig()
    block = meta.get("precursors") if isinstance(meta, dict) else None
    recorded = isinstance(block, dict)
    block = block if recorded else {}

    def pick(name: str) -> float:
        value = _number(block.get(name))
        return value if math.isfinite(value) and value > 0 else float(getattr(default, name))

    return PrecursorThresholds(pick("rms_threshold"), pick("attention_logit_threshold"), pick("log_z_threshold"),
                               recorded)
