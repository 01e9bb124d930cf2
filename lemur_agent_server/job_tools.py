"""The evaluation side of the server: check_model, submit_model, get_job, cancel_job (a job or a batch);
the batch tools (submit_models, wait_jobs, list_jobs) live in batch_tools and are registered from here.

Why submit + poll: hosts give up on a tool call after about 60 s and training takes minutes, so
submit_model returns a job_id at once and get_job long-polls for at most 50 s, reporting MCP
progress while it waits.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field, ValidationError, WithJsonSchema

from lemur_agent_server.contract import SEARCH_SPACE_HELP
from lemur_agent_server.evaluator.protocols import DETERMINISTIC_HELP, PRECISION_HELP, PROTOCOL_HELP
from lemur_agent_server.evaluator.requests import EvalRequest, RequestRefused
from lemur_agent_server.isolation_view import short, shorten_result
from lemur_agent_server.schemas import MAX_FILTER_CHARS
from lemur_agent_server.state import AppState
from lemur_agent_server.tool_wiring import tool
from sandbox.protocol import MAX_CODE_CHARS, JobStatus
from zoo.jobs import Selection
from zoo.standing import model_standing

Code = Annotated[str, Field(description="The complete Python source of the model file (Net contract; see "
                                        "list_catalog.net_contract)", min_length=1, max_length=MAX_CODE_CHARS)]
DatasetArg = Annotated[str, Field(description="Dataset to train on: digits, mnist, fashion-mnist, cifar-10, "
                                              "cifar-100 or svhn (list_catalog says which are present)",
                                  max_length=MAX_FILTER_CHARS)]
TaskArg = Annotated[str, Field(description="Task; only 'img-classification' is evaluated", max_length=MAX_FILTER_CHARS)]
PrmArg = Annotated[dict[str, Any] | None, Field(
    description="Fixed hyperparameters, e.g. {'lr': 0.01, 'batch': 64, 'transform': 'norm_32'}; values in "
                "[0, 1] except batch (integer) and transform (name). Anything not fixed is searched.")]
EXPORT_ONNX_HELP = ("Also export the selected trial's model with its weights to ONNX (in the sandbox); get_model "
                    "lists it in weights.files (format 'onnx'). A model that cannot be exported still succeeds: "
                    "the result's onnx_error says why")


class CheckResult(BaseModel):
    ok: bool = Field(description="True when the model builds and produces logits of the right shape")
    model_name: str = Field(description="The name it will get in the zoo when submitted")
    problems: list[dict[str, Any]] = Field(description="What to fix: kind, message, and line where known")
    params: int | None = None
    flops: int | None = Field(default=None, description="Forward FLOPs for one sample")
    fingerprint: str | None = Field(default=None, description="Architecture fingerprint")
    in_shape: list[int] | None = None
    out_shape: list[int] | None = None
    code_quality: float | None = Field(default=None, description="0..1 (ruff + radon), see detail")
    code_quality_detail: dict[str, Any] | None = None
    duplicates: dict[str, list[str]] = Field(default_factory=dict, description=(
        "same_code: models with the same normalized code (a submission adds runs to it); same_architecture: "
        "models with the same fingerprint"))
    isolation: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = Field(default=None, description=(
        "The heaviest modules (top 10 by FLOPs): name, type, out_shape, params, flops (one sample)"))
    speed: dict[str, Any] | None = Field(default=None, description=(
        "Measured on this server now: epoch_s (seconds per training epoch) and eval_pass_s (one evaluation "
        "of the validation and test splits) at the given batch and transform; size time_budget_s and epochs "
        "with them"))
    next_step: str


# the job statuses as a plain string enum in the schema, as clients have always seen it
StatusField = Annotated[JobStatus, WithJsonSchema({"enum": [s.value for s in JobStatus], "title": "Status",
                                                   "type": "string"})]


class JobView(BaseModel):
    job_id: str
    status: StatusField
    done: bool = Field(description="True once the job reached a final state")
    model_name: str | None = None
    progress: dict[str, Any] | None = Field(default=None, description="Stage, trial, epoch, best validation "
                                                                       "accuracy, elapsed and budget seconds")
    result: dict[str, Any] | None = Field(default=None, description=(
        "When done: accuracy (test, 0..1, computed by the server), accuracy_to_time, code_quality, duration_ns "
        "(training only, warm-up excluded), selected trial and prm, every trial (a pruned one says why), params, "
        "flops, layers, duplicates; curve (the selected trial's points: test accuracy, training loss and accuracy); "
        "timing (train_s, eval_s, warmup_s, the host's load, a warning when noisy); flags (chance_level, "
        "accuracy_falls_while_loss_falls, lr_at_edge, evaluation_heavy, noisy_timing: each with why and "
        "next_step); isolation as a short id (include_isolation=true for the full description)"))
    error: dict[str, Any] | None = Field(default=None, description=(
        "When failed: stage, kind (syntax, contract, shape, exception, nan_loss, out_of_memory, timeout, "
        "sandbox, interrupted), message, log tail"))
    created: float
    finished: float | None = None
    batch_id: str | None = Field(default=None, description="The batch (submit_models) the job belongs to")
    reused_from: str | None = Field(default=None, description="The earlier job of the same experiment whose "
                                                              "result this job reports (nothing was trained)")
    standing: dict[str, Any] | None = Field(default=None, description=(
        "When succeeded: where the model now stands on its task/dataset/metric, by the score leaderboard ranks "
        "(best complete run per model): rank_accuracy and rank_a2t of n models, best_name, gap (this model's "
        "score minus the best one's; 0 = best). Null when the model has no complete run there."))
    notes: list[str] = Field(default_factory=list, description="What the job did differently from the request")
    next_step: str


PROBLEM_KEYS = ("stage", "kind", "message", "line", "function", "source", "hint", "traceback")


def final_progress(row: dict[str, Any]) -> dict[str, Any] | None:
    """A finished job's progress without the step it was in (a job that ended while 'preparing dataset'
    is no longer preparing anything)."""
    progress = row.get("progress")
    if not isinstance(progress, dict) or not JobStatus(row["status"]).is_finished():
        return progress
    return {k: v for k, v in progress.items() if k != "step"} or None


def _request_of(row: dict[str, Any]) -> dict[str, Any]:
    request = row.get("request")
    if isinstance(request, str):
        try:
            request = json.loads(request)
        except ValueError:
            request = None
    return request if isinstance(request, dict) else {}


def request_notes(row: dict[str, Any]) -> list[str]:
    """Where the job differs from what was asked: a name_prefix on code the zoo already held keeps the
    existing model's name (the zoo stores each code once)."""
    prefix = _request_of(row).get("name_prefix")
    name = row.get("model_name")
    if prefix and name and not name.startswith(prefix):
        return [f"name_prefix '{prefix}' was not used: this code is already in the zoo as '{name}', so the runs "
                "are recorded under that existing name."]
    return []


