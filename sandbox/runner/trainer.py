"""One Optuna trial: build the Net, train it in partial epochs, evaluate between them, save its weights.

Why partial epochs: the learning curve (accuracy after 0.5, 1.0, ... epochs) is what lets the host score
accuracy-per-time and lets Optuna prune early; LEMUR's learn() contract only knows "one epoch", so learn()
is called once per partial epoch with an iterable that covers just that share of the batches.

Accounting: `train_ns` is time spent inside learn() only (synchronised on GPU); evaluation is excluded.
Failure policy: NaN/inf loss or parameters and out-of-memory end the trial (the hyperparameters are at
fault) and the search goes on; any other exception from the model's code stops the job.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from sandbox import protocol
from sandbox.protocol import TrialStatus
from sandbox.runner import netops
from sandbox.runner.budget import Budget
from sandbox.runner.emit import Emitter
from sandbox.runner.errors import RunnerFailure, describe, traceback_tail
from sandbox.runner.loader import DeviceData, Segment, TrainStream, eval_batches
from sandbox.runner.params import Transform, parse_transform

EVAL_BATCH_MAX = 1024
EVAL_PIXELS = 256 * 32 * 32  # pixels per evaluation batch: 256 images at 32x32
# A stop inside a segment reserves the evaluation plus this much. Between the stop and the evaluation
# the model's learn() still finishes (a scheduler step, a log line after its loop), the device syncs,
# and a busy host may pause the process: without the slack, the point the stop was made for was skipped
# when that stretch cost more than the one batch left in hand (a CI failure of the budget test).
EVAL_SLACK_S = 0.25


@dataclasses.dataclass
class Job:
    """Everything a trial needs that stays the same across trials."""

    spec: protocol.JobSpec
    module: ModuleType
    data: DeviceData
    device: torch.device
    emitter: Emitter
    budget: Budget
    out_dir: Path
    first_step_done: bool = False


@dataclasses.dataclass
class TrialOutcome:
    trial: int
    status: protocol.TrialStatus
    val_accuracy: float | None
    train_ns: int
    weights: str | None = None
    error: dict[str, str] | None = None
    stop_job: bool = False  # the time budget is spent: start no further trial
    points: int = 0
    params: int | None = None  # of the built model (an out-of-memory message names it)
    eval_s: float = 0.0  # seconds of evaluation passes (not in train_ns)
    warmup_ns: int = 0  # the job's first optimizer step, kept out of train_ns

    def event_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "trial": self.trial,
            "status": self.status,
            "val_accuracy": self.val_accuracy,
            "train_ns": self.train_ns,
            "weights": self.weights,
            "points": self.points,
            "eval_s": round(self.eval_s, 4),
            "warmup_s": self.warmup_ns / 1e9,
        }
        if self.error:
            fields["error"] = self.error
        return fields


def point_schedule(epochs: float, eval_every: float, per_epoch: int) -> list[tuple[float, int]]:
    """(epoch, cumulative batch count) of each learning-curve point; the last one is at `epochs`."""
    total = max(1, round(epochs * per_epoch))
    step = eval_every if eval_every > 0 else epochs
    points: list[tuple[float, int]] = []
    j = 1
    while True:
        epoch = min(j * step, epochs)
        batches = total if epoch >= epochs else max(1, round(epoch * per_epoch))
        if points and batches == points[-1][1]:  # rounding merged two points: keep the later label
            points[-1] = (round(epoch, 6), batches)
        else:
            points.append((round(epoch, 6), batches))
        if epoch >= epochs:
            return points
        j += 1


def release_memory(device: torch.device) -> None:
    """Free the previous trial's model and optimizer (gc takes ~0.1 s, so only between trials)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16 autocast for `precision == "bf16"` (CPU and CUDA both have it), a no-op context for fp32.

    Without autocast's weight cache: one autocast region spans a whole learn() call, many optimizer
    steps, and the cache would keep serving the bf16 copies of the weights from before the first step
    (the model would not learn at all)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16",
                          cache_enabled=False)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch for a trial; returns the generator used for shuffles and flips."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class TrialRun:
    """State of one running trial (kept small: model, stream, counters)."""

    def __init__(self, job: Job, trial: int, prm: dict[str, Any], optuna_trial: Any) -> None:
        self.job = job
        self.trial = trial
        self.prm = prm
        self.optuna_trial = optuna_trial
        self.tf: Transform = parse_transform(prm["transform"], job.spec.image_shape[-1])
        self.pixels = self.tf.size * self.tf.size
        self.train_ns = 0
        self.best_val: float | None = None
        self.points = 0
        self.model: torch.nn.Module | None = None
        self.params: int | None = None
        self.warmup_ns = 0  # the job's first optimizer step (allocation, kernel choice): not training time
        self.eval_s = 0.0
        self._learn_t0 = 0

    # --- pieces -------------------------------------------------------------------------------------
    def _on_batch(self, stream: TrainStream) -> None:
        if not self.job.first_step_done and stream.batches_done >= 1:
            self._emit_first_step()

    def _emit_first_step(self) -> None:
        netops.sync(self.job.device)
        self.job.first_step_done = True
        self.warmup_ns = time.perf_counter_ns() - self._learn_t0
        self.job.emitter.emit(
            protocol.EVENT_FIRST_STEP, trial=self.trial, t_unix=time.time(), warmup_s=self.warmup_ns / 1e9
        )

    def _eval_samples(self) -> int:
        return len(self.job.data.val_x) + len(self.job.data.test_x)

    def _should_stop(self, seg_seconds: float, seg_samples: int, batch: int) -> bool:
        """Inside a segment: stop before a batch that would leave no time for it and the evaluation."""
        live_rate = seg_seconds / (seg_samples * self.pixels) if seg_samples else None
        per_batch = (live_rate or 0.0) * batch * self.pixels
        eval_s = self.job.budget.eval_estimate(self._eval_samples(), self.pixels, live_rate)
        return not self.job.budget.fits(per_batch + eval_s + EVAL_SLACK_S)

    def _learn(self, segment: Segment) -> Any:
        assert self.model is not None
        device = self.job.device
        netops.sync(device)
        t0 = self._learn_t0 = time.perf_counter_ns()
        warm = self.job.first_step_done
        try:
            with autocast(device, self.job.spec.precision):
                result = self.model.learn(segment)
        except BaseException as exc:  # model code may raise anything, SystemExit too
            if segment.truncated:  # our early end of the iterable confused the model: a timeout
                raise netops.TrialFailure(
                    protocol.KIND_TIMEOUT, "time budget reached during learn()"
                ) from exc
            raise netops.model_error(exc, protocol.STAGE_TRAIN, "learn()") from exc
        netops.sync(device)
        if not self.job.first_step_done and segment.yielded:
            self._emit_first_step()
        dt, samples = time.perf_counter_ns() - t0, segment.samples
        if not warm and self.job.first_step_done:  # this segment held the warm-up step: keep it out
            dt, samples = max(0, dt - self.warmup_ns), max(0, samples - segment.stream.batch)
        self.train_ns += dt
        self.job.budget.record_train(dt / 1e9, samples, self.pixels)
        return result

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        data, num_classes = self.job.data, int(self.job.spec.num_classes)
        # no larger than training batches for big images (memory), at least 256 small ones (speed)
        eval_batch = max(int(self.prm.get("batch", 1)), min(EVAL_BATCH_MAX, EVAL_PIXELS // self.pixels))
        preds = []
        try:
            for x in eval_batches(images, self.tf, data.mean, data.std, eval_batch):
                out = netops.check_logits(self.model(x), len(x), num_classes, protocol.STAGE_EVALUATE)
                preds.append(out.argmax(dim=1))
        except RunnerFailure:
            raise
        except BaseException as exc:
            raise netops.model_error(exc, protocol.STAGE_EVALUATE, "forward() during evaluation") from exc
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64, device=images.device)

    def _evaluate(self, epoch: float, loss: float | None, train_acc: float | None, step: int) -> float | None:
        assert self.model is not None
        job = self.job
        job.emitter.emit(protocol.EVENT_EVALUATING, trial=self.trial, epoch=epoch)
        t0 = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), autocast(job.device, job.spec.precision):
            val_pred = self._predict(job.data.val_x)
            test_pred = self._predict(job.data.test_x)
        self.model.train()
        # no validation split (protocol "lemur"): no validation accuracy, nothing to select or prune on
        val_acc = int((val_pred == job.data.val_y).sum()) / len(val_pred) if len(val_pred) else None
        rel = protocol.preds_name(self.trial, epoch)
        np.save(job.out_dir / rel, test_pred.to("cpu", torch.int16).numpy(), allow_pickle=False)
        eval_s = time.perf_counter() - t0
        self.eval_s += eval_s
        job.budget.record_eval(eval_s, self._eval_samples(), self.pixels)
        self.points += 1
        if val_acc is not None:
            self.best_val = val_acc if self.best_val is None else max(self.best_val, val_acc)
        job.emitter.emit(
            protocol.EVENT_POINT,
            trial=self.trial,
            epoch=epoch,
            train_ns=self.train_ns,
            elapsed_s=round(job.emitter.elapsed(), 4),
            loss=loss,
            train_accuracy=train_acc,
            val_accuracy=val_acc,
            preds=rel,
            step=step,
            eval_s=round(eval_s, 4),
            warmup_s=self.warmup_ns / 1e9,
        )
        if self.optuna_trial is not None and val_acc is not None:
            self.optuna_trial.report(val_acc, step)
        return val_acc

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> TrialOutcome:
        """Train and evaluate; returns how the trial ended. Raises RunnerFailure to stop the job."""
        generator = seed_everything(int(self.job.spec.seed) + self.trial)
        try:
            return self._run(generator)
        except netops.TrialFailure as fail:
            status = TrialStatus.PRUNED if fail.kind == protocol.KIND_TIMEOUT else TrialStatus.FAILED
            return self._outcome(
                status,
                {"kind": fail.kind, "message": fail.message},
                stop_job=fail.kind == protocol.KIND_TIMEOUT,
                save=status == TrialStatus.PRUNED,
            )
        finally:
            self.model = None  # freed by release_memory() before the next trial, not on the clock here

    def _run(self, generator: torch.Generator) -> TrialOutcome:
        job, spec = self.job, self.job.spec
        in_shape = (1, int(spec.image_shape[0]), self.tf.size, self.tf.size)
        self.model = netops.build_net(
            job.module, in_shape, (int(spec.num_classes),), self.prm, job.device, protocol.STAGE_TRAIN
        )
        self.params = netops.count_params(self.model)[0]
        try:
            self.model.train()
            self.model.train_setup(dict(self.prm))
        except BaseException as exc:
            raise netops.model_error(exc, protocol.STAGE_TRAIN, "train_setup()") from exc
        stream = TrainStream(job.data, int(self.prm["batch"]), self.tf, generator)
        done_batches = 0
        schedule = point_schedule(float(spec.epochs), float(spec.eval_every), stream.per_epoch)
        for step, (epoch, upto) in enumerate(schedule):
            n_batches = upto - done_batches
            samples = n_batches * stream.batch
            estimate = job.budget.train_estimate(samples, self.pixels)
            eval_s = job.budget.eval_estimate(self._eval_samples(), self.pixels)
            if estimate is not None and not job.budget.fits(estimate + eval_s):
                return self._timeout(self._forecast(epoch - done_batches / stream.per_epoch, estimate, eval_s))
            segment = Segment(
                stream,
                n_batches,
                should_stop=lambda s, n, b=stream.batch: self._should_stop(s, n, b),
                on_batch=lambda _i, st=stream: self._on_batch(st),
                clock=job.budget.now,
            )
            loss, train_acc = netops.parse_learn_result(self._learn(segment))
            done_batches += segment.yielded
            if netops.is_nan(loss) or not netops.params_finite(self.model):
                what = (
                    f"learn() returned loss {loss}" if netops.is_nan(loss) else "a parameter became NaN/inf"
                )
                return self._outcome(
                    TrialStatus.FAILED,
                    {"kind": protocol.KIND_NAN_LOSS, "message": f"{what} at epoch {epoch:g}; lower lr?"},
                )
            if segment.truncated:
                return self._truncated(done_batches / stream.per_epoch, upto - done_batches, stream, loss,
                                       train_acc, step)
            self._evaluate(epoch, loss, train_acc, step)
            last = step == len(schedule) - 1  # a finished trial is completed, whatever the pruner says
            if not last and self.optuna_trial is not None and self.optuna_trial.should_prune():
                return self._outcome(TrialStatus.PRUNED, None)
        return self._outcome(TrialStatus.COMPLETED, None)

    def _forecast(self, share: float, train_s: float, eval_s: float) -> str:
        """Why the budget stops a trial here: what the next stretch would cost against what is left."""
        return (
            f"the next {round(share, 4):g} epoch would take ~{train_s:.1f}s + {eval_s:.1f}s evaluation; "
            f"{max(self.job.budget.remaining(), 0):.1f}s were left"
        )

    def _truncated(
        self, epoch: float, batches_left: int, stream: TrainStream, loss: float | None,
        train_acc: float | None, step: int,
    ) -> TrialOutcome:
        """The budget ran out inside a segment: keep a point at the fraction reached if evaluation fits."""
        epoch = round(epoch, 4)
        eval_s = self.job.budget.eval_estimate(self._eval_samples(), self.pixels)
        message = self._forecast(
            batches_left / stream.per_epoch,
            self.job.budget.train_estimate(batches_left * stream.batch, self.pixels) or 0.0,
            eval_s,
        )
        if epoch > 0 and self.job.budget.fits(eval_s):
            self._evaluate(epoch, loss, train_acc, step)
        return self._timeout(f"{message} (stopped after {epoch:g} epochs)")

    def _timeout(self, message: str) -> TrialOutcome:
        return self._outcome(
            TrialStatus.PRUNED, {"kind": protocol.KIND_TIMEOUT, "message": message}, stop_job=True
        )

    def _outcome(
        self, status: protocol.TrialStatus, error: dict[str, str] | None, stop_job: bool = False, save: bool = True
    ) -> TrialOutcome:
        weights = None
        ok = status != TrialStatus.FAILED and save
        if ok and self.job.spec.save_weights and self.model is not None and self.points:
            weights = protocol.weights_name(self.trial)
            try:
                netops.save_weights(self.model, self.job.out_dir / weights)
            except Exception as exc:  # noqa: BLE001 - odd state_dicts must not lose the trial
                weights = None
                self.job.emitter.emit(
                    "warning",
                    trial=self.trial,
                    message=f"weights not saved: {describe(exc)}",
                    traceback=traceback_tail(exc, 1000),
                )
        return TrialOutcome(
            trial=self.trial,
            status=status,
            val_accuracy=self.best_val,
            train_ns=self.train_ns,
            weights=weights,
            error=error,
            stop_job=stop_job,
            points=self.points,
            params=self.params,
            eval_s=self.eval_s,
            warmup_ns=self.warmup_ns,
        )
