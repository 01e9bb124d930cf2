"""One sandbox run (the check, the search, or one repeat) and what the host makes of its events.

Trust boundary: the runner's events are hints. Every event is applied defensively (a malformed one is
dropped, never fatal); accuracies are computed here from the test predictions the sandbox wrote (test
labels never enter it), and the training time it reports is clamped to what the host saw.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from lemur_agent_server.evaluator import diagnose, hostload, jobfiles, oom_retry
from sandbox import datasets, protocol
from sandbox.backend import Exit, Handle, JobPaths, Limits
from sandbox.protocol import FailureKind, RunStatus, Stage, TrialStatus
from zoo.records import Point, accuracy_to_time, is_number

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.pipeline import Job

log = logging.getLogger(__name__)

LOG_TAIL_CHARS = 4000
MIN_TRAIN_SHARE = 0.5  # the least share of the host-observed trial time counted as training (see trusted_duration)
PROGRESS_AGAIN_S = 0.6  # just over the queue's progress throttle (0.5 s): a long evaluation is shown
RUNNING = TrialStatus.RUNNING  # a trial the host saw start and not (yet) end


def failure(stage: str, kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "kind": kind, "message": message, **extra}


@dataclasses.dataclass
class Trial:
    """One trial as the host saw it; `repeat` 0 is the search, 1.. the reruns of the selected prm."""

    trial: int
    prm: dict[str, Any] = dataclasses.field(default_factory=dict)
    points: list[Point] = dataclasses.field(default_factory=list)
    status: str = RUNNING  # RUNNING, then a RunStatus
    error: dict[str, Any] | None = None
    weights: str | None = None
    archived: tuple[str, int, str] | None = None  # (sha256, size, path in the weights store) once copied
    weights_error: str | None = None
    onnx: str | None = None  # out/ path of its ONNX export (the `onnx` event), then `onnx_archived`
    onnx_archived: tuple[str, int, str] | None = None
    onnx_error: str | None = None  # why there is no ONNX file (the runner's reason, or the host's)
    # what the runner said of it: exporter (dynamo | torchscript), seconds, fallback_from (the errors before)
    onnx_detail: dict[str, Any] = dataclasses.field(default_factory=dict)
    started_at: float = dataclasses.field(default_factory=time.monotonic)
    repeat: int = 0
    eval_s: float = 0.0  # seconds the runner spent in evaluation passes (its own count: a hint)
    warmup_s: float = 0.0  # the job's first optimizer step, kept out of duration_ns
    train_accuracy: dict[float, float] = dataclasses.field(default_factory=dict)  # by epoch, where learn() said
    pruned: str | None = None  # why the trial was pruned, when it was

    @property
    def best_val(self) -> float:
        vals = [p.val_accuracy for p in self.points if p.val_accuracy is not None]
        return max(vals) if vals else float("-inf")

    @property
    def running(self) -> bool:
        return self.status == RUNNING

    def end_unreported(self, timed_out: bool, cancelled: bool = False) -> None:
        """A trial the runner never ended: the job was cancelled, the sandbox was killed (timed out) or
        died (failed)."""
        if not self.running:
            return
        if cancelled:
            self.status = RunStatus.CANCELLED
            self.error = failure(Stage.TRAIN, FailureKind.CANCELLED, "Cancelled by request while this trial ran.")
        else:
            self.status = RunStatus.TIMED_OUT if timed_out else RunStatus.FAILED


def select(trials: list[Trial]) -> Trial | None:
    """The search trial the job reports and archives weights of (`protocol.selection_rank`)."""
    scored = [t for t in trials if t.points and t.repeat == 0]
    return protocol.select_trial(scored, lambda t: (t.status == RunStatus.SUCCEEDED, _finite(t.best_val), t.trial))


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


def known_kind(kind: Any) -> str:
    return kind if kind in protocol.FAILURE_KINDS else FailureKind.EXCEPTION


def exit_failure(exit: Exit, stage: str) -> dict[str, Any] | None:
    """A failure read from how the sandbox ended, when the runner said nothing (or could not)."""
    tail = exit.log_tail[-LOG_TAIL_CHARS:]
    if exit.cancelled:
        return failure(stage, FailureKind.CANCELLED, "Cancelled by request.", log_tail=tail)
    if exit.timed_out:
        return failure(stage, FailureKind.TIMEOUT, f"Killed after {exit.wall_s:.1f} s: the time budget ran out.",
                       log_tail=tail)
    if exit.oom_killed:
        return failure(stage, FailureKind.OOM, "Killed by the sandbox's memory limit. Use a smaller model "
                       "or batch.", log_tail=tail)
    if exit.exit_code != 0:
        how = f"signal {exit.signal}" if exit.signal else f"exit code {exit.exit_code}"
        return failure(stage, FailureKind.SANDBOX, f"The sandbox ended with {how} without reporting an error.",
                       log_tail=tail)
    return None


def _onnx_detail(event: dict[str, Any]) -> dict[str, Any]:
    """The `onnx` event's description of a made file, bounded (the runner's words are untrusted)."""
    fallback = event.get("fallback_from")
    return {"exporter": str(event.get("exporter") or "")[:40] or None,
            "seconds": float(event["seconds"]) if is_number(event.get("seconds")) else None,
            "fallback_from": [str(e)[:600] for e in fallback[:4]] if isinstance(fallback, list) and fallback else None}


def _finite(value: float) -> float | None:
    return value if value > float("-inf") else None


class Phase:
    """One sandbox run (check or train) and what it reported."""

    def __init__(self, job: Job, paths: JobPaths, prepared: datasets.PreparedDataset, repeat: int = 0,
                 on_ended: Callable[[Trial], Awaitable[None]] | None = None):
        self.job = job
        self.on_ended = on_ended  # called once per trial the runner ends (the pipeline archives it at once)
        self.paths = paths
        self.prepared = prepared
        self.repeat = repeat
        self.check: dict[str, Any] | None = None
        self.ready: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.done: dict[str, Any] | None = None
        self.first_step_at: float | None = None
        self.evaluating: tuple[int, float] | None = None  # (trial, epoch) of the evaluation pass running now
        self.host: dict[str, Any] | None = None  # hostload.between() around the run
        self._tasks: anyio.abc.TaskGroup | None = None  # the run's task group (cancelled when the sandbox ends)
        self.trials: dict[int, Trial] = {}
        self.exit: Exit | None = None
        self.test_labels = prepared.test_labels
        self.chance = prepared.info.chance
        self.handle: Handle | None = None
        request = job.request
        self.max_points = math.ceil(request.epochs / request.eval_every) + 1
        self._handlers: dict[Any, Callable[[dict[str, Any]], Awaitable[None] | None]] = {
            protocol.EVENT_READY: self._on_ready, protocol.EVENT_CHECK: self._on_check,
            protocol.EVENT_ERROR: self._on_error, protocol.EVENT_FIRST_STEP: self._on_first_step,
            protocol.EVENT_TRIAL_START: self._on_trial_start, protocol.EVENT_POINT: self._on_point_event,
            protocol.EVENT_TRIAL_END: self._on_trial_end, protocol.EVENT_DONE: self._on_done,
            protocol.EVENT_TRIAL_RETRY: self._on_trial_retry,
            protocol.EVENT_ONNX: self._on_onnx,
            protocol.EVENT_EVALUATING: self._on_evaluating,
        }

    async def run(self, spec: protocol.JobSpec, wall_s: float) -> Exit:
        limits = Limits(wall_s=max(1.0, wall_s), memory_bytes=self.job.memory_bytes, cpus=float(self.job.threads),
                        gpu=self.job.gpu)
        await anyio.to_thread.run_sync(jobfiles.reset_out_dir, self.paths)
        jobfiles.write_spec(self.paths, spec)
        before = hostload.sample()
        handle = self.handle = await self.job.backend.start(self.paths, limits)
        if self.job.prewarm is not None:
            self.job.prewarm(self.paths.data_dir, limits)
        try:
            async with anyio.create_task_group() as tg:
                async def watch_cancel() -> None:
                    await self.job.cancelled.wait()
                    await handle.cancel()

                tg.start_soon(watch_cancel)
                self._tasks = tg
                async for event in handle.events():
                    await self.on_event(event)
                self.exit = await handle.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await handle.cancel()
                if self.exit is None:
                    self.exit = await handle.wait()
                self.host = hostload.between(before, hostload.sample())
        if self.exit.out_exceeded:  # whatever the code reported after that, this is why it stopped
            stage = Stage.CHECK if self.check is None else Stage.TRAIN
            self.error = failure(stage, FailureKind.SANDBOX, self.exit.out_exceeded)
        return self.exit

    async def on_event(self, event: dict[str, Any]) -> None:
        """Apply one event; a malformed one (wrong types, impossible numbers) is dropped, never fatal."""
        try:
            await self._apply(event)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
            log.info("job %s: dropped a malformed %r event: %s", self.job.job_id, event.get("event"), exc)

    async def _apply(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is not None:
            pending = handler(event)
            if pending is not None:
                await pending

    # --- one handler per event; each keeps the first of the events the runner sends once ---
    def _on_ready(self, event: dict[str, Any]) -> None:
        if self.ready is None:
            self.ready = event

    def _on_check(self, event: dict[str, Any]) -> None:
        if self.check is None:  # the runner checks once, before any trial
            self.check = event

    def _on_error(self, event: dict[str, Any]) -> None:
        if self.error is None:
            self.error = diagnose.explain(failure(
                str(event.get("stage") or Stage.TRAIN), known_kind(event.get("kind")),
                str(event.get("message", ""))[:2000], traceback=str(event.get("traceback", ""))[-LOG_TAIL_CHARS:]),
                self.job.request.code)

    def _on_first_step(self, event: dict[str, Any]) -> None:
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def _on_done(self, event: dict[str, Any]) -> None:
        self.done = event

    def _on_onnx(self, event: dict[str, Any]) -> None:
        """The export of an ended search trial: its file (checked when archived) or why there is none."""
        trial = self.trials.get(int(event.get("trial", -1)))
        if trial is None or trial.running or trial.onnx is not None or trial.onnx_error is not None:
            return
        if isinstance(event.get("file"), str):
            trial.onnx = event["file"]
            trial.onnx_detail = _onnx_detail(event)
        else:
            trial.onnx_error = str(event.get("error") or "the sandbox exported no ONNX file")[:2000]

    async def _on_trial_start(self, event: dict[str, Any]) -> None:
        number = int(event.get("trial", len(self.trials)))
        if number in self.trials or len(self.trials) >= self.job.request.n_trials:
            return  # a forged or repeated start: the runner starts each trial once
        # started no earlier than the host's last look that did not see this event
        seen_after = self.handle.written_after if self.handle is not None else 0.0
        self.trials[number] = Trial(trial=number, prm=dict(event.get("prm") or {}),
                                    started_at=seen_after or time.monotonic(), repeat=self.repeat)
        await self.job.progress(Stage.TRAIN, self.progress())

    def _on_trial_retry(self, event: dict[str, Any]) -> None:
        trial = self.trials.get(int(event.get("trial", -1)))
        if trial is not None:  # the runner halved a batch after running out of memory (see oom_retry)
            oom_retry.apply_retry(trial, event)

    async def _on_point_event(self, event: dict[str, Any]) -> None:
        self.on_point(event)
        self.evaluating = None
        await self.job.progress(Stage.TRAIN, self.progress())

    async def _on_evaluating(self, event: dict[str, Any]) -> None:
        trial = self.trials.get(int(event.get("trial", -1)))
        epoch = float(event["epoch"])
        if trial is None or not trial.running or not 0 < epoch <= self.job.request.epochs + 1e-6:
            return
        self.evaluating = (trial.trial, epoch)
        await self.job.progress(Stage.TRAIN, self.progress())
        if self._tasks is not None:  # the queue writes progress at most every 0.5 s: say it again after that
            self._tasks.start_soon(self._still_evaluating, self.evaluating)

    async def _still_evaluating(self, evaluating: tuple[int, float]) -> None:
        await anyio.sleep(PROGRESS_AGAIN_S)
        if self.evaluating == evaluating:
            await self.job.progress(Stage.TRAIN, self.progress())

    async def _on_trial_end(self, event: dict[str, Any]) -> None:
        trial = self.trials.get(int(event.get("trial", -1)))
        if trial is None or not trial.running:
            return
        self._end_trial(trial, event)
        trial.eval_s = _seconds(event.get("eval_s"), time.monotonic() - trial.started_at)
        trial.warmup_s = _seconds(event.get("warmup_s"), time.monotonic() - trial.started_at)
        if trial.status == RunStatus.PRUNED:
            trial.pruned = _pruned_reason(trial, list(self.trials.values()))
        if self.on_ended is not None:
            await self.on_ended(trial)

    @staticmethod
    def _end_trial(trial: Trial, event: dict[str, Any]) -> None:
        trial.status = TrialStatus.reported(str(event.get("status", TrialStatus.FAILED)))
        if event.get("error"):
            err = event["error"] if isinstance(event["error"], dict) else {"message": str(event["error"])}
            trial.error = failure(Stage.TRAIN, known_kind(err.get("kind")), str(err.get("message", ""))[:2000])
        if isinstance(event.get("weights"), str):
            trial.weights = event["weights"]

    def on_point(self, event: dict[str, Any]) -> None:
        trial = self.trials.get(int(event.get("trial", -1)))
        if trial is None or not trial.running or len(trial.points) >= self.max_points:
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
            trial.status = RunStatus.FAILED
            trial.error = failure(Stage.EVALUATE, FailureKind.SHAPE, f"Bad predictions: {exc}")
            return
        accuracy = float(np.mean(preds == self.test_labels)) if n_test else None
        duration = trusted_duration(event.get("train_ns"), int((time.monotonic() - trial.started_at) * 1e9))
        val = event.get("val_accuracy")
        loss = event.get("loss")
        train_acc = event.get("train_accuracy")
        if is_number(train_acc) and 0 <= train_acc <= 1:
            trial.train_accuracy[epoch] = float(train_acc)
        trial.points.append(Point(
            epoch=epoch, accuracy=accuracy,
            val_accuracy=float(val) if is_number(val) and 0 <= val <= 1 else None,
            loss=float(loss) if is_number(loss) else None,
            duration_ns=duration, accuracy_to_time=accuracy_to_time(accuracy, self.chance, duration),
            elapsed_s=time.monotonic() - trial.started_at, train_accuracy=trial.train_accuracy.get(epoch)))

    def progress(self) -> dict[str, Any]:
        current = max(self.trials.values(), key=lambda t: t.trial) if self.trials else None
        last = current.points[-1] if current and current.points else None
        best = max((t.best_val for t in self.trials.values()), default=float("-inf"))
        evaluating = self.evaluating if current and self.evaluating and self.evaluating[0] == current.trial else None
        step = {"step": f"evaluating epoch {evaluating[1]:g}"} if evaluating else {}
        return {**step, "trial": current.trial if current else None, "n_trials": self.job.request.n_trials,
                "epoch": evaluating[1] if evaluating else last.epoch if last else 0.0,
                "epochs": self.job.request.epochs,
                "val_accuracy": last.val_accuracy if last else None,
                "best_val_accuracy": _finite(best),
                "elapsed_s": round(time.monotonic() - self.job.started, 2),
                "time_budget_s": self.job.request.time_budget_s}


def _seconds(value: Any, at_most: float) -> float:
    """A duration the runner reported, clamped into [0, what the host saw]."""
    return round(min(max(float(value), 0.0), max(at_most, 0.0)), 4) if is_number(value) else 0.0


def _pruned_reason(trial: Trial, trials: list[Trial]) -> str:
    """Why a trial was pruned: the runner's own reason (the time budget), else Optuna's median rule."""
    if trial.error and trial.error.get("message"):
        return f"time budget: {trial.error['message']}"
    if not trial.points:
        return "pruned before its first learning-curve point"
    last = trial.points[-1]
    others = sorted(p.val_accuracy for t in trials if t is not trial and t.repeat == trial.repeat
                    for p in t.points if p.epoch == last.epoch and p.val_accuracy is not None)
    median = f" below the median {others[len(others) // 2]:.4f} of the other trials there" if others else ""
    val = f"{last.val_accuracy:.4f}" if last.val_accuracy is not None else "none"
    return (f"median pruner at epoch {last.epoch:g}: validation accuracy {val}{median}; the search spent the "
            "rest of its trials on more promising hyperparameters")
