"""One evaluation job from code to archive: static checks, the sandboxed check, the sandboxed Optuna
search and its repeats, trusted scoring; each trial into the zoo as it ends, the job's end in one
transaction.

Where things are: one sandbox run and its events in `phase`, the records and the transaction in
`archive`, the typed result in `outcome`; this module decides the order and the job's status.
Trust boundary: the runner's events are hints (see `phase`); the job's outcome is decided from how
the sandbox process ended and from what the host computed itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from lemur_agent_server.evaluator import archive, costs, flags, jobfiles, protocols
from lemur_agent_server.evaluator.outcome import CheckStats, JobResult, Outcome, Selection
from lemur_agent_server.evaluator.phase import (  # noqa: F401 - re-exported: the old names of these
    LOG_TAIL_CHARS,
    MIN_TRAIN_SHARE,
    Phase,
    Trial,
    exit_failure,
    failure,
    select,
    trusted_duration,
)
from lemur_agent_server.evaluator.quality import code_quality
from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.evaluator.static_checks import prm_problems, static_problems
from sandbox import datasets, protocol
from sandbox.backend import Backend, Exit, JobPaths, Limits
from sandbox.protocol import FailureKind, JobStatus, RunStatus, Stage, TimeBudget
from zoo import codehash
from zoo.jobs import Claim
from zoo.records import Model, Run, is_number
from zoo.store import ZooStore

CHECK_WALL_S = TimeBudget.CHECK_S  # kept for callers (queue.check); the value lives in TimeBudget
KILL_GRACE_S = TimeBudget.KILL_GRACE_S
# A budget spent before the runner's `ready` event went on starting the sandbox (interpreter and torch
# imports; a first start on a cold disk takes 15 s and more): the agent must learn that its code never ran.
STARTUP_TIMEOUT = ("Killed after {s:.1f} s: the time budget ran out while the sandbox was still starting (Python "
                   "and torch imports), before any of the submitted code ran. Submit again (later starts are "
                   "faster: the files are cached, and the Docker backend keeps a sandbox started) or raise "
                   "time_budget_s.")
NO_POINT_IN_TIME = ("The time budget ({budget:g} s) ran out before any trial reached its first evaluation (epoch "
                    "{every:g}). Raise time_budget_s, or lower max_train_samples or eval_every; if one step should "
                    "be fast, look for a loop in forward() or learn().")
EARLY_EXIT = ("The sandbox ended with exit code 0 before the runner reported its result: does the model call "
              "sys.exit() or os._exit()? Remove that and submit again.")
MIN_REPEAT_S = 2.0  # a repeat is not started with less of the budget left

ProgressFn = Callable[[str, dict[str, Any]], Awaitable[None]]
TrialEnded = Callable[[Trial], Awaitable[None]]


@dataclasses.dataclass
class Job:
    """Everything a pipeline run needs; built by the queue."""

    job_id: str
    kind: str  # submit (train + archive) | evaluate (train, no archive) | check
    request: EvalRequest
    store: ZooStore
    backend: Backend
    jobs_root: Path
    data_root: Path
    cache_root: Path
    threads: int
    memory_bytes: int
    gpu: str | None
    progress: ProgressFn
    cancelled: anyio.Event = dataclasses.field(default_factory=anyio.Event)
    # schedules a warm sandbox for the next phase or job (fire and forget); None when unsupported
    prewarm: Callable[[Any, Limits], None] | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    first_step_at: float | None = None  # unix time the host saw the first optimizer step (for bench/)
    # the queue's hold on the job: every archive write checks it, and the job's end is written with it
    claim: Claim | None = None
    # the device's calibration (evaluator.calibration), known before the job's clock started; None: runs
    # get no normalized duration
    calibration: Any = None

    @property
    def attempt(self) -> int:
        return self.claim.attempt if self.claim is not None else 1

    @property
    def budget(self) -> TimeBudget:
        """The job's budget; a check job's is capped at the check's share."""
        budget = self.request.budget
        return budget.for_check() if self.kind == "check" else budget

    @property
    def deadline(self) -> float:
        """The job's clock started when the job object was made (the queue claimed it)."""
        return self.started + self.budget.budget_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def default_transforms(info: datasets.DatasetInfo) -> list[str]:
    """Transforms searched unless prm or search_space says otherwise: the dataset's default first, then
    the other transforms of the same size (larger resizes cost a lot on CPU; ask for them explicitly)."""
    size = datasets.transform_size(info.default_transform, info.image_shape[-1])
    # sizeless names (`norm`: the dataset's own size) only by request: at 32 x 32 they would repeat norm_32
    same = [t for t in datasets.TRANSFORMS
            if protocol.parse_transform(t).size == size and t != info.default_transform]
    return [info.default_transform, *same]


