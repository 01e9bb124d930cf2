"""The job queue's persistence: create, claim, heartbeat, recover, requeue, finish and cancel.

Why its own store beside the archive (like Optuna's heartbeat module next to its storage): the
queue's rules — who owns a job, when an owner counts as dead, that a finished job never changes
again — are a different concern from models and runs, and read best in one small place. It shares
the zoo's SQLite file and writer connection (`ZooStore.transaction`), so a job and the runs it
archives live in one database, and the table is the one `zoo.schema` creates.

Ownership: a worker claims a job by writing its `owner` id and counting `attempts` up. Every later
write of that worker (progress, heartbeat, finish, requeue) is conditional on `owner = ? AND
attempts = ?` and on the job still being active, so a stalled server whose job was re-queued and
claimed elsewhere can no longer touch it, and a late progress call can never move a finished job
back to `training`.

Batches: a job may belong to a batch (`batch_id`). Every job that ends gets the next `finished_seq`
(a counter in `meta`, drawn inside the transaction that ends it), so a reader that remembers the
highest sequence it saw (wait_jobs' cursor) gets every later end exactly once. `claim_next` serves
batches round-robin: the next job comes from the batch (or single job) whose last claim is oldest,
so one client's 150-model batch holds another's single submission back by one job at most.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox.protocol import FailureKind, JobStatus, RunStatus, Stage
from zoo import codehash
from zoo.records import Run

if TYPE_CHECKING:
    import aiosqlite

    from zoo.store import ZooStore

ACTIVE = (JobStatus.CHECKING, JobStatus.TRAINING, JobStatus.EVALUATING)
_ACTIVE_SQL = ",".join(f"'{s}'" for s in ACTIVE)
_CLAIMED = "id=? AND owner=? AND attempts=? AND status IN (" + _ACTIVE_SQL + ")"
# a process started this long after the owner's last heartbeat is not the owner (its PID was reused);
# /proc/stat's boot time has a resolution of one second
_PID_REUSE_SLACK_S = 2.0


class JobKind(StrEnum):
    """What a job does (`job.kind`); a worker runs each job as its own kind."""

    SUBMIT = "submit"  # train and archive in the zoo
    EVALUATE = "evaluate"  # train and score, archive nothing (the Python API's check_nn(save_to_db=False))
    CHECK = "check"  # the check stage only (never persisted: check_model runs it in the caller's task)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One worker's hold on one attempt of a job: the key of every write it makes to the job."""

    job_id: str
    owner: str
    attempt: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> Claim:
        return cls(row["id"], row["owner"], int(row["attempts"]))

    def args(self) -> tuple[str, str, int]:
        return self.job_id, self.owner, self.attempt


