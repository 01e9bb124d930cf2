"""Batches of submissions: submit_models, wait_jobs, list_jobs (and cancel_job's batch_id, in job_tools).

Why: NNGPT-style loops generate 10 to 150 models per cycle. One call per model and one long poll per
job would cost an agent hundreds of tool calls; here one call queues the whole batch (each item checked
and reported on its own: a bad item never sinks the others), and one long poll per ~50 s returns every
job that finished since the caller's cursor. The cursor is the jobs' `finished_seq` (zoo.jobs), so
consecutive polls never repeat or skip a result.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lemur_agent_server.contract import SEARCH_SPACE_HELP
from lemur_agent_server.evaluator import batching
from lemur_agent_server.evaluator.protocols import DETERMINISTIC_HELP, PRECISION_HELP, PROTOCOL_HELP
from lemur_agent_server.evaluator.requests import EvalRequest, RequestRefused
from lemur_agent_server.job_tools import (
    EXPORT_ONNX_HELP,
    Code,
    DatasetArg,
    JobView,
    PrmArg,
    ProgressFn,
    TaskArg,
    job_view,
)
from lemur_agent_server.schemas import MAX_FILTER_CHARS
from lemur_agent_server.state import AppState
from lemur_agent_server.tool_wiring import tool
from sandbox.protocol import JobStatus
from zoo.jobs import ACTIVE, Selection

MAX_ITEMS = 200
MAX_WAIT_S = 50.0
POLL_S = 1.0
INVALID = "invalid"  # an item's status when its request was refused: no job exists for it

FAIR_QUEUE = ("Jobs are taken round-robin: the next job comes from the batch (or single submission) whose "
              "last job started longest ago, so a large batch holds another client's single submission back "
              "by one job at most, and two batches take turns.")


class BatchItem(BaseModel):
    """One model of a batch; its own values override the call's shared ones (prm key by key)."""

    model_config = ConfigDict(extra="forbid")
    code: Code
    prm: PrmArg = None
    name_prefix: Annotated[str | None, Field(description="Name prefix for this model")] = None
    n_trials: Annotated[int | None, Field(description="Optuna trials for this model (1..200)")] = None
    epochs: Annotated[float | None, Field(description="Epochs per trial for this model (>0)")] = None


class BatchEntry(BaseModel):
    index: int = Field(description="Position of the item in `items`")
    job_id: str | None = Field(default=None, description="The item's job (None when the item was invalid)")
    model_name: str | None = None
    status: str = Field(description="The job's status at submission (queued, or failed for static failures, or "
                                    "succeeded when reused), or 'invalid' when the request was refused")
    reused_from: str | None = Field(default=None, description="The earlier succeeded job whose result answers this "
                                                              "item (same code, data, prm, epochs and seed)")
    same_as: int | None = Field(default=None, description="Index of an identical earlier item of this batch: "
                                                          "this entry shares its job")
    duplicate_rule: str | None = Field(default=None, description="Why it is a duplicate: 'code' (same normalized "
                                                                 "code) or 'fingerprint' (same architecture and "
                                                                 "training code)")
    problems: list[dict[str, Any]] = Field(default_factory=list, description="What to fix (static or request)")
    error: dict[str, Any] | None = None


class BatchView(BaseModel):
    batch_id: str | None = Field(description="None when no item was valid (nothing was queued)")
    entries: list[BatchEntry]
    counts: dict[str, int] = Field(description="Entries by status")
    next_step: str


class WaitView(BaseModel):
    jobs: list[JobView] = Field(description="Jobs that finished since `cursor`, in the order they finished")
    cursor: str = Field(description="Pass it to the next wait_jobs call: no job is returned twice or skipped")
    counts: dict[str, int] = Field(description="Jobs of the selection by status (every status, zeros included)")
    running: int = Field(description="checking + training + evaluating")
    finished: int
    total: int
    more: bool = Field(description="True when more finished jobs are waiting (call again at once)")
    done: bool = Field(description="True when every job of the selection finished and all were returned")
    next_step: str


class JobSummary(BaseModel):
    job_id: str
    kind: str
    status: str
    model_name: str | None = None
    batch_id: str | None = None
    reused_from: str | None = None
    accuracy: float | None = None
    error_kind: str | None = None
    created: float
    finished: float | None = None


class JobList(BaseModel):
    jobs: list[JobSummary]
    cursor: str | None = Field(description="Pass it back for the next (older) page; None on the last page")


def _item_request(item: BatchItem, shared: dict[str, Any]) -> EvalRequest:
    fields = {k: v for k, v in shared.items() if v is not None}
    own = item.model_dump(exclude_none=True)
    fields.update(own)
    fields["prm"] = {**(shared.get("prm") or {}), **(own.get("prm") or {})}
    return EvalRequest(**fields)


