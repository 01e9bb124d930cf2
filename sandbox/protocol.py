"""The contract between the server (host) and the runner inside a sandbox.

Why a file protocol: the same runner must work in a local process and in a Docker container, where
the only channels we control are a read-only input directory and one writable output directory.
Everything the runner writes is *untrusted* (the submitted model runs in the same interpreter and can
forge any of it), so the host treats events as hints and computes every score itself from
predictions it validates (`sandbox.outputs`). Test labels never enter the sandbox.

Layout of one job directory on the host (mounted at the same relative places in a container):

    <job>/in/model.py       the submitted code (read-only)
    <job>/in/spec.json      a `JobSpec` (read-only)
    <data>/                 dataset arrays (read-only): train_x.npy, train_y.npy, test_x.npy
    <job>/out/              the only writable place:
        events.jsonl        one JSON object a line, see EVENT_* below
        preds/t{trial}_e{epoch}.npy   int16 predicted class per test image, shape (N_test,)
        weights/t{trial}.safetensors  state_dict of the trial's model at its end

This module is imported by the runner as well, so it uses the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
from enum import StrEnum
from pathlib import Path
from typing import Any

PROTOCOL_VERSION = 1

# --- events (field "event") -------------------------------------------------------------------------
EVENT_READY = "ready"  # runner started: {device, versions{python,torch,torchvision,numpy,optuna}, import_s}
EVENT_CHECK = "check"  # model built: {params, flops, fingerprint, in_shape, out_shape, forward_s}
EVENT_TRIAL_START = "trial_start"  # {trial, prm}
EVENT_POINT = "point"  # {trial, epoch, train_ns, elapsed_s, loss, val_accuracy, preds}
EVENT_TRIAL_END = "trial_end"  # {trial, status, error?, weights?, train_ns}
EVENT_ERROR = "error"  # {stage, kind, message, traceback}
EVENT_DONE = "done"  # {best_trial}
EVENT_FIRST_STEP = "first_step"  # {trial, t_unix}: the first optimizer step of a job has finished
EVENT_ANALYZED = "analyzed"  # analyze mode, one per model: {id, ok, params, flops, fingerprint, ...} or {id, error}

# --- modes (JobSpec.mode) --------------------------------------------------------------------------
MODE_CHECK = "check"
MODE_TRAIN = "train"
MODE_ANALYZE = "analyze"  # many models, one process: build + count + fingerprint each (`JobSpec.models`)

# --- statuses, stages and failure kinds ------------------------------------------------------------
# One owner for every status string the host and the runner exchange or store. StrEnum members are
# `str`s, so they compare equal to the literals already in the zoo and serialise to them in JSON.


class JobStatus(StrEnum):
    """A job's state in the queue (`job.status`). The running states double as the stage it is in."""

    QUEUED = "queued"
    CHECKING = "checking"
    TRAINING = "training"
    EVALUATING = "evaluating"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    def is_finished(self) -> bool:
        """True once the job can no longer change (like Optuna's `TrialState.is_finished`)."""
        return self in _FINISHED_JOB

    @classmethod
    def finished(cls) -> tuple[JobStatus, ...]:
        return tuple(s for s in cls if s.is_finished())


_FINISHED_JOB = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED})


class RunStatus(StrEnum):
    """How one archived run (one trial of one repeat) ended (`run.status`)."""

    SUCCEEDED = "succeeded"
    PRUNED = "pruned"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"

    def is_failure(self) -> bool:
        return self in (RunStatus.FAILED, RunStatus.TIMED_OUT)


class TrialStatus(StrEnum):
    """How the runner reports a trial's end (`trial_end.status`); `run_status` maps it into the zoo."""

    RUNNING = "running"
    COMPLETED = "completed"
    PRUNED = "pruned"
    FAILED = "failed"

    def is_finished(self) -> bool:
        return self is not TrialStatus.RUNNING

    def run_status(self) -> RunStatus:
        return {TrialStatus.COMPLETED: RunStatus.SUCCEEDED, TrialStatus.PRUNED: RunStatus.PRUNED}.get(
            self, RunStatus.FAILED)


