"""Reading a LEMUR 2.2 database (`db/ab.nn.db`), read-only, in the shapes the importer needs.

Why a module of its own: the importer must never write to the user's database, and every column name
of LEMUR's schema lives here, so a schema change upstream touches one file. Facts about the schema
(LEMUR 2.2.11, `ab/nn/util/db/Init.py` and `Write.py`):

- `stat(id, accuracy, epoch, duration, task, dataset, nn, transform, metric, prm)`: one row per trial
  per epoch; `prm` is the trial's uid. No key ties `prm` to `prm.uid` uniquely, so nothing here relies
  on foreign keys: rows are joined by value.
- `prm(uid, name, value)`: one row per hyperparameter, re-inserted by every record of a trial; the value
  column has NUMERIC affinity (LEMUR stores the Python value as is). Read with DISTINCT over LEMUR's
  covering index `(uid, name, value)`, so the duplicates never reach Python.
- `nn(name, code, id)`: model code.
- `train_stat(stat_id, ...)`: per-epoch diagnostics, 1:1 with `stat` where present.
- `nn_stat`, `run`, `tflite`, `prun`: side tables keyed by model name; empty in a database built from
  the 2.1 files, absent in older builds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SQLITE_MAGIC = b"SQLite format 3\x00"
DB_RELATIVE = Path("db") / "ab.nn.db"

STAT_COLUMNS = ("id", "task", "dataset", "metric", "nn", "transform", "prm", "epoch", "accuracy", "duration")
TRAIN_COLUMNS = ("train_loss", "test_loss", "train_accuracy", "gradient_norm", "samples_per_second")
HARDWARE_COLUMNS = ("epoch_max", "cpu_count", "cpu_type", "total_ram_kb", "gpu_type", "gpu_memory_kb",
                    "gpu_total_memory_kb")
USAGE_COLUMNS = ("cpu_usage_percent", "occupied_ram_kb", "ram_usage_percent", "occupied_gpu_memory_kb",
                 "gpu_memory_usage_percent")
SIDE_TABLES = ("nn_stat", "run", "tflite", "prun")


def is_sqlite_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def find_database(path: Path) -> Path | None:
    """The LEMUR database `path` names: the file itself, or `<path>/db/ab.nn.db`; None otherwise.

    A checkout that still holds the statistics files (`ab/nn/nn` or `ab/nn/stat`) is read as files by
    the caller, as before: this returns None for it, so the 2.1 layout keeps its importer.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path if is_sqlite_file(path) else None
    if (path / "ab" / "nn" / "stat").is_dir() or (path / "ab" / "nn" / "nn").is_dir():
        return None
    candidate = path / DB_RELATIVE
    return candidate if candidate.is_file() and is_sqlite_file(candidate) else None


class LemurDatabase:
    """A read-only connection (`mode=ro` URI: SQLite itself refuses any write) and the readers."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.conn = sqlite3.connect(self.path.as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        try:
            self.conn.execute("PRAGMA query_only=ON")
            self.conn.execute("PRAGMA temp_store=MEMORY")  # the ORDER BY of stat sorts in memory
            self.tables = {r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError:
            self.conn.close()
            raise
        missing = {"stat", "nn", "prm"} - self.tables
        if missing:
            self.conn.close()
            raise ValueError(f"{path} is an SQLite file without LEMUR's tables {sorted(missing)}; "
                             "pass LEMUR's db/ab.nn.db, a folder holding it, or an nn-dataset checkout/wheel.")

    def close(self) -> None:
        self.conn.close()

    def columns(self, table: str) -> list[str]:
        return [r[1] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    def count(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]) if table in self.tables else 0

    def models(self) -> Iterator[tuple[str, str]]:
        """(name, code) of every model, code as stored (a non-text code is the caller's bad row)."""
        yield from self.conn.execute("SELECT name, code FROM nn ORDER BY name")

    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        """uid -> {name: value}, each distinct (uid, name, value) once; a repeated name keeps the last."""
        by_uid: dict[str, dict[str, Any]] = {}
        for uid, name, value in self.conn.execute("SELECT DISTINCT uid, name, value FROM prm"):
            entry = by_uid.get(uid)
            if entry is None:
                entry = by_uid[uid] = {}
            entry[name] = value
        return by_uid

    def train_columns(self) -> list[str]:
        """The train_stat columns this database has, of those the importer keeps."""
        if "train_stat" not in self.tables:
            return []
        have = set(self.columns("train_stat"))
        return [c for c in TRAIN_COLUMNS + HARDWARE_COLUMNS + USAGE_COLUMNS if c in have]

    def records(self) -> Iterator[tuple[Any, ...]]:
        """stat rows (STAT_COLUMNS), ordered by config and trial so the caller can group them in one
        streaming pass. Why no JOIN with train_stat here: sorting the joined wide rows costs five times
        the sort of stat alone (7 s against 1.3 s for 578k records); `train_rows` is read beside it."""
        select = ", ".join(STAT_COLUMNS)
        yield from self.conn.execute(
            f"SELECT {select} FROM stat ORDER BY nn, task, dataset, metric, epoch, rowid")

    def train_rows(self, train_columns: list[str]) -> dict[str, tuple[Any, ...]]:
        """stat_id -> the `train_columns` of its train_stat row, rows with any value only (one
        sequential scan; about 0.7 KB of memory per row, 200 MB for a fully filled 289k rows)."""
        if not train_columns:
            return {}
        rows = self.conn.execute(f"SELECT stat_id, {', '.join(train_columns)} FROM train_stat")
        empty = (None,) * len(train_columns)
        return {row[0]: row[1:] for row in rows if row[1:] != empty}

    def side_rows(self, table: str) -> tuple[list[str], Iterator[tuple[Any, ...]]]:
        """All rows of a side table with its column names; empty when the table is absent."""
        if table not in self.tables:
            return [], iter(())
        return self.columns(table), self.conn.execute(f"SELECT * FROM {table}")
