"""Which rows a statistic is computed over, as SQL built on `zoo.query.Filters`.

Why a "scope": the same filters must mean the same thing in the query tool, the CLI and here, so every
SQL WHERE below comes from `zoo.query._where` (alias `p`). What one row stands for depends on the view:

- per-epoch views (learning curves, mean ± std per epoch) read `point`: one row per curve point;
- per-run views (scatters, histograms, box plots, durations) read one row per scored run: its last
  curve point, which the run row already carries (`run.accuracy`, `run.duration_ns`, ...), or, when
  `filters.epoch` is set, its point at that epoch. Reading `run` avoids the slow per-point table
  lookups of the WITHOUT ROWID `point` table (measured: 24 s vs 2 s for a 1 M-run leaderboard);
- per-model views (leaderboard, Pareto front) take the best of a model's per-run rows within each
  task/dataset/metric.

`only_best_accuracy` and `unique_nn` are query-tool notions and are ignored here.
"""

from __future__ import annotations

import dataclasses
import difflib
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

from zoo.query import Filters, _where

RUN_COLUMNS = ("run_id", "model_id", "task", "dataset", "metric", "epoch", "accuracy", "duration_ns",
               "accuracy_to_time", "created", "prm")
_RUN_TABLE: ContextVar[str] = ContextVar("stats_run_table", default="run")


class StatsError(ValueError):
    """A statistic that cannot be computed as asked; the message says what to do next."""


class NoData(StatsError):
    pass


class UnknownModel(StatsError):
    pass


class Triple(NamedTuple):
    """One task/dataset/metric: accuracies are only comparable inside one."""

    task: str
    dataset: str
    metric: str
    chosen: bool = False  # True when picked as the most populated one because filters left it open

    @property
    def label(self) -> str:
        return f"{self.task} / {self.dataset} / {self.metric}"

    def narrow(self, f: Filters) -> Filters:
        return dataclasses.replace(f, task=self.task, dataset=self.dataset, metric=self.metric)


def describe(f: Filters) -> str:
    """The filters as the agent wrote them, for messages and plot subtitles."""
    parts = [f"{k}={v!r}" for k, v in (("task", f.task), ("dataset", f.dataset), ("metric", f.metric),
                                        ("epoch", f.epoch), ("min_accuracy", f.min_accuracy)) if v is not None]
    if f.nn:
        parts.append(f"nn={list(f.nn)!r}")
    if f.nn_prefix:
        parts.append(f"nn_prefix={list(f.nn_prefix)!r}")
    return ", ".join(parts) or "no filters"


def no_data(f: Filters, what: str = "scored runs") -> NoData:
    return NoData(f"No {what} match {describe(f)}; call list_catalog to see what the zoo holds "
                  "(tasks, datasets, metrics and run counts), then loosen the filters.")


def runs_sql(f: Filters) -> tuple[str, list[Any]]:
    """A derived table `(...)` with RUN_COLUMNS: one row per scored run (its last point, or its point
    at f.epoch).

    With an epoch the rows are driven from `run` (where the filters apply) into `point` by its
    primary key (run_id, epoch); CROSS JOIN pins that order. Starting from `point` instead makes
    SQLite walk a secondary index and look every row up in the WITHOUT ROWID table: 9 s instead of
    2 s for an epoch-2 leaderboard over a million runs. Inside `materialized_runs` the runs come
    from its indexed temporary copy instead of `run`.
    """
    table = _RUN_TABLE.get()
    if f.epoch is None:
        where, args = _where(dataclasses.replace(f, epoch=None))
        where = (where + " AND" if where else " WHERE") + " p.accuracy IS NOT NULL"
        cols = ("p.id AS run_id, p.model_id, p.task, p.dataset, p.metric, p.epochs AS epoch, p.accuracy, "
                "p.duration_ns, p.accuracy_to_time, p.created, p.prm")
        return f"(SELECT {cols} FROM {table} p{where})", args
    where, args = _where(dataclasses.replace(f, epoch=None, min_accuracy=None))
    extra = ["pt.epoch = ?", "pt.accuracy IS NOT NULL"]
    args.append(float(f.epoch))
    if f.min_accuracy is not None:
        extra.append("pt.accuracy >= ?")
        args.append(float(f.min_accuracy))
    where = (where + " AND " if where else " WHERE ") + " AND ".join(extra)
    cols = ("pt.run_id, pt.model_id, pt.task, pt.dataset, pt.metric, pt.epoch, pt.accuracy, pt.duration_ns, "
            "pt.accuracy_to_time, pt.created, p.prm")
    return f"(SELECT {cols} FROM {table} p CROSS JOIN point pt ON pt.run_id = p.id{where})", args


