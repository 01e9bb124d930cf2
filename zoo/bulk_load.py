"""Bulk writes into the zoo: many models, runs and curve points in ONE transaction, fast.

Why not the store's per-run inserts: importing LEMUR's 578k records through `ZooStore._add_run` costs
a SELECT per run, an INSERT per row (through the `point` view's trigger) and the upkeep of five point
indexes and three best_point indexes on every row. Here:

- ids are assigned in Python (next free id), so runs and points go in with `executemany` batches and
  no `lastrowid` round trips; existence is checked against sets loaded once;
- for a large load the secondary indexes of the tables written are dropped first and rebuilt from
  their own `CREATE INDEX` text at the end (one sort per index instead of a B-tree insert per row);
- rows go to the tables behind the `point` and `best_point` views (zoo.schema, version 5), each
  (task, dataset, metric) as its `scope` id;
- best_point receives one upsert per (task, dataset, metric, epoch, model) of the new points, the best
  of them chosen in Python, with the store's rule (strictly better accuracy wins, ties keep the first);
- points and training diagnostics bound for an empty `point_row`/`point_train` (a first import) go to a
  TEMP copy of the table first and are moved over by one `INSERT INTO t SELECT * FROM copy` at the end:
  SQLite then copies the b-tree in order (its transfer optimization) and fills every page, where rows
  inserted one by one leave these WITHOUT ROWID trees 12 % empty (4 MB of the 2.1.2 wheel's zoo);
- everything is one transaction: readers (WAL) see the zoo before or after the import, never half.
Foreign keys are off on this private connection: the writer creates parents before children itself.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zoo import codehash, connection, schema
from zoo.records import Run, code_text, stored_code

BULK_TABLES = ("run", "point_row", "best_point_row", "point_train")
FLUSH_ROWS = 50_000   # rows buffered per executemany; more than any drop_threshold, see begin()

RUN_INSERT = (
    "INSERT INTO run(id, uid, model_id, task, dataset, metric, transform, prm, epochs, status, accuracy,"
    " duration_ns, accuracy_to_time, device, source, created) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")
POINT_INSERT = (  # point_row, not the `point` view: no trigger per row (zoo.schema, version 5)
    "INSERT INTO point_row(run_id, epoch, model_id, scope_id, accuracy, val_accuracy, loss,"
    " duration_ns, accuracy_to_time, elapsed_s) VALUES(?,?,?,?,?,NULL,?,?,?,NULL)")  # created: the run's
TRAIN_INSERT = (
    "INSERT INTO point_train(run_id, epoch, train_loss, test_loss, train_accuracy, gradient_norm,"
    " samples_per_second, cpu_usage_percent, occupied_ram_kb, ram_usage_percent, occupied_gpu_memory_kb,"
    " gpu_memory_usage_percent) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)")
BEST_INSERT = (  # best_point_row's rows when it is staged (empty: no conflicts to upsert), see _stage
    "INSERT INTO best_point_row(scope_id, epoch, model_id, accuracy, duration_ns, accuracy_to_time,"
    " run_id) VALUES(?,?,?,?,?,?,?)")
HARDWARE_INSERT = "INSERT INTO run_hardware(run_id, hardware_id) VALUES(?,?)"
MODEL_INSERT = (
    "INSERT INTO model(id, name, code, code_hash, lemur_id, prefix, origin, created) VALUES(?,?,?,?,?,?,?,?)")

BestKey = tuple[int, float, int]  # scope id, epoch, model id


class BulkWriter:
    """Open with `BulkWriter.open(zoo_path)`, then `begin(prefix)`, add rows, `commit()`, `close()`."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.created = time.time()
        self.models: dict[str, tuple[int, str]] = {}   # name -> (id, code_hash)
        self.run_uids: set[str] = set()
        self.hardware: dict[str, int] = {}              # spec JSON -> hardware id
        self.scopes: dict[tuple[str, str, str], int] = {}  # (task, dataset, metric) -> scope id
        self.next_hardware_id = 1
        self.drop_threshold = 20_000
        self._new_points = 0
        self.next_model_id = 1
        self.next_run_id = 1
        self.best: dict[BestKey, tuple[float, int | None, float | None, int]] = {}
        self._dropped: list[str] = []
        self._rows: dict[str, list[Sequence[Any]]] = {RUN_INSERT: [], POINT_INSERT: [], TRAIN_INSERT: [],
                                                      HARDWARE_INSERT: []}
        self._pending = 0
        self._staged: dict[str, str] = {}  # insert statement -> the same into its TEMP copy (see _stage)

    @classmethod
    def open(cls, zoo_path: str | Path | None) -> BulkWriter:
        path = connection.resolve_zoo_path(zoo_path)
        connection.initialize(path)
        conn = sqlite3.connect(path, isolation_level=None, timeout=connection.BUSY_TIMEOUT_MS / 1000)
        connection.apply_pragmas(conn)
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB while the indexes are rebuilt
        conn.execute("PRAGMA temp.cache_size=-262144")  # the staged copies (see _stage) stay in memory
        return cls(conn)

    def close(self) -> None:
        self.conn.close()

    # --- transaction ---------------------------------------------------------------------------------
    def begin(self, run_uid_prefix: str, drop_threshold: int = 20_000) -> None:
        """Start the write transaction and load what exists. The indexes are dropped once the new points
        reach `drop_threshold` (before the first flush), so a re-import that adds nothing rebuilds none."""
        self.conn.execute("BEGIN IMMEDIATE")
        for row_id, name, code_hash in self.conn.execute("SELECT id, name, code_hash FROM model"):
            self.models[name] = (row_id, code_hash)
        self.run_uids = {r[0] for r in self.conn.execute(
            "SELECT uid FROM run WHERE uid >= ? AND uid < ?", (run_uid_prefix, run_uid_prefix + "\U0010ffff"))}
        self.next_model_id = self._max_id("model") + 1
        self.next_run_id = self._max_id("run") + 1
        self.next_hardware_id = self._max_id("hardware") + 1
        self.hardware = dict(self.conn.execute("SELECT spec, id FROM hardware").fetchall())
        self.scopes = {(task, dataset, metric): scope_id for scope_id, task, dataset, metric
                       in self.conn.execute("SELECT id, task, dataset, metric FROM scope")}
        self.drop_threshold = drop_threshold

    def _max_id(self, table: str) -> int:
        return int(self.conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0])

    def _drop_indexes(self) -> None:
        marks = ",".join("?" * len(BULK_TABLES))
        rows = self.conn.execute(
            f"SELECT name, sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL AND tbl_name IN ({marks})",
            BULK_TABLES).fetchall()
        for name, sql in rows:
            self.conn.execute(f'DROP INDEX "{name}"')
            self._dropped.append(sql)
        for table, insert in (("point_row", POINT_INSERT), ("point_train", TRAIN_INSERT)):
            self._stage(table, insert)

    def _stage(self, table: str, insert: str) -> None:
        """Send `insert`'s rows to a TEMP copy of `table` when `table` is empty (see the module's notes)."""
        if self.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
            return
        ddl = self.conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone()[0]
        self.conn.execute(re.sub(rf"^CREATE TABLE \"?{table}\"?", f"CREATE TEMP TABLE stage_{table}", ddl))
        self._staged[insert] = insert.replace(f"INSERT INTO {table}(", f"INSERT INTO temp.stage_{table}(", 1)

    def _move_staged(self) -> None:
        """Copy each staged table into its empty zoo table in one statement (SQLite's transfer: in order, full
        pages) and drop the copy."""
        for staged in self._staged.values():
            table = staged.split("(", 1)[0].removeprefix("INSERT INTO temp.stage_")
            self.conn.execute(f"INSERT INTO main.{table} SELECT * FROM temp.stage_{table}")
            self.conn.execute(f"DROP TABLE temp.stage_{table}")
        self._staged.clear()

    def commit(self, clock: Callable[[str], None] = lambda _: None) -> None:
        """Flush, upsert best points, rebuild the dropped indexes, COMMIT; `clock(phase)` times them."""
        self.flush()
        if self._staged:  # a large load into an empty zoo: best_point_row is empty too, its keys all new
            self._stage("best_point_row", BEST_INSERT)
        self.conn.executemany(self._staged.get(BEST_INSERT, schema.BEST_POINT_ROW_UPSERT), [
            (scope_id, epoch, model_id, acc, duration, a2t, run_id)
            for (scope_id, epoch, model_id), (acc, duration, a2t, run_id) in sorted(self.best.items())])
        self._move_staged()
        clock("rows written")
        for sql in self._dropped:
            self.conn.execute(sql)
        self._dropped.clear()
        clock("indexes")
        self.conn.execute("COMMIT")
        self.conn.execute("PRAGMA optimize")
        # a bulk transaction leaves a WAL as large as the load: fold it in and truncate it now
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        clock("commit")

    def rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    # --- rows ----------------------------------------------------------------------------------------
    def reserve_model(self, name: str) -> int:
        """The id a new model will get; the row itself comes later with `add_models` (its hash may
        still be computing), which is fine on this connection: foreign keys are checked by nobody
        until the transaction commits, and it commits with every row in place."""
        model_id = self.next_model_id
        self.next_model_id += 1
        self.models[name] = (model_id, "")
        return model_id

    def add_models(self, rows: Sequence[tuple[int, str, str, str, str, str | None, str]]) -> None:
        """(id, name, code, code_hash, lemur_id, prefix, origin) of models reserved before."""
        for model_id, name, _, code_hash, *_ in rows:
            self.models[name] = (model_id, code_hash)
        self.conn.executemany(MODEL_INSERT, [(model_id, name, stored_code(code), *rest, self.created)
                                             for model_id, name, code, *rest in rows])

    def has_other_code(self, name: str, code: str) -> bool:
        """Whether the existing model `name` has code other than `code` (by our code hash). The stored
        text is compared first: a re-import then costs a lookup per model, not a tokenizer pass."""
        model_id, stored_hash = self.models[name]
        row = self.conn.execute("SELECT code FROM model WHERE id=?", (model_id,)).fetchone()
        if row is not None and code_text(row[0]) == code:
            return False
        return stored_hash != codehash.code_hash(code)

    def new_run_id(self, uid: str) -> int | None:
        """An id for a run not yet in the zoo; None if its uid exists (the import is idempotent)."""
        if uid in self.run_uids:
            return None
        self.run_uids.add(uid)
        run_id = self.next_run_id
        self.next_run_id += 1
        return run_id

    def add_run(self, row: Sequence[Any]) -> None:
        """A RUN_INSERT row (its id from `new_run_id`)."""
        self._rows[RUN_INSERT].append(row)

    def add_imported_run(self, run: Run, model_id: int) -> bool:
        """A records.Run of an import (no seed, job or weights) with its points; False if its uid exists."""
        run_id = self.new_run_id(run.uid)
        if run_id is None:
            return False
        last = run.last_point
        epochs = max((p.epoch for p in run.points), default=None)
        self.add_run((run_id, run.uid, model_id, run.task, run.dataset, run.metric, run.transform,
                      json.dumps(run.prm, sort_keys=True, separators=(",", ":"), default=str), epochs, run.status,
                      last.accuracy if last else None, last.duration_ns if last else None,
                      last.accuracy_to_time if last else None, run.device, run.source, self.created))
        for p in run.points:
            self.add_point(run_id, p.epoch, model_id, run.task, run.dataset, run.metric, p.accuracy, p.loss,
                           p.duration_ns, p.accuracy_to_time)
        return True

    def scope_id(self, task: str, dataset: str, metric: str) -> int:
        """The id of the (task, dataset, metric) in `scope`, inserted the first time it is seen."""
        key = (task, dataset, metric)
        scope_id = self.scopes.get(key)
        if scope_id is None:
            scope_id = self.scopes[key] = int(self.conn.execute(
                "INSERT INTO scope(task, dataset, metric) VALUES(?,?,?) RETURNING id", key).fetchone()[0])
        return scope_id

    def add_point(self, run_id: int, epoch: float, model_id: int, task: str, dataset: str, metric: str,
                  accuracy: float | None, loss: float | None, duration_ns: int | None, a2t: float | None) -> None:
        scope_id = self.scope_id(task, dataset, metric)
        self._rows[POINT_INSERT].append((run_id, epoch, model_id, scope_id, accuracy, loss, duration_ns, a2t))
        if accuracy is not None:
            key = (scope_id, epoch, model_id)
            best = self.best.get(key)
            if best is None or accuracy > best[0]:
                self.best[key] = (accuracy, duration_ns, a2t, run_id)
        self._pending += 1
        self._new_points += 1
        if self._new_points == self.drop_threshold:
            self._drop_indexes()
        if self._pending >= FLUSH_ROWS:
            self.flush()

    def add_train(self, row: Sequence[Any]) -> None:
        """A TRAIN_INSERT row: (run_id, epoch, 5 diagnostics, 5 usage values)."""
        self._rows[TRAIN_INSERT].append(row)

    def add_hardware(self, run_id: int, spec_json: str) -> None:
        """The run trained on the machine `spec_json` describes; each distinct description stored once."""
        hardware_id = self.hardware.get(spec_json)
        if hardware_id is None:
            hardware_id = self.hardware[spec_json] = self.next_hardware_id
            self.next_hardware_id += 1
            self.conn.execute("INSERT INTO hardware(id, spec) VALUES(?,?)", (hardware_id, spec_json))
        self._rows[HARDWARE_INSERT].append((run_id, hardware_id))

    def flush(self) -> None:
        for sql, rows in self._rows.items():
            if rows:
                self.conn.executemany(self._staged.get(sql, sql), rows)
                rows.clear()
        self._pending = 0
