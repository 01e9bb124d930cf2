"""Copy LEMUR 2.2's side tables (nn_stat, run, tflite, prun) into the zoo's `lemur_*` tables.

Why copied whole as JSON plus a few typed columns: these tables are LEMUR's own measurements
(architecture statistics, on-device benchmarks, TFLite exports, pruning experiments), read back per
model (`zoo.lemur_extras`) or filtered on a few fields; keeping every column under LEMUR's names
lets `nn_stat_data()`/`run_data()` answer with LEMUR's column names without a schema per version.
Rows are keyed by LEMUR's primary key, so a re-import adds nothing (INSERT OR IGNORE).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from lemur_agent_server.lemur_db_source import LemurDatabase

# source table -> (zoo table, model-name column in the source, typed columns copied as is)
SIDE: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "nn_stat": ("lemur_nn_stat", "nn_name", ("prm_id", "total_params", "flops", "model_size_mb", "error")),
    "run": ("lemur_mobile_run", "model_name", ("device_type", "precision_type", "valid", "duration")),
    "tflite": ("lemur_tflite", "model_name", ("accuracy", "precision_type")),
    "prun": ("lemur_prun", "model_name", ("pruning_method", "task_dataset", "accuracy", "pruning_ratio")),
}
SIDE_TABLES = tuple(SIDE)
BATCH = 10_000

AddProblem = Callable[[str, str], None]


def _json_value(value: Any) -> Any:
    return value.hex() if isinstance(value, bytes) else value


def _rows(table: str, columns: list[str], rows: Iterator[tuple[Any, ...]],
          add_problem: AddProblem) -> Iterator[tuple[Any, ...]]:
    """Zoo rows (lemur_id, model_name, typed..., data) of one source table; keyless rows reported."""
    _, name_column, typed = SIDE[table]
    index = {c: i for i, c in enumerate(columns)}
    id_at, name_at = index.get("id"), index.get(name_column)
    typed_at = [index.get(c) for c in typed]
    for row in rows:
        lemur_id = row[id_at] if id_at is not None else None
        name = row[name_at] if name_at is not None else None
        if not isinstance(lemur_id, str) or not isinstance(name, str):
            add_problem(f"{table}:{lemur_id}", f"row without a text id and {name_column}; skipped")
            continue
        data = {c: _json_value(v) for c, v in zip(columns, row, strict=True) if v is not None}
        yield (lemur_id, name, *(row[i] if i is not None else None for i in typed_at),
               json.dumps(data, sort_keys=True))


def import_side_tables(db: LemurDatabase, conn: sqlite3.Connection, add_problem: AddProblem) -> dict[str, int]:
    """Rows added per source table (inside the caller's transaction); then fill models' params/flops."""
    added: dict[str, int] = {}
    for table, (target, _, typed) in SIDE.items():
        columns, rows = db.side_rows(table)
        sql = (f"INSERT OR IGNORE INTO {target}(lemur_id, model_name, {', '.join(typed)}, data) "
               f"VALUES({','.join('?' * (len(typed) + 3))})")
        before = conn.total_changes
        batch: list[tuple[Any, ...]] = []
        for row in _rows(table, columns, rows, add_problem):
            batch.append(row)
            if len(batch) >= BATCH:
                conn.executemany(sql, batch)
                batch.clear()
        conn.executemany(sql, batch)
        added[table] = conn.total_changes - before
    fill_model_sizes(conn)
    return added


def fill_model_sizes(conn: sqlite3.Connection) -> int:
    """Models without params/flops get them from an error-free nn_stat row (the largest, if several).

    Why: LEMUR measured them already; the zoo's Pareto plot and `params` sort need them, and the
    analyzer then only has to measure what LEMUR did not.
    """
    before = conn.total_changes
    conn.execute(
        "UPDATE model SET"
        " params = COALESCE(params, (SELECT MAX(s.total_params) FROM lemur_nn_stat s WHERE s.model_name = model.name"
        "  AND s.error IS NULL)),"
        " flops = COALESCE(flops, (SELECT MAX(s.flops) FROM lemur_nn_stat s WHERE s.model_name = model.name"
        "  AND s.error IS NULL))"
        " WHERE (params IS NULL OR flops IS NULL)"
        " AND name IN (SELECT model_name FROM lemur_nn_stat WHERE error IS NULL)")
    return conn.total_changes - before