def is_materialized() -> bool:
    """Whether `runs_sql` reads the indexed temporary copy (inside `materialized_runs`)."""
    return _RUN_TABLE.get() != "run"


@contextmanager
def materialized_runs(conn: sqlite3.Connection, f: Filters) -> Iterator[int]:
    """Answer many per-triple queries over one filter set (the Excel report) from an indexed copy.

    `run` has no (task, dataset, metric) index, so each per-triple query scans every run (0.25 s
    per query at a million runs). Inside this block `runs_sql` reads a TEMP table of the scored runs'
    statistic columns (prm left out: ~80 bytes a run) indexed on (task, dataset, metric, model_id),
    built in one scan (~2.7 s CPU at a million runs). Yields the number of runs copied.
    """
    where, args = _where(dataclasses.replace(f, epoch=None, min_accuracy=None))
    where = (where + " AND" if where else " WHERE") + " p.accuracy IS NOT NULL"
    conn.execute("DROP TABLE IF EXISTS temp.stats_runs")
    conn.execute("CREATE TEMP TABLE stats_runs AS SELECT p.id, p.model_id, p.task, p.dataset, p.metric, p.epochs, "
                 f"p.accuracy, p.duration_ns, p.accuracy_to_time, p.created, NULL AS prm FROM main.run p{where}", args)
    conn.execute("CREATE INDEX temp.stats_runs_triple ON stats_runs(task, dataset, metric, model_id)")
    n = conn.execute("SELECT COUNT(*) FROM temp.stats_runs").fetchone()[0]
    token = _RUN_TABLE.set("temp.stats_runs")
    try:
        yield n
    finally:
        _RUN_TABLE.reset(token)
        conn.execute("DROP TABLE IF EXISTS temp.stats_runs")


def all_runs_sql(f: Filters, columns: str) -> tuple[str, list[Any]]:
    """`SELECT columns FROM run p WHERE filters` over every run, scored or not (failures, statuses)."""
    where, args = _where(dataclasses.replace(f, epoch=None, min_accuracy=None))
    return f"SELECT {columns} FROM run p{where}", args


def points_where(f: Filters) -> tuple[str, list[Any]]:
    """WHERE over `point p` for per-epoch views; only scored points (a model filter through its runs: the
    point view has no model index, zoo.query._where(via_run=True))."""
    where, args = _where(f, via_run=True)
    return (where + " AND" if where else " WHERE") + " p.accuracy IS NOT NULL", args


def sample_clause(column: str, every: int) -> str:
    """A deterministic ~1/every sample: Knuth's multiplicative hash of the id, so that periodic ids
    (every 8th trial of a job, say) do not alias with the stride."""
    if every <= 1:
        return "1"
    return f"(({column} * 2654435761) % 4294967296) % {int(every)} = 0"


def check_models(conn: sqlite3.Connection, names: tuple[str, ...] | list[str]) -> None:
    """Raise UnknownModel, with near names, for the first name the zoo lacks."""
    if not names:
        return
    found = {r[0] for r in conn.execute(
        f"SELECT name FROM model WHERE name IN ({','.join('?' * len(names))})", list(names))}
    for name in names:
        if name not in found:
            near = [r[0] for r in conn.execute(
                "SELECT name FROM model WHERE name >= ? ORDER BY name LIMIT 200", (name[:3],))]
            close = difflib.get_close_matches(name, near, n=3, cutoff=0.6)
            hint = f" Close names: {', '.join(close)}." if close else ""
            raise UnknownModel(f"Unknown model {name!r}.{hint} Use query_models to find names.")


def resolve_triple(conn: sqlite3.Connection, f: Filters) -> Triple:
    """The task/dataset/metric a single-triple view shows: the filters' own, else the most populated.

    Counted on the `point_filter` covering index (every filter column is in it), so it costs one
    index scan even on a million runs (~0.4 s), and nothing when the filters name all three.
    """
    where, args = points_where(f)
    if f.task is not None and f.dataset is not None and f.metric is not None:
        if conn.execute(f"SELECT 1 FROM point p{where} LIMIT 1", args).fetchone() is None:
            raise no_data(f, "scored curve points")
        return Triple(f.task, f.dataset, f.metric)
    row = conn.execute(f"SELECT p.task, p.dataset, p.metric, COUNT(*) AS n FROM point p{where} "
                       "GROUP BY p.task, p.dataset, p.metric ORDER BY n DESC, 1, 2, 3 LIMIT 1", args).fetchone()
    if row is None:
        raise no_data(f, "scored curve points")
    return Triple(row[0], row[1], row[2], chosen=True)