class Stage(StrEnum):
    """Where a job was when something happened (`error.stage`)."""

    QUEUE = "queue"
    CHECK = "checking"
    TRAIN = "training"
    EVALUATE = "evaluating"


class FailureKind(StrEnum):
    """Why a job or a trial failed (`error.kind`), shared by host and runner."""

    SYNTAX = "syntax"
    CONTRACT = "contract"
    SHAPE = "shape"
    EXCEPTION = "exception"
    NAN_LOSS = "nan_loss"
    OOM = "out_of_memory"
    TIMEOUT = "timeout"
    SANDBOX = "sandbox"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


# Older names, kept so both sides read the same members.
KIND_SYNTAX = FailureKind.SYNTAX
KIND_CONTRACT = FailureKind.CONTRACT
KIND_SHAPE = FailureKind.SHAPE
KIND_EXCEPTION = FailureKind.EXCEPTION
KIND_NAN_LOSS = FailureKind.NAN_LOSS
KIND_OOM = FailureKind.OOM
KIND_TIMEOUT = FailureKind.TIMEOUT
KIND_SANDBOX = FailureKind.SANDBOX
# the kinds a runner may report; the host adds CANCELLED and INTERRUPTED itself
FAILURE_KINDS = tuple(k for k in FailureKind if k not in (FailureKind.CANCELLED, FailureKind.INTERRUPTED))

STAGE_CHECK = Stage.CHECK
STAGE_TRAIN = Stage.TRAIN
STAGE_EVALUATE = Stage.EVALUATE

EVENTS_FILE = "events.jsonl"
SPEC_FILE = "spec.json"
MODEL_FILE = "model.py"


@dataclasses.dataclass
class JobSpec:
    """What the runner is asked to do. Written by the host as `in/spec.json`."""

    mode: str  # "check": build + one forward pass; "train": Optuna over trials
    task: str
    dataset: str
    metric: str
    num_classes: int
    image_shape: list[int]  # [C, H, W] of the stored images (before the transform's resize)
    mean: list[float]  # per channel, for [0, 1]-scaled pixels
    std: list[float]
    model_path: str  # absolute path of model.py as the runner sees it
    data_dir: str  # absolute path of the dataset arrays as the runner sees it
    out_dir: str  # absolute path of the writable output directory as the runner sees it
    fixed_prm: dict[str, Any] = dataclasses.field(default_factory=dict)
    search_space: dict[str, Any] = dataclasses.field(default_factory=dict)
    transforms: list[str] = dataclasses.field(default_factory=list)  # allowed transform names
    n_trials: int = 1
    epochs: float = 1.0
    eval_every: float = 0.5  # epochs between learning-curve points
    seed: int = 0
    val_fraction: float = 0.1
    split_seed: int = 42
    time_budget_s: float = 60.0  # the whole job; the host kills the sandbox at this + a margin
    device: str = "cpu"  # "cpu" or "cuda" (the sandbox sees at most one GPU)
    max_train_samples: int | None = None  # cap on the training split (tests use small data)
    max_test_samples: int | None = None
    threads: int = 1  # torch.set_num_threads inside the sandbox
    save_weights: bool = True
    # analyze mode: [{id, file (a name in in/), image_shape, num_classes, mean, std, transform}], one event each
    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    model_timeout_s: float = 30.0  # analyze mode: a model that takes longer is skipped (SIGALRM)
    protocol: int = PROTOCOL_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_file(cls, path: str | Path) -> JobSpec:
        raw = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def preds_name(trial: int, epoch: float) -> str:
    """File name (relative to out/) of one learning-curve point's test predictions."""
    return f"preds/t{trial}_e{epoch:g}.npy"


def weights_name(trial: int) -> str:
    return f"weights/t{trial}.safetensors"
