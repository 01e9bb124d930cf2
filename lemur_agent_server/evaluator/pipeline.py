"""One evaluation job from code to archive: static checks, the sandboxed check, the sandboxed Optuna
search, trusted scoring, and one transaction into the zoo.

Trust boundary: the runner's events are hints. The server computes every accuracy itself from the
test predictions the sandbox wrote (test labels never enter it), clamps reported training time to
what it observed from outside, and decides the job's outcome from how the sandbox process ended.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from lemur_agent_server.evaluator import jobfiles
from lemur_agent_server.evaluator.quality import code_quality
from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.evaluator.static_checks import static_problems
from sandbox import datasets, protocol
from sandbox.backend import Backend, Exit, Handle, JobPaths, Limits
from zoo import codehash
from zoo.records import Model, Point, Run, accuracy_to_time, is_number
from zoo.store import ZooStore

log = logging.getLogger(__name__)

CHECK_WALL_S = 120.0
KILL_GRACE_S = 5.0  # the sandbox is killed this long after the job's budget
LOG_TAIL_CHARS = 4000
# A budget spent before the runner's `ready` event went on starting the sandbox (interpreter and torch
# imports; a first start on a cold disk takes 15 s and more): the agent must learn that its code never ran.
STARTUP_TIMEOUT = ("Killed after {s:.1f} s: the time budget ran out while the sandbox was still starting (Python "
                   "and torch imports), before any of the submitted code ran. Submit again (later starts are "
                   "faster: the files are cached, and the Docker backend keeps a sandbox started) or raise "
                   "time_budget_s.")
MIN_TRAIN_SHARE = 0.5  # the least share of the host-observed trial time counted as training (see trusted_duration)

# runner's trial_end status -> the run status stored in the zoo
TRIAL_STATUS = {"completed": "succeeded", "succeeded": "succeeded", "pruned": "pruned", "failed": "failed"}

ProgressFn = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass
class Outcome:
    status: str  # succeeded | failed | timed_out | cancelled
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


@dataclasses.dataclass
class Trial:
    trial: int
    prm: dict[str, Any] = dataclasses.field(default_factory=dict)
    points: list[Point] = dataclasses.field(default_factory=list)
    status: str = "running"
    error: dict[str, Any] | None = None
    weights: str | None = None
    archived: tuple[str, int, str] | None = None  # (sha256, size, path in the weights store) once copied
    weights_error: str | None = None
    started_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def best_val(self) -> float:
        vals = [p.val_accuracy for p in self.points if p.val_accuracy is not None]
        return max(vals) if vals else float("-inf")


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

    @property
    def deadline(self) -> float:
        return self.started + self.request.time_budget_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def failure(stage: str, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "kind": kind, "message": message, **extra}


class Phase:
    """One sandbox run (check or train) and what it reported."""

    def __init__(self, job: Job, paths: JobPaths, prepared: datasets.PreparedDataset):
        self.job = job
        self.paths = paths
        self.prepared = prepared
        self.check: dict[str, Any] | None = None
        self.ready: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done: dict[str, Any] | None = None
        self.first_step_at: float | None = None
        self.trials: dict[int, Trial] = {}
        self.exit: Exit | None = None
        self.test_labels = prepared.test_labels
        self.chance = prepared.info.chance
        self.handle: Handle | None = None
        request = job.request
        self.max_points = math.ceil(request.epochs / request.eval_every) + 1

    async def run(self, spec: protocol.JobSpec, wall_s: float) -> Exit:
        limits = Limits(wall_s=max(1.0, wall_s), memory_bytes=self.job.memory_bytes, cpus=float(self.job.threads),
                        gpu=self.job.gpu)
        await anyio.to_thread.run_sync(jobfiles.reset_out_dir, self.paths)
        jobfiles.write_spec(self.paths, spec)
        handle = self.handle = await self.job.backend.start(self.paths, limits)
        if self.job.prewarm is not None:
            self.job.prewarm(self.paths.data_dir, limits)
        try:
            async with anyio.create_task_group() as tg:
                async def watch_cancel() -> None:
                    await self.job.cancelled.wait()
                    await handle.cancel()

                tg.start_soon(watch_cancel)
                async for event in handle.events():
                    await self.on_event(event)
                self.exit = await handle.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await handle.cancel()
                if self.exit is None:
                    self.exit = await handle.wait()
        if self.exit.out_exceeded:  # whatever the code reported after that, this is why it stopped
            stage = protocol.STAGE_CHECK if self.check is None else protocol.STAGE_TRAIN
            self.error = failure(stage, protocol.KIND_SANDBOX, self.exit.out_exceeded)
        return self.exit

    async def on_event(self, event: dict[str, Any]) -> None:
        """Apply one event; a malformed one (wrong types, impossible numbers) is dropped, never fatal."""
        try:
            await self._apply(event)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            log.info("job %s: dropped a malformed %r event: %s", self.job.job_id, event.get("event"), exc)

    async def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == protocol.EVENT_READY and self.ready is None:
            self.ready = event
        elif kind == protocol.EVENT_CHECK and self.check is None:  # the runner checks once, before any trial
            self.check = event
        elif kind == protocol.EVENT_ERROR and self.error is None:
            self.error = failure(str(event.get("stage") or protocol.STAGE_TRAIN),
                                 _known_kind(event.get("kind")), str(event.get("message", ""))[:2000],
                                 traceback=str(event.get("traceback", ""))[-LOG_TAIL_CHARS:])
        elif kind == protocol.EVENT_FIRST_STEP and self.first_step_at is None:
            self.first_step_at = time.time()
        elif kind == protocol.EVENT_TRIAL_START:
            number = int(event.get("trial", len(self.trials)))
            if number in self.trials or len(self.trials) >= self.job.request.n_trials:
                return  # a forged or repeated start: the runner starts each trial once
            # started no earlier than the host's last look that did not see this event
            seen_after = self.handle.written_after if self.handle is not None else 0.0
            self.trials[number] = Trial(trial=number, prm=dict(event.get("prm") or {}),
                                        started_at=seen_after or time.monotonic())
            await self.job.progress(protocol.STAGE_TRAIN, self.progress())
        elif kind == protocol.EVENT_POINT:
            self.on_point(event)
            await self.job.progress(protocol.STAGE_TRAIN, self.progress())
        elif kind == protocol.EVENT_TRIAL_END:
            trial = self.trials.get(int(event.get("trial", -1)))
            if trial is not None and trial.status == "running":
                status = str(event.get("status", "failed"))
                trial.status = TRIAL_STATUS.get(status, "failed")
                if event.get("error"):
                    err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
                    trial.error = failure(protocol.STAGE_TRAIN, _known_kind(err.get("kind")),
                                          str(err.get("message", ""))[:2000])
                if isinstance(event.get("weights"), str):
                    trial.weights = event["weights"]
        elif kind == protocol.EVENT_DONE:
            self.done = event

    def on_point(self, event: dict[str, Any]) -> None:
        trial = self.trials.get(int(event.get("trial", -1)))
        if trial is None or trial.status != "running" or len(trial.points) >= self.max_points:
            return  # a point flood would cost a predictions read each; the runner sends at most max_points
        epoch = float(event["epoch"])
        last_epoch = trial.points[-1].epoch if trial.points else 0.0
        if not math.isfinite(epoch) or epoch <= last_epoch or epoch > self.job.request.epochs + 1e-6:
            return  # the runner's epochs only grow and stop at the request's: a replayed or forged point
        n_test = len(self.test_labels)
        try:
            preds = jobfiles.read_predictions(self.paths.out_dir, str(event.get("preds", "")), n_test,
                                              self.prepared.info.num_classes)
        except jobfiles.OutputError as exc:
            trial.status = "failed"
            trial.error = failure(protocol.STAGE_EVALUATE, protocol.KIND_SHAPE, f"Bad predictions: {exc}")
            return
        accuracy = float(np.mean(preds == self.test_labels)) if n_test else None
        duration = trusted_duration(event.get("train_ns"), int((time.monotonic() - trial.started_at) * 1e9))
        val = event.get("val_accuracy")
        loss = event.get("loss")
        trial.points.append(Point(
            epoch=epoch, accuracy=accuracy,
            val_accuracy=float(val) if is_number(val) and 0 <= val <= 1 else None,
            loss=float(loss) if is_number(loss) else None,
            duration_ns=duration, accuracy_to_time=accuracy_to_time(accuracy, self.chance, duration),
            elapsed_s=time.monotonic() - trial.started_at))

    def progress(self) -> dict[str, Any]:
        current = max(self.trials.values(), key=lambda t: t.trial) if self.trials else None
        last = current.points[-1] if current and current.points else None
        best = max((t.best_val for t in self.trials.values()), default=float("-inf"))
        return {"trial": current.trial if current else None, "n_trials": self.job.request.n_trials,
                "epoch": last.epoch if last else 0.0, "epochs": self.job.request.epochs,
                "val_accuracy": last.val_accuracy if last else None,
                "best_val_accuracy": _finite(best),
                "elapsed_s": round(time.monotonic() - self.job.started, 2),
                "time_budget_s": self.job.request.time_budget_s}


def trusted_duration(reported: Any, observed_ns: int) -> int:
    """Training time for accuracy_to_time: the runner's own count, clamped into
    [MIN_TRAIN_SHARE, 1] x the wall time the host saw since the trial started.

    Why both bounds: the count is made inside the sandbox, where the submitted code can rewrite it;
    the host's wall time also holds the evaluations and the trial's setup, so it is only an upper
    bound. A forged count can gain at most 1 / MIN_TRAIN_SHARE in accuracy_to_time."""
    floor = int(observed_ns * MIN_TRAIN_SHARE)
    if is_number(reported):
        return max(floor, min(int(reported), observed_ns))
    return observed_ns


def _known_kind(kind: Any) -> str:
    return kind if kind in protocol.FAILURE_KINDS else protocol.KIND_EXCEPTION


def exit_failure(exit: Exit, stage: str) -> dict[str, Any] | None:
    """A failure read from how the sandbox ended, when the runner said nothing (or could not)."""
    tail = exit.log_tail[-LOG_TAIL_CHARS:]
    if exit.cancelled:
        return failure(stage, "cancelled", "Cancelled by request.", log_tail=tail)
    if exit.timed_out:
        return failure(stage, protocol.KIND_TIMEOUT, f"Killed after {exit.wall_s:.1f} s: the time budget ran out.",
                       log_tail=tail)
    if exit.oom_killed:
        return failure(stage, protocol.KIND_OOM, "Killed by the sandbox's memory limit. Use a smaller model "
                       "or batch.", log_tail=tail)
    if exit.exit_code != 0:
        how = f"signal {exit.signal}" if exit.signal else f"exit code {exit.exit_code}"
        return failure(stage, protocol.KIND_SANDBOX, f"The sandbox ended with {how} without reporting an error.",
                       log_tail=tail)
    return None


def default_transforms(info: datasets.DatasetInfo) -> list[str]:
    """Transforms searched unless prm or search_space says otherwise: the dataset's default first, then
    the other transforms of the same size (larger resizes cost a lot on CPU; ask for them explicitly)."""
    size = datasets.transform_size(info.default_transform)
    same = [t for t in datasets.TRANSFORMS if datasets.transform_size(t) == size and t != info.default_transform]
    return [info.default_transform, *same]


def _spec(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, mode: str, budget_s: float,
          **overrides: Any) -> protocol.JobSpec:
    req = job.request
    rp = job.backend.runner_paths(paths)
    fields = prepared.spec_fields()
    fields.update(model_path=rp.model, data_dir=rp.data_dir, out_dir=rp.out_dir)
    spec = protocol.JobSpec(
        mode=mode, **fields, fixed_prm=dict(req.prm), search_space=dict(req.search_space),
        transforms=default_transforms(prepared.info), n_trials=req.n_trials, epochs=req.epochs,
        eval_every=req.eval_every, seed=req.seed, time_budget_s=max(1.0, budget_s),
        device="cuda" if job.gpu is not None else "cpu", max_train_samples=req.max_train_samples,
        threads=job.threads)
    return dataclasses.replace(spec, **overrides)


async def evaluate(job: Job) -> Outcome:
    """Run the whole job. Never raises for bad code: every failure becomes an Outcome (and an archive)."""
    req = job.request
    same_code = await job.store.models_by_hash(codehash.code_hash(req.code))
    # same normalized code -> same model: a resubmission adds runs to the existing name
    name = same_code[0]["name"] if same_code else codehash.model_name(req.name_prefix or "nn", req.code)
    problems = static_problems(req.code)
    score, quality = await anyio.to_thread.run_sync(code_quality, req.code)
    model = Model(name=name, code=req.code, origin="submitted", prefix=req.name_prefix or "nn",
                  code_quality=score, code_quality_detail=quality)
    base = {"model_name": name, "code_quality": score, "code_quality_detail": quality}
    if problems:
        err = failure(protocol.STAGE_CHECK, problems[0].kind, problems[0].message,
                      problems=[p.as_dict() for p in problems])
        return await _finish(job, model, [_failed_run(job, None, err, None)], err, "failed", base)

    await job.progress(protocol.STAGE_CHECK, {"step": "preparing dataset"})
    try:
        prepared = await anyio.to_thread.run_sync(datasets.prepare, req.dataset, job.data_root, job.cache_root)
    except (datasets.DatasetUnavailable, datasets.UnknownDataset) as exc:
        err = failure(protocol.STAGE_CHECK, protocol.KIND_SANDBOX, str(exc))
        return Outcome("failed", base, err)
    paths = jobfiles.create_job_dir(job.jobs_root, job.job_id, prepared.public_dir, req.code)
    try:
        return await _evaluate_in(job, paths, prepared, model, base)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(jobfiles.remove_job_dir, paths)


async def _evaluate_in(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, model: Model,
                       base: dict[str, Any]) -> Outcome:
    """One sandbox does the check and, for submissions, the search: a second start would double the
    fixed cost (interpreter, torch import, data load) for nothing."""
    await job.progress(protocol.STAGE_CHECK, {"step": "building the model in the sandbox"})
    mode = "check" if job.kind == "check" else "train"
    phase = Phase(job, paths, prepared)
    budget = min(CHECK_WALL_S, job.remaining()) if mode == "check" else job.remaining()
    exit = await phase.run(_spec(job, paths, prepared, mode, budget), budget + KILL_GRACE_S)
    isolation = exit.isolation
    base["isolation"] = isolation
    if phase.check:
        stats = phase.check
        model.params = _int(stats.get("params"))
        model.flops = _int(stats.get("flops"))
        model.fingerprint = str(stats.get("fingerprint"))[:128] if stats.get("fingerprint") else None
        base.update(params=model.params, flops=model.flops, fingerprint=model.fingerprint,
                    in_shape=stats.get("in_shape"), out_shape=stats.get("out_shape"))
    base["duplicates"] = await _duplicates(job.store, model)
    err = _check_failure(phase, exit)
    if err:
        if err.get("kind") == "cancelled":
            return Outcome("cancelled", base, err)
        status = "timed_out" if err["kind"] == protocol.KIND_TIMEOUT else "failed"
        return await _finish(job, model, [_failed_run(job, prepared, err, isolation)], err, status, base)
    if mode == "check":
        return Outcome("succeeded", base)

    trials, err, timed_out, cancelled = await _search(job, paths, prepared, phase, exit)
    if cancelled:
        err = failure(protocol.STAGE_TRAIN, "cancelled", "Cancelled by request.")
    await job.progress(protocol.STAGE_EVALUATE, {"step": "scoring and archiving"})
    runs, selected = _runs(job, prepared, trials, isolation)
    if selected is not None:
        last = selected.points[-1]
        base.update(accuracy=last.accuracy, accuracy_to_time=last.accuracy_to_time, duration_ns=last.duration_ns,
                    epochs=last.epoch, selected_trial=selected.trial, prm=selected.prm,
                    val_accuracy=_finite(selected.best_val))
    base["trials"] = [{"trial": t.trial, "status": t.status, "best_val_accuracy": _finite(t.best_val),
                       "accuracy": t.points[-1].accuracy if t.points else None, "prm": t.prm,
                       "error": t.error} for t in trials.values()]
    if cancelled:
        status = "cancelled"
    elif selected is None:
        status = "timed_out" if timed_out else "failed"
        if err is None:
            kinds = [t.error for t in trials.values() if t.error]
            if kinds:
                err = kinds[-1]
            elif timed_out:
                err = failure(protocol.STAGE_TRAIN, protocol.KIND_TIMEOUT,
                              f"The time budget ({job.request.time_budget_s:g} s) ran out before any trial reached "
                              f"its first evaluation (epoch {job.request.eval_every:g}). Raise time_budget_s, or "
                              "lower max_train_samples or eval_every; if one step should be fast, look for a "
                              "loop in forward() or learn().")
            else:
                err = failure(protocol.STAGE_TRAIN, protocol.KIND_SANDBOX, "No trial produced a learning-curve point.")
    elif timed_out:
        status = "timed_out"
    elif err is not None:
        status = "failed"
    else:
        status = "succeeded"
    if selected is not None:
        await _archive_weights(job, paths, selected)
        if selected.weights_error:
            base["weights_error"] = selected.weights_error
    weights = selected.archived if selected is not None else None
    return await _finish(job, model, runs, err, status, base, weights=(selected, weights))


async def _archive_weights(job: Job, paths: JobPaths, trial: Trial) -> None:
    """Copy the trial's weights into the store, once, while they are still in out/ (a repeat resets it)."""
    if trial.weights is None or trial.archived is not None or trial.weights_error is not None:
        return
    try:
        trial.archived = await anyio.to_thread.run_sync(jobfiles.archive_weights, paths.out_dir, trial.weights,
                                                        job.store.weights_dir)
    except jobfiles.OutputError as exc:
        trial.weights_error = str(exc)


