"""The persistent job queue and its worker slots.

Why persisted in the zoo: a stdio client (and every MCP Inspector CLI call) starts a fresh server
process, and hosts restart servers at will. A job lives in the `job` table; a worker claims it
atomically, heart-beats while it runs, and writes its runs in one transaction at the end. A server
that starts finds jobs whose owner stopped heart-beating and re-queues them (or fails them as
`interrupted` after repeated crashes), so no job is lost or stuck and no run is half-written.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator import pipeline
from lemur_agent_server.evaluator.backends import choose_backend
from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.evaluator.static_checks import static_problems
from sandbox.backend import Backend, Limits
from zoo.store import TERMINAL_JOB_STATES, ZooStore

log = logging.getLogger(__name__)

HEARTBEAT_S = 3.0
IDLE_POLL_S = 1.0
CHECK_CONCURRENCY = 1


class JobQueue:
    def __init__(self, settings: Settings, store: ZooStore, backend: Backend):
        self.settings = settings
        self.store = store
        self.backend = backend
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wakeup = anyio.Event()
        self._changed: dict[str, anyio.Event] = {}
        self._running: dict[str, pipeline.Job] = {}
        self._check_slots = anyio.Semaphore(CHECK_CONCURRENCY)
        self.last_timings: dict[str, dict[str, float]] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    @classmethod
    @asynccontextmanager
    async def running(cls, settings: Settings, store: ZooStore, backend: Backend | None = None,
                      workers: bool = True) -> AsyncIterator[JobQueue]:
        backend = backend or await anyio.to_thread.run_sync(choose_backend, settings)
        queue = cls(settings, store, backend)
        removed = await backend.cleanup_orphans()
        if removed:
            log.info("removed %d orphaned sandboxes", removed)
        recovered = await store.recover_jobs(settings.stale_after_s)
        if recovered["requeued"] or recovered["failed"]:
            log.info("recovered jobs: %s", recovered)
        try:
            async with anyio.create_task_group() as tg:
                queue._tg = tg
                if workers:
                    for slot in range(settings.slot_count):
                        tg.start_soon(queue._worker, slot)
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
                "gpus": list(self.settings.gpus)}

    # --- public API --------------------------------------------------------------------------------
    async def submit(self, request: EvalRequest) -> str:
        """Persist a job and return its id at once. Code failing static checks fails at once, archived."""
        job_id = "job-" + uuid.uuid4().hex[:12]
        await self.store.create_job(job_id, "submit", request.model_dump(), None)
        if static_problems(request.code):
            claimed = await self.store.claim_specific_job(job_id, self.owner)
            if claimed:
                await self._run(claimed)
        else:
            self._wakeup.set()
        return job_id

    async def check(self, request: EvalRequest) -> pipeline.Outcome:
        """The check stage only, now, outside the training slots (it takes seconds)."""
        job_id = "check-" + uuid.uuid4().hex[:12]
        request = request.model_copy(update={"time_budget_s": min(request.time_budget_s, pipeline.CHECK_WALL_S)})

        async def no_progress(stage: str, info: dict[str, Any]) -> None:
            return None

        async with self._check_slots:
            job = self._job(job_id, "check", request, no_progress)
            return await pipeline.evaluate(job)

    async def run_now(self, request: EvalRequest, archive: bool = True) -> tuple[str, pipeline.Outcome]:
        """Evaluate in the caller's task, outside the worker slots (the Python API's check_nn)."""
        job_id = "job-" + uuid.uuid4().hex[:12]
        await self.store.create_job(job_id, "submit" if archive else "evaluate", request.model_dump(), None)
        row = await self.store.claim_specific_job(job_id, self.owner)
        assert row is not None
        await self._run(row, kind="submit" if archive else "evaluate")
        final = await self.store.get_job(job_id)
        assert final is not None
        return job_id, pipeline.Outcome(final["status"], final.get("result"), final.get("error"))

    async def wait(self, job_id: str, wait_s: float,
                   on_change: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> dict[str, Any] | None:
        """The job row, after it ends or `wait_s` passes, whichever is first (long poll)."""
        deadline = time.monotonic() + wait_s
        row = await self.store.get_job(job_id)
        while row is not None and row["status"] not in TERMINAL_JOB_STATES:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            event = self._changed.setdefault(job_id, anyio.Event())
            with anyio.move_on_after(min(left, IDLE_POLL_S)):
                await event.wait()
            row = await self.store.get_job(job_id)
            if on_change and row is not None:
                await on_change(row)
        return row

    async def cancel(self, job_id: str) -> str | None:
        status = await self.store.request_cancel(job_id)
        job = self._running.get(job_id)
        if job is not None:
            job.cancelled.set()
        self._notify(job_id)
        return status

    # --- workers -----------------------------------------------------------------------------------
    def _job(self, job_id: str, kind: str, request: EvalRequest,
             progress: Callable[[str, dict[str, Any]], Awaitable[None]]) -> pipeline.Job:
        gpu = self.settings.gpus[0] if self.settings.gpus else None
        return pipeline.Job(
            job_id=job_id, kind=kind, request=request, store=self.store, backend=self.backend,
            jobs_root=self.settings.jobs_dir, data_root=self.settings.data_root,
            cache_root=self.settings.cache_dir, threads=self.settings.threads,
            memory_bytes=int(self.settings.memory_gb * (1 << 30)), gpu=gpu, progress=progress,
            prewarm=self.prewarm)

    async def _worker(self, slot: int) -> None:
        while True:
            row = await self.store.claim_next_job(self.owner)
            if row is None:
                with anyio.move_on_after(IDLE_POLL_S):
                    await self._wakeup.wait()
                self._wakeup = anyio.Event() if self._wakeup.is_set() else self._wakeup
                continue
            await self._run(row, slot)

    async def _run(self, row: dict[str, Any], slot: int = 0, kind: str = "submit") -> None:
        job_id = row["id"]
        request = EvalRequest.model_validate(row["request"])
        last_write = 0.0

        async def progress(stage: str, info: dict[str, Any]) -> None:
            nonlocal last_write
            now = time.monotonic()
            if now - last_write > 0.5 or stage != current.get("stage"):
                current["stage"] = stage
                await self.store.update_job(job_id, status=stage, progress=info, heartbeat=time.time())
                last_write = now
                self._notify(job_id)

        current: dict[str, Any] = {}
        gpu = self.settings.gpus[slot % len(self.settings.gpus)] if self.settings.gpus else None
        job = self._job(job_id, kind, request, progress)
        job.gpu = gpu
        self._running[job_id] = job
        try:
            if row.get("cancel_requested"):
                job.cancelled.set()
            outcome = await pipeline.evaluate(job)
            await self.store.finish_job(job_id, outcome.status, outcome.result, outcome.error)
            if outcome.result and outcome.result.get("model_name"):
                await self.store.update_job(job_id, model_name=outcome.result["model_name"])
            self.last_timings[job_id] = {"claimed": row.get("started") or 0.0,
                                         "first_step": job.first_step_at or 0.0}
        except anyio.get_cancelled_exc_class():
            # the server is stopping cleanly: hand the job back now instead of waiting to look stale
            with anyio.CancelScope(shield=True):
                await self.store.requeue_job(job_id)
            raise
        except Exception as exc:  # a bug of ours must not kill the worker slot
            log.exception("job %s crashed", job_id)
            with anyio.CancelScope(shield=True):
                await self.store.finish_job(job_id, "failed", None, {
                    "stage": "evaluating", "kind": "sandbox",
                    "message": f"Internal evaluator error ({type(exc).__name__}); the job was not lost but "
                               "could not finish. Submit again; report it if it repeats."})
        finally:
            self._running.pop(job_id, None)
            self._notify(job_id)

    async def _heartbeats(self) -> None:
        beats = 0
        while True:
            await anyio.sleep(min(HEARTBEAT_S, self.settings.stale_after_s / 4))
            beats += 1
            if beats % 5 == 0:  # jobs of another server process on this zoo that died meanwhile
                recovered = await self.store.recover_jobs(self.settings.stale_after_s)
                if recovered["requeued"]:
                    self._wakeup.set()
            running = list(self._running)
            if not running:
                continue
            await self.store.heartbeat(running)
            for job_id in running:  # cancels requested through another server process
                row = await self.store.get_job(job_id)
                job = self._running.get(job_id)
                if row and row.get("cancel_requested") and job is not None:
                    job.cancelled.set()

    def _notify(self, job_id: str) -> None:
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()