def _spec(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, mode: str, budget_s: float,
          **overrides: Any) -> protocol.JobSpec:
    req = job.request
    rp = job.backend.runner_paths(paths)
    fields = prepared.spec_fields()
    fields.update(model_path=rp.model, data_dir=rp.data_dir, out_dir=rp.out_dir)
    fields.update(protocols.spec_fields(req.protocol, prepared.info), deterministic=bool(req.deterministic),
                  precision=req.precision)
    spec = protocol.JobSpec(
        mode=mode, **fields, fixed_prm=dict(req.prm), search_space=dict(req.search_space),
        transforms=default_transforms(prepared.info), n_trials=req.n_trials, epochs=req.epochs,
        eval_every=req.eval_every, seed=req.seed, time_budget_s=job.budget.sandbox_s(budget_s),
        device="cuda" if job.gpu is not None else "cpu", max_train_samples=req.max_train_samples,
        threads=job.threads, export_onnx=req.export_onnx and mode == protocol.MODE_TRAIN)
    return dataclasses.replace(spec, **overrides)




@dataclasses.dataclass
class Search:
    """What the search and its repeats left: every trial, and how the training stage ended."""

    trials: list[Trial]
    error: dict[str, Any] | None  # a failure of the code (a timeout is not one: see timed_out)
    timed_out: bool
    cancelled: bool


async def evaluate(job: Job) -> Outcome:
    """Run the whole job. Never raises for bad code: every failure becomes an Outcome (and an archive)."""
    req = job.request
    same_code = await job.store.models_by_hash(codehash.code_hash(req.code))
    # same normalized code -> same model: a resubmission adds runs to the existing name
    name = same_code[0]["name"] if same_code else codehash.model_name(req.name_prefix, req.code)
    problems = static_problems(req.code) or prm_problems(req.code, req.prm)
    score, quality = await anyio.to_thread.run_sync(code_quality, req.code)
    model = Model(name=name, code=req.code, origin="submitted", prefix=req.name_prefix or "nn",
                  code_quality=score, code_quality_detail=quality)
    result = JobResult(model_name=name, code_quality=score, code_quality_detail=quality)
    if problems:
        err = failure(Stage.CHECK, problems[0].kind, problems[0].message, problems=[p.as_dict() for p in problems])
        return await _finish(job, model, result, JobStatus.FAILED, err, [archive.failed_run(job, None, err, None)])

    await job.progress(Stage.CHECK, {"step": "preparing dataset"})
    try:
        prepared = await anyio.to_thread.run_sync(datasets.prepare, req.dataset, job.data_root, job.cache_root)
    except (datasets.DatasetUnavailable, datasets.UnknownDataset) as exc:  # the files went away after admit
        message = str(exc).replace(str(job.data_root), "the server's data root ($LEMUR_DATA)")
        return Outcome(JobStatus.FAILED, result.as_dict(), failure(Stage.CHECK, FailureKind.SANDBOX, message))
    paths = jobfiles.create_job_dir(job.jobs_root, job.job_id, prepared.public_dir, req.code)
    try:
        twins = await archive.earlier_twins(job.store, codehash.code_hash(req.code), job.job_id)
        return await _evaluate_in(job, paths, prepared, model, result, twins)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(jobfiles.remove_job_dir, paths)


async def _evaluate_in(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, model: Model,
                       result: JobResult, same_code: list[str]) -> Outcome:
    """One sandbox does the check and, for submissions, the search: a second start would double the
    fixed cost (interpreter, torch import, data load) for nothing."""
    await job.progress(Stage.CHECK, {"step": "building the model in the sandbox"})
    mode = "check" if job.kind == "check" else "train"

    async def ended(trial: Trial) -> None:
        if phase.check is not None:  # the check came first: the model row gets its measurements
            _check_stats(model, phase.check)
        await archive.archive_trial(job, model, paths, prepared, trial, phase.ready)

    phase = Phase(job, paths, prepared, on_ended=ended)
    remaining = job.remaining()
    exit = await phase.run(_spec(job, paths, prepared, mode, remaining), job.budget.kill_after(remaining))
    result.isolation = exit.isolation
    result.check = _check_stats(model, phase.check)
    # the code's twins as they were before this job (its own trials are archived as they end)
    result.duplicates = await archive.duplicates(job.store, model, same_code)
    err = _check_failure(phase, exit)
    if err:
        if err.get("kind") == FailureKind.CANCELLED:
            return Outcome(JobStatus.CANCELLED, result.as_dict(), err)
        status = JobStatus.TIMED_OUT if err["kind"] == FailureKind.TIMEOUT else JobStatus.FAILED
        return await _finish(job, model, result, status, err,
                             [archive.failed_run(job, prepared, err, exit.isolation, phase.ready)])
    if mode == "check":
        return Outcome(JobStatus.SUCCEEDED, result.as_dict())

    search = await _search(job, paths, prepared, phase, exit, ended)
    await job.progress(Stage.EVALUATE, {"step": "scoring and archiving"})
    runs, selected = archive.trial_runs(job, prepared, search.trials, exit.isolation, phase.ready)
    result.selection = _selection(selected)
    result.trials = [_trial_summary(t) for t in search.trials]
    result.curve = _curve(selected)
    result.timing = flags.timing(search.trials, phase.host)
    result.flags = flags.job_flags(search.trials, selected, prepared.info.chance, job.request, phase.host)
    status, err = _train_outcome(job, search, selected)
    if selected is not None:
        await archive.copy_weights(job, paths, selected)
        result.weights_error = selected.weights_error
    return await _finish(job, model, result, status, err, runs, selected)