def _check_failure(phase: Phase, exit: Exit) -> dict[str, Any] | None:
    """The check's failure, if the model never got past it (no check result, or an error at that stage)."""
    if phase.check is None:
        if phase.error is not None:
            return {**phase.error, "stage": protocol.STAGE_CHECK}
        if exit.timed_out and phase.ready is None:
            return failure(protocol.STAGE_CHECK, protocol.KIND_TIMEOUT, STARTUP_TIMEOUT.format(s=exit.wall_s),
                           started=False, log_tail=exit.log_tail[-LOG_TAIL_CHARS:])
        return exit_failure(exit, protocol.STAGE_CHECK) or failure(
            protocol.STAGE_CHECK, protocol.KIND_SANDBOX, "The runner exited without a check result.",
            log_tail=exit.log_tail[-LOG_TAIL_CHARS:])
    if phase.error is not None and phase.error.get("stage") == protocol.STAGE_CHECK:
        return phase.error
    return None


async def _search(job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, search: Phase, exit: Exit
                  ) -> tuple[dict[int, Trial], dict[str, Any] | None, bool, bool]:
    """Read the Optuna search's trials, then rerun the selected prm `repeats - 1` times with other seeds."""
    req = job.request
    trials = dict(search.trials)
    err = search.error
    if err is None and search.done is None:
        err = exit_failure(exit, protocol.STAGE_TRAIN) or failure(
            protocol.STAGE_TRAIN, protocol.KIND_SANDBOX,
            "The sandbox ended with exit code 0 before the runner reported its result: does the model call "
            "sys.exit() or os._exit()? Remove that and submit again.", log_tail=exit.log_tail[-LOG_TAIL_CHARS:])
    if search.first_step_at is not None:
        job.first_step_at = search.first_step_at
    timed_out = exit.timed_out or any(t.error and t.error.get("kind") == protocol.KIND_TIMEOUT
                                      for t in trials.values())
    if search.done is not None and err is None and len(trials) < req.n_trials:
        timed_out = True  # the runner ended the search early: the next trial's first segment did not fit
    for t in trials.values():
        if t.status == "running":
            t.status = "timed_out" if exit.timed_out else "failed"
    if err and err.get("kind") == protocol.KIND_TIMEOUT:
        err = None  # a timeout is the job's status, not an error of the code
    best = _select(trials)
    if best is not None and req.repeats > 1:
        await _archive_weights(job, paths, best)
    for repeat in range(1, req.repeats):
        if best is None or exit.cancelled or job.remaining() < 2:
            timed_out = timed_out or (best is not None and job.remaining() < 2)
            break
        rerun = Phase(job, paths, prepared)
        budget = job.remaining()
        fixed = {k: v for k, v in best.prm.items() if k != "epoch"}
        exit = await rerun.run(_spec(job, paths, prepared, "train", budget, fixed_prm=fixed, n_trials=1,
                                     seed=req.seed + repeat), budget + KILL_GRACE_S)
        for t in rerun.trials.values():
            t.trial = 1000 * repeat + t.trial
            if t.status == "running":
                t.status = "timed_out" if exit.timed_out else "failed"
            trials[t.trial] = t
        timed_out = timed_out or exit.timed_out
    return trials, err, timed_out, exit.cancelled


