"""Plot kinds over the zoo: `render(kind, zoo_path_or_conn, filters, ...) -> PlotResult` (PNG bytes,
pixel size, a short text summary of what the picture shows, and where its plot areas are).

Why this shape: the MCP tool, the resource, the CLI and the Excel report all render through here, so
a plot looks and means the same everywhere. Data comes from SQL aggregates (`stats.aggregates`), never
from every row: scatters draw at most `Options.cap` points and say so. matplotlib is used through its
object API on the Agg canvas (no pyplot, no display) and only under `PLOT_LOCK`, because matplotlib's
global state (rcParams, font and text caches) is not thread-safe while the server renders in worker
threads; the SQL part runs outside the lock.
"""

from __future__ import annotations

import dataclasses
import io
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stats import figures as fg
from stats.fit import fit_figure
from stats.palette import DPI, STYLE
from stats.scope import StatsError, check_models
from zoo.connection import connect_sync
from zoo.query import Filters

PLOT_LOCK = threading.Lock()
# below 640 x 400 px the titles, legends and 10x10 heatmap labels no longer fit (checked for every kind)
MIN_WIDTH, MAX_WIDTH = 640, 2400
MIN_HEIGHT, MAX_HEIGHT = 400, 1800
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1000, 600

PlotKind = Literal["curves", "mean_std", "accuracy_vs_time", "pareto", "box", "histogram", "durations",
                   "failures", "correlation", "timeline", "calibration"]
Options = fg.Options


@dataclasses.dataclass(frozen=True)
class PlotSpec:
    kind: str
    title: str
    description: str  # one line for tool descriptions and --help
    fetch: Callable[[sqlite3.Connection, Filters, Options], dict[str, Any]]
    draw: Callable[[Figure, dict[str, Any]], str]


@dataclasses.dataclass(frozen=True)
class PlotResult:
    kind: str
    png: bytes
    summary: str
    width: int  # pixels
    height: int  # pixels
    axes_px: tuple[tuple[int, int, int, int], ...]  # data areas as (left, top, right, bottom), top-left origin

    @property
    def mime_type(self) -> str:
        return "image/png"


def _spec(kind: str, title: str, description: str) -> PlotSpec:
    return PlotSpec(kind, title, description, getattr(fg, f"fetch_{kind}"), getattr(fg, f"draw_{kind}"))


PLOT_KINDS: dict[str, PlotSpec] = {s.kind: s for s in (
    _spec("curves", "Learning curves",
          "accuracy per epoch (half epochs hollow) of the best run of each named model, else the top 5 [one triple]"),
    _spec("mean_std", "Mean ± std per epoch",
          "mean ± std band, median and best accuracy at each epoch over all curve points [one triple]"),
    _spec("accuracy_vs_time", "Accuracy vs training time",
          "final accuracy vs training time per run (≤5,000 drawn), exact time/accuracy Pareto front [one triple]"),
    _spec("pareto", "Accuracy vs params and FLOPs",
          "best accuracy per model vs parameters and vs FLOPs, Pareto fronts marked [one triple]"),
    _spec("box", "Accuracy per dataset",
          "box plot of final accuracy per task/dataset/metric, sorted by median"),
    _spec("histogram", "Histogram of accuracy",
          "distribution of final accuracy (40 bins), mean, median and best marked [one triple]"),
    _spec("durations", "Training time per dataset",
          "box plot of training time (log s) per task/dataset/metric"),
    _spec("failures", "Failed evaluator runs",
          "failed and timed-out evaluator runs (one per trial) by error stage and kind, as shares of all "
          "evaluator runs; the summary adds how the submissions (jobs) ended"),
    _spec("correlation", "Correlation heatmap",
          "Pearson r between accuracy, epochs, time, accuracy-to-time, params, FLOPs, lr, batch, momentum, "
          "dropout (≤20,000 runs sampled) [one triple]"),
    _spec("timeline", "Accuracy over time",
          "final accuracy by run creation time: rolling mean, best so far, runs per bin [one triple]"),
    _spec("calibration", "Device calibration",
          "each calibrated device's speed curve (factor over the reference device against work per step, with "
          "its spread) and, for models trained on two devices, measured vs normalized training time side by side"),
)}


def check_kind(kind: str) -> PlotSpec:
    spec = PLOT_KINDS.get(kind)
    if spec is None:
        raise StatsError(f"Unknown plot kind {kind!r}. Use one of: {', '.join(PLOT_KINDS)}.")
    return spec


def check_size(width: int, height: int) -> None:
    if not (MIN_WIDTH <= width <= MAX_WIDTH and MIN_HEIGHT <= height <= MAX_HEIGHT):
        raise StatsError(f"Plot size {width}x{height} px is out of range: width {MIN_WIDTH}-{MAX_WIDTH}, "
                         f"height {MIN_HEIGHT}-{MAX_HEIGHT} pixels.")


def lay_out(spec: PlotSpec, data: dict[str, Any], width: int, height: int) -> tuple[Figure, str]:
    """Draw fetched data on a new figure, laid out once and its text fitted (`stats.fit`); the caller
    holds `PLOT_LOCK` and the `STYLE` rc context until it has saved the figure."""
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    summary = spec.draw(fig, data)
    fig.draw_without_rendering()  # a layout pass: where each axes and label landed
    fit_figure(fig)
    return fig, summary


def draw(spec: PlotSpec, data: dict[str, Any], width: int, height: int) -> PlotResult:
    """Render fetched data to PNG bytes, under the matplotlib lock."""
    with PLOT_LOCK, matplotlib.rc_context(STYLE):
        fig, summary = lay_out(spec, data, width, height)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": "lemur-agent-server stats"})
        boxes = []  # after savefig's draw the constrained layout has placed every axes
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            b = ax.get_window_extent()
            boxes.append((round(b.x0), round(height - b.y1), round(b.x1), round(height - b.y0)))
    return PlotResult(spec.kind, buf.getvalue(), summary, width, height, tuple(boxes))


def render(kind: str, zoo: Path | str | sqlite3.Connection, filters: Filters | None = None, *,
           width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT, models: tuple[str, ...] | list[str] = (),
           limit: int = 5, cap: int = fg.Options.cap) -> PlotResult:
    """Fetch and draw one plot kind. Raises `StatsError` (unknown kind, size out of range, unknown model,
    filters matching nothing) with a message that says what to do next."""
    spec = check_kind(kind)
    check_size(width, height)
    opts = Options(width=width, height=height, models=tuple(models), limit=limit, cap=cap)
    f = filters or Filters()
    conn = zoo if isinstance(zoo, sqlite3.Connection) else open_zoo(zoo)
    try:
        check_models(conn, tuple(dict.fromkeys(f.nn + opts.models)))
        data = spec.fetch(conn, f, opts)
    finally:
        if conn is not zoo:
            conn.close()
    return draw(spec, data, width, height)


def open_zoo(path: Path | str) -> sqlite3.Connection:
    """A read-only connection; a missing file is a StatsError, not an empty zoo."""
    p = Path(path)
    if not p.exists():
        raise StatsError(f"No zoo at {p}. Pass --zoo PATH or set LEMUR_ZOO to an existing zoo file.")
    return connect_sync(p, readonly=True)