async def job_standing(state: AppState, row: dict[str, Any]) -> dict[str, Any] | None:
    """The finished model's standing, read from the zoo now (see zoo.standing)."""
    request = _request_of(row)
    if row.get("status") != JobStatus.SUCCEEDED or not row.get("model_name") or not request.get("dataset"):
        return None
    return await model_standing(state.zoo(), row["model_name"], request.get("task", "img-classification"),
                                request["dataset"], request.get("metric", "acc"))


def job_view(row: dict[str, Any], standing: dict[str, Any] | None = None, include_isolation: bool = False) -> JobView:
    status = JobStatus(row["status"])
    done = status.is_finished()
    if status is JobStatus.SUCCEEDED:
        hint = ("Done. `standing` says where the model ranks (leaderboard(task, dataset) shows the table); "
                "get_model(model_name) for its curve.")
    elif status is JobStatus.FAILED:
        hint = "Read error.kind and error.message, fix the code, check_model it, then submit_model again."
    elif status is JobStatus.TIMED_OUT:
        hint = ("The time budget ran out; result holds what finished. Use fewer trials/epochs, a smaller "
                "model, or a larger time_budget_s.")
    elif status is JobStatus.CANCELLED:
        hint = "Cancelled. Submit again when ready."
    else:
        hint = "Still running: call get_job(job_id, wait_s=50) again."
    return JobView(job_id=row["id"], status=status, done=done, model_name=row.get("model_name"),
                   progress=final_progress(row),
                   result=row.get("result") if include_isolation else shorten_result(row.get("result")),
                   error=row.get("error"),
                   created=row["created"], finished=row.get("finished"), batch_id=row.get("batch_id"),
                   reused_from=row.get("reused_from"), standing=standing, notes=request_notes(row), next_step=hint)