def _invalid(index: int, exc: ValidationError) -> BatchEntry:
    problems = [{"kind": "invalid_request", "field": ".".join(map(str, e["loc"])) or "request", "message": e["msg"]}
                for e in exc.errors()]
    return BatchEntry(index=index, status=INVALID, problems=problems,
                      error={"stage": "request", "kind": "invalid_request",
                             "message": "; ".join(f"{p['field']}: {p['message']}" for p in problems)})


def _tally(entries: list[BatchEntry]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.status] = counts.get(entry.status, 0) + 1
    return counts


# --- the tools' logic, callable without MCP --------------------------------------------------------
async def submit_models(state: AppState, items: list[BatchItem], shared: dict[str, Any],
                        force: bool = False) -> BatchView:
    """Validate every item, queue the valid ones as one batch, and report each item."""
    if not 1 <= len(items) <= MAX_ITEMS:
        raise ToolError(f"items holds {len(items)} models; send 1..{MAX_ITEMS} per call (split larger batches).")
    requests: list[tuple[int, EvalRequest]] = []
    entries: dict[int, BatchEntry] = {}
    for index, item in enumerate(items):
        try:
            requests.append((index, _item_request(item, shared)))
        except ValidationError as exc:
            entries[index] = _invalid(index, exc)
    valid = [r for _, r in requests]
    if not valid:
        ordered = [entries[i] for i in range(len(items))]
        return BatchView(batch_id=None, entries=ordered, counts=_tally(ordered), next_step=(
            "No item was valid and nothing was queued: fix each entry's problems and call submit_models again."))
    try:  # the server's limits (budget, dataset present) are the same for every item: the whole call
        if state.queue is not None:
            batch_id, queued = await state.queue.submit_batch(valid, force=force)
        else:  # --no-worker: into the zoo's queue, for a worker on the same zoo
            batch_id, queued = await batching.submit_batch(state.zoo(), state.settings, valid, force=force)
    except RequestRefused as exc:
        raise ToolError(str(exc)) from exc
    index_of = [i for i, _ in requests]
    for (index, _), entry in zip(requests, queued):
        same = entry.get("same_as")
        entries[index] = BatchEntry(index=index, **{**entry, "same_as": index_of[same] if same is not None else None})
    ordered = [entries[i] for i in range(len(items))]
    return BatchView(batch_id=batch_id, entries=ordered, counts=_tally(ordered), next_step=(
        f"wait_jobs(batch_id='{batch_id}', wait_s=50) until done is true, passing back each answer's cursor. "
        + FAIR_QUEUE))


def _selection(batch_id: str | None, job_ids: list[str] | None) -> Selection:
    if (batch_id is None) == (not job_ids):
        raise ToolError("Pass either batch_id (from submit_models) or job_ids (a list of job ids), not both "
                        "and not neither.")
    return Selection(batch_id=batch_id) if batch_id is not None else Selection(job_ids=tuple(dict.fromkeys(job_ids)))


def _cursor(cursor: str | None) -> int:
    if cursor is None or cursor == "":
        return 0
    if not cursor.isdigit():
        raise ToolError(f"cursor {cursor!r} is not one wait_jobs returned; pass the `cursor` of the last answer, "
                        "or omit it to start from the first finished job.")
    return int(cursor)


async def _check_selection(state: AppState, selection: Selection) -> None:
    jobs = state.zoo().jobs
    if selection.batch_id is not None:
        if not await jobs.count_by_status(selection):
            raise ToolError(f"No batch '{selection.batch_id}'. Use the batch_id that submit_models returned "
                            "(list_jobs shows recent jobs with their batch ids).")
        return
    missing = sorted(set(selection.job_ids) - await jobs.existing_ids(selection.job_ids))
    if missing:
        raise ToolError(f"No job(s) {missing[:10]}. Use job ids that submit_model or submit_models returned.")


def _wait_message(counts: dict[str, int]) -> str:
    finished = sum(n for s, n in counts.items() if JobStatus(s).is_finished())
    running = sum(counts.get(s, 0) for s in ACTIVE)
    return (f"{finished}/{sum(counts.values())} finished, {running} running, {counts.get(JobStatus.QUEUED, 0)} "
            f"queued, {counts.get(JobStatus.SUCCEEDED, 0)} succeeded, {counts.get(JobStatus.FAILED, 0)} failed")


