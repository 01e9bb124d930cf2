"""LEMUR's side tables through our API: `nn_stat_data()`, `run_data()` and `data(include_nn_stats=True)`.

Why introspection: the tables come from the LEMUR 2.2 database importer, which is written separately.
The shape assumed here (documented so that importer and reader agree):

- `nn_stat`: one row per model (or per model and LEMUR prm id) with a `model_id INTEGER` referencing
  `model(id)`, optionally `prm_id TEXT`, and any of LEMUR's `nn_stat` columns under LEMUR's own names
  (`total_layers`, `total_params`, ..., `has_residual_connections`, ..., `meta_json`, `error`).
- `device_run` (LEMUR's `run`; our `run` is a training run): `model_id INTEGER` referencing `model(id)`
  and any of LEMUR's `run` columns under LEMUR's names (`id`, `device_type`, ..., `device_analytics_json`,
  `precision_type`); optional `tflite` with `model_id`, `id`, `accuracy`, `transform`, `precision_type`.

A column that is absent reads as None; a table that is absent gives an empty DataFrame with LEMUR's
columns, so callers can select columns without checking first.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Sequence
from typing import Any

import pandas as pd

from zoo import connection

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

_RUN_FIELDS = ("id", "device_type", "os_version", "valid", "emulator", "error_message", "duration", "iterations",
               "unit", *(f"{unit}_{what}" for unit in ("cpu", "gpu", "npu")
                         for what in ("duration", "min_duration", "max_duration", "std_dev", "error")),
               "total_ram_kb", "free_ram_kb", "available_ram_kb", "cached_kb", "in_dim_0", "in_dim_1", "in_dim_2",
               "in_dim_3")
RUN_DATA_COLUMNS = [*_RUN_FIELDS[:1], "model_name", *_RUN_FIELDS[1:], "device_analytics", "precision_type",
                    "tflite_id", "tflite_accuracy", "tflite_transform", "tflite_precision_type"]

NN_STAT_TABLE = "nn_stat"
DEVICE_RUN_TABLE = "device_run"
TFLITE_TABLE = "tflite"


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def _select(present: set[str], wanted: Sequence[str], alias: str) -> str:
    """`alias.col` for the columns the table has, `NULL AS col` for the rest (same order as `wanted`)."""
    return ", ".join(f"{alias}.{c}" if c in present else f"NULL AS {c}" for c in wanted)


def _parse_json(text: Any) -> Any:
    if not isinstance(text, str) or not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def nn_stats_by_model(conn: sqlite3.Connection, model_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """`data(include_nn_stats=True)`'s nn_* values per model id.

    Parameter count and FLOPs come from the model row (measured by us) and code length from its code,
    unless the imported nn_stat row has them; everything else only from nn_stat.
    """
    present = _columns(conn, NN_STAT_TABLE)
    stats: dict[int, dict[str, Any]] = {}
    for start in range(0, len(model_ids), 900):
        chunk = list(model_ids[start:start + 900])
        marks = ",".join("?" * len(chunk))
        for mid, params, flops, length, fingerprint, quality in conn.execute(
                f"SELECT id, params, flops, length(code), fingerprint, code_quality FROM model WHERE id IN ({marks})",
                chunk):
            stats[mid] = {"nn_total_params": params, "nn_flops": flops, "nn_code_length": length,
                          "nn_fingerprint": fingerprint, "nn_code_quality": quality}
        if "model_id" not in present:
            continue
        fields = [*STAT_FIELDS, "meta_json", "error"]
        for row in conn.execute(f"SELECT n.model_id, {_select(present, fields, 'n')} FROM {NN_STAT_TABLE} n "
                                f"WHERE n.model_id IN ({marks})", chunk):
            values = dict(zip(fields, row[1:]))
            target = stats.setdefault(row[0], {})
            for field in STAT_FIELDS:
                if values[field] is not None:
                    target[_RENAMED.get(field, f"nn_{field}")] = values[field]
            target["nn_stats_meta"] = _parse_json(values["meta_json"])
            target["nn_stats_error"] = values["error"]
    return stats


def _read(zoo: str | os.PathLike[str] | None, fn: Any) -> Any:
    path = connection.resolve_zoo_path(zoo)
    if not path.exists():
        return None
    conn = connection.connect_sync(path, readonly=True)
    conn.row_factory = None
    try:
        return fn(conn)
    finally:
        conn.close()


def _limit(sql: str, args: list[Any], max_rows: int | None) -> str:
    if max_rows:
        args.append(int(max_rows))
        return sql + " LIMIT ?"
    return sql


def nn_stat_data(nn_name: str | None = None, prm_id: str | None = None, max_rows: int | None = None, *,
                 zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """LEMUR's `nn_stat_data`: architecture statistics per model, `meta` parsed from `meta_json`."""
    def query(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        present = _columns(conn, NN_STAT_TABLE)
        if "model_id" not in present:
            return []
        fields = ["id", "prm_id", *STAT_FIELDS, "meta_json", "error"]
        sql = (f"SELECT {_select(present, fields[:1], 'n')}, m.name, {_select(present, fields[1:], 'n')} "
               f"FROM {NN_STAT_TABLE} n JOIN model m ON m.id = n.model_id WHERE 1=1")
        args: list[Any] = []
        if nn_name is not None:
            sql += " AND m.name = ?"
            args.append(nn_name)
        if prm_id is not None:
            sql += " AND n.prm_id = ?" if "prm_id" in present else " AND 0"
            args.extend([prm_id] if "prm_id" in present else [])
        return conn.execute(_limit(sql + " ORDER BY m.name", args, max_rows), args).fetchall()

    rows = _read(zoo, query) or []
    records = [dict(zip(NN_STAT_DATA_COLUMNS, (*row[:-2], _parse_json(row[-2]), row[-1]))) for row in rows]
    return pd.DataFrame.from_records(records, columns=NN_STAT_DATA_COLUMNS)


def run_data(model_name: str | None = None, device_type: str | None = None, max_rows: int | None = None, *,
             zoo: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """LEMUR's `run_data`: on-device benchmark rows, each with its model's TFLite row (if any) merged in."""
    def query(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
        present = _columns(conn, DEVICE_RUN_TABLE)
        if "model_id" not in present:
            return []
        tflite = _columns(conn, TFLITE_TABLE)
        lite = ["id", "accuracy", "transform", "precision_type"]
        lite_sql = (f", {_select(tflite, lite, 't')} " if "model_id" in tflite else ", NULL, NULL, NULL, NULL ")
        join = (f"LEFT JOIN (SELECT * FROM {TFLITE_TABLE} GROUP BY model_id) t ON t.model_id = r.model_id "
                if "model_id" in tflite else "")
        sql = (f"SELECT {_select(present, _RUN_FIELDS[:1], 'r')}, m.name, {_select(present, _RUN_FIELDS[1:], 'r')}, "
               f"{_select(present, ['device_analytics_json', 'precision_type'], 'r')}{lite_sql}"
               f"FROM {DEVICE_RUN_TABLE} r JOIN model m ON m.id = r.model_id {join}WHERE 1=1")
        args: list[Any] = []
        if model_name is not None:
            sql += " AND m.name = ?"
            args.append(model_name)
        if device_type is not None:
            sql += " AND r.device_type = ?" if "device_type" in present else " AND 0"
            args.extend([device_type] if "device_type" in present else [])
        return conn.execute(_limit(sql + " ORDER BY m.name", args, max_rows), args).fetchall()

    rows = _read(zoo, query) or []
    analytics = RUN_DATA_COLUMNS.index("device_analytics")
    records = [dict(zip(RUN_DATA_COLUMNS, (*row[:analytics], _parse_json(row[analytics]), *row[analytics + 1:])))
               for row in rows]
    return pd.DataFrame.from_records(records, columns=RUN_DATA_COLUMNS)
