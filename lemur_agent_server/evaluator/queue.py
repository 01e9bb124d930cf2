"""The persistent job queue and its worker slots.

Why persisted in the zoo: a stdio client (and every MCP Inspector CLI call) starts a fresh server
process, and hosts restart servers at will. A job lives in the `job` table; a worker claims it
atomically, heart-beats while it runs, archives each trial as it ends and the job's end in one
transaction (`evaluator.archive`), every write checked against its claim. A server
that starts, and every heartbeat after, finds jobs whose owner died (its process gone from this host,
or its heartbeat stale) and re-queues them (or fails them as `interrupted` after repeated crashes),
so no job is lost or stuck and no run is half-written; the folders of the jobs it ends or re-queues
are removed. The persistence rules live in `zoo.jobs`.

Batches (`submit_batch`): one call queues many jobs under one batch id; an item whose experiment
already succeeded is answered from that job (`reused_from`), identical items of one batch train
once, and workers take batches round-robin (`JobStore.claim_next`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator import batching, jobfiles, pipeline
from lemur_agent_server.evaluator.batching import new_job_id
from lemur_agent_server.evaluator.calibration import Calibrator
from lemur_agent_server.evaluator.dedup import experiment_key
from lemur_agent_server.evaluator.executor import GpuPool, WorkerLost, make_backend, pool_gpus
from lemur_agent_server.evaluator.requests import EvalRequest, admit
from lemur_agent_server.evaluator.static_checks import prm_problems, static_problems
from sandbox.backend import Backend, Limits
from sandbox.protocol import FailureKind, JobStatus, Stage
from zoo.jobs import Claim, JobKind, NewJob, new_owner_id
from zoo.store import ZooStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 3.0
IDLE_POLL_S = 1.0
CHECK_CONCURRENCY = 1
WORKER_KINDS = (JobKind.SUBMIT, JobKind.EVALUATE)  # the kinds a worker slot claims and runs (as themselves)


async def _no_progress(stage: str, info: dict[str, Any]) -> None:
    """Progress of a job that has no row to write it to (a check, a static failure before its row)."""
    return None


class JobQueue:
    def __init__(self, settings: Settings, store: ZooStore, backend: Backend):
        self.settings = settings
        self.store = store
        self.backend = backend
        self.jobs = store.jobs
        self.owner = new_owner_id()
        self._wakeup = anyio.Event()
        self._changed: dict[str, anyio.Event] = {}
        self._any_change = anyio.Event()
        self._running: dict[str, pipeline.Job] = {}
        self._claims: dict[str, Claim] = {}
        self._check_slots = anyio.Semaphore(CHECK_CONCURRENCY)
        self.gpu_pool = GpuPool(pool_gpus(settings))  # one training job per GPU
        self.last_timings: dict[str, dict[str, float]] = {}
        # device calibration (evaluator.calibration): local executor only, off with settings.calibrate=False
        self.calibrator = (Calibrator(store, backend, settings.jobs_dir, int(settings.memory_gb * (1 << 30)))
                           if settings.executor == "local" and settings.calibrate else None)
        self._tg: anyio.abc.TaskGroup | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def running(cls, settings: Settings, store: ZooStore, backend: Backend | None = None,
                      workers: bool = True) -> AsyncIterator[JobQueue]:
        backend = backend or await anyio.to_thread.run_sync(make_backend, settings)
        queue = cls(settings, store, backend)
        removed = await backend.cleanup_orphans()
        if removed:
            log.info("removed %d orphaned sandboxes", removed)
        await queue._recover()
        try:
            async with anyio.create_task_group() as tg:
                queue._tg = tg
                if workers:
                    for slot in range(settings.slot_count):
                        tg.start_soon(queue._worker, slot)
                # without workers too: a job run_now runs in the caller's task is heart-beaten like any other
                tg.start_soon(queue._heartbeats)
                yield queue
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await backend.aclose()

    def prewarm(self, data_dir: Path, limits: Limits) -> None:
        """Ask the backend for a warm sandbox on this dataset in the background (Docker pre-start)."""
        prestart = getattr(self.backend, "prestart", None)
        if prestart is None or self._tg is None:
            return

        async def warm() -> None:
            try:
                await prestart(data_dir, limits)
            except Exception as exc:  # noqa: BLE001 - a cold start is the fallback, never a failure
                log.info("pre-start failed, the next sandbox starts cold: %s", exc)

        self._tg.start_soon(warm)

    def describe_sandbox(self) -> dict[str, Any]:
        return {**self.backend.describe(), "slots": self.settings.slot_count,
                "gpus": list(self.gpu_pool.gpus)}

    # --- public API --------------------------------------------------------------------------------
    async def submit(self, request: EvalRequest) -> str:
        """Persist a job and return its id at once. Code failing static checks fails at once, archived.

        The static checks run before any job row exists: if they crash, the caller gets the error and
        nothing stays queued. A failing submission is archived, then its job is written already
        finished in one statement (a crash in between leaves a failed run and no job, never a queued one).
        """
        request = admit(request, self.settings)
        job_id = new_job_id()
        if not (static_problems(request.code) or prm_problems(request.code, request.prm)):
            await self.jobs.create(job_id, JobKind.SUBMIT, request.model_dump(), dedup_key=experiment_key(request))
            self._wakeup.set()
            return job_id
        await self.jobs.create_many(None, [await self._static_failure(job_id, request)])
        self._notify(job_id)
        return job_id

    async def _static_failure(self, job_id: str, request: EvalRequest, kind: JobKind = JobKind.SUBMIT) -> NewJob:
        """Archive a submission that fails the static checks; its job row, already finished (not written)."""
        outcome = await pipeline.evaluate(self._job(job_id, kind, request, _no_progress))
        return NewJob(job_id, kind, request.model_dump(), (outcome.result or {}).get("model_name"),
                      experiment_key(request), JobStatus(outcome.status), outcome.result, outcome.error)

    async def submit_batch(self, requests: Sequence[EvalRequest], force: bool = False, archive: bool = True
                           ) -> tuple[str, list[dict[str, Any]]]:
        """Queue many submissions as one batch (see `batching.submit_batch`); static failures are archived
        and finished at once, like submit's."""
        batch_id, entries = await batching.submit_batch(self.store, self.settings, requests, force, archive,
                                                        self._static_failure)
        self._wakeup.set()
        for entry in entries:
            self._notify(entry["job_id"])
        return batch_id, entries

    async def cancel_batch(self, batch_id: str) -> dict[str, str] | None:
        """Cancel every unfinished job of a batch: {job id: status after the request}; None: no such batch."""
        statuses = await self.jobs.request_cancel_batch(batch_id)
        for job_id in statuses or {}:
            self._cancel_locally(job_id)
            self._notify(job_id)
        return statuses

    async def changed(self, timeout: float) -> None:
        """Return when any job of this queue changes, or after `timeout` (jobs of other servers are seen by
        polling: callers re-read the zoo after this returns)."""
        with anyio.move_on_after(timeout):
            await self._any_change.wait()

    async def check(self, request: EvalRequest) -> pipeline.Outcome:
        """The check stage only, now, outside the training slots (it takes seconds)."""
        request = admit(request, self.settings)
        job_id = "check-" + uuid.uuid4().hex[:12]
        request = request.model_copy(update={"time_budget_s": request.budget.for_check().budget_s})
        async with self._check_slots:
            return await pipeline.evaluate(self._job(job_id, JobKind.CHECK, request, _no_progress))

    async def run_now(self, request: EvalRequest, archive: bool = True) -> tuple[str, pipeline.Outcome]:
        """Evaluate in the caller's task, outside the worker slots (the Python API's check_nn)."""
        request = admit(request, self.settings)
        job_id = new_job_id()
        kind = JobKind.SUBMIT if archive else JobKind.EVALUATE
        claim = await self.jobs.create_claimed(job_id, kind, request.model_dump(), self.owner)
        row = await self.jobs.get(job_id)
        assert row is not None
        async with self.gpu_pool.lease() as gpu:  # a GPU no worker slot holds now
            await self._run(row, claim, gpu)
        final = await self.jobs.get(job_id)
        assert final is not None
        return job_id, pipeline.Outcome(final["status"], final.get("result"), final.get("error"))

    async def wait(self, job_id: str, wait_s: float,
                   on_change: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> dict[str, Any] | None:
        """The job row, after it ends or `wait_s` passes, whichever is first (long poll)."""
        deadline = time.monotonic() + wait_s
        row = await self.jobs.get(job_id)
        while row is not None and not JobStatus(row["status"]).is_finished():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._changed.setdefault(job_id, anyio.Event())
            with anyio.move_on_after(min(left, IDLE_POLL_S)):
                await event.wait()
            row = await self.jobs.get(job_id)
            if on_change and row is not None:
                await on_change(row)
        return row

    async def cancel(self, job_id: str) -> str | None:
        status = await self.jobs.request_cancel(job_id)
        job = self._running.get(job_id)
        if job is not None:
            job.cancelled.set()
        self._notify(job_id)
        return status

    async def _calibrate_while_idle(self, gpu: str | None) -> None:
        """Measure this slot's device if it is pending, while no job runs here; a job that becomes
        claimable (or starts in another slot) cancels the measurement, to be retried when idle again."""
        calibrator = self.calibrator
        if calibrator is None or self._running or not await calibrator.needs_measuring(gpu, self.settings.threads):
            return
        async with anyio.create_task_group() as tg:
            async def give_way() -> None:
                while not (self._running or await self._claimable()):
                    with anyio.move_on_after(IDLE_POLL_S):
                        await self._wakeup.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(give_way)
            await calibrator.measure(gpu, self.settings.threads)
            tg.cancel_scope.cancel()

    async def _claimable(self) -> bool:
        """Whether a queued job waits for a worker (of this server or another on the same zoo)."""
        marks = ",".join("?" * len(WORKER_KINDS))
        return await self.store.fetchone(f"SELECT 1 FROM job WHERE status=? AND cancel_requested=0 AND kind IN "
                                         f"({marks}) LIMIT 1", (JobStatus.QUEUED, *WORKER_KINDS)) is not None

    # --- workers -----------------------------------------------------------------------------------
    def _job(self, job_id: str, kind: JobKind, request: EvalRequest,
             progress: Callable[[str, dict[str, Any]], Awaitable[None]], gpu: str | None = None) -> pipeline.Job:
        """A pipeline job pinned to `gpu` (a lease of `gpu_pool`), or on CPU only when None."""
        return pipeline.Job(
            job_id=job_id, kind=kind, request=request, store=self.store, backend=self.backend,
            jobs_root=self.settings.jobs_dir, data_root=self.settings.data_root,
            cache_root=self.settings.cache_dir, threads=self.settings.threads,
            memory_bytes=int(self.settings.memory_gb * (1 << 30)), gpu=gpu,
            progress=progress, prewarm=self.prewarm)

    async def _worker(self, slot: int) -> None:
        """Claim and run jobs one at a time; a job is claimed only once a GPU is free for it (on a GPU
        host), so a queued job is never held by a slot that cannot start it."""
        while True:
            async with self.gpu_pool.lease() as gpu:
                row = await self.jobs.claim_next(self.owner, WORKER_KINDS)
                if row is not None:
                    await self._run(row, Claim.of(row), gpu)
                    continue
                await self._calibrate_while_idle(gpu)
            with anyio.move_on_after(IDLE_POLL_S):
                await self._wakeup.wait()
            self._wakeup = anyio.Event() if self._wakeup.is_set() else self._wakeup

    async def _run(self, row: dict[str, Any], claim: Claim, gpu: str | None = None) -> None:
        """Run one claimed job as its own kind; every write to its row goes through the claim."""
        job_id = row["id"]
        request = EvalRequest.model_validate(row["request"])
        last: dict[str, Any] = {"stage": None, "written": 0.0}

        async def progress(stage: str, info: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - last["written"] > 0.5 or stage != last["stage"]:
                last.update(stage=stage, written=now)
                if await self.jobs.progress(claim, JobStatus(stage), info):
                    self._notify(job_id)

        calibration = None
        if self.calibrator is not None:  # before the job object: its clock starts when it is made
            calibration = await self.calibrator.device(gpu, self.settings.threads)
        job = self._job(job_id, JobKind(row["kind"]), request, progress, gpu)
        job.calibration = calibration
        job.claim = claim  # the archive's writes check it; a submission's end is written with it
        self._running[job_id] = job
        self._claims[job_id] = claim
        try:
            if row.get("cancel_requested"):
                job.cancelled.set()
            outcome = await pipeline.evaluate(job)
            if not outcome.recorded:
                await self.jobs.finish(claim, JobStatus(outcome.status), outcome.result, outcome.error)
            self.last_timings[job_id] = {"claimed": row.get("started") or 0.0,
                                         "first_step": job.first_step_at or 0.0}
        except anyio.get_cancelled_exc_class():
            # the server is stopping cleanly: hand the job back now instead of waiting to look stale
            with anyio.CancelScope(shield=True):
                await self.jobs.requeue(claim)
            raise
        except WorkerLost as exc:  # left un-heart-beaten: recovery re-queues it (bounded) like a dead server's
            log.warning("job %s: %s; it goes back to the queue", job_id, exc)
        except Exception as exc:  # a bug of ours must not kill the worker slot
            log.exception("job %s crashed", job_id)
            with anyio.CancelScope(shield=True):
                await self.jobs.finish(claim, JobStatus.FAILED, None, {
                    "stage": Stage.EVALUATE, "kind": FailureKind.SANDBOX,
                    "message": f"Internal evaluator error ({type(exc).__name__}); the job was not lost but "
                               "could not finish. Submit again; report it if it repeats."})
        finally:
            self._running.pop(job_id, None)
            self._claims.pop(job_id, None)
            self._notify(job_id)

    async def _recover(self) -> None:
        """Re-queue the jobs of dead owners now (a gone process on this host, a stale heartbeat elsewhere)."""
        recovered = await self.jobs.recover(self.settings.stale_after_s, on_release=self._remove_job_dirs)
        if recovered["requeued"] or recovered["failed"]:
            log.info("recovered jobs: %s", recovered)
        if recovered["requeued"]:
            self._wakeup.set()

    def _remove_job_dirs(self, job_ids: list[str]) -> None:
        """The folders of jobs that recovery ended or re-queued: nothing needs them (a re-queued job's
        next attempt makes a fresh one). Called inside recovery's transaction, so no worker has claimed
        a re-queued job yet; a few small directories, removed in the event loop on purpose."""
        for job_id in job_ids:
            jobfiles.remove_job_dir_of(self.settings.jobs_dir, job_id)

    async def _heartbeats(self) -> None:
        while True:
            await anyio.sleep(min(HEARTBEAT_S, self.settings.stale_after_s / 4))
            await self._heartbeat_once()

    async def _heartbeat_once(self) -> None:
        await self._recover()  # one read of the active jobs: a dead owner on this host is seen at once
        claims = {claim.job_id: claim for claim in self._claims.values()}
        if not claims:
            return
        for job_id in await self.jobs.heartbeat(claims.values()):  # re-queued and claimed elsewhere: stop ours
            if await self._ended_under(claims[job_id]):
                continue
            log.warning("job %s is no longer ours (claimed elsewhere); stopping it here", job_id)
            self._cancel_locally(job_id)
        for claim in claims.values():  # cancels requested through another server process
            row = await self.jobs.get(claim.job_id)
            if row and row.get("cancel_requested"):
                self._cancel_locally(claim.job_id)

    async def _ended_under(self, claim: Claim) -> bool:
        """Whether a claim the heartbeat missed is one whose job just finished under it here (its worker
        ended it between the snapshot of claims and the heartbeat), not one re-queued or claimed elsewhere."""
        row = await self.jobs.get(claim.job_id)
        return (row is not None and row.get("owner") == claim.owner and int(row.get("attempts") or 0) == claim.attempt
                and JobStatus(row["status"]).is_finished())

    def _cancel_locally(self, job_id: str) -> None:
        job = self._running.get(job_id)
        if job is not None:
            job.cancelled.set()

    def _notify(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()
        self._any_change.set()
        self._any_change = anyio.Event()
