"""The job queue's rules, on a real zoo file and the process sandbox: each job runs as its own kind,
a job exists only once its caller knows its id, only the claiming server may write to a job, and a
job of a dead owner on this host is re-queued at once.

Job rows are written with plain SQL where a test sets up a situation (the table is the schema's), so
each test describes the state of the zoo, not a call sequence of the store."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from lemur_agent_server.evaluator import queue as queue_module
from lemur_agent_server.evaluator.queue import JobQueue
from lemur_agent_server.evaluator.requests import EvalRequest
from tests import models
from tests.zoo_factory import count
from zoo.jobs import Claim, new_owner_id, owner_is_gone
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

QUICK = {"n_trials": 1, "epochs": 0.5, "time_budget_s": 60, "max_train_samples": 64,
         "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}}


def insert_job(zoo: Path, job_id: str, kind: str, request: EvalRequest, status: str = "queued",
               owner: str | None = None, heartbeat: float | None = None, attempts: int = 0) -> None:
    with sqlite3.connect(zoo) as conn:
        conn.execute("INSERT INTO job(id, kind, status, request, owner, heartbeat, attempts, created)"
                     " VALUES(?,?,?,?,?,?,?,?)", (job_id, kind, status, json.dumps(request.model_dump()), owner,
                                                  heartbeat, attempts, time.time()))
    conn.close()


def job_row(zoo: Path, job_id: str) -> dict:
    conn = sqlite3.connect(zoo)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT * FROM job WHERE id=?", (job_id,)).fetchone())
    finally:
        conn.close()


async def wait_for(zoo: Path, job_id: str, statuses: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while (row := job_row(zoo, job_id))["status"] not in statuses:
        assert time.monotonic() < deadline, row
        await anyio.sleep(0.2)
    return row


async def test_a_requeued_evaluate_job_runs_as_evaluate_and_archives_nothing(make_settings):
    """check_nn(save_to_db=False) leaves an `evaluate` job; after a crash a worker picks it up again."""
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-evaluate-1", "evaluate", request)
        async with JobQueue.running(settings, store):
            row = await wait_for(settings.zoo_path, "job-evaluate-1", {"succeeded", "failed", "timed_out"}, 180)
    assert row["status"] == "succeeded", row
    assert json.loads(row["result"])["accuracy"] is not None  # it really trained and was scored
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM run") == 0
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM model") == 0


async def test_a_job_of_an_unknown_kind_is_left_to_a_worker_that_knows_it(make_settings):
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-batch-1", "batch", request)
        async with JobQueue.running(settings, store):
            await anyio.sleep(2.5)  # two idle polls of every slot
    assert job_row(settings.zoo_path, "job-batch-1")["status"] == "queued"


async def test_a_crash_in_the_static_checks_leaves_no_job(make_settings, monkeypatch):
    """The caller who gets an exception has no job id, so no job may exist (let alone stay queued)."""
    settings = make_settings(seed_zoo=False)

    def crash(code: str) -> list:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(queue_module, "static_problems", crash)  # a fault no valid input provokes reliably
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, workers=False) as queue:
            with pytest.raises(RecursionError):
                await queue.submit(EvalRequest(code=models.GOOD, dataset="digits", **QUICK))
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM job") == 0


async def test_a_static_failure_is_one_finished_job_with_its_model(make_settings):
    settings = make_settings(seed_zoo=False)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, workers=False) as queue:
            job_id = await queue.submit(EvalRequest(code=models.SYNTAX, dataset="digits", **QUICK))
    row = job_row(settings.zoo_path, job_id)
    assert row["status"] == "failed" and json.loads(row["error"])["kind"] == "syntax"
    assert row["finished"] is not None and row["model_name"]
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM run WHERE job_id=? AND status='failed'", (job_id,)) == 1


async def test_a_stalled_server_cannot_write_to_a_job_claimed_elsewhere(make_settings):
    """Server A runs a job; meanwhile the job is re-queued and claimed by server B (A looked dead).
    A's progress and its end must not reach the row: B owns it now."""
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.SLOW, dataset="digits", n_trials=1, epochs=1, time_budget_s=60,
                          max_train_samples=256, prm={"batch": 16, "lr": 0.05, "momentum": 0.9})
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-stolen", "evaluate", request)
        async with JobQueue.running(settings, store) as queue:
            await wait_for(settings.zoo_path, "job-stolen", {"checking", "training"}, 60)
            with sqlite3.connect(settings.zoo_path) as conn:  # what B's claim writes
                conn.execute("UPDATE job SET owner='elsewhere:1:b', attempts=attempts+1, status='checking', "
                             "progress=NULL, heartbeat=? WHERE id='job-stolen'", (time.time() + 3600,))
            conn.close()
            deadline = time.monotonic() + 90
            while "job-stolen" in queue._running:  # until server A has ended its run of the job
                assert time.monotonic() < deadline
                await anyio.sleep(0.2)
    row = job_row(settings.zoo_path, "job-stolen")
    assert row["owner"] == "elsewhere:1:b" and row["status"] == "checking", row
    assert row["progress"] is None and row["result"] is None and row["finished"] is None