def new_owner_id() -> str:
    """`host:pid:random`: the host and pid let another server on this host see that the owner died."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _process_start_unix(pid: int) -> tuple[float | None, bool]:
    """(start time in unix seconds, is a zombie) of a live process, from /proc (None where unreadable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
    except (OSError, StopIteration, ValueError, IndexError):
        return None, False
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK"), fields[0] == "Z"


def owner_is_gone(owner: str | None, last_seen: float | None) -> bool:
    """True when `owner` ran on this host and its process is gone (or its PID now names another process).

    An owner on another host is never judged here: only its heartbeat going stale says it died.
    """
    parts = (owner or "").rsplit(":", 2)
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's process
    started, zombie = _process_start_unix(pid)
    if zombie:
        return True
    return started is not None and last_seen is not None and started > last_seen + _PID_REUSE_SLACK_S


_FINISH_SEQ = "job_finished_seq"  # meta key of the last finished_seq handed out
_LIST_COLUMNS = ("id, kind, status, model_name, batch_id, reused_from, created, started, finished, finished_seq,"
                 " result, error")


async def next_finished_seq(db: aiosqlite.Connection) -> int:
    """The next sequence number of a job's end; call inside the transaction that ends the job."""
    row = await (await db.execute(
        "INSERT INTO meta(key, value) VALUES(?, '1') ON CONFLICT(key) DO UPDATE SET"
        " value = CAST(value AS INTEGER) + 1 RETURNING value", (_FINISH_SEQ,))).fetchone()
    return int(row[0])


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which jobs a batch read is about: one batch, or a list of job ids."""

    batch_id: str | None = None
    job_ids: tuple[str, ...] = ()

    def where(self) -> tuple[str, tuple[Any, ...]]:
        if self.batch_id is not None:
            return "batch_id=?", (self.batch_id,)
        return f"id IN ({','.join('?' * len(self.job_ids))})", tuple(self.job_ids)


@dataclasses.dataclass
class NewJob:
    """One row of a batch insert: queued, or already finished (static failure, reused result)."""

    job_id: str
    kind: str
    request: dict[str, Any]
    model_name: str | None = None
    dedup_key: str | None = None
    status: JobStatus = JobStatus.QUEUED
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    reused_from: str | None = None


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


def _decode(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row:
        for key in ("request", "progress", "result", "error"):
            if row.get(key):
                row[key] = json.loads(row[key])
    return row


class JobStore:
    """The `job` table of one zoo. Reach it as `ZooStore.jobs`."""

    def __init__(self, zoo: ZooStore):
        self._zoo = zoo

    # --- creating and reading ----------------------------------------------------------------------
    async def create(self, job_id: str, kind: str, request: dict[str, Any], model_name: str | None = None,
                     dedup_key: str | None = None) -> None:
        """A queued job, for any worker to claim."""
        await self.create_many(None, [NewJob(job_id, kind, request, model_name, dedup_key)])

    async def create_many(self, batch_id: str | None, jobs: Sequence[NewJob]) -> None:
        """Jobs of one batch in one transaction, in order (their rowids keep the items' order)."""
        now = time.time()
        async with self._zoo.transaction() as db:
            for job in jobs:
                done = JobStatus(job.status).is_finished()
                await db.execute(
                    "INSERT INTO job(id, kind, status, request, model_name, result, error, created, started, finished,"
                    " finished_seq, batch_id, dedup_key, reused_from) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (job.job_id, job.kind, job.status, _json(job.request), job.model_name, _json(job.result),
                     _json(job.error), now, now if done else None, now if done else None,
                     await next_finished_seq(db) if done else None, batch_id, job.dedup_key, job.reused_from))

    async def create_claimed(self, job_id: str, kind: str, request: dict[str, Any], owner: str) -> Claim:
        """A job already claimed by `owner` (run in the caller's task), in one statement: it is never queued."""
        now = time.time()
        async with self._zoo.transaction() as db:
            await db.execute(
                "INSERT INTO job(id, kind, status, request, owner, heartbeat, attempts, created, started)"
                " VALUES(?,?,?,?,?,?,1,?,?)",
                (job_id, kind, JobStatus.CHECKING, _json(request), owner, now, now, now))
        return Claim(job_id, owner, 1)

    async def create_finished(self, job_id: str, kind: str, request: dict[str, Any], status: JobStatus,
                              result: dict[str, Any] | None, error: dict[str, Any] | None,
                              model_name: str | None = None, dedup_key: str | None = None) -> None:
        """A job that ended before it was queued (static-check failures), in one statement."""
        assert JobStatus(status).is_finished(), status
        await self.create_many(None, [NewJob(job_id, kind, request, model_name, dedup_key, status, result, error)])

    async def get(self, job_id: str) -> dict[str, Any] | None:
        return _decode(await self._zoo.fetchone("SELECT * FROM job WHERE id=?", (job_id,)))

    async def recent(self, limit: int = 20, status: str | None = None) -> list[dict[str, Any]]:
        """The newest jobs first (ids, kinds, states), optionally of one status."""
        where, args = ("WHERE status=? ", (status, limit)) if status else ("", (limit,))
        return await self._zoo.fetchall(
            f"SELECT id, kind, status, model_name, created, finished FROM job {where}ORDER BY created DESC LIMIT ?",
            args)

    async def reusable(self, dedup_key: str) -> dict[str, Any] | None:
        """The newest succeeded, archived job of this experiment that trained itself (not a reuse)."""
        return _decode(await self._zoo.fetchone(
            "SELECT * FROM job WHERE dedup_key=? AND status=? AND kind=? AND reused_from IS NULL"
            " ORDER BY finished DESC LIMIT 1", (dedup_key, JobStatus.SUCCEEDED, JobKind.SUBMIT)))

    async def finished_since(self, selection: Selection, cursor: int, limit: int) -> list[dict[str, Any]]:
        """The selection's jobs that ended after `cursor` (a finished_seq), in the order they ended."""
        where, args = selection.where()
        rows = await self._zoo.fetchall(f"SELECT * FROM job WHERE {where} AND finished_seq > ? "
                                        "ORDER BY finished_seq LIMIT ?", (*args, cursor, limit))
        return [_decode(row) for row in rows]  # type: ignore[misc]

    async def count_by_status(self, selection: Selection) -> dict[str, int]:
        where, args = selection.where()
        rows = await self._zoo.fetchall(f"SELECT status, COUNT(*) AS n FROM job WHERE {where} GROUP BY status",
                                        args)
        return {row["status"]: row["n"] for row in rows}

    async def existing_ids(self, job_ids: Sequence[str]) -> set[str]:
        rows = await self._zoo.fetchall(f"SELECT id FROM job WHERE id IN ({','.join('?' * len(job_ids))})",
                                        tuple(job_ids))
        return {row["id"] for row in rows}

    async def page(self, limit: int, status: Sequence[str] = (), batch_id: str | None = None,
                   before: int | None = None) -> list[dict[str, Any]]:
        """Jobs newest first (by insertion), optionally of some statuses or one batch, older than `before`
        (a rowid from the previous page); each row carries its `seq` (rowid) for the next page."""
        where, args = ["1=1"], []
        if status:
            where.append(f"status IN ({','.join('?' * len(status))})")
            args += list(status)
        if batch_id is not None:
            where.append("batch_id=?")
            args.append(batch_id)
        if before is not None:
            where.append("rowid < ?")
            args.append(before)
        rows = await self._zoo.fetchall(f"SELECT rowid AS seq, {_LIST_COLUMNS} FROM job WHERE {' AND '.join(where)}"
                                        " ORDER BY rowid DESC LIMIT ?", (*args, limit))
        return [_decode(row) for row in rows]  # type: ignore[misc]

    # --- claiming ----------------------------------------------------------------------------------
    async def claim_next(self, owner: str, kinds: Sequence[str]) -> dict[str, Any] | None:
        """Atomically move the next queued job of one of `kinds` to `checking` for this owner.

        Fair between batches: the next job comes from the group (a batch, or a single job alone) whose
        last claim is oldest; a group never claimed counts from its creation. Within a batch, jobs
        run in item order. So a batch and a single job queued after it alternate, and a batch that
        arrives while another runs takes turns with it instead of waiting for it to drain.
        """
        marks = ",".join("?" * len(kinds))
        async with self._zoo.transaction() as db:
            row = await (await db.execute(
                f"SELECT j.id FROM job j WHERE j.status=? AND j.cancel_requested=0 AND j.kind IN ({marks}) "
                "ORDER BY COALESCE((SELECT MAX(s.started) FROM job s WHERE j.batch_id IS NOT NULL"
                " AND s.batch_id = j.batch_id), j.created), j.created, j.rowid LIMIT 1",
                (JobStatus.QUEUED, *kinds))).fetchone()
            if row is None:
                return None
            now = time.time()
            await db.execute(
                "UPDATE job SET status=?, owner=?, heartbeat=?, started=COALESCE(started, ?),"
                " attempts=attempts+1 WHERE id=?", (JobStatus.CHECKING, owner, now, now, row[0]))
        return await self.get(row[0])

    # --- the owner's writes (each conditional on its claim) -----------------------------------------
    async def progress(self, claim: Claim, status: JobStatus, progress: dict[str, Any]) -> bool:
        """The stage a running job is in and its progress. False when the claim is no longer held."""
        return await self._update_claimed(claim, "status=?, progress=?, heartbeat=?",
                                          (status, _json(progress), time.time()))

    async def heartbeat(self, claims: Iterable[Claim]) -> list[str]:
        """Heart-beat the claims; returns the ids of jobs whose claim was lost (re-queued, cancelled, ...)."""
        lost = []
        now = time.time()
        async with self._zoo.transaction() as db:
            for claim in claims:
                cur = await db.execute(f"UPDATE job SET heartbeat=? WHERE {_CLAIMED}", (now, *claim.args()))
                if cur.rowcount != 1:
                    lost.append(claim.job_id)
        return lost

    async def finish(self, claim: Claim, status: JobStatus, result: dict[str, Any] | None = None,
                     error: dict[str, Any] | None = None) -> bool:
        """End a job (with the model it archived, from `result`). False when the claim is no longer held."""
        async with self._zoo.transaction() as db:
            return await self.finish_in(db, claim, status, result, error)

    @staticmethod
    async def finish_in(db: aiosqlite.Connection, claim: Claim, status: JobStatus,
                        result: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> bool:
        """`finish` inside the caller's open transaction, so a job's runs and its end can commit together
        (the caller rolls its archive back when this returns False: the job is no longer its own)."""
        assert JobStatus(status).is_finished(), status
        model_name = (result or {}).get("model_name")
        held = await (await db.execute(f"SELECT 1 FROM job WHERE {_CLAIMED}", claim.args())).fetchone()
        if held is None:
            return False
        cur = await db.execute(
            f"UPDATE job SET status=?, result=?, error=?, finished=?, model_name=COALESCE(?, model_name), "
            f"finished_seq=? WHERE {_CLAIMED}", (status, _json(result), _json(error), time.time(), model_name,
                                                  await next_finished_seq(db), *claim.args()))
        return cur.rowcount == 1

    @staticmethod
    async def holds_in(db: aiosqlite.Connection, claim: Claim) -> bool:
        """Whether the claim is still held, inside the caller's open transaction (and a heartbeat): a
        trial is archived only while its job is its worker's own."""
        cur = await db.execute(f"UPDATE job SET heartbeat=? WHERE {_CLAIMED}", (time.time(), *claim.args()))
        return cur.rowcount == 1

    async def requeue(self, claim: Claim) -> bool:
        """Give a running job back to the queue (clean shutdown); the attempt does not count."""
        return await self._update_claimed(
            claim, "status=?, owner=NULL, heartbeat=NULL, attempts=MAX(0, attempts-1)", (JobStatus.QUEUED,))

    async def _update_claimed(self, claim: Claim, sets: str, values: tuple[Any, ...]) -> bool:
        async with self._zoo.transaction() as db:
            cur = await db.execute(f"UPDATE job SET {sets} WHERE {_CLAIMED}", (*values, *claim.args()))
            return cur.rowcount == 1

    # --- anyone's writes ---------------------------------------------------------------------------
    async def request_cancel(self, job_id: str) -> str | None:
        """Mark a job for cancellation. A queued job is cancelled at once. Returns its status after."""
        async with self._zoo.transaction() as db:
            row = await (await db.execute("SELECT status FROM job WHERE id=?", (job_id,))).fetchone()
            if row is None:
                return None
            status = JobStatus(row[0])
            if status.is_finished():
                return status
            return await self._cancel_in(db, job_id, status)

    async def request_cancel_batch(self, batch_id: str) -> dict[str, str] | None:
        """`request_cancel` for every unfinished job of a batch, in one transaction: {job id: status after}.
        None when no job has this batch id."""
        async with self._zoo.transaction() as db:
            rows = await db.execute_fetchall("SELECT id, status FROM job WHERE batch_id=?", (batch_id,))
            if not rows:
                return None
            return {job_id: await self._cancel_in(db, job_id, JobStatus(status)) for job_id, status in rows}

    @staticmethod
    async def _cancel_in(db: aiosqlite.Connection, job_id: str, status: JobStatus) -> JobStatus:
        if status.is_finished():
            return status
        if status is JobStatus.QUEUED:
            await db.execute("UPDATE job SET status=?, cancel_requested=1, finished=?, finished_seq=? WHERE id=?",
                             (JobStatus.CANCELLED, time.time(), await next_finished_seq(db), job_id))
            return JobStatus.CANCELLED
        await db.execute("UPDATE job SET cancel_requested=1 WHERE id=?", (job_id,))
        return status

    async def recover(self, stale_after_s: float, max_attempts: int = 2,
                      is_gone: Callable[[str | None, float | None], bool] = owner_is_gone,
                      on_release: Callable[[list[str]], None] | None = None) -> dict[str, list[str]]:
        """Active jobs whose owner died: re-queue them, or fail them as `interrupted` after `max_attempts`.

        An owner counts as dead at once when its process is gone from this host (`is_gone`), and
        after `stale_after_s` without a heartbeat anywhere else. The trials that finished are in the zoo
        already (each was archived as it ended, see `evaluator.archive`); an interrupted job adds a failed
        run that says so. `on_release(ids)` runs before the commit, while this transaction holds the
        write lock, so no worker can claim a re-queued job and make its folder before it is removed.
        """
        cutoff = time.time() - stale_after_s
        released: dict[str, list[str]] = {"requeued": [], "failed": []}
        cancelled: list[str] = []
        async with self._zoo.transaction() as db:
            rows = await db.execute_fetchall(
                f"SELECT id, attempts, cancel_requested, owner, heartbeat, kind, request FROM job "
                f"WHERE status IN ({_ACTIVE_SQL})")
            for job_id, attempts, cancel, owner, beat, kind, request in rows:
                if beat is not None and beat >= cutoff and not is_gone(owner, beat):
                    continue
                if cancel:
                    await db.execute("UPDATE job SET status=?, finished=?, finished_seq=? WHERE id=?",
                                     (JobStatus.CANCELLED, time.time(), await next_finished_seq(db), job_id))
                    cancelled.append(job_id)
                elif attempts < max_attempts:
                    await db.execute("UPDATE job SET status=?, owner=NULL, heartbeat=NULL WHERE id=?",
                                     (JobStatus.QUEUED, job_id))
                    released["requeued"].append(job_id)
                else:
                    await self._interrupt(db, job_id, attempts, kind, json.loads(request))
                    released["failed"].append(job_id)
            if on_release is not None:
                on_release([*released["requeued"], *released["failed"], *cancelled])
        return released

    async def _interrupt(self, db: aiosqlite.Connection, job_id: str, attempts: int, kind: str,
                         request: dict[str, Any]) -> None:
        """Fail a job whose servers kept dying, with a failed run on its model that says why (a submission
        that got past its check has its model in the zoo; one that did not has nothing to show it on)."""
        error = {"stage": Stage.QUEUE, "kind": FailureKind.INTERRUPTED,
                 "message": f"The server running this job stopped {attempts} times; the trials that finished "
                            "are archived. Submit again if you need the rest."}
        model = await (await db.execute("SELECT id, name FROM model WHERE code_hash=? ORDER BY id LIMIT 1",
                                        (codehash.code_hash(str(request.get("code", ""))),))).fetchone()
        if kind == JobKind.SUBMIT and model is not None:
            run = Run(uid=f"{job_id}:interrupted", task=request.get("task", ""), dataset=request.get("dataset", ""),
                      metric=request.get("metric", ""), status=RunStatus.FAILED, source="evaluator",
                      prm=dict(request.get("prm") or {}), seed=request.get("seed"), job_id=job_id, error=error)
            await self._zoo.add_run_in(db, int(model[0]), run)
        await db.execute("UPDATE job SET status=?, error=?, finished=?, finished_seq=?, "
                         "model_name=COALESCE(model_name, ?) WHERE id=?",
                         (JobStatus.FAILED, _json(error), time.time(), await next_finished_seq(db),
                          model[1] if model is not None else None, job_id))