def build_request(**fields: Any) -> EvalRequest:
    try:
        return EvalRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        messages = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
        raise ToolError(f"Invalid request: {messages}") from exc


# --- the tools' logic, callable without MCP --------------------------------------------------------
async def check_model(state: AppState, request: EvalRequest) -> CheckResult:
    """Run the check stage of `request` now and say what to fix."""
    try:
        outcome = await state.jobs().check(request)
    except RequestRefused as exc:
        raise ToolError(str(exc)) from exc
    result = outcome.result or {}
    problems = []
    if outcome.error:
        problems = outcome.error.get("problems") or [
            {k: v for k, v in outcome.error.items() if k in PROBLEM_KEYS}]
    ok = outcome.status == JobStatus.SUCCEEDED
    return CheckResult(
        ok=ok, model_name=result.get("model_name", ""), problems=problems, params=result.get("params"),
        flops=result.get("flops"), fingerprint=result.get("fingerprint"), in_shape=result.get("in_shape"),
        out_shape=result.get("out_shape"), code_quality=result.get("code_quality"),
        code_quality_detail=result.get("code_quality_detail"), duplicates=result.get("duplicates") or {},
        isolation=short(result.get("isolation")), layers=result.get("layers"), speed=result.get("speed"),
        next_step="submit_model with the same code" if ok else "fix the problems and call check_model again")


async def submit_model(state: AppState, request: EvalRequest) -> JobView:
    """Queue `request` as a job (static failures end at once) and return its view."""
    try:
        job_id = await state.jobs().submit(request)
    except RequestRefused as exc:
        raise ToolError(str(exc)) from exc
    row = await state.zoo().jobs.get(job_id)
    assert row is not None
    return job_view(row)


ProgressFn = Callable[[float, float, str], Awaitable[None]]


async def get_job(state: AppState, job_id: str, wait_s: float = 0, report: ProgressFn | None = None,
                  include_isolation: bool = False) -> JobView:
    """The job's view, after waiting up to `wait_s` for it to end; `report(progress, total, message)`
    hears each change while waiting (the MCP tool sends them as progress notifications)."""
    jobs = state.zoo().jobs
    row = await jobs.get(job_id)
    if row is None:
        recent = [j["id"] for j in await jobs.recent(limit=5)]
        raise ToolError(f"No job '{job_id}'. Recent jobs: {recent or 'none'}. Use the job_id that "
                        "submit_model returned.")
    if wait_s > 0 and state.queue is not None:
        started = time.monotonic()
        tick = 0

        async def on_change(current: dict[str, Any]) -> None:
            nonlocal tick
            if report is None:
                return
            tick += 1
            progress = current.get("progress") or {}
            await report(min(wait_s, time.monotonic() - started) + tick * 1e-6, wait_s,
                         f"{current['status']}: trial {progress.get('trial')} epoch {progress.get('epoch')} "
                         f"best val {progress.get('best_val_accuracy')}")

        row = await state.queue.wait(job_id, wait_s, on_change) or row
    return job_view(row, await job_standing(state, row), include_isolation)


async def cancel_job(state: AppState, job_id: str) -> JobView:
    """Request the job's cancellation and return its view once it took effect (at most 10 s)."""
    status = await state.jobs().cancel(job_id)
    if status is None:
        raise ToolError(f"No job '{job_id}'. Use the job_id that submit_model returned.")
    row = await state.queue.wait(job_id, 10) if state.queue else await state.zoo().jobs.get(job_id)
    assert row is not None
    return job_view(row)


class CancelView(JobView):
    """cancel_job's answer: the job's view, or (for a batch_id) the batch's counts after the request."""

    job_id: str | None = None  # type: ignore[assignment]
    status: StatusField | None = None  # type: ignore[assignment]
    created: float | None = None  # type: ignore[assignment]
    batch_id: str | None = None
    counts: dict[str, int] | None = Field(default=None, description="For a batch: its jobs by status")
    cancelled: list[str] | None = Field(default=None, description="For a batch: the jobs it stopped or unqueued")


