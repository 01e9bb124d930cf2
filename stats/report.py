"""The Excel report (LEMUR's nn-stat report, faster): an Overview sheet and one sheet per
task/dataset/metric, with tables and the plots embedded as PNG images.

Why summaries only: Excel stops at 1,048,576 rows and openpyxl writes ~50k cells/s, so raw points
and runs go to csv/parquet (`stats.export`). Each triple's sheet holds its per-epoch statistics, two
leaderboards, LEMUR's per-model-per-epoch statistics for the top models and three plots (mean ± std,
Pareto front, accuracy vs time); the Overview holds the catalog, failures and four cross-dataset
plots.

Why a process pool: at a million runs the SQL is ~15 s and drawing 40 figures ~10 s of CPU. SQL runs
here while spawned worker processes draw (matplotlib is single-threaded and holds the GIL), so the
two overlap; small zoos draw in-process, where a pool's start-up (~2 s) would not pay.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import datetime as dt
import io
import math
import multiprocessing
import os
import re
import sqlite3
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pandas as pd

from stats import aggregates as agg
from stats import figures as fg
from stats.plots import PLOT_KINDS, draw
from stats.scope import StatsError, Triple, describe, materialized_runs, no_data
from zoo.query import Filters

REPORT_TOP = 50  # models per leaderboard / per-model table
IMAGE_W, IMAGE_H = 800, 480  # pixels, plots embedded in the report
POOL_MIN_RUNS = 100_000  # below this, drawing in-process is faster than starting workers


def _render(kind: str, data: dict[str, Any]) -> tuple[bytes, str]:
    """Worker entry point (module level, so spawned processes can import it)."""
    res = draw(PLOT_KINDS[kind], data, IMAGE_W, IMAGE_H)
    return res.png, res.summary


class _Renderer:
    """Draws in a pool of spawned processes, or here. A pool that cannot start (e.g. the program's
    __main__ cannot be re-imported, as with `python - < script`) degrades to drawing here."""

    def __init__(self, workers: int):
        self.pool = (cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                     if workers > 0 else None)

    def submit(self, kind: str, data: dict[str, Any]) -> cf.Future[tuple[bytes, str]]:
        if self.pool is not None:
            try:
                return self.pool.submit(_render, kind, data)
            except BrokenProcessPool:
                self.close()
        done: cf.Future[tuple[bytes, str]] = cf.Future()
        done.set_result(_render(kind, data))
        return done

    def result(self, job: cf.Future[tuple[bytes, str]], kind: str, data: dict[str, Any]) -> tuple[bytes, str]:
        try:
            return job.result()
        except BrokenProcessPool:
            self.close()
            return _render(kind, data)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


class _Sheet:
    """Titled tables down column A; plots (or notes where a plot had no data) down `image_col`."""

    def __init__(self, ws: Any, image_col: int, renderer: _Renderer):
        self.ws, self.image_col, self.renderer = ws, image_col, renderer
        self.row, self.rows = 1, 0
        self.pending: list[tuple[str, dict[str, Any] | None, cf.Future[tuple[bytes, str]] | str]] = []

    def heading(self, text: str, size: int = 14) -> None:
        from openpyxl.styles import Font
        self.ws.cell(self.row, 1, text).font = Font(bold=True, size=size)
        self.row += 1

    def note(self, text: str) -> None:
        self.ws.cell(self.row, 1, text)
        self.row += 1

    def table(self, title: str, df: pd.DataFrame) -> None:
        from openpyxl.styles import Font
        self.row += 1
        self.ws.cell(self.row, 1, title).font = Font(bold=True, size=12)
        self.row += 1
        for j, col in enumerate(df.columns, 1):
            self.ws.cell(self.row, j, str(col)).font = Font(bold=True)
        self.row += 1
        for rec in df.itertuples(index=False):
            for j, v in enumerate(rec, 1):
                if v is None or (isinstance(v, float) and math.isnan(v)):
                    continue
                self.ws.cell(self.row, j, v.item() if hasattr(v, "item") else v)
            self.row += 1
        self.rows += len(df)

    def plot(self, kind: str, fetch: Callable[[], dict[str, Any]]) -> None:
        try:
            data = fetch()
        except StatsError as exc:  # e.g. no evaluator runs: the sheet says so instead of failing
            self.pending.append((kind, None, str(exc)))
        else:
            self.pending.append((kind, data, self.renderer.submit(kind, data)))

    def place_plots(self) -> int:
        """Embed the finished plots in order; returns how many."""
        from openpyxl.drawing.image import Image
        from openpyxl.utils import get_column_letter
        col, row, n = get_column_letter(self.image_col), 1, 0
        for kind, data, job in self.pending:
            title = PLOT_KINDS[kind].title
            if isinstance(job, str) or data is None:
                self.ws.cell(row, self.image_col, f"{title}: {job}")
                row += 2
                continue
            png, summary = self.renderer.result(job, kind, data)
            self.ws.cell(row, self.image_col, f"{title}: {summary}")
            img = Image(io.BytesIO(png))
            img.width, img.height = IMAGE_W, IMAGE_H
            self.ws.add_image(img, f"{col}{row + 1}")
            row += IMAGE_H // 20 + 3
            n += 1
        return n

    def widths(self) -> None:
        from openpyxl.utils import get_column_letter
        self.ws.column_dimensions["A"].width = 24
        for j in range(2, self.image_col):
            self.ws.column_dimensions[get_column_letter(j)].width = 13


def sheet_name(triple: Triple, taken: set[str]) -> str:
    """'<dataset> <metric>', made legal (31 chars, no []:*?/\\) and unique (the task added on a clash)."""
    base = re.sub(r"[\[\]:*?/\\]", "-", f"{triple.dataset} {triple.metric}")[:31]
    name, i = base, 2
    while name.lower() in taken:
        suffix = f" {triple.task.split('-')[0][:6]}" if i == 2 else f" {i}"
        name = base[: 31 - len(suffix)] + suffix
        i += 1
    taken.add(name.lower())
    return name


def _overview_tables(sheet: _Sheet, conn: sqlite3.Connection, f: Filters, zoo: str, cat: pd.DataFrame
                     ) -> dict[str, Any]:
    sheet.ws.title = "Overview"
    sheet.heading("LEMUR zoo report")
    sheet.note(f"Zoo: {zoo}")
    sheet.note(f"Filters: {describe(f)}")
    sheet.note(f"Generated: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M UTC}")
    sheet.note("Raw curve points and runs do not fit Excel; export them with --table points / --table runs.")
    sheet.table("Task / dataset / metric", cat)
    fl = agg.failures(conn, f)
    if fl["evaluator_runs"]:
        sheet.table("Evaluator runs (one per trial) by status", fl["by_status"])
        sheet.table("Failure reasons (failed and timed-out evaluator runs)", fl["reasons"])
    return fl


def _overview_plots(sheet: _Sheet, conn: sqlite3.Connection, f: Filters, fl: dict[str, Any],
                    correlation: dict[str, Any] | StatsError) -> None:
    values = agg.value_stats_many(conn, f, ("accuracy", "duration_ns"))
    sheet.plot("box", lambda: {"f": f, "stats": values["accuracy"].sort_values("median", ascending=False)})
    sheet.plot("durations", lambda: {"f": f, "stats": values["duration_ns"].sort_values("median", ascending=False)})
    sheet.plot("failures", lambda: fg.check_failures(f, fl))

    def corr() -> dict[str, Any]:
        if isinstance(correlation, StatsError):
            raise correlation
        return correlation
    sheet.plot("correlation", corr)


def _triple_sheet(sheet: _Sheet, conn: sqlite3.Connection, f: Filters, triple: Triple, epochs: pd.DataFrame,
                  top: int) -> None:
    tf = triple.narrow(f)
    sheet.heading(triple.label)
    sheet.note(f"Filters: {describe(tf)}")
    sheet.table("Accuracy per epoch (all curve points)", epochs)
    by_acc, total = agg.leaderboard(conn, tf, "accuracy", limit=top)
    keyless = ["task", "dataset", "metric", "model_id"]
    sheet.table(f"Leaderboard by final accuracy (top {len(by_acc)} of {total:,} models)", by_acc.drop(columns=keyless))
    by_a2t, _ = agg.leaderboard(conn, tf, "accuracy_to_time", limit=top)
    sheet.table(f"Leaderboard by accuracy-to-time (top {len(by_a2t)})", by_a2t.drop(columns=keyless))
    stats = agg.model_epoch_stats(conn, tf, by_acc["model_id"].tolist())
    sheet.table(f"Per model and epoch, top {len(by_acc)} models by accuracy (LEMUR's statistics)",
                stats.drop(columns=["task", "dataset", "metric"]))
    base = dataclasses.replace(tf, epoch=None)
    sheet.plot("mean_std", lambda: {"f": base, "triple": triple, "summary": epochs})
    sheet.plot("pareto", lambda: {"f": tf, "triple": triple, "models": agg.model_best(conn, tf, triple),
                                  "cap": agg.SCATTER_CAP})
    sheet.plot("accuracy_vs_time", lambda: {"f": tf, "triple": triple, "data": agg.accuracy_vs_time(conn, tf, triple)})


def _auto_workers(runs: int) -> int:
    if runs < POOL_MIN_RUNS:
        return 0
    return max(1, min(4, (os.cpu_count() or 1) - 1))


def write_report(conn: sqlite3.Connection, f: Filters, out: Path, zoo: str, top: int = REPORT_TOP,
                 workers: int | None = None) -> tuple[int, list[str], int]:
    """Write the report to `out` (via `out.part`). Returns (table rows, sheet names, plots embedded)."""
    from openpyxl import Workbook
    cat = agg.catalog(conn, f)
    cat = cat[cat["scored_runs"] > 0].reset_index(drop=True)
    if cat.empty:
        raise no_data(f)
    renderer = _Renderer(_auto_workers(int(cat["runs"].sum())) if workers is None else workers)
    try:
        wb = Workbook()
        sheets = [_Sheet(wb.active, 12, renderer)]
        fl = _overview_tables(sheets[0], conn, f, zoo, cat)
        try:  # hyperparameters (run.prm) are not in the temporary copy: correlate before making it
            correlation: dict[str, Any] | StatsError = fg.fetch_correlation(conn, f, fg.Options())
        except StatsError as exc:
            correlation = exc
        epochs = agg.epoch_summary(conn, f)
        taken = {"overview"}
        with materialized_runs(conn, f):
            _overview_plots(sheets[0], conn, f, fl, correlation)
            for r in cat.itertuples(index=False):
                triple = Triple(r.task, r.dataset, r.metric)
                ep = epochs[(epochs["task"] == r.task) & (epochs["dataset"] == r.dataset)
                            & (epochs["metric"] == r.metric)].reset_index(drop=True)
                sheet = _Sheet(wb.create_sheet(sheet_name(triple, taken)), 16, renderer)
                _triple_sheet(sheet, conn, f, triple, ep, top)
                sheets.append(sheet)
        images = 0
        for sheet in sheets:
            images += sheet.place_plots()
            sheet.widths()
    finally:
        renderer.close()
    tmp = out.with_name(out.name + ".part")
    wb.save(tmp)
    tmp.replace(out)
    return sum(s.rows for s in sheets), [s.ws.title for s in sheets], images
