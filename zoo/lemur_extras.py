"""Read back what the LEMUR 2.2 import kept beyond the records, in small bounded dicts.

For `get_model` (the lead wires it): `model_extras(conn, model_id)` gives LEMUR's architecture
statistics, on-device (mobile) benchmarks, TFLite exports and pruning experiments of one model;
`curve_diagnostics(conn, run_id)` gives the training diagnostics of a run's curve points and the
hardware it ran on. Why bounded: an agent reads these answers; a model with hundreds of benchmark rows
must not become a megabyte reply, so each list is capped and says how many rows exist.
Works on any sqlite3 connection (plain or with a Row factory), synchronous; for the async store run
it in a thread or on a reader connection.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from zoo import connection

MAX_ROWS = 10           # rows per list in model_extras
MAX_POINTS = 200        # curve points in curve_diagnostics

# zoo table -> (answer key, ORDER BY that puts the most useful rows first)
_TABLES = {
    "lemur_nn_stat": ("architecture", "error IS NOT NULL, lemur_id"),
    "lemur_mobile_run": ("mobile_benchmarks", "valid IS NOT 1, duration IS NULL, duration, lemur_id"),
    "lemur_tflite": ("tflite", "accuracy IS NULL, accuracy DESC, lemur_id"),
    "lemur_prun": ("pruning", "accuracy IS NULL, accuracy DESC, lemur_id"),
}
_CORE = ("train_loss", "test_loss", "train_accuracy", "gradient_norm", "samples_per_second")
_USAGE = ("cpu_usage_percent", "occupied_ram_kb", "ram_usage_percent", "occupied_gpu_memory_kb",
          "gpu_memory_usage_percent")
_DROP = {"id", "model_name", "nn_name"}  # repeated by the caller's model; LEMUR's row id stays as lemur_id


def _decode(lemur_id: str, data: str) -> dict[str, Any]:
    row = json.loads(data)
    out = {"lemur_id": lemur_id} | {k: v for k, v in row.items() if k not in _DROP}
    meta = out.get("meta_json")
    if isinstance(meta, str):
        try:
            out["meta"] = json.loads(meta)
            del out["meta_json"]
        except ValueError:
            pass
    return out


def model_extras(conn: sqlite3.Connection, model_id: int, max_rows: int = MAX_ROWS) -> dict[str, Any]:
    """{architecture, mobile_benchmarks, tflite, pruning}: each `{"total": n, "rows": [...]}` with at
    most `max_rows` rows (LEMUR's column names); {} when the model has none or does not exist."""
    found = conn.execute("SELECT name FROM model WHERE id=?", (model_id,)).fetchone()
    if found is None:
        return {}
    name = found[0]
    extras: dict[str, Any] = {}
    for table, (key, order) in _TABLES.items():
        total = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE model_name=?", (name,)).fetchone()[0]
        if not total:
            continue
        rows = conn.execute(f"SELECT lemur_id, data FROM {table} WHERE model_name=? ORDER BY {order} LIMIT ?",
                            (name, max_rows)).fetchall()
        extras[key] = {"total": total, "rows": [_decode(r[0], r[1]) for r in rows]}
    return extras


def curve_diagnostics(conn: sqlite3.Connection, run_id: int, max_points: int = MAX_POINTS) -> dict[str, Any]:
    """{"hardware": {...} | None, "points": [{epoch, train_loss, test_loss, train_accuracy, gradient_norm,
    samples_per_second, usage?}]}: LEMUR's train_stat of the run's epochs, in epoch order; empty
    points when the run has none (the 2.1 files, or our own runs)."""
    row = conn.execute("SELECT h.spec FROM run_hardware r JOIN hardware h ON h.id = r.hardware_id "
                       "WHERE r.run_id=?", (run_id,)).fetchone()
    points = []
    # a train_loss equal to the point's loss is stored on the point only (both writers, since zoo.schema 9)
    columns = ", ".join(f"t.{c}" for c in _CORE + _USAGE).replace("t.train_loss", "COALESCE(t.train_loss, p.loss)")
    for values in conn.execute(f"SELECT t.epoch, {columns} FROM point_train t LEFT JOIN point_row p"
                               " ON p.run_id = t.run_id AND p.epoch = t.epoch WHERE t.run_id=?"
                               " ORDER BY t.epoch LIMIT ?", (run_id, max_points)):
        point: dict[str, Any] = {"epoch": values[0], **dict(zip(_CORE, values[1:6], strict=True))}
        usage = {k: v for k, v in zip(_USAGE, values[6:], strict=True) if v is not None}
        if usage:
            point["usage"] = usage
        points.append(point)
    return {"hardware": json.loads(row[0]) if row else None, "points": points}


def lemur_extras_at(zoo_path: str | Path, model_id: int, run_id: int | None = None) -> dict[str, Any]:
    """`model_extras` (and `curve_diagnostics` of `run_id` as "train_diagnostics") on a read-only
    connection of their own: for async callers (`await anyio.to_thread.run_sync(...)`), whose store
    connections are not sqlite3 ones."""
    conn = connection.connect_sync(Path(zoo_path), readonly=True)
    try:
        extras = model_extras(conn, model_id)
        if run_id is not None:
            diagnostics = curve_diagnostics(conn, run_id)
            if diagnostics["points"] or diagnostics["hardware"]:
                extras["train_diagnostics"] = diagnostics
        return extras
    finally:
        conn.close()