CANCEL_WAIT_S = 10.0


async def cancel_batch(state: AppState, batch_id: str) -> CancelView:
    """Cancel every unfinished job of a batch; answer once they ended (at most 10 s) with the batch's counts."""
    if state.queue is not None:
        statuses = await state.queue.cancel_batch(batch_id)
    else:  # --no-worker: the worker running a job sees its cancel flag at its next heartbeat
        statuses = await state.zoo().jobs.request_cancel_batch(batch_id)
    if statuses is None:
        raise ToolError(f"No batch '{batch_id}'. Use the batch_id that submit_models returned.")
    jobs = state.zoo().jobs
    stopping = [j for j, s in statuses.items() if not JobStatus(s).is_finished()]
    deadline = time.monotonic() + CANCEL_WAIT_S
    for job_id in stopping:
        if state.queue is not None:
            await state.queue.wait(job_id, max(0.0, deadline - time.monotonic()))
    counts = await jobs.count_by_status(Selection(batch_id=batch_id))
    done = all(JobStatus(s).is_finished() for s in counts)
    changed = [j for j, s in statuses.items() if s == JobStatus.CANCELLED] + stopping
    return CancelView(batch_id=batch_id, done=done, counts=counts, cancelled=changed, next_step=(
        "Cancelled: every job of the batch ended; finished results stay." if done else
        "Cancellation requested; running jobs stop within seconds: wait_jobs(batch_id) shows them end."))


async def cancel_any(state: AppState, job_id: str | None, batch_id: str | None) -> CancelView:
    if (job_id is None) == (batch_id is None):
        raise ToolError("Pass either job_id or batch_id to cancel_job, not both and not neither.")
    if batch_id is not None:
        return await cancel_batch(state, batch_id)
    assert job_id is not None
    return CancelView(**(await cancel_job(state, job_id)).model_dump())


