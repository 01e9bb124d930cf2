"""Exports of the zoo: one table as CSV or Parquet (here), the Excel report (`stats.report`), or
fine-tuning data for code LLMs (SFT/DPO JSONL, `stats.finetune`).

Why streamed: a table export is for analysis elsewhere and may be the whole dataset (millions of
curve points), so it goes from SQLite in chunks through pyarrow (C++ CSV and Parquet writers) and
never holds the zoo in memory. The file appears under its name only when complete.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from stats import aggregates as agg
from stats.finetune import FinetuneResult, write_finetune
from stats.plots import open_zoo
from stats.report import REPORT_TOP, write_report
from stats.scope import StatsError, Triple, no_data, points_where
from zoo.query import Filters, _where

ExportFormat = Literal["csv", "parquet", "xlsx", "sft-jsonl", "dpo-jsonl"]
FINETUNE_FORMATS = ("sft-jsonl", "dpo-jsonl")  # folders of train/dev/test JSONL (stats.finetune)
TableName = Literal["points", "runs", "models", "epochs", "leaderboard", "failures", "catalog"]
CHUNK_ROWS = 100_000

TABLES: dict[str, str] = {
    "points": "every curve point (a LEMUR record): task, dataset, metric, nn, epoch, accuracy, val_accuracy, "
              "loss, duration_ns, accuracy_to_time, elapsed_s, run_uid, created",
    "runs": "every run: its hyperparameters (prm JSON), status, error, final accuracy and time, model size",
    "models": "LEMUR's aggregated statistics: per task/dataset/metric/nn/epoch the runs and accuracy "
              "mean/std/min/max",
    "epochs": "per task/dataset/metric/epoch: n, best, mean, std, min, quartiles of accuracy",
    "leaderboard": "best run of every model per task/dataset/metric, ranked by final accuracy",
    "failures": "failed evaluator runs (one per trial) by status, stage and kind, with shares and an example message",
    "catalog": "per task/dataset/metric: runs, scored and failed runs, models, best and mean accuracy",
}

_S, _F, _I = pa.string(), pa.float64(), pa.int64()
_POINTS = [("task", _S, "pt.task"), ("dataset", _S, "pt.dataset"), ("metric", _S, "pt.metric"),
           ("nn", _S, "m.name"), ("epoch", _F, "pt.epoch"), ("accuracy", _F, "pt.accuracy"),
           ("val_accuracy", _F, "pt.val_accuracy"), ("loss", _F, "pt.loss"), ("duration_ns", _I, "pt.duration_ns"),
           ("accuracy_to_time", _F, "pt.accuracy_to_time"), ("elapsed_s", _F, "pt.elapsed_s"),
           ("run_uid", _S, "p.uid"), ("created", _F, "pt.created")]
_RUNS = [("run_uid", _S, "p.uid"), ("nn", _S, "m.name"), ("task", _S, "p.task"), ("dataset", _S, "p.dataset"),
         ("metric", _S, "p.metric"), ("transform", _S, "p.transform"), ("prm", _S, "p.prm"),
         ("status", _S, "p.status"), ("source", _S, "p.source"), ("epochs", _F, "p.epochs"),
         ("accuracy", _F, "p.accuracy"), ("duration_ns", _I, "p.duration_ns"),
         ("accuracy_to_time", _F, "p.accuracy_to_time"), ("error_stage", _S, "json_extract(p.error, '$.stage')"),
         ("error_kind", _S, "json_extract(p.error, '$.kind')"),
         ("error_message", _S, "json_extract(p.error, '$.message')"), ("params", _I, "m.params"),
         ("flops", _I, "m.flops"), ("created", _F, "p.created")]


@dataclasses.dataclass
class ExportResult:
    """What an export wrote; `describe()` is the one-line report the CLI prints."""

    path: Path
    format: str
    table: str | None  # None for the Excel report
    rows: int  # data rows written (all sheets for xlsx)
    sheets: list[str] = dataclasses.field(default_factory=list)
    images: int = 0
    seconds: float = 0.0

    def describe(self) -> str:
        what = f"table {self.table}" if self.table else f"report with {len(self.sheets)} sheets, {self.images} plots"
        return f"Wrote {self.path} ({self.format}, {what}, {self.rows:,} rows) in {self.seconds:.1f} s"


# --- streamed tables -----------------------------------------------------------------------------
def _points_sql(f: Filters, triples: list[Any]) -> tuple[str, list[Any]]:
    """Points driven from `run` (alias p, so `_where` applies) joined to `point` by its primary key:
    the planner then scans runs in order and never takes the slow secondary-index-to-table path.

    Task/dataset/metric come back as one small integer (a CASE over `triples`) and the model as its
    id, so the only string made per row is the run uid: 27 % less CPU at 3 M points than reading
    the names (Python string creation dominates; Arrow decodes the dictionaries in C++).
    """
    where, args = _where(dataclasses.replace(f, epoch=None, min_accuracy=None))
    extra = []
    if f.epoch is not None:
        extra.append("pt.epoch = ?")
        args.append(float(f.epoch))
    if f.min_accuracy is not None:
        extra.append("pt.accuracy >= ?")
        args.append(float(f.min_accuracy))
    if extra:
        where = (where + " AND " if where else " WHERE ") + " AND ".join(extra)
    case = " ".join(f"WHEN ? THEN {i}" for i in range(len(triples)))
    keys = [f"{t.task}\x1f{t.dataset}\x1f{t.metric}" for t in triples]
    cols = ", ".join(expr for _, _, expr in _POINTS[4:])
    sql = (f"SELECT CASE pt.task || char(31) || pt.dataset || char(31) || pt.metric {case} ELSE -1 END, "
           f"pt.model_id, {cols} FROM run p CROSS JOIN point pt ON pt.run_id = p.id{where}")
    return sql, keys + args


def _points_batches(conn: sqlite3.Connection, f: Filters, chunk: int) -> Iterator[pa.RecordBatch]:
    where, wargs = points_where(f)
    triples = [tuple(r) for r in conn.execute(
        f"SELECT DISTINCT p.task, p.dataset, p.metric FROM point p{where}", wargs)]
    if not triples:
        raise no_data(f, "curve points")
    triples_ns = [Triple(*t) for t in triples]
    names = conn.execute("SELECT id, name FROM model ORDER BY id").fetchall()
    ids = np.array([r[0] for r in names], dtype=np.int64)
    name_dict = pa.array([r[1] for r in names], type=pa.string())
    parts = [pa.array([t[k] for t in triples], type=pa.string()) for k in range(3)]
    schema = pa.schema([(n, t) for n, t, _ in _POINTS])
    sql, args = _points_sql(f, triples_ns)
    cur = conn.execute(sql, args)
    while rows := cur.fetchmany(chunk):
        cols = list(zip(*rows))
        code = pa.array(cols[0], type=pa.int32())
        nn = pa.array(np.searchsorted(ids, np.asarray(cols[1], dtype=np.int64)).astype(np.int32))
        arrays = [pa.DictionaryArray.from_arrays(code, d).dictionary_decode() for d in parts]
        arrays.append(pa.DictionaryArray.from_arrays(nn, name_dict).dictionary_decode())
        arrays += [pa.array(c, type=t) for c, (_, t, _) in zip(cols[2:], _POINTS[4:])]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _runs_sql(f: Filters) -> tuple[str, list[Any]]:
    where, args = _where(dataclasses.replace(f, epoch=None))
    cols = ", ".join(f"{expr} AS {name}" for name, _, expr in _RUNS)
    return f"SELECT {cols} FROM run p JOIN model m ON m.id = p.model_id{where}", args


def _stream(conn: sqlite3.Connection, sql: str, args: list[Any], spec: list[tuple[str, Any, str]],
            chunk: int) -> Iterator[pa.RecordBatch]:
    schema = pa.schema([(n, t) for n, t, _ in spec])
    cur = conn.execute(sql, args)
    while rows := cur.fetchmany(chunk):
        cols = list(zip(*rows))
        yield pa.RecordBatch.from_arrays([pa.array(c, type=t) for c, (_, t, _) in zip(cols, spec)], schema=schema)


def _frame_table(df: pd.DataFrame) -> Iterator[pa.RecordBatch]:
    yield from pa.Table.from_pandas(df, preserve_index=False).to_batches()


def table_batches(conn: sqlite3.Connection, f: Filters, table: str, chunk: int = CHUNK_ROWS
                  ) -> Iterator[pa.RecordBatch]:
    """The rows of one export table as Arrow record batches (streamed for points and runs)."""
    if table == "points":
        return _points_batches(conn, f, chunk)
    if table == "runs":
        sql, args = _runs_sql(f)
        return _stream(conn, sql, args, _RUNS, chunk)
    builders: dict[str, Callable[[], pd.DataFrame]] = {
        "models": lambda: agg.model_epoch_stats(conn, f),
        "epochs": lambda: agg.epoch_summary(conn, f),
        "leaderboard": lambda: agg.leaderboard(conn, f, "accuracy", limit=-1)[0].drop(columns="model_id"),
        "failures": lambda: agg.failures(conn, f)["reasons"],
        "catalog": lambda: agg.catalog(conn, f),
    }
    if table not in builders:
        raise StatsError(f"Unknown table {table!r}. Use one of: {', '.join(TABLES)}.")
    return _frame_table(builders[table]())


def _write_table(conn: sqlite3.Connection, f: Filters, table: str, out: Path, fmt: str) -> int:
    rows = 0
    writer: Any = None
    tmp = out.with_name(out.name + ".part")
    try:
        for batch in table_batches(conn, f, table):
            if writer is None:
                writer = (pq.ParquetWriter(tmp, batch.schema, compression="zstd") if fmt == "parquet"
                          else pacsv.CSVWriter(tmp, batch.schema))
            writer.write_batch(batch)
            rows += batch.num_rows
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise no_data(f, f"rows for table {table!r}")
    tmp.replace(out)  # never leave half a file under the asked name
    return rows


def export(zoo: Path | str | sqlite3.Connection, out: Path | str, fmt: ExportFormat | None = None,
           filters: Filters | None = None, table: str = "points", top: int = REPORT_TOP,
           workers: int | None = None, finetune: dict[str, Any] | None = None) -> ExportResult | FinetuneResult:
    """Write `table` as csv/parquet, or the Excel report (`fmt="xlsx"`, `table` ignored), to `out`;
    for sft-jsonl/dpo-jsonl, `out` is a folder that gets train/dev/test.jsonl (`finetune`: keyword
    arguments of stats.finetune.write_finetune: seed, fractions, min_gap).

    The format defaults to the file suffix. `workers`: processes that render the report's plots
    (None: automatic, 0: in this process). Raises StatsError for an unknown format or table, or
    filters that match nothing; the file appears only when complete.
    """
    out = Path(out)
    fmt = fmt or out.suffix.lstrip(".").lower()  # type: ignore[assignment]
    if fmt in FINETUNE_FORMATS:
        return _export_finetune(zoo, out, fmt, filters or Filters(), finetune or {})
    if fmt not in ("csv", "parquet", "xlsx"):
        raise StatsError(f"Unknown export format {fmt!r}. Use csv, parquet, xlsx (or an OUT ending in one), "
                         "sft-jsonl or dpo-jsonl.")
    if fmt != "xlsx" and table not in TABLES:
        raise StatsError(f"Unknown table {table!r}. Use one of: {', '.join(TABLES)}.")
    f = filters or Filters()
    t0 = time.perf_counter()
    zoo_label = "(connection)" if isinstance(zoo, sqlite3.Connection) else str(zoo)
    conn = zoo if isinstance(zoo, sqlite3.Connection) else open_zoo(zoo)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "xlsx":
            rows, sheets, images = write_report(conn, f, out, zoo_label, top, workers)
            res = ExportResult(out, "xlsx", None, rows, sheets, images)
        else:
            res = ExportResult(out, fmt, table, _write_table(conn, f, table, out, fmt))
    finally:
        if not isinstance(zoo, sqlite3.Connection):
            conn.close()
    res.seconds = time.perf_counter() - t0
    return res


def _export_finetune(zoo: Path | str | sqlite3.Connection, out: Path, fmt: str, f: Filters,
                     options: dict[str, Any]) -> FinetuneResult:
    conn = zoo if isinstance(zoo, sqlite3.Connection) else open_zoo(zoo)
    try:
        return write_finetune(conn, out, fmt, f, **options)
    finally:
        if not isinstance(zoo, sqlite3.Connection):
            conn.close()