def _check_stats(model: Model, check: dict[str, Any] | None) -> CheckStats | None:
    """The check event's measurements (untrusted numbers, bounded), also written onto the model."""
    if not check:
        return None
    model.params = _int(check.get("params"))
    model.flops = _int(check.get("flops"))
    model.fingerprint = str(check.get("fingerprint"))[:128] if check.get("fingerprint") else None
    return CheckStats(params=model.params, flops=model.flops, fingerprint=model.fingerprint,
                      in_shape=check.get("in_shape"), out_shape=check.get("out_shape"),
                      layers=costs.layer_table(check), speed=costs.speed(check))


def _selection(selected: Trial | None) -> Selection | None:
    if selected is None:
        return None
    last = selected.points[-1]
    return Selection(accuracy=last.accuracy, accuracy_to_time=last.accuracy_to_time, duration_ns=last.duration_ns,
                     epochs=last.epoch, selected_trial=selected.trial, prm=selected.prm,
                     val_accuracy=_finite(selected.best_val))


def _trial_summary(t: Trial) -> dict[str, Any]:
    summary = {"trial": t.trial, "repeat": t.repeat, "status": t.status, "best_val_accuracy": _finite(t.best_val),
               "accuracy": t.points[-1].accuracy if t.points else None,
               "epochs": t.points[-1].epoch if t.points else 0.0, "eval_s": t.eval_s, "prm": t.prm,
               "error": t.error}
    if t.pruned:
        summary["pruned"] = t.pruned
    return summary


def _curve(t: Trial | None) -> list[dict[str, Any]] | None:
    """The selected trial's points with the training loss and accuracy learn() returned (null where not)."""
    if t is None:
        return None
    return [{"epoch": p.epoch, "accuracy": p.accuracy, "val_accuracy": p.val_accuracy, "train_loss": p.loss,
             "train_accuracy": t.train_accuracy.get(p.epoch), "duration_s": round((p.duration_ns or 0) / 1e9, 3)}
            for p in t.points]


def _train_outcome(job: Job, search: Search, selected: Trial | None) -> tuple[str, dict[str, Any] | None]:
    """The job's status after training, and the error it reports."""
    if search.cancelled:
        return JobStatus.CANCELLED, failure(Stage.TRAIN, FailureKind.CANCELLED, "Cancelled by request.")
    if selected is None:
        return (JobStatus.TIMED_OUT if search.timed_out else JobStatus.FAILED), search.error or _no_point_error(
            job, search)
    if search.timed_out:
        return JobStatus.TIMED_OUT, search.error
    if search.error is None and selected.status == RunStatus.FAILED:  # its points are the best there is, but
        return JobStatus.FAILED, selected.error or failure(  # the trial did not end well: neither does the job
            Stage.TRAIN, FailureKind.EXCEPTION, "The selected trial failed after its last curve point.")
    return (JobStatus.FAILED if search.error is not None else JobStatus.SUCCEEDED), search.error


def _no_point_error(job: Job, search: Search) -> dict[str, Any]:
    """Why no trial has a learning-curve point, when the runner reported no error of its own."""
    errors = [t.error for t in search.trials if t.error and not t.error.get("recovered")]
    if errors:
        return errors[-1]
    if search.timed_out:
        return failure(Stage.TRAIN, FailureKind.TIMEOUT,
                       NO_POINT_IN_TIME.format(budget=job.request.time_budget_s, every=job.request.eval_every))
    return failure(Stage.TRAIN, FailureKind.SANDBOX, "No trial produced a learning-curve point.")