def _select(trials: dict[int, Trial]) -> Trial | None:
    """The trial Optuna would pick: best validation accuracy; finished trials before cut ones."""
    scored = [t for t in trials.values() if t.points and t.trial < 1000]
    if not scored:
        return None
    return max(scored, key=lambda t: (t.status == "succeeded", t.best_val, -t.trial))


def _runs(job: Job, prepared: datasets.PreparedDataset, trials: dict[int, Trial], isolation: dict[str, Any]
          ) -> tuple[list[Run], Trial | None]:
    req = job.request
    selected = _select(trials)
    runs = []
    for t in sorted(trials.values(), key=lambda t: t.trial):
        repeat, trial_no = divmod(t.trial, 1000)
        prm = {**t.prm, "epoch": req.epochs}
        runs.append(Run(
            uid=f"{job.job_id}:t{t.trial}", task=req.task, dataset=req.dataset, metric=req.metric,
            status=t.status if t.status in ("succeeded", "failed", "pruned", "timed_out") else "failed",
            source="evaluator", prm=prm, transform=prm.get("transform"), seed=req.seed + repeat,
            device="cuda" if job.gpu is not None else "cpu", dataset_hash=prepared.content_hash,
            job_id=job.job_id, trial=trial_no, repeat=repeat, selected=t is selected, isolation=isolation,
            error=t.error, points=t.points, train_samples=req.max_train_samples and min(
                req.max_train_samples, prepared.n_train), test_samples=prepared.n_test))
    return runs, selected


