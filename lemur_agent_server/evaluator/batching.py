"""Turning a list of requests into one batch of job rows: reuse, in-batch duplicates, static failures.

Why its own module and not only `JobQueue.submit_batch`: a `--no-worker` server has no evaluator in
its process but still queues batches into the zoo for a worker elsewhere, so the planning must not
need one. With an evaluator, static failures are archived and finished at once (`static_failure`);
without one they are queued with their problems reported, and the worker fails them at its first look.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator import dedup
from lemur_agent_server.evaluator.dedup import experiment_key
from lemur_agent_server.evaluator.requests import EvalRequest, admit
from lemur_agent_server.evaluator.static_checks import prm_problems, static_problems
from sandbox.protocol import JobStatus
from zoo import codehash
from zoo.jobs import JobKind, NewJob
from zoo.store import ZooStore

# (job id, request, kind) -> the finished row of a static failure, its failed run archived
StaticFailure = Callable[[str, EvalRequest, JobKind], Awaitable[NewJob]]


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:12]


async def submit_batch(store: ZooStore, settings: Settings, requests: Sequence[EvalRequest], force: bool = False,
                       archive: bool = True, static_failure: StaticFailure | None = None
                       ) -> tuple[str, list[dict[str, Any]]]:
    """Write many submissions under one batch id; one entry per request, in order.

    Each entry: job_id, model_name, status, problems, error, and `reused_from` (a succeeded job of the
    same experiment answered it; skipped with `force`) or `same_as` (the index of an identical earlier
    item, whose job it shares: one batch never trains the same experiment twice), with `duplicate_rule`
    saying which of `dedup`'s rules matched (code or fingerprint; None otherwise). All rows are written
    in one transaction at the end, so a crash half-way queues nothing the caller never heard of.
    `archive=False` makes `evaluate` jobs (trained and scored, nothing archived: save_to_db=False).
    """
    kind = JobKind.SUBMIT if archive else JobKind.EVALUATE
    requests = [admit(request, settings) for request in requests]  # the server's limits, before any write
    batch_id = "batch-" + uuid.uuid4().hex[:12]
    rows: list[NewJob] = []
    entries: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    for index, request in enumerate(requests):
        key = experiment_key(request)
        fingerprint = await dedup.known_fingerprint(store, request.code)
        keys = {key: dedup.RULE_CODE} | (
            {dedup.architecture_key(request, fingerprint): dedup.RULE_FINGERPRINT} if fingerprint else {})
        same = next((k for k in keys if k in first), None)
        if same is not None:
            entries.append({**entries[first[same]], "same_as": first[same], "reused_from": None,
                            "duplicate_rule": keys[same]})
            continue
        first.update(dict.fromkeys(keys, index))
        problems = [p.as_dict() for p in static_problems(request.code) or prm_problems(request.code, request.prm)]
        row = await _row(store, request, key, kind, force, bool(problems), static_failure, fingerprint)
        rows.append(row)
        entries.append({"job_id": row.job_id, "model_name": row.model_name, "status": row.status,
                        "reused_from": row.reused_from, "same_as": None,
                        "duplicate_rule": ((row.result or {}).get("reuse") or {}).get("rule"),
                        "problems": (row.error or {}).get("problems") or problems, "error": row.error})
    await store.jobs.create_many(batch_id, rows)
    return batch_id, entries


async def _row(store: ZooStore, request: EvalRequest, key: str, kind: JobKind, force: bool, failing: bool,
               static_failure: StaticFailure | None, fingerprint: str | None = None) -> NewJob:
    job_id = new_job_id()
    if failing and static_failure is not None:
        return await static_failure(job_id, request, kind)
    reuse = None if force or failing else await dedup.find_reusable(store, request, fingerprint)
    if reuse is not None:
        return NewJob(job_id, kind, request.model_dump(), reuse.job.get("model_name"), key,
                      JobStatus.SUCCEEDED, reuse.result(), None, reused_from=reuse.job["id"])
    return NewJob(job_id, kind, request.model_dump(), await model_name(store, request), key)


async def model_name(store: ZooStore, request: EvalRequest) -> str:
    """The name the job's model will have: an existing model's of the same code, else a new one (as the
    pipeline names it)."""
    same_code = await store.models_by_hash(codehash.code_hash(request.code))
    return same_code[0]["name"] if same_code else codehash.model_name(request.name_prefix, request.code)