async def wait_jobs(state: AppState, batch_id: str | None = None, job_ids: list[str] | None = None,
                    cursor: str | None = None, wait_s: float = 0, limit: int = 20,
                    report: ProgressFn | None = None) -> WaitView:
    """Jobs of the selection that finished after `cursor`; waits up to `wait_s` for the first of them."""
    selection = _selection(batch_id, job_ids)
    after = _cursor(cursor)
    await _check_selection(state, selection)
    jobs = state.zoo().jobs
    started = time.monotonic()
    tick = 0
    while True:
        counts = await jobs.count_by_status(selection)  # read before the rows: every end counted is in them
        rows = await jobs.finished_since(selection, after, limit + 1)
        unfinished = sum(n for s, n in counts.items() if not JobStatus(s).is_finished())
        left = wait_s - (time.monotonic() - started)
        if rows or unfinished == 0 or left <= 0:
            break
        if report is not None:
            tick += 1
            await report(min(wait_s, time.monotonic() - started) + tick * 1e-6, wait_s, _wait_message(counts))
        if state.queue is not None:
            await state.queue.changed(min(left, POLL_S))
        else:
            await anyio.sleep(min(left, POLL_S))
    more = len(rows) > limit
    rows = rows[:limit]
    new_cursor = rows[-1]["finished_seq"] if rows else after
    total = sum(counts.values())
    running = sum(counts.get(s, 0) for s in ACTIVE)
    done = unfinished == 0 and not more
    if done:
        hint = "Every job finished. query_models(task, dataset, unique_nn=true) shows where they rank."
    elif more:
        hint = "More finished jobs are waiting: call wait_jobs again now with this cursor."
    else:
        hint = "Call wait_jobs again with this cursor (wait_s=50) for the next finished jobs."
    counts = {status.value: counts.get(status, 0) for status in JobStatus}  # every status, zeros too
    return WaitView(jobs=[job_view(row) for row in rows], cursor=str(new_cursor), counts=counts, running=running,
                    finished=total - unfinished, total=total, more=more, done=done, next_step=hint)


StatusFilter = Literal["queued", "active", "checking", "training", "evaluating", "succeeded", "failed",
                       "timed_out", "cancelled", "finished"]


def _statuses(status: str | None) -> tuple[str, ...]:
    if status is None:
        return ()
    if status == "active":
        return tuple(ACTIVE)
    if status == "finished":
        return tuple(s for s in JobStatus if s.is_finished())
    return (status,)


async def list_jobs(state: AppState, status: str | None = None, batch_id: str | None = None, limit: int = 20,
                    cursor: str | None = None) -> JobList:
    """Jobs newest first, filtered; `cursor` pages to older ones."""
    before = _cursor(cursor) if cursor else None
    rows = await state.zoo().jobs.page(limit + 1, _statuses(status), batch_id, before)
    page = rows[:limit]
    summaries = [JobSummary(
        job_id=r["id"], kind=r["kind"], status=r["status"], model_name=r.get("model_name"), batch_id=r.get("batch_id"),
        reused_from=r.get("reused_from"), accuracy=(r.get("result") or {}).get("accuracy"),
        error_kind=(r.get("error") or {}).get("kind"), created=r["created"], finished=r.get("finished"))
        for r in page]
    return JobList(jobs=summaries, cursor=str(page[-1]["seq"]) if len(rows) > limit else None)