def _failed_run(job: Job, prepared: datasets.PreparedDataset | None, err: dict[str, Any],
                isolation: dict[str, Any] | None) -> Run:
    req = job.request
    return Run(uid=f"{job.job_id}:check", task=req.task, dataset=req.dataset, metric=req.metric,
               status="timed_out" if err["kind"] == protocol.KIND_TIMEOUT else "failed", source="evaluator",
               prm=dict(req.prm), transform=req.prm.get("transform"), seed=req.seed, job_id=job.job_id,
               dataset_hash=prepared.content_hash if prepared else None, isolation=isolation,
               error={k: v for k, v in err.items() if k in ("stage", "kind", "message")})


async def _duplicates(store: ZooStore, model: Model) -> dict[str, list[str]]:
    same_code = [m["name"] for m in await store.models_by_hash(codehash.code_hash(model.code))]
    same_arch = []
    if model.fingerprint:
        same_arch = [m["name"] for m in await store.models_by_fingerprint(model.fingerprint)
                     if m["name"] != model.name]
    return {"same_code": same_code[:20], "same_architecture": same_arch[:20]}


async def _finish(job: Job, model: Model, runs: list[Run], err: dict[str, Any] | None, status: str,
                  base: dict[str, Any], weights: tuple[Trial | None, tuple[str, int, str] | None] | None = None
                  ) -> Outcome:
    """Archive (one transaction) unless this is a dry check, and shape the outcome."""
    if job.kind == "submit":
        with anyio.CancelScope(shield=True):
            model_id, written = await job.store.add_model_with_runs(model, runs)
            existing = await job.store.model_by_name(model.name)
            if existing and existing.get("params") is None and model.params is not None:
                await job.store.update_model_stats(model.name, params=model.params, flops=model.flops,
                                                   fingerprint=model.fingerprint)
            if weights and weights[1] is not None and weights[0] is not None:
                sha, size, rel = weights[1]
                index = [i for i, r in enumerate(runs) if r.selected]
                if index:
                    await job.store.set_weights(written[index[0]][0], sha, size, rel)
                    base["weights"] = {"sha256": sha, "size": size}
        base["runs_archived"] = len(runs)
        base["resubmission"] = bool(base.get("duplicates", {}).get("same_code"))
    if err is not None:
        err = {**err}
        err.setdefault("stage", protocol.STAGE_TRAIN)
    return Outcome(status, base, err)


def _int(value: Any) -> int | None:
    return int(value) if is_number(value) and 0 <= value < 2**62 else None


def _finite(value: float) -> float | None:
    return value if value > float("-inf") else None