async def test_a_late_progress_call_never_reopens_a_finished_job(make_settings):
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-late", "submit", request)
        claim = Claim.of(await store.jobs.claim_next("me:1:a", ["submit"]))
        assert await store.jobs.progress(claim, "training", {"epoch": 0.5})
        assert await store.jobs.finish(claim, "succeeded", {"model_name": "m", "accuracy": 0.9})
        assert not await store.jobs.progress(claim, "training", {"epoch": 1.0})
        assert await store.jobs.heartbeat([claim]) == ["job-late"]
        assert not await store.jobs.finish(claim, "failed", None, {"kind": "sandbox"})
        assert not await store.jobs.requeue(claim)
    row = job_row(settings.zoo_path, "job-late")
    assert row["status"] == "succeeded" and json.loads(row["progress"]) == {"epoch": 0.5}
    assert row["model_name"] == "m" and row["error"] is None


async def test_only_the_current_claim_writes(make_settings):
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-two", "submit", request)
        first = Claim.of(await store.jobs.claim_next("a:1:a", ["submit"]))
        gone = await store.jobs.recover(600, is_gone=lambda owner, seen: owner == "a:1:a")
        assert gone == {"requeued": ["job-two"], "failed": []}
        second = Claim.of(await store.jobs.claim_next("b:2:b", ["submit"]))
        assert second.attempt == first.attempt + 1
        assert not await store.jobs.progress(first, "training", {"from": "a"})
        assert await store.jobs.heartbeat([first, second]) == ["job-two"]  # the first claim's, lost
        assert await store.jobs.progress(second, "training", {"from": "b"})
        assert not await store.jobs.finish(first, "failed")
        assert await store.jobs.finish(second, "succeeded", {"model_name": "n"})
    row = job_row(settings.zoo_path, "job-two")
    assert row["status"] == "succeeded" and row["owner"] == "b:2:b" and json.loads(row["progress"]) == {"from": "b"}


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


async def test_a_job_of_a_dead_process_on_this_host_is_requeued_at_start(make_settings):
    """Fresh heartbeat, long stale_after_s: only the owner's missing process says it died."""
    settings = make_settings(seed_zoo=False, stale_after_s=600)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    owner = f"{socket.gethostname()}:{dead_pid()}:deadbeef"
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-orphan", "submit", request, status="training", owner=owner,
                   heartbeat=time.time(), attempts=1)
        async with JobQueue.running(settings, store, workers=False):
            row = job_row(settings.zoo_path, "job-orphan")
    assert row["status"] == "queued" and row["owner"] is None, row


