"""The async zoo store used by the server: models, runs with their curves and weights (jobs: `zoo.jobs`).

Why one writer connection behind a lock: SQLite allows one writer at a time anyway, and a run with
its curve points must land in one transaction so that concurrent readers (other tools, other server
processes, the Python API) see either the whole run or nothing. Reads go through a second connection
so a long query never delays a job's progress update.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from sandbox.protocol import RunStatus
from zoo import codehash, connection, repeat_groups, schema
from zoo.jobs import JobStore
from zoo.query import Filters, Page, count_sql, decode_row, encode_cursor, page_sql
from zoo.records import Model, Run, code_text, stored_code


def weights_dir_of(zoo_path: Path) -> Path:
    """Where a zoo's weights files live (content-addressed; the rows' `path` is relative to it)."""
    return zoo_path.parent / (zoo_path.stem + "-weights")

_FAILED_RUN_SQL = ",".join(f"'{s}'" for s in RunStatus if s.is_failure())


def _source_protocol(source: str) -> str:
    """The protocol of a run that does not name one: the evaluator's default, LEMUR's for imports."""
    return "default" if source == "evaluator" else "lemur"


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _decoded(row: dict[str, Any]) -> dict[str, Any]:
    """A row with its `code` column (model code, maybe deflated: zoo.records.code_text) as text."""
    if isinstance(row.get("code"), bytes):
        row["code"] = code_text(row["code"])
    return row


class ZooStore:
    """Open with `await ZooStore.open(path)`; close with `await store.close()`."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._w = writer
        self._r = reader
        self._write_lock = anyio.Lock()
        self._read_lock = anyio.Lock()
        self.jobs = JobStore(self)  # the queue's table, same file and writer

    # --- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    async def open(cls, path: str | Path | None = None) -> ZooStore:
        resolved = connection.resolve_zoo_path(path)
        await anyio.to_thread.run_sync(connection.initialize, resolved)
        writer = await cls._connect(resolved)
        reader = await cls._connect(resolved)
        return cls(resolved, writer, reader)

    @staticmethod
    async def _connect(path: Path) -> aiosqlite.Connection:
        pending = aiosqlite.connect(path, isolation_level=None, timeout=connection.BUSY_TIMEOUT_MS / 1000)
        # A forgotten close() must not keep the interpreter alive at exit (a crashed CLI, a failed test):
        # SQLite rolls back whatever an abandoned transaction held, so a daemon worker is safe.
        worker = getattr(pending, "_thread", None)
        if worker is not None and not worker.is_alive():
            worker.daemon = True
        conn = await pending
        conn.row_factory = aiosqlite.Row
        for pragma in connection.PRAGMAS:
            await conn.execute(pragma)
        return conn

    async def close(self) -> None:
        await self._w.close()
        await self._r.close()

    async def __aenter__(self) -> ZooStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        # aiosqlite's worker threads keep the interpreter alive until closed: close on every path
        with anyio.CancelScope(shield=True):
            await self.close()

    @property
    def weights_dir(self) -> Path:
        return weights_dir_of(self.path)

    @staticmethod
    async def _begin(conn: aiosqlite.Connection, statement: str) -> None:
        """Open a transaction that a cancellation cannot leave open behind the caller's back.

        aiosqlite queues the statement on the connection's thread before its first await, so a task
        cancelled during that await (a client cancelling a tool call, a task group ending) still gets
        its BEGIN executed, but never reaches the `try` that ends it: the reader then refused every later
        snapshot ("cannot start a transaction within a transaction") and the writer held SQLite's write
        lock for good. Shielded, the caller is cancelled only once the transaction is its to end."""
        with anyio.CancelScope(shield=True):
            await conn.execute(statement)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT on the writer; rolled back on any error or cancellation."""
        async with self._write_lock:
            await self._begin(self._w, "BEGIN IMMEDIATE")
            try:
                yield self._w
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._w.execute("ROLLBACK")
                raise
            else:
                with anyio.CancelScope(shield=True):
                    await self._w.execute("COMMIT")

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read transaction: every SELECT inside sees the same committed state."""
        async with self._read_lock:
            await self._begin(self._r, "BEGIN")
            try:
                yield self._r
            finally:
                with anyio.CancelScope(shield=True):
                    await self._r.execute("COMMIT")

    async def fetchall(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        async with self._read_lock:
            rows = await self._r.execute_fetchall(sql, args)
        return [_decoded(dict(r)) for r in rows]

    async def fetchone(self, sql: str, args: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = await self.fetchall(sql, args)
        return rows[0] if rows else None

    # --- models ------------------------------------------------------------------------------------
    async def add_model(self, model: Model) -> tuple[int, bool]:
        """Insert the model unless its name exists. Returns (model id, created)."""
        async with self.transaction() as db:
            return await self.add_model_in(db, model)

    @staticmethod
    async def add_model_in(db: aiosqlite.Connection, model: Model) -> tuple[int, bool]:
        row = await (await db.execute("SELECT id FROM model WHERE name=?", (model.name,))).fetchone()
        if row:
            return int(row[0]), False
        cur = await db.execute(
            "INSERT INTO model(name, code, code_hash, lemur_id, prefix, origin, fingerprint, params, flops,"
            " code_quality, code_quality_detail, supported_hyperparameters, created)"
            " VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (model.name, stored_code(model.code), codehash.code_hash(model.code), codehash.lemur_id(model.code),
             model.prefix, model.origin, model.fingerprint, model.params, model.flops, model.code_quality,
             _json(model.code_quality_detail), _json(model.supported_hyperparameters), model.created),
        )
        return int(cur.lastrowid), True  # type: ignore[arg-type]

    async def update_model_stats(self, name: str, **fields: Any) -> None:
        """Fill architecture stats measured by the evaluator (params, flops, fingerprint, quality)."""
        allowed = {"fingerprint", "params", "flops", "code_quality", "code_quality_detail",
                   "supported_hyperparameters"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"not model stats: {sorted(bad)}")
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [_json(v) if isinstance(v, (dict, list)) else v for v in fields.values()]
        async with self.transaction() as db:
            await db.execute(f"UPDATE model SET {sets} WHERE name=?", (*values, name))

    async def record_analysis(self, rows: Sequence[dict[str, Any]]) -> None:
        """Write `analyze` results in one transaction: each row has model_id, status, analysed_at and
        optional error/detail (JSON) and stats (params, flops, fingerprint, code_quality,
        code_quality_detail). Stats fill only what the model lacks: values the evaluator measured stay."""
        async with self.transaction() as db:
            for row in rows:
                stats = row.get("stats") or {}
                await db.execute(
                    "UPDATE model SET params=COALESCE(params, ?), flops=COALESCE(flops, ?),"
                    " fingerprint=COALESCE(fingerprint, ?), code_quality=COALESCE(code_quality, ?),"
                    " code_quality_detail=COALESCE(code_quality_detail, ?) WHERE id=?",
                    (stats.get("params"), stats.get("flops"), stats.get("fingerprint"), stats.get("code_quality"),
                     _json(stats.get("code_quality_detail")), row["model_id"]))
                await db.execute(
                    "INSERT INTO model_analysis(model_id, status, error, detail, analysed_at) VALUES(?,?,?,?,?)"
                    " ON CONFLICT(model_id) DO UPDATE SET status=excluded.status, error=excluded.error,"
                    " detail=excluded.detail, analysed_at=excluded.analysed_at",
                    (row["model_id"], row["status"], _json(row.get("error")), _json(row.get("detail")),
                     row["analysed_at"]))

    async def model_by_name(self, name: str) -> dict[str, Any] | None:
        return await self.fetchone("SELECT * FROM model WHERE name=?", (name,))

    async def models_by_hash(self, code_hash: str) -> list[dict[str, Any]]:
        return await self.fetchall("SELECT id, name, origin FROM model WHERE code_hash=?", (code_hash,))

    async def models_by_fingerprint(self, fingerprint: str) -> list[dict[str, Any]]:
        return await self.fetchall("SELECT id, name, origin FROM model WHERE fingerprint=?", (fingerprint,))

    async def resolve_model_name(self, name: str) -> str | None:
        """`name` itself, else the one model whose name equals it ignoring case (None: none, or ambiguous)."""
        rows = await self.fetchall("SELECT name FROM model WHERE name = ? COLLATE NOCASE ORDER BY name LIMIT 2",
                                   (name,))
        names = [r["name"] for r in rows]
        if name in names:
            return name
        return names[0] if len(names) == 1 else None

    async def similar_model_names(self, name: str, limit: int = 5, cutoff: float = 0.6) -> list[str]:
        """Names that really resemble `name` (difflib's ratio over lower-cased names), best first; maybe none."""
        names = [r["name"] for r in await self.fetchall("SELECT name FROM model")]
        by_lower: dict[str, str] = {}
        for n in names:
            by_lower.setdefault(n.lower(), n)

        def close() -> list[str]:
            return difflib.get_close_matches(name.lower(), list(by_lower), n=limit, cutoff=cutoff)

        return [by_lower[n] for n in await anyio.to_thread.run_sync(close)]

    async def model_names(self, like_prefix: str | None = None, limit: int = 20) -> list[str]:
        if like_prefix:
            rows = await self.fetchall("SELECT name FROM model WHERE name >= ? ORDER BY name LIMIT ?",
                                       (like_prefix, limit))
        else:
            rows = await self.fetchall("SELECT name FROM model ORDER BY name LIMIT ?", (limit,))
        return [r["name"] for r in rows]

    # --- runs --------------------------------------------------------------------------------------
    async def add_runs(self, model_id: int, runs: Iterable[Run]) -> list[tuple[int, bool]]:
        """Write runs with their curve points in ONE transaction; idempotent on `Run.uid`."""
        async with self.transaction() as db:
            return [await self.add_run_in(db, model_id, run) for run in runs]

    async def add_model_with_runs(self, model: Model, runs: Sequence[Run]) -> tuple[int, list[tuple[int, bool]]]:
        """Model (if new) and its runs in one transaction: used by the importer and the evaluator."""
        async with self.transaction() as db:
            model_id, _ = await self.add_model_in(db, model)
            return model_id, [await self.add_run_in(db, model_id, run) for run in runs]

    @staticmethod
    async def add_run_in(db: aiosqlite.Connection, model_id: int, run: Run) -> tuple[int, bool]:
        """One run with its points and best points inside the caller's transaction; an existing uid is kept
        as it is (returns its id and False): the evaluator writes a trial once, when it ends."""
        # the look-up and the insert share the caller's write transaction: no second run of a uid
        row = await (await db.execute(f"SELECT id FROM run WHERE {schema.RUN_BY_UID}", (run.uid,))).fetchone()
        if row:
            return int(row[0]), False
        last = run.last_point
        epochs = max((p.epoch for p in run.points), default=None)
        cur = await db.execute(
            "INSERT INTO run(uid, model_id, task, dataset, metric, transform, prm, seed, epochs, status,"
            " accuracy, duration_ns, accuracy_to_time, device, versions, dataset_hash, job_id, trial, repeat,"
            " selected, train_samples, test_samples, isolation, error, source, created, protocol, precision,"
            " deterministic, environment) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (run.uid, model_id, run.task, run.dataset, run.metric, run.transform, _json(run.prm) or "{}",
             run.seed, epochs, run.status, last.accuracy if last else None,
             last.duration_ns if last else None, last.accuracy_to_time if last else None, run.device,
             _json(run.versions), run.dataset_hash, run.job_id, run.trial, run.repeat, int(run.selected),
             run.train_samples, run.test_samples, _json(run.isolation), _json(run.error), run.source, run.created,
             run.protocol or _source_protocol(run.source), run.precision,
             None if run.deterministic is None else int(run.deterministic), _json(run.environment)),
        )
        run_id = int(cur.lastrowid)  # type: ignore[arg-type]
        if run.points:
            await db.executemany(
                "INSERT INTO point(run_id, epoch, model_id, task, dataset, metric, accuracy, val_accuracy, loss,"
                " duration_ns, accuracy_to_time, elapsed_s) VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                [(run_id, p.epoch, model_id, run.task, run.dataset, run.metric, p.accuracy, p.val_accuracy,
                  p.loss, p.duration_ns, p.accuracy_to_time, p.elapsed_s) for p in run.points],
            )  # a point's created is its run's (zoo.schema.POINT_VIEW_V9)
            await db.executemany(schema.BEST_POINT_UPSERT, [
                (run.task, run.dataset, run.metric, p.epoch, model_id, p.accuracy, p.duration_ns,
                 p.accuracy_to_time, run_id) for p in run.points if p.accuracy is not None])
            # our own runs' training diagnostics (learn()'s loss and accuracy) beside LEMUR's, one row a point
            await db.executemany(
                # the loss is the point's (zoo.lemur_extras.curve_diagnostics reads it there): stored once
                "INSERT INTO point_train(run_id, epoch, train_accuracy) VALUES(?,?,?)",
                [(run_id, p.epoch, p.train_accuracy) for p in run.points if p.train_accuracy is not None])
        return run_id, True

    async def set_weights(self, run_id: int, sha256: str, size: int, rel_path: str) -> None:
        async with self.transaction() as db:
            await self.set_weights_in(db, run_id, sha256, size, rel_path)

    @staticmethod
    async def set_weights_in(db: aiosqlite.Connection, run_id: int, sha256: str, size: int, rel_path: str,
                             fmt: str = "safetensors") -> None:
        """The run's weights row of format `fmt` (replaced if it has one) inside the caller's transaction;
        a run has one per format (its safetensors, and its ONNX export when one was asked for)."""
        await db.execute(
            "INSERT INTO weights(run_id, sha256, size, path, format) VALUES(?,?,?,?,?) ON CONFLICT(run_id, format) "
            "DO UPDATE SET sha256=excluded.sha256, size=excluded.size, path=excluded.path",
            (run_id, sha256, size, rel_path, fmt),
        )

    @staticmethod
    async def settle_run_in(db: aiosqlite.Connection, run: Run) -> None:
        """What a job learns of a run only at its end, for a run written when its trial ended: whether it
        is the selected one, and the isolation the sandbox reported when it exited."""
        await db.execute(f"UPDATE run SET selected=?2, isolation=?3 WHERE {schema.RUN_BY_UID}",
                         (run.uid, int(run.selected), _json(run.isolation)))

    # --- device calibration (lemur_agent_server.evaluator.calibration) -------------------------------
    _CALIBRATION_COLS = ("key", "device_kind", "device_name", "threads", "harness", "status", "median_ns", "spread",
                         "times_ns", "factor", "detail", "created")

    async def calibration_by_key(self, key: str) -> dict[str, Any] | None:
        return await self.fetchone("SELECT * FROM device_calibration WHERE key=?", (key,))

    async def add_calibration(self, row: dict[str, Any]) -> dict[str, Any]:
        """Store a device's calibration row (usually `pending`); a row already stored under the same key
        (another job or server saw the device first) wins and is returned instead."""
        cols = self._CALIBRATION_COLS
        values = [_json(row.get(c)) if c in ("times_ns", "detail") else row.get(c) for c in cols]
        async with self.transaction() as db:
            await db.execute(f"INSERT INTO device_calibration({', '.join(cols)}) VALUES({','.join('?' * len(cols))})"
                             " ON CONFLICT(key) DO NOTHING", values)
        stored = await self.calibration_by_key(row["key"])
        assert stored is not None
        return stored

    async def finish_calibration(self, key: str, row: dict[str, Any]) -> dict[str, Any] | None:
        """A pending calibration's result (status ok or failed, times, factor) and, in the same
        transaction, the normalized duration of every run that trained on the device meanwhile. The
        first result wins: a row no longer pending is left as it is. Returns the stored row."""
        fields = ("status", "median_ns", "spread", "times_ns", "factor", "detail", "created")
        values = [_json(row.get(c)) if c in ("times_ns", "detail") else row.get(c) for c in fields]
        async with self.transaction() as db:
            cur = await db.execute(f"UPDATE device_calibration SET {', '.join(f + '=?' for f in fields)}"
                                   " WHERE key=? AND status='pending'", (*values, key))
            if cur.rowcount:
                await db.execute(
                    "UPDATE run SET duration_norm_ns=CAST(duration_ns * (SELECT factor FROM device_calibration"
                    " WHERE key=? AND status='ok') AS INTEGER) WHERE calibration_id=(SELECT id FROM"
                    " device_calibration WHERE key=?)", (key, key))
        return await self.calibration_by_key(key)

    @staticmethod
    async def set_run_calibration_in(db: aiosqlite.Connection, run_uid: str, calibration_id: int) -> None:
        """Which device calibration a run's time is measured against, and its training time on the
        reference device (duration x the factor; NULL while the calibration is pending or if it failed)."""
        await db.execute(
            "UPDATE run SET calibration_id=?2, duration_norm_ns=CAST(duration_ns * (SELECT factor FROM"
            f" device_calibration WHERE id=?2 AND status='ok') AS INTEGER) WHERE {schema.RUN_BY_UID}",
            (run_uid, calibration_id))

    @staticmethod
    async def fill_model_stats_in(db: aiosqlite.Connection, model: Model) -> None:
        """Params, flops and fingerprint measured by the check, where the stored model has none yet."""
        if model.params is not None:
            await db.execute("UPDATE model SET params=?, flops=?, fingerprint=? WHERE name=? AND params IS NULL",
                             (model.params, model.flops, model.fingerprint, model.name))

    # --- queries -----------------------------------------------------------------------------------
    async def query(self, filters: Filters, page: Page) -> dict[str, Any]:
        """Rows of one page, the total number of rows for the filters, and the next cursor."""
        sql, args = page_sql(filters, page)
        csql, cargs = count_sql(filters)
        async with self.snapshot() as db:
            raw = [dict(r) for r in await db.execute_fetchall(sql, args)]
            total = (await (await db.execute(csql, cargs)).fetchone())[0]
            groups = await repeat_groups.groups_in(db, [r.get("job_id") for r in raw])
        rows = [decode_row(r) | {"repeat_group": groups.get(r.get("job_id") or "")} for r in raw]
        next_cursor = None
        if page.limit is not None and len(raw) == page.limit:
            consumed = (page.offset if not page.cursor else 0) + len(raw)
            if page.cursor or consumed < total:
                next_cursor = encode_cursor(filters, page, raw[-1])
        return {"rows": rows, "total": total, "next_cursor": next_cursor}

    async def model_detail(self, name: str) -> dict[str, Any] | None:
        """A model with a summary of its runs per task/dataset/metric and its best run's curve."""
        async with self.snapshot() as db:
            model = await (await db.execute("SELECT * FROM model WHERE name=?", (name,))).fetchone()
            if model is None:
                return None
            model = _decoded(dict(model))
            summary = [dict(r) for r in await db.execute_fetchall(
                "SELECT task, dataset, metric, COUNT(*) AS runs, MAX(accuracy) AS best_accuracy,"
                " AVG(accuracy) AS mean_accuracy, MAX(accuracy_to_time) AS best_accuracy_to_time,"
                f" MAX(epochs) AS max_epochs, SUM(status IN ({_FAILED_RUN_SQL})) AS failed_runs"
                " FROM run WHERE model_id=? GROUP BY task, dataset, metric ORDER BY best_accuracy DESC",
                (model["id"],))]
            best = await (await db.execute(
                "SELECT * FROM run WHERE model_id=? AND accuracy IS NOT NULL "
                "ORDER BY accuracy DESC, id LIMIT 1", (model["id"],))).fetchone()
            curve: list[dict[str, Any]] = []
            weights = None
            if best is not None:
                best = dict(best)
                curve = [dict(r) for r in await db.execute_fetchall(
                    "SELECT epoch, accuracy, val_accuracy, loss, duration_ns, accuracy_to_time, elapsed_s "
                    "FROM point WHERE run_id=? ORDER BY epoch", (best["id"],))]
                # the best run that kept weights (a repeat's rerun keeps none: the selected trial does)
                w = await (await db.execute(
                    "SELECT w.*, r.uid AS run_uid, r.accuracy AS run_accuracy FROM weights w JOIN run r "
                    "ON r.id = w.run_id WHERE r.model_id=? AND w.format='safetensors' "
                    "ORDER BY r.accuracy DESC, r.id LIMIT 1", (model["id"],))).fetchone()
                weights = dict(w) if w else None
                if weights is not None:  # every file of that run, one per format (safetensors, onnx)
                    weights["files"] = [dict(f) for f in await db.execute_fetchall(
                        "SELECT format, sha256, size, path FROM weights WHERE run_id=? ORDER BY format",
                        (weights["run_id"],))]
            recent = [dict(r) for r in await db.execute_fetchall(
                "SELECT uid, task, dataset, metric, status, accuracy, epochs, duration_ns, prm, error, created, "
                "seed, job_id, repeat, protocol, precision "
                "FROM run WHERE model_id=? ORDER BY created DESC, id DESC LIMIT 10", (model["id"],))]
            groups = await repeat_groups.groups_in(db, [r["job_id"] for r in recent] + [(best or {}).get("job_id")])
        if best is not None:
            best["repeat_group"] = groups.get(best.get("job_id") or "")
        for run in recent:
            run["repeat_group"] = groups.get(run.get("job_id") or "")
        return {"model": model, "summary": summary, "best_run": best, "curve": curve, "weights": weights,
                "recent_runs": recent}

    async def catalog_counts(self) -> list[dict[str, Any]]:
        return await self.fetchall(
            "SELECT task, dataset, metric, COUNT(DISTINCT model_id) AS models, COUNT(*) AS runs "
            "FROM run GROUP BY task, dataset, metric ORDER BY runs DESC")

    async def transform_counts(self) -> list[dict[str, Any]]:
        return await self.fetchall(
            "SELECT transform, COUNT(*) AS runs FROM run WHERE transform IS NOT NULL "
            "GROUP BY transform ORDER BY runs DESC")

    async def totals(self) -> dict[str, int]:
        row = await self.fetchone(
            "SELECT (SELECT COUNT(*) FROM model) AS models, (SELECT COUNT(*) FROM run) AS runs")
        return dict(row) if row else {"models": 0, "runs": 0}
