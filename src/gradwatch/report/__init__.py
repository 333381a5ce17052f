"""The run report: one self-contained HTML page per run (or two runs overlaid).

Layout of this package, top to bottom:

- :mod:`.data`     pure numpy: downsampling for display, heatmap buckets, effective gain;
- :mod:`.prepare`  a run read once into the arrays the report shows (all steps);
- :mod:`.figures`  matplotlib charts as SVG text (matplotlib is imported only there);
- :mod:`.page`     HTML assembly, every user-derived string escaped.

Importing this package imports neither matplotlib nor anything heavy;
:func:`report` does, when called.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..rundir import load_run

__all__ = ["report"]


def report(run_dir: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
           compare: str | os.PathLike[str] | None = None) -> Path:
    """Write the HTML report of a run directory and return its path.

    Args:
        run_dir: the run directory (``run_dir`` given to :class:`gradwatch.Watch`).
        output: the HTML file to write. Default: ``RUN_DIR/report.html``, or
            ``RUN_DIR/compare.html`` when comparing.
        compare: a second run directory to overlay on the same charts (run B,
            drawn dashed), e.g. the same training after a fix. Default: None.

    Returns:
        the path of the HTML file written.

    Raises:
        FileNotFoundError: a run directory does not exist or holds no run.
        ImportError: matplotlib is not installed (``pip install gradwatch[report]``).

    Example:
        >>> import gradwatch as gw
        >>> gw.report("runs/exp1")  # doctest: +SKIP
        PosixPath('runs/exp1/report.html')
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("gradwatch.report needs matplotlib: pip install 'gradwatch[report]'") from exc
    from .figures import FIGURES, PRECURSOR_FIGURES
    from .page import build_page
    from .prepare import prepare

    if output is None:
        output = Path(run_dir) / ("compare.html" if compare is not None else "report.html")
    target = Path(output)
    if target.is_dir():
        raise ValueError(f"output {str(target)!r} is a directory; pass a file path such as {str(target / 'report.html')!r}")
    runs = [load_run(run_dir)]
    if compare is not None:
        runs.append(load_run(compare))
    labels = [r.path.resolve().name or str(r.path) for r in runs]
    if len(labels) == 2 and labels[0] == labels[1]:  # e.g. a/run and b/run: say which is which
        labels = [f"A: {labels[0]}", f"B: {labels[1]}"]
    views = [prepare(r, label) for r, label in zip(runs, labels)]
    text = build_page(views, FIGURES, PRECURSOR_FIGURES)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target