async def test_a_running_server_requeues_a_dead_owners_job_within_a_heartbeat(make_settings):
    settings = make_settings(seed_zoo=False, stale_after_s=600)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store):
            owner = f"{socket.gethostname()}:{dead_pid()}:deadbeef"
            # a kind no worker here runs, so the re-queued job stays visible as queued
            insert_job(settings.zoo_path, "job-later-orphan", "batch", request, status="training", owner=owner,
                       heartbeat=time.time(), attempts=1)
            row = await wait_for(settings.zoo_path, "job-later-orphan", {"queued"}, queue_module.HEARTBEAT_S + 3)
    assert row["owner"] is None and row["heartbeat"] is None


async def test_a_live_owner_keeps_its_job_and_a_reused_pid_does_not(make_settings):
    settings = make_settings(seed_zoo=False, stale_after_s=600)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.5)
        owner = f"{socket.gethostname()}:{sleeper.pid}:cafe"
        async with await ZooStore.open(settings.zoo_path) as store:
            # the live process claimed it a moment ago
            insert_job(settings.zoo_path, "job-alive", "submit", request, status="training", owner=owner,
                       heartbeat=time.time(), attempts=1)
            # a job whose owner beat last 30 s before this PID's process was born: the PID was reused
            insert_job(settings.zoo_path, "job-reused", "submit", request, status="training", owner=owner,
                       heartbeat=time.time() - 30, attempts=1)
            async with JobQueue.running(settings, store, workers=False):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    assert job_row(settings.zoo_path, "job-alive")["status"] == "training"
    assert job_row(settings.zoo_path, "job-reused")["status"] == "queued"


def test_owner_ids_name_this_host_and_process():
    owner = new_owner_id()
    host, pid, _ = owner.rsplit(":", 2)
    assert host == socket.gethostname() and int(pid) == os.getpid()
    assert not owner_is_gone(owner, time.time())
    assert not owner_is_gone("another-host:1:x", time.time())  # only its heartbeat can tell
    assert owner_is_gone(f"{socket.gethostname()}:{dead_pid()}:x", time.time())


class _RunningHere:
    """What `_cancel_locally` touches of a job running in this queue (its cancel event)."""

    def __init__(self) -> None:
        self.cancelled = anyio.Event()


async def test_a_job_that_ends_under_its_claim_during_a_heartbeat_is_not_reported_as_claimed_elsewhere(
        make_settings, caplog):
    """The heartbeat works on a snapshot of the claims; a job its worker finishes meanwhile is not lost
    (before: a warning "claimed elsewhere" and a cancel for a job that had simply ended). A job really
    claimed by another owner still is."""
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, workers=False) as queue:
            insert_job(settings.zoo_path, "job-ended", "submit", request)
            insert_job(settings.zoo_path, "job-taken", "submit", request)
            ended = Claim.of(await store.jobs.claim_next(queue.owner, ["submit"]))
            taken = Claim.of(await store.jobs.claim_next(queue.owner, ["submit"]))
            assert {ended.job_id, taken.job_id} == {"job-ended", "job-taken"}
            if ended.job_id != "job-ended":
                ended, taken = taken, ended
            assert await store.jobs.finish(ended, "succeeded", {"model_name": "m", "accuracy": 0.9})
            with sqlite3.connect(settings.zoo_path) as conn:  # what another server's claim writes
                conn.execute("UPDATE job SET owner='elsewhere:1:b', attempts=attempts+1 WHERE id='job-taken'")
            conn.close()
            here = {job_id: _RunningHere() for job_id in ("job-ended", "job-taken")}
            queue._claims.update({"job-ended": ended, "job-taken": taken})
            queue._running.update(here)
            with caplog.at_level("WARNING", logger=queue_module.log.name):
                await queue._heartbeat_once()
            queue._claims.clear()
            queue._running.clear()
    warned = [r.getMessage() for r in caplog.records if "no longer ours" in r.getMessage()]
    assert warned == ["job job-taken is no longer ours (claimed elsewhere); stopping it here"]
    assert here["job-taken"].cancelled.is_set() and not here["job-ended"].cancelled.is_set()
