"""Aggregates over the zoo, computed in SQLite wherever SQL can (counts, means, maxima, bins), as
pandas DataFrames. Every function takes an open sqlite3 connection (`zoo.connection.connect_sync`)
and `zoo.query.Filters`; see `stats.scope` for which rows each one reads.

Why not load the zoo into pandas: a million runs are ~3 M curve points; GROUP BY on the covering
index `point_filter` answers per-epoch statistics in well under a second, while fetching the rows into
Python alone takes longer. Only what SQL lacks is done in numpy: quantiles (SQLite has no median), the
exact Pareto front, and Pearson correlations (pairwise sums over a million rows took 35 s in SQL; a
deterministic sample of 20,000 runs gives r within ±0.01 in 0.3 s).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sqlite3
from typing import Any, Literal

import numpy as np
import pandas as pd

from sandbox.protocol import JobStatus, RunStatus
from stats.scope import (
    Triple,
    all_runs_sql,
    is_materialized,
    no_data,
    points_where,
    runs_sql,
    sample_clause,
)
from zoo import repeat_groups
from zoo.jobs import JobKind
from zoo.query import SCORE_BY, SCORE_ORDER_SQL, Filters, model_scores_sql, name_filter

LeaderboardBy = Literal["accuracy", "accuracy_to_time", "accuracy_to_time_norm"]
FAILED_STATUSES = tuple(str(s) for s in RunStatus if s.is_failure())
SCATTER_CAP = 5_000  # points drawn in a scatter; the rest are summarised (front, counts)
CORRELATION_CAP = 20_000  # runs sampled for correlations


def _frame(conn: sqlite3.Connection, sql: str, args: list[Any] | tuple[Any, ...] = ()) -> pd.DataFrame:
    cur = conn.execute(sql, list(args))
    cols = [d[0] for d in cur.description]
    return pd.DataFrame.from_records(cur.fetchall(), columns=cols)


def _floats(conn: sqlite3.Connection, sql: str, args: list[Any]) -> np.ndarray:
    return np.fromiter((r[0] for r in conn.execute(sql, args)), dtype=float)


_NULL = -1.7e308  # stands for NULL on the way into numpy (see _matrix)


def _matrix(conn: sqlite3.Connection, sql: str, args: list[Any], width: int) -> np.ndarray:
    """Numeric rows straight into a float matrix: 40 % less CPU than np.array(fetchall()). The SQL must
    not return NULL; wrap nullable columns as IFNULL(x, _NULL) and they come back as NaN."""
    flat = np.fromiter(itertools.chain.from_iterable(conn.execute(sql, args)), dtype=float)
    flat[flat == _NULL] = np.nan
    return flat.reshape(-1, width)


# --- what the zoo holds --------------------------------------------------------------------------
def catalog(conn: sqlite3.Connection, f: Filters) -> pd.DataFrame:
    """Per task/dataset/metric: runs, scored runs, failed runs, models, best and mean final accuracy."""
    sql, args = all_runs_sql(f, (
        "p.task, p.dataset, p.metric, COUNT(*) AS runs, COUNT(p.accuracy) AS scored_runs, "
        f"SUM(p.status IN {FAILED_STATUSES}) AS failed_runs, COUNT(DISTINCT p.model_id) AS models, "
        "MAX(p.accuracy) AS best_accuracy, AVG(p.accuracy) AS mean_accuracy"))
    return _frame(conn, sql + " GROUP BY p.task, p.dataset, p.metric ORDER BY runs DESC, 1, 2, 3", args)


# --- per epoch -----------------------------------------------------------------------------------
def epoch_summary(conn: sqlite3.Connection, f: Filters) -> pd.DataFrame:
    """Per task/dataset/metric/epoch (half epochs included): n, best, mean, std, min and quartiles.

    n, best, mean, std and min come from one GROUP BY on the covering index; the quartiles from the
    group's accuracies, read one group at a time through the same index.
    """
    where, args = points_where(f)
    df = _frame(conn, (
        "SELECT p.task, p.dataset, p.metric, p.epoch, COUNT(*) AS n, MAX(p.accuracy) AS best, "
        "AVG(p.accuracy) AS mean, AVG(p.accuracy * p.accuracy) AS mean_sq, MIN(p.accuracy) AS min "
        f"FROM point p{where} GROUP BY p.task, p.dataset, p.metric, p.epoch "
        "ORDER BY p.task, p.dataset, p.metric, p.epoch"), args)
    if df.empty:
        return pd.DataFrame(columns=["task", "dataset", "metric", "epoch", "n", "best", "mean", "std", "min",
                                     "q1", "median", "q3"])
    var = (df["mean_sq"] - df["mean"] ** 2) * df["n"] / (df["n"] - 1).where(df["n"] > 1)
    df["std"] = np.sqrt(var.clip(lower=0))
    quartiles = []
    for row in df.itertuples(index=False):
        g = dataclasses.replace(f, task=row.task, dataset=row.dataset, metric=row.metric, epoch=row.epoch)
        gw, ga = points_where(g)
        quartiles.append(np.quantile(_floats(conn, f"SELECT p.accuracy FROM point p{gw}", ga), [0.25, 0.5, 0.75]))
    df[["q1", "median", "q3"]] = np.array(quartiles)
    return df[["task", "dataset", "metric", "epoch", "n", "best", "mean", "std", "min", "q1", "median", "q3"]]


def model_epoch_stats(conn: sqlite3.Connection, f: Filters, model_ids: list[int] | None = None) -> pd.DataFrame:
    """LEMUR's aggregated statistics: per task/dataset/metric/model/epoch the number of curve points
    (runs that reached the epoch) and accuracy mean/std/min/max, answered from the covering index."""
    where, args = points_where(f)
    if model_ids is not None:
        # via the runs to the point primary key: points have no model index (zoo.schema version 9)
        where += f" AND p.run_id IN (SELECT id FROM run WHERE model_id IN ({','.join('?' * len(model_ids))}))"
        args = args + list(model_ids)
    df = _frame(conn, (
        "SELECT q.task, q.dataset, q.metric, m.name AS nn, q.epoch, q.runs, q.accuracy_mean, q.mean_sq, "
        "q.accuracy_min, q.accuracy_max FROM ("
        "SELECT p.task, p.dataset, p.metric, p.epoch, p.model_id, COUNT(*) AS runs, "
        "AVG(p.accuracy) AS accuracy_mean, AVG(p.accuracy * p.accuracy) AS mean_sq, "
        "MIN(p.accuracy) AS accuracy_min, MAX(p.accuracy) AS accuracy_max "
        f"FROM point p{where} GROUP BY p.task, p.dataset, p.metric, p.epoch, p.model_id) q "
        "JOIN model m ON m.id = q.model_id ORDER BY q.task, q.dataset, q.metric, m.name, q.epoch"), args)
    var = (df["mean_sq"] - df["accuracy_mean"] ** 2) * df["runs"] / (df["runs"] - 1).where(df["runs"] > 1)
    df.insert(7, "accuracy_std", np.sqrt(var.astype(float).clip(lower=0)))
    return df.drop(columns="mean_sq")


# --- per model -----------------------------------------------------------------------------------
def leaderboard(conn: sqlite3.Connection, f: Filters, by: LeaderboardBy = "accuracy", limit: int = 20,
                offset: int = 0, include_partial: bool = False) -> tuple[pd.DataFrame, int]:
    """Each model's score per task/dataset/metric (`zoo.query.SCORE_DEFINITION`: the best of its complete
    runs' last points, ties to the faster), ranked by accuracy or accuracy-to-time.

    Returns (rows, total number of ranked model/triple pairs). Each row carries the run that holds the
    score: its accuracy, accuracy-to-time, epoch, training time and uid, and the model's params/FLOPs.
    """
    if by not in SCORE_BY:
        raise ValueError(f"by must be one of {', '.join(SCORE_BY)}, not {by!r}")
    scores, args = model_scores_sql(f, by, include_partial)
    df = _frame(conn, (
        f"SELECT s.*, COUNT(*) OVER () AS total FROM {scores} s "
        f"ORDER BY {SCORE_ORDER_SQL.replace('s.model_id', 's.task, s.dataset, s.metric, s.model_id')} "
        "LIMIT ? OFFSET ?"), args + [int(limit), int(offset)])
    total = int(df["total"].iloc[0]) if len(df) else 0
    if df.empty:
        return df.assign(rank=[], name=[], params=[], flops=[], run_uid=[]), total
    ids = df["model_id"].tolist()
    models = _frame(conn, f"SELECT id AS model_id, name, params, flops FROM model WHERE id IN "
                          f"({','.join('?' * len(ids))})", ids)
    runs = df["run_id"].tolist()
    uids = _frame(conn, f"SELECT id AS run_id, uid AS run_uid FROM run WHERE id IN ({','.join('?' * len(runs))})",
                  runs)
    df = df.merge(models, on="model_id", how="left").merge(uids, on="run_id", how="left")
    df.insert(0, "rank", range(offset + 1, offset + 1 + len(df)))
    df["duration_s"] = df["duration_ns"] / 1e9
    df["duration_norm_s"] = pd.to_numeric(df["duration_norm_ns"], errors="coerce") / 1e9  # NaN: not calibrated
    df["repeat_group"] = _repeat_groups(conn, runs, df["run_id"])
    cols = ["rank", "name", "task", "dataset", "metric", "accuracy", "accuracy_to_time", "epoch", "duration_s",
            "duration_norm_s", "params", "flops", "runs", "run_uid", "repeat_group", "model_id"]
    return df[cols], total


def _repeat_groups(conn: sqlite3.Connection, run_ids: list[int], column: pd.Series) -> list[dict[str, Any] | None]:
    """The repeat group (zoo.repeat_groups: mean and std over the job's selected trial and its repeats) of the
    run holding each row's score, None where that run's job had no repeats."""
    jobs = dict(conn.execute(f"SELECT id, job_id FROM run WHERE id IN ({','.join('?' * len(run_ids))})",
                             run_ids).fetchall())
    found = repeat_groups.groups(conn, jobs.values())
    return [found.get(jobs.get(int(r)) or "") for r in column]


def model_best(conn: sqlite3.Connection, f: Filters, triple: Triple) -> pd.DataFrame:
    """Per model in one triple: its score (`zoo.query.SCORE_DEFINITION`) with that run's training time,
    the runs counted, params, FLOPs."""
    scores, args = model_scores_sql(triple.narrow(f))
    return _frame(conn, (
        "SELECT m.name, s.model_id, s.accuracy, s.duration_ns, s.runs, m.params, m.flops "
        f"FROM {scores} s JOIN model m ON m.id = s.model_id ORDER BY s.model_id"), args)


def pareto_mask(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """True for the points no other point beats: lower-or-equal cost with higher value (exact, O(n log n))."""
    cost = np.asarray(cost, dtype=float)
    value = np.asarray(value, dtype=float)
    order = np.lexsort((-value, cost))  # by cost, best value first among equal costs
    best_before = np.maximum.accumulate(np.concatenate([[-np.inf], value[order][:-1]]))
    on = value[order] > best_before
    mask = np.zeros(len(cost), dtype=bool)
    mask[order[on]] = True
    return mask


# --- per run -------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScatterData:
    sample: pd.DataFrame  # at most `cap` runs: duration_ns, accuracy, run_id, epoch
    front: pd.DataFrame  # every run on the time/accuracy Pareto front (computed on all runs)
    total: int  # runs in scope
    every: int  # one run in `every` was drawn


def accuracy_vs_time(conn: sqlite3.Connection, f: Filters, triple: Triple, cap: int = SCATTER_CAP) -> ScatterData:
    """Final accuracy against training time for one triple: a deterministic sample of at most `cap`
    runs, and the exact front (fastest run for each accuracy level) over all runs.

    One indexed read of (time, accuracy, run id, epoch) per run of the triple; front and sample are
    then computed in numpy. Measured on 1 M runs (200 k in the triple): 0.4 s CPU, against 1.1 s for
    a window-function front plus a sampling query in SQLite.
    """
    scope, args = runs_sql(triple.narrow(f))
    data = _matrix(conn, f"SELECT s.duration_ns, s.accuracy, s.run_id, s.epoch FROM {scope} s "
                         "WHERE s.duration_ns > 0", args, 4)
    total = len(data)
    if total == 0:
        raise no_data(triple.narrow(f), "runs with a training time")
    every = max(1, math.ceil(total / cap))
    ids = data[:, 2].astype(np.uint64)
    picked = ((ids * np.uint64(2654435761)) % np.uint64(2**32)) % np.uint64(every) == 0
    sample = pd.DataFrame(data[picked][:cap], columns=["duration_ns", "accuracy", "run_id", "epoch"])
    front = pd.DataFrame(data[pareto_mask(data[:, 0], data[:, 1])], columns=sample.columns)
    return ScatterData(sample, front.sort_values("duration_ns").reset_index(drop=True), total, every)


def value_stats(conn: sqlite3.Connection, f: Filters, column: Literal["accuracy", "duration_ns"]) -> pd.DataFrame:
    """Per triple: n, mean, min, 5th/25th/50th/75th/95th percentile and max of a per-run column
    (durations: only positive ones). For box plots."""
    return value_stats_many(conn, f, (column,))[column]


def value_stats_many(conn: sqlite3.Connection, f: Filters, columns: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """`value_stats` for several columns from one read of the runs.

    SQLite has no percentiles, so the values are read and ranked in numpy. The triple of each run
    comes back as a small integer (a CASE over the triples, which the covering index lists), so only
    numbers cross into Python: 1.2 s instead of 3.5 s at a million runs. Inside `materialized_runs`
    each triple is read through the temporary table's index instead.
    """
    triples = catalog_triples(conn, f)
    vals = ", ".join(f"IFNULL(s.{c}, {_NULL})" for c in columns)
    if is_materialized():
        parts = []
        for i, t in enumerate(triples):
            scope, args = runs_sql(t.narrow(f))
            parts.append(_matrix(conn, f"SELECT {i}, {vals} FROM {scope} s", args, len(columns) + 1))
        data = np.concatenate(parts) if parts else np.empty((0, len(columns) + 1))
    else:
        scope, args = runs_sql(f)
        case = " ".join(f"WHEN ? THEN {i}" for i in range(len(triples)))
        keys = [f"{t.task}\x1f{t.dataset}\x1f{t.metric}" for t in triples]
        data = _matrix(conn, f"SELECT CASE s.task || char(31) || s.dataset || char(31) || s.metric {case} ELSE -1 END, "
                             f"{vals} FROM {scope} s", keys + args, len(columns) + 1) if triples else \
            np.empty((0, len(columns) + 1))
    key = data[:, 0].astype(int)
    out = {}
    for j, col in enumerate(columns, 1):
        rows = []
        for i, t in enumerate(triples):
            v = data[key == i, j]
            v = v[v > 0] if col == "duration_ns" else v[~np.isnan(v)]
            if v.size:
                q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
                rows.append((t.task, t.dataset, t.metric, v.size, float(v.mean()), float(v.min()), *q.tolist(),
                             float(v.max())))
        if not rows:
            raise no_data(f)
        st = pd.DataFrame(rows, columns=["task", "dataset", "metric", "n", "mean", "min", "p5", "q1", "median", "q3",
                                         "p95", "max"])
        out[col] = st.sort_values(["n", "task", "dataset", "metric"], ascending=[False, True, True, True])\
            .reset_index(drop=True)
    return out


def catalog_triples(conn: sqlite3.Connection, f: Filters) -> list[Triple]:
    """The task/dataset/metric triples with scored points under the filters, from the covering index."""
    where, args = points_where(f)
    return [Triple(*r) for r in conn.execute(
        f"SELECT DISTINCT p.task, p.dataset, p.metric FROM point p{where} ORDER BY 1, 2, 3", args)]


def accuracy_histogram(conn: sqlite3.Connection, f: Filters, triple: Triple, bins: int = 40) -> dict[str, Any]:
    """Final accuracies of one triple in `bins` equal bins between their min and max, in SQL (two
    scans: range and mean, then counts). Returns {"bins": DataFrame(left, right, count), "n", "mean",
    "min", "max"}."""
    scope, args = runs_sql(triple.narrow(f))
    lo, hi, mean, n = conn.execute(f"SELECT MIN(s.accuracy), MAX(s.accuracy), AVG(s.accuracy), COUNT(*) "
                                   f"FROM {scope} s", args).fetchone()
    if not n:
        raise no_data(triple.narrow(f))
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = dict(conn.execute(
        f"SELECT MIN(CAST((s.accuracy - ?) / ? AS INTEGER), ?) AS b, COUNT(*) FROM {scope} s GROUP BY b",
        [lo, width, bins - 1] + args).fetchall())
    left = lo + width * np.arange(bins)
    df = pd.DataFrame({"left": left, "right": left + width, "count": [counts.get(i, 0) for i in range(bins)]})
    return {"bins": df, "n": int(n), "mean": float(mean), "min": float(lo), "max": float(hi)}


def timeline(conn: sqlite3.Connection, f: Filters, triple: Triple, bins: int = 60, window: int = 5) -> pd.DataFrame:
    """Runs per time bin (by creation time): count, mean and best final accuracy, the rolling mean of
    the bin means over `window` bins (LEMUR's rolling-mean plot) and the best accuracy so far."""
    scope, args = runs_sql(triple.narrow(f))
    t0, t1 = conn.execute(f"SELECT MIN(s.created), MAX(s.created) FROM {scope} s", args).fetchone()
    if t0 is None:
        raise no_data(triple.narrow(f))
    width = max((t1 - t0) / bins, 1.0)
    df = _frame(conn, (
        f"SELECT MIN(CAST((s.created - ?) / ? AS INTEGER), ?) AS bin, COUNT(*) AS runs, AVG(s.accuracy) AS mean, "
        f"MAX(s.accuracy) AS best FROM {scope} s GROUP BY bin ORDER BY bin"), [t0, width, bins - 1] + args)
    df["start"] = t0 + df["bin"] * width
    df["rolling_mean"] = df["mean"].rolling(window, min_periods=1).mean()
    df["best_so_far"] = df["best"].cummax()
    return df


def failures(conn: sqlite3.Connection, f: Filters) -> dict[str, Any]:
    """What share of evaluator runs failed and why.

    Counted per run, i.e. per trial of a submission (source != 'lemur-import'; imported LEMUR records
    exist only because they trained). A job the budget stopped keeps its finished trials as succeeded
    or pruned runs and shows here by them; the job's own status is in get_job. Failed means status
    failed or timed_out; `reasons` splits them by the error's stage and kind, with one example message
    each. Shares are of all evaluator runs (`evaluator_runs`).
    """
    sql, args = all_runs_sql(f, (
        "p.source <> 'lemur-import' AS submitted, p.status, json_extract(p.error, '$.stage') AS stage, "
        "json_extract(p.error, '$.kind') AS kind, COUNT(*) AS runs, "
        "MIN(json_extract(p.error, '$.message')) AS example"))
    df = _frame(conn, sql + " GROUP BY 1, 2, 3, 4", args)
    if df.empty:
        raise no_data(f, "runs")
    total = int(df["runs"].sum())
    sub = df[df["submitted"] == 1]
    evaluator_runs = int(sub["runs"].sum())
    by_status, reasons = _status_tables(sub, "runs", sub["status"].isin(FAILED_STATUSES))
    reasons["share"] = reasons["runs"] / evaluator_runs if evaluator_runs else np.nan
    n_failed = int(reasons["runs"].sum())
    return {"runs": total, "evaluator_runs": evaluator_runs, "failed": n_failed,
            "failed_share": n_failed / evaluator_runs if evaluator_runs else None,
            "by_status": by_status, "reasons": reasons}


def _status_tables(df: pd.DataFrame, count: str, ended_badly: pd.Series) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From rows (status, stage, kind, `count`, example): the count and share per status, most first, and
    the rows where `ended_badly` grouped by status, stage and kind (unknown where no error says), with one
    example message each, most first. Shared by the per-run and the per-job views."""
    total = int(df[count].sum())
    by_status = (df.groupby("status", as_index=False)[count].sum()
                 .sort_values([count, "status"], ascending=[False, True]).reset_index(drop=True))
    by_status["share"] = by_status[count] / total if total else np.nan
    bad = df[ended_badly].copy()
    bad[["stage", "kind"]] = bad[["stage", "kind"]].fillna("unknown")
    reasons = (bad.groupby(["status", "stage", "kind"], as_index=False)
               .agg(**{count: (count, "sum")}, example=("example", "first"))
               .sort_values([count, "stage", "kind"], ascending=[False, True, True]).reset_index(drop=True))
    return by_status, reasons


def job_outcomes(conn: sqlite3.Connection, f: Filters) -> dict[str, Any]:
    """How the finished submissions (jobs) ended, and why those that did not succeed ended as they did.

    The per-job view next to `failures`' per-run one: a submission whose budget ran out after two good
    trials is one `timed_out` job but two succeeded runs. Read from the job queue, so only a zoo that a
    server evaluated into has any (imported and synthetic zoos have none: `jobs` is 0). Filters apply
    through the request (task, dataset, metric) and the model name (nn, nn_prefix); epoch and
    min_accuracy describe runs, not jobs, and are ignored here. `check_model` calls leave no job."""
    finished = JobStatus.finished()
    where = ["kind IN (?, ?)", f"status IN ({', '.join('?' * len(finished))})"]
    args: list[Any] = [JobKind.SUBMIT, JobKind.EVALUATE, *finished]
    for key in ("task", "dataset", "metric"):
        value = getattr(f, key)
        if value is not None:
            where.append(f"json_extract(request, '$.{key}') = ?")
            args.append(value)
    names, name_args = name_filter(f, "model_name")
    if names:
        where.append(names)
        args.extend(name_args)
    df = _frame(conn, "SELECT status, json_extract(error, '$.stage') AS stage, json_extract(error, '$.kind') AS "
                "kind, COUNT(*) AS jobs, MIN(json_extract(error, '$.message')) AS example FROM job WHERE "
                + " AND ".join(where) + " GROUP BY 1, 2, 3", args)
    by_status, reasons = _status_tables(df, "jobs", df["status"] != JobStatus.SUCCEEDED)
    return {"jobs": int(df["jobs"].sum()), "by_status": by_status, "reasons": reasons}


CORRELATION_VARIABLES: dict[str, str] = {
    "accuracy": "s.accuracy",
    "epochs": "s.epoch",
    "log10 training time (s)": "log10(NULLIF(s.duration_ns, 0) / 1e9)",
    "accuracy-to-time": "s.accuracy_to_time",
    "log10 params": "log10(NULLIF(m.params, 0))",
    "log10 FLOPs": "log10(NULLIF(m.flops, 0))",
    "log10 lr": "log10(NULLIF(json_extract(s.prm, '$.lr'), 0))",
    "log2 batch": "log2(NULLIF(json_extract(s.prm, '$.batch'), 0))",
    "momentum": "json_extract(s.prm, '$.momentum')",
    "dropout": "json_extract(s.prm, '$.dropout')",
}


def correlation(conn: sqlite3.Connection, f: Filters, cap: int = CORRELATION_CAP) -> tuple[pd.DataFrame, int, int]:
    """Pearson correlations (pairwise complete) between accuracy, time, size and hyperparameters over a
    deterministic sample of at most `cap` scored runs. Returns (matrix, runs sampled, runs in scope);
    variables with fewer than 3 values or no spread are dropped."""
    scope, args = runs_sql(f)
    total = conn.execute(f"SELECT COUNT(*) FROM {scope} s", args).fetchone()[0]
    if not total:
        raise no_data(f)
    every = max(1, math.ceil(total / cap))
    cols = ", ".join(f'{expr} AS "{name}"' for name, expr in CORRELATION_VARIABLES.items())
    df = _frame(conn, f"SELECT {cols} FROM {scope} s LEFT JOIN model m ON m.id = s.model_id "
                      f"WHERE {sample_clause('s.run_id', every)}", args).apply(pd.to_numeric, errors="coerce")
    df = df.loc[:, (df.notna().sum() >= 3) & (df.std() > 0)]
    return df.corr(method="pearson", min_periods=3), len(df), int(total)


# --- learning curves -----------------------------------------------------------------------------
def learning_curves(conn: sqlite3.Connection, f: Filters, triple: Triple, models: tuple[str, ...] = (),
                    limit: int = 5) -> pd.DataFrame:
    """Every curve point (half epochs included) of the best run of each model in one triple.

    `models` picks the models (their best run in the triple, partial runs included); without it, the
    `limit` models with the best score (`zoo.query.SCORE_DEFINITION`, the leaderboard's order).
    Columns: name, run_uid, epoch, accuracy, duration_ns, final.
    """
    g = triple.narrow(dataclasses.replace(f, nn=tuple(models) or f.nn, epoch=None))
    scores, args = model_scores_sql(g, include_partial=bool(models))  # a named model's curve shows even if partial
    best = _frame(conn, (
        f"SELECT s.model_id, s.best AS final, s.run_id FROM {scores} s "
        f"ORDER BY {SCORE_ORDER_SQL} LIMIT ?"), args + [len(models) if models else int(limit)])
    if best.empty:
        raise no_data(g, "scored runs of these models")
    ids = best["run_id"].tolist()
    pts = _frame(conn, (
        "SELECT m.name, r.uid AS run_uid, p.epoch, p.accuracy, p.duration_ns, p.run_id FROM point p "
        "JOIN run r ON r.id = p.run_id JOIN model m ON m.id = p.model_id "
        f"WHERE p.run_id IN ({','.join('?' * len(ids))}) AND p.accuracy IS NOT NULL ORDER BY p.run_id, p.epoch"),
        ids)
    pts = pts.merge(best[["run_id", "final"]], on="run_id")
    pts["rank"] = pts["run_id"].map({rid: i for i, rid in enumerate(ids)})
    return pts.sort_values(["rank", "epoch"]).drop(columns=["run_id", "rank"]).reset_index(drop=True)
