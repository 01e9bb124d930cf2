"""LEMUR's side tables through our API: `nn_stat_data()`, `run_data()`, `prun_data()` and the `nn_*`
columns of `data(include_nn_stats=True)`.

Why read from JSON: the LEMUR 2.2 database importer (lemur_agent_server.lemur_db_extras) copies
LEMUR's `nn_stat`, `run`, `tflite` and `prun` rows into `lemur_nn_stat`, `lemur_mobile_run`,
`lemur_tflite` and `lemur_prun`: a few typed columns for filters (model_name, device_type, ...)
plus `data`, every non-null source column under LEMUR's own name. The answers here pick LEMUR's
columns out of `data`, so they have LEMUR 2.2.11's column names and order whatever LEMUR version
wrote the rows; a column the source lacked reads as None. Rows join models by name (`model.name` =
LEMUR's `nn.name`). A zoo without these tables (one made before schema version 2) or without rows
gives empty DataFrames with LEMUR's columns, so callers can select columns without checking first.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

from zoo import connection
from zoo.records import code_text

STAT_FIELDS = ("total_layers", "leaf_layers", "max_depth", "total_params", "trainable_params", "frozen_params",
               "flops", "model_size_mb", "buffer_size_mb", "total_memory_mb", "dropout_count", "has_attention",
               "has_residual_connections", "is_resnet_like", "is_vgg_like", "is_inception_like",
               "is_densenet_like", "is_unet_like", "is_transformer_like", "is_mobilenet_like",
               "is_efficientnet_like", "code_length", "num_classes_defined", "num_functions_defined",
               "uses_sequential", "uses_modulelist", "uses_moduledict")
NN_STAT_DATA_COLUMNS = ["id", "nn_name", "prm_id", *STAT_FIELDS, "meta", "error"]

# data(include_nn_stats=True)'s columns -> the nn_stat field each one reads (LEMUR's renames)
_RENAMED = {"has_residual_connections": "nn_has_residual", "num_classes_defined": "nn_num_classes",
            "num_functions_defined": "nn_num_functions"}
NN_STAT_COLUMNS = [_RENAMED.get(f, f"nn_{f}") for f in STAT_FIELDS] + ["nn_stats_meta", "nn_stats_error"]
# ours, beyond LEMUR's: the architecture fingerprint (identical graphs share it) and the code-quality score
NN_EXTRA_COLUMNS = ["nn_fingerprint", "nn_code_quality"]

_RUN_FIELDS = ("id", "model_name", "device_type", "os_version", "valid", "emulator", "error_message", "duration",
               "iterations", "unit", *(f"{unit}_{what}" for unit in ("cpu", "gpu", "npu")
                                       for what in ("duration", "min_duration", "max_duration", "std_dev", "error")),
               "total_ram_kb", "free_ram_kb", "available_ram_kb", "cached_kb", "in_dim_0", "in_dim_1", "in_dim_2",
               "in_dim_3")
_TFLITE_FIELDS = ("id", "accuracy", "transform", "precision_type")
RUN_DATA_COLUMNS = [*_RUN_FIELDS, "device_analytics", "precision_type", *(f"tflite_{f}" for f in _TFLITE_FIELDS)]

PRUN_DATA_COLUMNS = ["id", "model_name", "pruning_method", "task_dataset", "status", "accuracy", "duration",
                     "pruning_ratio", "params_before", "params_after", "params_removed", "model_size_before_kb",
                     "model_size_after_kb"]

NN_STAT_TABLE = "lemur_nn_stat"
MOBILE_RUN_TABLE = "lemur_mobile_run"
TFLITE_TABLE = "lemur_tflite"
PRUN_TABLE = "lemur_prun"
_CHUNK = 900  # ids per IN (...) list, under SQLite's bound on host parameters


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def _parse_json(text: Any) -> Any:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _decode(lemur_id: str, model_name: str, data: str, name_key: str) -> dict[str, Any]:
    """One imported row as LEMUR's dict; `id` and the model name come from the typed columns."""
    row = _parse_json(data)
    row = row if isinstance(row, dict) else {}
    row["id"], row[name_key] = lemur_id, model_name
    return row


def _side_rows(conn: sqlite3.Connection, table: str, name_key: str, where: dict[str, Any],
               max_rows: int | None) -> list[dict[str, Any]]:
    """Rows of one imported side table matching `where` (typed column -> value, None = any), in LEMUR's
    order (by model name; LEMUR's id breaks ties so the answer is stable)."""
    if not _has_table(conn, table):
        return []
    sql = f"SELECT lemur_id, model_name, data FROM {table}"
    wanted = {k: v for k, v in where.items() if v is not None}
    if wanted:
        sql += " WHERE " + " AND ".join(f"{column} = ?" for column in wanted)
    sql += " ORDER BY model_name, lemur_id"
    args = list(wanted.values())
    if max_rows:
        sql += " LIMIT ?"
        args.append(int(max_rows))
    return [_decode(i, n, d, name_key) for i, n, d in conn.execute(sql, args)]


def _read(zoo: str | os.PathLike[str] | None, fn: Callable[[sqlite3.Connection], list[dict[str, Any]]]
          ) -> list[dict[str, Any]]:
    path = connection.resolve_zoo_path(zoo)
    if not path.exists():
        return []
    conn = connection.connect_sync(path, readonly=True)
    conn.row_factory = None
    try:
        return fn(conn)
    finally:
        conn.close()