def _check_failure(phase: Phase, exit: Exit) -> dict[str, Any] | None:
    """The check's failure, if the model never got past it (no check result, or an error at that stage)."""
    if phase.check is None:
        if phase.error is not None:
            return {**phase.error, "stage": Stage.CHECK}
        if exit.timed_out and phase.ready is None:
            return failure(Stage.CHECK, FailureKind.TIMEOUT, STARTUP_TIMEOUT.format(s=exit.wall_s),
                           started=False, log_tail=exit.log_tail[-LOG_TAIL_CHARS:])
        return exit_failure(exit, Stage.CHECK) or failure(
            Stage.CHECK, FailureKind.SANDBOX, "The runner exited without a check result.",
            log_tail=exit.log_tail[-LOG_TAIL_CHARS:])
    if phase.error is not None and phase.error.get("stage") == Stage.CHECK:
        return phase.error
    return None


def _search_error(search: Phase, exit: Exit) -> dict[str, Any] | None:
    """The search phase's failure: the runner's error, or one read from how the sandbox ended."""
    if search.error is not None or search.done is not None:
        return search.error
    return exit_failure(exit, Stage.TRAIN) or failure(Stage.TRAIN, FailureKind.SANDBOX, EARLY_EXIT,
                                                      log_tail=exit.log_tail[-LOG_TAIL_CHARS:])


def _search_timed_out(job: Job, search: Phase, exit: Exit, err: dict[str, Any] | None) -> bool:
    if exit.timed_out or any(t.error and t.error.get("kind") == FailureKind.TIMEOUT for t in search.trials.values()):
        return True
    # the runner ended the search early: the next trial's first segment did not fit
    return search.done is not None and err is None and len(search.trials) < job.request.n_trials


async def _search(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, search: Phase, exit: Exit,
                  ended: TrialEnded) -> Search:
    """Read the Optuna search's trials, then rerun the selected prm `repeats - 1` times with other seeds."""
    err = _search_error(search, exit)
    if search.first_step_at is not None:
        job.first_step_at = search.first_step_at
    timed_out = _search_timed_out(job, search, exit, err)
    trials = list(search.trials.values())
    for t in trials:
        t.end_unreported(exit.timed_out, exit.cancelled)
    if err and err.get("kind") == FailureKind.TIMEOUT:
        err = None  # a timeout is the job's status, not an error of the code
    best = select(trials)
    if best is not None and job.request.repeats > 1:
        await archive.copy_weights(job, paths, best)
    for repeat in range(1, job.request.repeats):
        if best is None or exit.cancelled or job.remaining() < MIN_REPEAT_S:
            timed_out = timed_out or (best is not None and job.remaining() < MIN_REPEAT_S)
            break
        exit, rerun = await _repeat(job, paths, prepared, best, repeat, ended)
        trials += rerun
        timed_out = timed_out or exit.timed_out
    return Search(trials=trials, error=err, timed_out=timed_out, cancelled=exit.cancelled)


async def _repeat(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, best: Trial, repeat: int,
                  ended: TrialEnded) -> tuple[Exit, list[Trial]]:
    """One more sandbox that trains the selected prm once with seed `seed + repeat`."""
    rerun = Phase(job, paths, prepared, repeat=repeat, on_ended=ended)
    remaining = job.remaining()
    fixed = {k: v for k, v in best.prm.items() if k != "epoch"}
    spec = _spec(job, paths, prepared, "train", remaining, fixed_prm=fixed, n_trials=1,
                 seed=archive.repeat_seed(job.request.seed, repeat),
                 export_onnx=False)  # the search's selected trial is exported, never a rerun
    exit = await rerun.run(spec, job.budget.kill_after(remaining))
    trials = list(rerun.trials.values())
    for t in trials:
        t.end_unreported(exit.timed_out, exit.cancelled)
    return exit, trials


async def _finish(job: Job, model: Model, result: JobResult, status: str, err: dict[str, Any] | None,
                  runs: list[Run], selected: Trial | None = None) -> Outcome:
    """A submission's end is one transaction (its archive and, with a claim, the job's final state);
    a dry check or an `evaluate` job stores nothing and leaves the job's end to the queue."""
    if err is not None:
        err = {**err}
        err.setdefault("stage", Stage.TRAIN)
    recorded = False
    if job.kind == "submit":
        await archive.store(job, model, runs, selected, result, status, err)
        recorded = job.claim is not None  # written, or the claim was lost: nothing more to write either way
    return Outcome(status, archive.result_dict(job, result, selected), err, recorded=recorded)


def _int(value: Any) -> int | None:
    return int(value) if is_number(value) and 0 <= value < 2**62 else None


def _finite(value: float) -> float | None:
    return value if value > float("-inf") else None