# --- MCP wiring ------------------------------------------------------------------------------------------
def register_batch_tools(mcp: MCPServer, state: AppState) -> None:
    @tool(mcp, "submit_models", ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                                idempotent_hint=False, open_world_hint=False))
    async def submit_models_tool(
        items: Annotated[list[BatchItem], Field(
            description="1..200 models: {code, prm?, name_prefix?, n_trials?, epochs?}; an item's values override "
                        "the shared ones below (prm key by key)", min_length=1, max_length=MAX_ITEMS)],
        dataset: DatasetArg,
        task: TaskArg = "img-classification",
        metric: Annotated[str, Field(description="Metric; 'acc' (test accuracy)", max_length=MAX_FILTER_CHARS)
                          ] = "acc",
        prm: PrmArg = None,
        search_space: Annotated[dict[str, dict[str, Any]] | None, Field(description=SEARCH_SPACE_HELP)] = None,
        n_trials: Annotated[int | None, Field(description="Optuna trials per model, 1..200; default 3 (1 with "
                                                     "protocol='lemur')", ge=1, le=200)] = None,
        epochs: Annotated[float, Field(description="Epochs per trial, >0", gt=0, le=200)] = 1.0,
        time_budget_s: Annotated[float, Field(description="Wall-clock limit of each job in seconds (5..86400)",
                                              ge=5, le=86400)] = 300.0,
        eval_every: Annotated[float, Field(description="Epochs between learning-curve points", gt=0)] = 0.5,
        seed: Annotated[int, Field(description="Seed of the search and the training", ge=0)] = 0,
        repeats: Annotated[int, Field(description="Reruns of the selected prm with other seeds, 1..10",
                                      ge=1, le=10)] = 1,
        name_prefix: Annotated[str | None, Field(description="Shared name prefix", max_length=64)] = None,
        max_train_samples: Annotated[int | None, Field(description="Train on at most this many images",
                                                       ge=16)] = None,
        export_onnx: Annotated[bool, Field(description=EXPORT_ONNX_HELP + " (for every model of the batch)")
                               ] = False,
        force: Annotated[bool, Field(description="Train even when the same experiment (normalized code, dataset, "
                                                 "prm, epochs, seed, trials) already succeeded")] = False,
        deterministic: Annotated[bool | None, Field(description=DETERMINISTIC_HELP)] = None,
        precision: Annotated[Literal["fp32", "bf16"], Field(description=PRECISION_HELP)] = "fp32",
        protocol: Annotated[Literal["default", "lemur"], Field(description=PROTOCOL_HELP)] = "default",
    ) -> BatchView:
        """Submit a batch of models in one call (NNGPT-style loops): each item is validated and
        statically checked at once and reported in its own entry (invalid and failing items do not stop
        the others); the rest are queued as one batch and trained like submit_model's jobs. An item whose
        experiment already succeeded (same normalized code, dataset, prm, epochs, seed and trials) is
        answered from that job at once (`reused_from`) unless force=true; identical items of one batch
        train once (`same_as`). Jobs are taken round-robin: the next job comes from the batch (or single
        submission) whose last job started longest ago, so a large batch holds another client's single
        submission back by one job at most.
        Returns batch_id at once. Next: wait_jobs(batch_id, wait_s=50) with the returned cursor until done.
        """
        shared = {"dataset": dataset, "task": task, "metric": metric, "prm": prm or {},
                  "search_space": search_space or {}, "n_trials": n_trials, "epochs": epochs,
                  "time_budget_s": time_budget_s, "eval_every": eval_every, "seed": seed, "repeats": repeats,
                  "name_prefix": name_prefix, "max_train_samples": max_train_samples,
                  "export_onnx": export_onnx, "deterministic": deterministic, "precision": precision,
                  "protocol": protocol}
        return await submit_models(state, items, shared, force)

    @tool(mcp, "wait_jobs", ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def wait_jobs_tool(
        batch_id: Annotated[str | None, Field(description="batch_id from submit_models", max_length=64)] = None,
        job_ids: Annotated[list[str] | None, Field(description="Or: these job ids (1..200)", max_length=MAX_ITEMS)
                           ] = None,
        cursor: Annotated[str | None, Field(description="The cursor of the previous answer; omit at first",
                                            max_length=32)] = None,
        wait_s: Annotated[float, Field(description="Wait up to this many seconds (0..50) for a job to finish; "
                                                   "progress is reported while waiting", ge=0, le=MAX_WAIT_S)] = 0,
        limit: Annotated[int, Field(description="At most this many finished jobs per answer (1..100)", ge=1,
                                    le=100)] = 20,
        ctx: Context | None = None,
    ) -> WaitView:
        """Long-poll a batch (or a list of jobs): returns the jobs that finished since `cursor` with their
        results, the new cursor, and counts by status. Waits up to wait_s (at most 50 s) for the first
        new end, sending MCP progress notifications. Pass each answer's cursor to the next call: no job
        is returned twice and none is skipped. Stop when done is true.
        """
        return await wait_jobs(state, batch_id, job_ids, cursor, wait_s, limit,
                               ctx.report_progress if ctx is not None else None)

    @tool(mcp, "list_jobs", ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def list_jobs_tool(
        status: Annotated[StatusFilter | None, Field(
            description="Only jobs of this status ('active': checking/training/evaluating; 'finished': any "
                        "end)")] = None,
        batch_id: Annotated[str | None, Field(description="Only jobs of this batch", max_length=64)] = None,
        limit: Annotated[int, Field(description="Jobs per page (1..100)", ge=1, le=100)] = 20,
        cursor: Annotated[str | None, Field(description="The cursor of the previous page", max_length=32)] = None,
    ) -> JobList:
        """Jobs newest first (id, kind, status, model, batch, accuracy or error kind), filtered by status
        and/or batch; page with the returned cursor. get_job(job_id) gives one job in full.
        """
        return await list_jobs(state, status, batch_id, limit, cursor)