def _frame(records: list[dict[str, Any]], columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame.from_records([{c: r.get(c) for c in columns} for r in records], columns=list(columns))


def _with_parsed(row: dict[str, Any], raw: str, parsed: str) -> dict[str, Any]:
    """LEMUR parses `meta_json`/`device_analytics_json` into `meta`/`device_analytics`."""
    row[parsed] = _parse_json(row.pop(raw, None))
    return row


# --- data(include_nn_stats=True) ---------------------------------------------------------------------------
def _first_row_per_model(conn: sqlite3.Connection, table: str, names: Sequence[str], order: str,
                         name_key: str) -> dict[str, dict[str, Any]]:
    """The first row of `table` per model name in `order` (after the name), decoded; {} without the table."""
    first: dict[str, dict[str, Any]] = {}
    if not _has_table(conn, table):
        return first
    for start in range(0, len(names), _CHUNK):
        chunk = list(names[start:start + _CHUNK])
        for lemur_id, name, data in conn.execute(
                f"SELECT lemur_id, model_name, data FROM {table} WHERE model_name IN "
                f"({','.join('?' * len(chunk))}) ORDER BY model_name, {order}", chunk):
            first.setdefault(name, _decode(lemur_id, name, data, name_key))
    return first


def _pick_stat_rows(conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One nn_stat row per model name: an error-free one first, then the lowest LEMUR id (LEMUR joins every
    nn_stat row of the name, repeating the record; we keep one row per record)."""
    return _first_row_per_model(conn, NN_STAT_TABLE, names, "error IS NOT NULL, lemur_id", "nn_name")


def nn_stats_by_model(conn: sqlite3.Connection, model_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """`data(include_nn_stats=True)`'s nn_* values per model id.

    Parameter count and FLOPs come from the model row (measured by us, or filled from LEMUR's nn_stat
    by the importer) and code length from its code, unless the imported nn_stat row has them;
    everything else only from the imported nn_stat row.
    """
    stats: dict[int, dict[str, Any]] = {}
    names: dict[int, str] = {}
    for start in range(0, len(model_ids), _CHUNK):
        chunk = list(model_ids[start:start + _CHUNK])
        for mid, name, params, flops, length, fingerprint, quality in conn.execute(
                "SELECT id, name, params, flops, CASE WHEN typeof(code) = 'blob' THEN code ELSE length(code) END,"
                " fingerprint, code_quality FROM model "
                f"WHERE id IN ({','.join('?' * len(chunk))})", chunk):
            names[mid] = name
            if isinstance(length, bytes):  # deflated code (zoo.records.code_text)
                length = len(code_text(length) or "")
            stats[mid] = {"nn_total_params": params, "nn_flops": flops, "nn_code_length": length,
                          "nn_fingerprint": fingerprint, "nn_code_quality": quality}
    rows = _pick_stat_rows(conn, sorted(set(names.values())))
    for mid, name in names.items():
        row = rows.get(name)
        if row is None:
            continue
        target = stats[mid]
        for field in STAT_FIELDS:
            if row.get(field) is not None:
                target[_RENAMED.get(field, f"nn_{field}")] = row[field]
        target["nn_stats_meta"] = _parse_json(row.get("meta_json"))
        target["nn_stats_error"] = row.get("error")
    return stats


# --- LEMUR's side-table readers ------------------------------------------------------------------------
def nn_stat_data(nn_name: str | None = None, prm_id: str | None = None, max_rows: int | None = None, *,
                 zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """LEMUR's `nn_stat_data`: architecture statistics per model (and LEMUR prm id), `meta` parsed from
    `meta_json`, ordered by model name."""
    def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = _side_rows(conn, NN_STAT_TABLE, "nn_name", {"model_name": nn_name, "prm_id": prm_id}, max_rows)
        return [_with_parsed(r, "meta_json", "meta") for r in rows]

    return _frame(_read(zoo, query), NN_STAT_DATA_COLUMNS)


def _tflite_by_model(conn: sqlite3.Connection, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """One TFLite row per model name, the lowest LEMUR id (LEMUR keeps one per name too: the last it read)."""
    return _first_row_per_model(conn, TFLITE_TABLE, names, "lemur_id", "model_name")


def run_data(model_name: str | None = None, device_type: str | None = None, max_rows: int | None = None, *,
             zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """LEMUR's `run_data`: on-device (mobile) benchmark rows, `device_analytics` parsed from its JSON, each
    with its model's TFLite row (if any) as `tflite_*` columns."""
    def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = _side_rows(conn, MOBILE_RUN_TABLE, "model_name",
                          {"model_name": model_name, "device_type": device_type}, max_rows)
        lite = _tflite_by_model(conn, sorted({r["model_name"] for r in rows}))
        for row in rows:
            _with_parsed(row, "device_analytics_json", "device_analytics")
            found = lite.get(row["model_name"], {})
            row.update({f"tflite_{f}": found.get(f) for f in _TFLITE_FIELDS})
        return rows

    return _frame(_read(zoo, query), RUN_DATA_COLUMNS)


def prun_data(model_name: str | None = None, pruning_method: str | None = None, task_dataset: str | None = None,
              max_rows: int | None = None, *, zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """LEMUR's `prun_data`: pruning experiments (method, task_dataset, accuracy, ratio, sizes before/after)."""
    def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        return _side_rows(conn, PRUN_TABLE, "model_name", {"model_name": model_name,
                                                           "pruning_method": pruning_method,
                                                           "task_dataset": task_dataset}, max_rows)

    return _frame(_read(zoo, query), PRUN_DATA_COLUMNS)