# --- MCP wiring: names, arguments and descriptions; each tool calls its function above ------------------
def register_job_tools(mcp: MCPServer, state: AppState) -> None:
    @tool(mcp, "check_model", ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def check_model_tool(
        code: Code,
        dataset: DatasetArg,
        task: TaskArg = "img-classification",
        prm: PrmArg = None,
    ) -> CheckResult:
        """Check model code in seconds without training or archiving anything: syntax, the Net contract,
        building the Net in the sandbox with the dataset's shapes, one forward pass (logits must be
        (batch, classes)), a short learn() smoke test, parameter count, FLOPs, architecture fingerprint,
        duplicates already in the zoo, and the code-quality score with its breakdown; `layers` lists the
        heaviest modules (output shape, parameters, FLOPs) and `speed` the seconds per epoch and per
        evaluation pass measured here at the given batch and transform (size time_budget_s and epochs with it).
        prm keys the model does not declare in supported_hyperparameters() are refused.
        Use it before every submit_model. `problems` lists what to fix. Next: submit_model.
        """
        return await check_model(state, build_request(code=code, dataset=dataset, task=task, prm=prm or {}))

    @tool(mcp, "submit_model", ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                               open_world_hint=False))
    async def submit_model_tool(
        code: Code,
        dataset: DatasetArg,
        task: TaskArg = "img-classification",
        metric: Annotated[str, Field(description="Metric; 'acc' (test accuracy)", max_length=MAX_FILTER_CHARS)] = "acc",
        prm: PrmArg = None,
        search_space: Annotated[dict[str, dict[str, Any]] | None, Field(description=SEARCH_SPACE_HELP)] = None,
        n_trials: Annotated[int | None, Field(description="Optuna TPE trials, 1..200; default 3 (1 with "
                                                     "protocol='lemur')", ge=1, le=200)] = None,
        epochs: Annotated[float | None, Field(
            description="Epochs per trial, >0 (0.5 allowed); default 1, or prm.epoch when prm carries LEMUR's "
                        "epoch", gt=0, le=200)] = None,
        time_budget_s: Annotated[float, Field(
            description="Hard wall-clock limit for the whole job in seconds (5..86400); unfinished trials are "
                        "pruned and the job ends timed_out with what it has", ge=5, le=86400)] = 300.0,
        eval_every: Annotated[float, Field(description="Epochs between learning-curve points", gt=0)] = 0.5,
        seed: Annotated[int, Field(description="Seed of the search and the training", ge=0)] = 0,
        repeats: Annotated[int, Field(description="Extra reruns of the selected hyperparameters with other "
                                                  "seeds, 1..10 (1 = none)", ge=1, le=10)] = 1,
        name_prefix: Annotated[str | None, Field(
            description="Name prefix; a new model is named {prefix}-{md5} (LEMUR's rule: md5 of the code without "
                        "whitespace), or {md5} without a prefix; code already in the zoo keeps its name",
            max_length=64)] = None,
        max_train_samples: Annotated[int | None, Field(
            description="Train on at most this many images (quick experiments); test accuracy always uses "
                        "the full test split", ge=16)] = None,
        export_onnx: Annotated[bool, Field(description=EXPORT_ONNX_HELP)] = False,
        deterministic: Annotated[bool | None, Field(description=DETERMINISTIC_HELP)] = None,
        precision: Annotated[Literal["fp32", "bf16"], Field(description=PRECISION_HELP)] = "fp32",
        protocol: Annotated[Literal["default", "lemur"], Field(description=PROTOCOL_HELP)] = "default",
    ) -> JobView:
        """Train and score new model code: static checks at once, then (in a job) a sandboxed check and a
        time-boxed Optuna search on the dataset; accuracy is computed by the server on the held-out
        test split from the sandbox's predictions; the model, every trial's run with its learning curve,
        and the selected trial's weights are archived in the zoo (failures too).
        Returns at once with job_id (static failures are reported immediately).
        Next: get_job(job_id, wait_s=50) until done is true.
        """
        return await submit_model(state, build_request(
            code=code, dataset=dataset, task=task, metric=metric, prm=prm or {}, search_space=search_space or {},
            n_trials=n_trials, epochs=epochs, time_budget_s=time_budget_s, eval_every=eval_every, seed=seed,
            repeats=repeats, name_prefix=name_prefix, max_train_samples=max_train_samples, export_onnx=export_onnx,
            deterministic=deterministic, precision=precision, protocol=protocol))

    @tool(mcp, "get_job", ToolAnnotations(read_only_hint=True, open_world_hint=False))
    async def get_job_tool(
        job_id: Annotated[str, Field(description="job_id returned by submit_model", min_length=1, max_length=64)],
        wait_s: Annotated[float, Field(description="Wait up to this many seconds (0..50) for the job to end; "
                                                   "progress is reported while waiting", ge=0, le=50)] = 0,
        include_isolation: Annotated[bool, Field(description=(
            "Show the full sandbox description the job ran under (~1.5k characters); otherwise result.isolation "
            "is a short id (the same id = the same isolation)"))] = False,
        ctx: Context | None = None,
    ) -> JobView:
        """State of an evaluation job: queued, checking, training, evaluating, then succeeded, failed,
        timed_out or cancelled. With wait_s > 0 it waits (long poll, at most 50 s) and sends MCP progress
        notifications. When done it carries the result (accuracy, accuracy_to_time, code_quality,
        selected hyperparameters, every trial) or the error (stage, kind, message, log tail); a succeeded
        job also its `standing` (rank by accuracy and by accuracy-to-time of n models, gap to the best, by
        the score leaderboard ranks) and `notes` where it did not do what was asked (e.g. name_prefix).
        """
        return await get_job(state, job_id, wait_s, ctx.report_progress if ctx is not None else None,
                             include_isolation)

    @tool(mcp, "cancel_job", ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                                             open_world_hint=False))
    async def cancel_job_tool(
        job_id: Annotated[str | None, Field(description="job_id to cancel", min_length=1, max_length=64)] = None,
        batch_id: Annotated[str | None, Field(description="Or: cancel every unfinished job of this batch",
                                              min_length=1, max_length=64)] = None,
    ) -> CancelView:
        """Cancel a queued or running job (job_id), or every unfinished job of a batch (batch_id): sandboxes
        are killed, finished trials and jobs stay archived. Cancelling a finished job changes nothing.
        Returns the job's state after the request (for a batch: its counts by status).
        """
        return await cancel_any(state, job_id, batch_id)

    from lemur_agent_server.batch_tools import register_batch_tools

    register_batch_tools(mcp, state)
