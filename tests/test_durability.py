"""Nothing lost: a submission's trials reach the zoo as they end, a job's end is one transaction that a
lost claim rolls back, a re-run attempt writes fresh runs, and an interrupted job keeps its trials,
says why, and leaves no job folder. Real zoo file, real process sandbox, the digits dataset."""

from __future__ import annotations

import socket
import time

import anyio
import pytest

from lemur_agent_server.evaluator import pipeline
from lemur_agent_server.evaluator import queue as queue_module
from lemur_agent_server.evaluator.backends import choose_backend
from lemur_agent_server.evaluator.queue import JobQueue
from lemur_agent_server.evaluator.requests import EvalRequest
from sandbox.protocol import FailureKind, JobStatus
from tests import models
from tests.test_queue import count, dead_pid, insert_job, job_row, wait_for
from zoo.jobs import Claim
from zoo.records import Model, Point, Run
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

PRM = {"batch": 32, "lr": 0.05, "momentum": 0.9}
QUICK = {"n_trials": 1, "epochs": 0.5, "eval_every": 0.5, "time_budget_s": 60, "max_train_samples": 64,
         "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}}


async def _claims(store: ZooStore, job_id: str, owners: list[str]) -> list[Claim]:
    """Claim the queued job once per owner, each earlier owner counted dead (re-queued) before the next."""
    claims = []
    for owner in owners:
        claims.append(Claim.of(await store.jobs.claim_next(owner, ["submit"])))
        if owner != owners[-1]:
            await store.jobs.recover(600, is_gone=lambda o, seen, dead=owner: o == dead)
    return claims


async def test_finished_trials_are_in_the_zoo_while_the_job_runs(make_settings):
    settings = make_settings(seed_zoo=False)
    # SLOW sleeps per batch: three trials of about 2 s each, so the first ends well before the job
    request = EvalRequest(code=models.SLOW, dataset="digits", n_trials=3, epochs=0.5, eval_every=0.5,
                          time_budget_s=120, max_train_samples=320, prm=PRM)
    async with await ZooStore.open(settings.zoo_path) as store, JobQueue.running(settings, store) as queue:
        job_id = await queue.submit(request)
        seen_while_running = None
        while not JobStatus((row := await store.jobs.get(job_id))["status"]).is_finished():
            runs = await store.fetchall("SELECT id FROM run WHERE job_id=?", (job_id,))
            if runs and seen_while_running is None:
                seen_while_running = (len(runs), row["status"])
                name = row.get("model_name") or (await store.fetchone(
                    "SELECT m.name FROM model m JOIN run r ON r.model_id = m.id WHERE r.job_id=?", (job_id,)))["name"]
                detail = await store.model_detail(name)
                assert detail["recent_runs"] and detail["curve"], detail  # get_model shows it now
            await anyio.sleep(0.1)
        assert row["status"] == "succeeded", row
        assert seen_while_running is not None and seen_while_running[1] == "training", seen_while_running
        final = await store.fetchall("SELECT uid, selected FROM run WHERE job_id=? ORDER BY uid", (job_id,))
    assert [r["uid"] for r in final] == [f"{job_id}:t0", f"{job_id}:t1", f"{job_id}:t2"]  # each written once
    assert sum(r["selected"] for r in final) == 1  # the end flags the selected one
    assert row["result"]["runs_archived"] == 3


async def test_a_stalled_server_whose_job_was_claimed_elsewhere_archives_nothing(make_settings):
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-stalled", "submit", request)
        stale, _ = await _claims(store, "job-stalled", ["a:1:a", "b:2:b"])
        queue = JobQueue(settings, store, await anyio.to_thread.run_sync(choose_backend, settings))
        job = queue._job("job-stalled", "submit", request, queue_module._no_progress)
        job.claim = stale  # the stalled server still runs its old attempt
        outcome = await pipeline.evaluate(job)
        await queue.backend.aclose()
    assert outcome.status == "succeeded"  # trained, but nothing of it is written
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM run") == 0
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM model") == 0
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM weights") == 0
    row = job_row(settings.zoo_path, "job-stalled")
    assert row["owner"] == "b:2:b" and row["status"] == "checking" and row["result"] is None


async def test_a_rerun_attempt_writes_fresh_runs_and_keeps_the_earlier_ones(make_settings):
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store:
        insert_job(settings.zoo_path, "job-again", "submit", request)
        _, second = await _claims(store, "job-again", ["a:1:a", "b:2:b"])
        # what the first attempt archived when its trial 0 ended, before its server died
        earlier = Run(uid="job-again:t0", task=request.task, dataset="digits", metric="acc", status="succeeded",
                      source="evaluator", job_id="job-again", trial=0, points=[Point(epoch=0.5, accuracy=0.5)])
        await store.add_model_with_runs(Model(name="earlier", code=request.code, origin="submitted"), [earlier])
        queue = JobQueue(settings, store, await anyio.to_thread.run_sync(choose_backend, settings))
        await queue._run(await store.jobs.get("job-again"), second)
        await queue.backend.aclose()
        runs = await store.fetchall("SELECT r.uid, COUNT(p.epoch) AS points FROM run r LEFT JOIN point p "
                                    "ON p.run_id = r.id WHERE r.job_id=? GROUP BY r.id ORDER BY r.uid", ("job-again",))
    row = job_row(settings.zoo_path, "job-again")
    assert row["status"] == "succeeded", row
    assert [(r["uid"], r["points"]) for r in runs] == [("job-again:a2:t0", 1), ("job-again:t0", 1)]
    # the model the first attempt made is no earlier submission of the same code
    assert row["model_name"] == "earlier" and '"resubmission": false' in row["result"], row["result"]


async def test_an_interrupted_job_keeps_its_trials_says_why_and_leaves_no_folder(make_settings):
    settings = make_settings(seed_zoo=False, stale_after_s=600)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    dead = f"{socket.gethostname()}:{dead_pid()}:deadbeef"
    async with await ZooStore.open(settings.zoo_path) as store:
        # its second attempt's server died; a trial of it had ended and was archived
        insert_job(settings.zoo_path, "job-broken", "submit", request, status="training", owner=dead,
                   heartbeat=time.time(), attempts=2)
        insert_job(settings.zoo_path, "job-requeued", "submit", request, status="training", owner=dead,
                   heartbeat=time.time(), attempts=1)
        kept = Run(uid="job-broken:a2:t0", task=request.task, dataset="digits", metric="acc", status="succeeded",
                   source="evaluator", job_id="job-broken", trial=0, points=[Point(epoch=0.5, accuracy=0.6)])
        await store.add_model_with_runs(Model(name="m-broken", code=request.code, origin="submitted"), [kept])
        for job_id in ("job-broken", "job-requeued"):
            (settings.jobs_dir / job_id / "out").mkdir(parents=True)
        async with JobQueue.running(settings, store, workers=False):
            pass
        runs = await store.fetchall("SELECT uid, status, error FROM run WHERE job_id=? ORDER BY uid",
                                    ("job-broken",))
    row = job_row(settings.zoo_path, "job-broken")
    assert row["status"] == "failed" and '"interrupted"' in row["error"] and row["model_name"] == "m-broken"
    assert [r["uid"] for r in runs] == ["job-broken:a2:t0", "job-broken:interrupted"]
    assert runs[1]["status"] == "failed" and f'"kind": "{FailureKind.INTERRUPTED}"' in runs[1]["error"]
    assert job_row(settings.zoo_path, "job-requeued")["status"] == "queued"
    assert not (settings.jobs_dir / "job-broken").exists()
    assert not (settings.jobs_dir / "job-requeued").exists()  # its next attempt makes a fresh one
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM point p JOIN run r ON r.id = p.run_id "
                                    "WHERE r.uid = 'job-broken:a2:t0'") == 1


async def test_a_rerun_job_runs_from_a_fresh_folder(make_settings):
    """Removing a re-queued job's folder loses nothing: the next attempt makes its own (jobfiles)."""
    settings = make_settings(seed_zoo=False)
    request = EvalRequest(code=models.GOOD, dataset="digits", **QUICK)
    async with await ZooStore.open(settings.zoo_path) as store, JobQueue.running(settings, store) as queue:
        job_id = await queue.submit(request)
        await wait_for(settings.zoo_path, job_id, {"succeeded"}, 120)
    assert not (settings.jobs_dir / job_id).exists()
