"""The contract between the server (host) and the runner inside a sandbox.

Why a file protocol: the same runner must work in a local process and in a Docker container, where
the only channels we control are a read-only input directory and one writable output directory.
Everything the runner writes is *untrusted* (the submitted model runs in the same interpreter and can
forge any of it), so the host treats events as hints and computes every score itself from
predictions it validates (`lemur_agent_server.evaluator.jobfiles`). Test labels never enter the sandbox.

What lives here, so that the two sides cannot drift: the events and file names below, every status,
stage and failure kind, the transform grammar (`parse_transform`), the search-space format and its one
validator (`validate_search_space`), the rule that selects a trial (`selection_rank`), the code size
cap (`MAX_CODE_CHARS`) and the time budget's arithmetic (`TimeBudget`).

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
import difflib
import json
import math
from collections.abc import Callable, Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

PROTOCOL_VERSION = 1
MAX_CODE_CHARS = 400_000  # the largest model file accepted, by every door and by the static checks

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

    @classmethod
    def reported(cls, value: Any) -> RunStatus:
        """The run status of a `trial_end.status` as the runner reported it (untrusted): an unknown
        value, or a trial still running, counts as failed."""
        if value == RunStatus.SUCCEEDED:  # a runner may say "succeeded" for completed
            return RunStatus.SUCCEEDED
        try:
            return cls(value).run_status()
        except ValueError:
            return RunStatus.FAILED


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
    export_onnx: bool = False  # train mode: after the search, the selected trial as ONNX (EVENT_ONNX)
    protocol: int = PROTOCOL_VERSION
    # repeatable and comparable runs (issue 13); appended, so a spec without them reads as before
    deterministic: bool = False  # deterministic algorithms, cuDNN benchmark off (seeding is always on)
    precision: str = "fp32"  # one of PRECISIONS: bf16 autocasts learn() and the evaluation passes
    eval_protocol: str = "default"  # one of EVAL_PROTOCOLS: "lemur" trains on the whole train split

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


# --- transforms (LEMUR names) -----------------------------------------------------------------------
# Grammar: `<kind>[_<size>][_<flag>...]`, e.g. norm_32, echo_224_flip, complex_64, norm (no size: the
# dataset's own size, as LEMUR's `norm`, `norm_flip`), plus a few whole names LEMUR's records use that do
# not fit the grammar (TRANSFORM_NAMED). A new kind, size, flag or named recipe is one entry in the
# tables below; every name list (catalog, defaults, validation) and every description is derived from them.


@dataclasses.dataclass(frozen=True)
class TransformKind:
    """What a grammar kind does to the [0, 1]-scaled pixels after the resize."""

    normalize: bool  # subtract the dataset's mean, divide by its std
    complex: bool  # hand the model complex64 tensors (imaginary part 0), as LEMUR's complex* do


TRANSFORM_KINDS: dict[str, TransformKind] = {
    "norm": TransformKind(normalize=True, complex=False),
    "echo": TransformKind(normalize=False, complex=False),
    "complex": TransformKind(normalize=False, complex=True),
}
TRANSFORM_SIZES = (32, 64, 128, 224, 256, 299, 512)  # square side the images are resized to
TRANSFORM_FLAGS = ("flip",)  # flip: random horizontal flips of training batches
FIT_RESIZE, FIT_PAD = "resize", "pad"  # how images reach `size`: bilinear resize, or zero padding


@dataclasses.dataclass(frozen=True)
class Transform:
    """A LEMUR transform name decoded into the steps the runner applies, in this order, to uint8 images
    scaled to [0, 1]: crop (random in training, centred in evaluation), symmetric pad, fit to
    `size` x `size` (resize, or zero-pad right/bottom), random horizontal flip (training only),
    normalisation, complex64 conversion. `size` is the side the model sees (None: the dataset's own,
    when parsed without it)."""

    name: str
    size: int | None
    normalize: bool
    flip: bool
    complex: bool = False
    flip_p: float = 0.5  # probability of a flip per training image
    crop: int | None = None  # square crop side (clamped to the image), before the pad and the fit
    pad: int = 0  # symmetric padding (edge pixels mirrored) on every side, after the crop
    fit: str = FIT_RESIZE

    def side(self, native: int) -> int:
        """The square side images have after this transform, for a dataset whose images are `native` wide."""
        return self.size if self.size is not None else int(native)

    @property
    def searched_by_default(self) -> bool:
        """Whether a job may search this name without being asked to: only plain resize/flip/normalise
        names; complex input or crops change what a model must accept, so they are used only when named."""
        return not self.complex and self.crop is None and self.pad == 0 and self.fit == FIT_RESIZE


# Whole names from LEMUR's records (>= 500 image-classification records each), decoded by hand from what
# LEMUR's transform files do; sizes fixed, whatever the dataset.
TRANSFORM_NAMED: dict[str, Transform] = {
    "soft_pad": Transform(name="soft_pad", size=800, normalize=False, flip=False, fit=FIT_PAD),
    "bf-v1-RandomCrop_Pad_RandomHorizontalFlip": Transform(
        name="bf-v1-RandomCrop_Pad_RandomHorizontalFlip", size=64, normalize=True, flip=True, flip_p=0.64,
        crop=29, pad=1),
}


def transform_names() -> list[str]:
    """Every transform name the grammar accepts: sized ones kind by kind, size by size, plain before
    flipped, then the sizeless ones, then the named recipes."""
    flags = ("", *(f"_{f}" for f in TRANSFORM_FLAGS))
    sized = [f"{kind}_{size}{flag}" for kind in TRANSFORM_KINDS for size in TRANSFORM_SIZES for flag in flags]
    return sized + [f"{kind}{flag}" for kind in TRANSFORM_KINDS for flag in flags] + list(TRANSFORM_NAMED)


def parse_transform(name: Any, native_size: int | None = None) -> Transform:
    """Decode a transform name; raises ValueError saying what the grammar accepts. A sizeless name gets
    `native_size` (the dataset's image side) as its size when given."""
    if isinstance(name, str) and name in TRANSFORM_NAMED:
        return TRANSFORM_NAMED[name]
    parts = str(name).split("_")
    flags = set()
    while len(parts) > 1 and parts[-1] in TRANSFORM_FLAGS and parts[-1] not in flags:
        flags.add(parts.pop())
    sized = len(parts) == 2 and parts[1].isdigit() and int(parts[1]) in TRANSFORM_SIZES
    if (len(parts) not in (1, 2) or parts[0] not in TRANSFORM_KINDS or (len(parts) == 2 and not sized)
            or str(name) != "_".join([*parts, *sorted(flags)])):
        close = difflib.get_close_matches(str(name), transform_names(), n=3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown transform {name!r} (expected {'|'.join(TRANSFORM_KINDS)}[_<size>][_flip] with "
                         f"size in {TRANSFORM_SIZES}, e.g. norm_32, norm_32_flip, or norm for the dataset's own "
                         f"size; or one of {', '.join(TRANSFORM_NAMED)}{hint})")
    size = int(parts[1]) if sized else native_size
    kind = TRANSFORM_KINDS[parts[0]]
    return Transform(name=str(name), size=size, normalize=kind.normalize, flip="flip" in flags,
                     complex=kind.complex)


def describe_transform(name: str) -> str:
    """What transform `name` does, in one line for the catalog (derived from its decoded steps, so the
    text cannot drift from what the runner does). Raises ValueError like parse_transform."""
    tf = parse_transform(name)
    steps = []
    if tf.crop is not None:
        steps.append(f"random {tf.crop}x{tf.crop} crop of training images, centred in evaluation (no crop of "
                     "smaller images)")
    if tf.pad:
        steps.append(f"mirror-pad {tf.pad} pixel{'s' if tf.pad > 1 else ''} on each side")
    if tf.size is None:
        steps.append("keep the dataset's own size")
    elif tf.fit == FIT_PAD:
        steps.append(f"zero-pad right and bottom to {tf.size}x{tf.size} (larger images are resized down)")
    else:
        steps.append(f"resize to {tf.size}x{tf.size}")
    if tf.flip:
        steps.append(f"flip training images horizontally with probability {tf.flip_p:g}")
    steps.append("normalise with the dataset's mean/std" if tf.normalize else "pixels in [0, 1], not normalised")
    if tf.complex:
        steps.append("as complex64 (imaginary part 0) for complex-valued nets")
    return "; ".join(steps)


def transform_catalog() -> dict[str, str]:
    """Every supported transform name -> what it does (describe_transform), in transform_names() order."""
    return {name: describe_transform(name) for name in transform_names()}


# --- search space -----------------------------------------------------------------------------------
BATCH_POWERS = (4, 8)  # default batch sizes 2^4..2^8
MAX_BATCH_POWER = 12  # 2^12 = 4096, the largest batch a request may fix or search
SEARCH_SPACE_FORMAT = """\
search_space: one entry per hyperparameter to search instead of LEMUR's default range; names the
model does not declare are ignored (batch and transform apply to every model), and a name fixed in prm
cannot be searched too. Each entry is one of:
  {"low": a, "high": b}              float range, uniform, with a < b (to fix a value, put it in prm)
  {"low": a, "high": b, "log": true} log-uniform, with 0 < a < b
  {"choices": [v1, v2, ...]}         categorical: a non-empty list of numbers (strings for transform,
                                     which must be valid transform names; positive integers for batch)
  {"min_power": m, "max_power": n}   batch only: the sizes 2^m..2^n, integers 0 <= m <= n <= 12
epoch cannot be searched (set `epochs`)."""


def validate_search_space(space: Any) -> list[str]:
    """Problems with a `search_space` (empty when valid), checked by the host before any job exists and
    again by the runner. The format (`SEARCH_SPACE_FORMAT`, quoted by the submit tool's description):

    - {"low": a, "high": b[, "log": true]}: a float range with a < b (and a > 0 when log);
    - {"choices": [...]}: a non-empty list of numbers; for `transform`, valid transform names; for
      `batch`, positive integers up to 2^MAX_BATCH_POWER;
    - batch only: {"min_power": m, "max_power": n}, the sizes 2^m..2^n, 0 <= m <= n <= MAX_BATCH_POWER;
    - `epoch` is never searched: it is the request's `epochs`.
    """
    if not isinstance(space, dict):
        return ["search_space must be an object mapping hyperparameter names to ranges or choices"]
    problems: list[str] = []
    for name, entry in space.items():
        problems += _entry_problems(str(name), entry)
    return problems


def _entry_problems(name: str, entry: Any) -> list[str]:
    if name == "epoch":
        return ["epoch: the number of epochs is not searched; set `epochs` instead"]
    if not isinstance(entry, dict):
        return [f"{name}: expected an object like {{'low': .., 'high': ..}} or {{'choices': [..]}}"]
    if name == "batch" and ("min_power" in entry or "max_power" in entry):
        return _powers_problems(entry)
    if "choices" in entry:
        return _choices_problems(name, entry["choices"])
    if "low" in entry and "high" in entry:
        return _range_problems(name, entry["low"], entry["high"], bool(entry.get("log", False)))
    return [f"{name}: give 'low' and 'high' (and optional 'log') or 'choices'"]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _powers_problems(entry: dict[str, Any]) -> list[str]:
    lo, hi = entry.get("min_power", BATCH_POWERS[0]), entry.get("max_power", BATCH_POWERS[1])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) and 0 <= lo <= hi <= MAX_BATCH_POWER:
        return []
    return [f"batch: need integers 0 <= min_power <= max_power <= {MAX_BATCH_POWER}, got {lo!r}, {hi!r}"]


def _choices_problems(name: str, choices: Any) -> list[str]:
    if not isinstance(choices, list) or not choices:
        return [f"{name}: 'choices' must be a non-empty list"]
    if name == "transform":
        problems = []
        for choice in choices:
            try:
                parse_transform(choice)
            except ValueError as exc:
                problems.append(f"transform: {exc}")
        return problems
    if name == "batch":
        ok = all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 2**MAX_BATCH_POWER for c in choices)
        return [] if ok else [f"batch: choices must be integers in 1..{2**MAX_BATCH_POWER}, got {choices!r}"]
    if all(_is_number(c) for c in choices):
        return []
    return [f"{name}: choices must be finite numbers, got {choices!r}"]


def _range_problems(name: str, low: Any, high: Any, log: bool) -> list[str]:
    if not (_is_number(low) and _is_number(high) and low < high):
        return [f"{name}: need numbers low < high, got {low!r}, {high!r} (to fix one value, put it in prm)"]
    if log and low <= 0:
        return [f"{name}: a log range needs low > 0"]
    return []


# --- selecting a trial ------------------------------------------------------------------------------
T = TypeVar("T")


def selection_rank(finished: bool, best_val_accuracy: float | None, trial: int) -> tuple[bool, float, int]:
    """The order trials are selected in (larger is better), on both sides: a trial that finished before
    one cut short (pruned, timed out), then the best validation accuracy, then the earliest trial. The
    host archives the selected trial as the job's result; the runner keeps only its weights file."""
    return (finished, best_val_accuracy if best_val_accuracy is not None else float("-inf"), -trial)


def select_trial(candidates: Iterable[T], rank: Callable[[T], tuple[bool, float | None, int]]) -> T | None:
    """The best of `candidates` by `selection_rank`; `rank` says (finished, best val accuracy, number)."""
    return max(candidates, key=lambda c: selection_rank(*rank(c)), default=None)


# --- the time budget --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TimeBudget:
    """A job's `time_budget_s` and every margin around it, in one place.

    The clock starts when the server starts the job (claims it from the queue), so the sandbox's
    start-up counts; inside the sandbox the runner counts from its own start. A check job gets at most
    `CHECK_S` of it. The runner stops on its own `runner_end` seconds after its start (a share and a
    fixed margin early, to save weights and report); the host kills the sandbox `KILL_GRACE_S` after
    the budget (`kill_after`), and a backend waits at most `STOP_GRACE_S` more for a killed sandbox to
    be gone (an engine's own latency, not the job's compute).
    """

    budget_s: float

    CHECK_S = 120.0  # a check (build + one forward pass) never needs more
    KILL_GRACE_S = 5.0  # the runner's own stop beat the kill by this much, or the kill comes
    STOP_GRACE_S = 30.0  # after a kill request: how long a backend waits for the sandbox to stop
    RUNNER_SAFETY_SHARE = 0.05  # of the budget: the runner stops this much early ...
    RUNNER_SAFETY_S = 0.3  # ... plus this (saving weights, writing events, process exit)
    MIN_S = 1.0  # the least budget a sandbox is ever started with

    def for_check(self) -> TimeBudget:
        """The budget of a check-only job."""
        return TimeBudget(min(self.budget_s, self.CHECK_S))

    def sandbox_s(self, remaining_s: float) -> float:
        """The budget written into a spec when `remaining_s` of the job's clock is left."""
        return max(self.MIN_S, remaining_s)

    def kill_after(self, remaining_s: float) -> float:
        """The wall-clock limit handed to the backend for a sandbox started with `remaining_s` left."""
        return max(self.MIN_S, remaining_s + self.KILL_GRACE_S)

    def runner_end(self) -> float:
        """Seconds after the runner's start at which it stops starting or continuing work."""
        return self.budget_s * (1 - self.RUNNER_SAFETY_SHARE) - self.RUNNER_SAFETY_S

# --- appended (oomdedup): a trial retried with half the batch after running out of memory ---------
# {trial, reason: "out_of_memory", from_batch, to_batch, prm, message}: the same trial number starts over
# with `prm` (only `batch` differs); its `trial_end` then carries `oom_retry: {from_batch, to_batch}`.
EVENT_TRIAL_RETRY = "trial_retry"

# --- calibrate mode (sandbox/runner/calibrate.py; host side lemur_agent_server/evaluator/calibration.py) ---
MODE_CALIBRATE = "calibrate"  # time the fixed reference workload on the sandbox's device; no model, no data
EVENT_CALIBRATED = "calibrated"  # {workload_version, steps, repeats, batch, times_ns: [ns per timed block], threads}

# --- ONNX export (train mode with JobSpec.export_onnx) ----------------------------------------------
# After the search the runner rebuilds the trial whose weights it kept, loads them and exports it with
# torch's ONNX exporter; then one EVENT_ONNX: {trial, file, exporter, bytes, seconds} or {trial, error}.
# The job never fails for it: an export that cannot be made is only an `error` text in that event.
EVENT_ONNX = "onnx"


def onnx_name(trial: int) -> str:
    """File name (relative to out/) of a trial's exported ONNX model."""
    return f"onnx/t{trial}.onnx"


# (agentview) the runner starts an evaluation pass: {trial, epoch}; progress shows that epoch while it runs
EVENT_EVALUATING = "evaluating"


def unknown_prm_message(unknown: list[str], declared: list[str]) -> str:
    """(agentview) Why fixed prm keys the model does not declare are refused: the check (in the sandbox) and
    the host's static check (when supported_hyperparameters() returns a literal) say it the same way."""
    one = len(unknown) == 1
    known = sorted(declared) + ["batch", "epoch", "transform"]
    return (f"prm {unknown} {'is not a hyperparameter' if one else 'are not hyperparameters'} of this model; its "
            f"supported_hyperparameters() declares {sorted(declared)}, and batch, epoch, transform are always known "
            f"(so prm may hold {known}). Remove {unknown} from prm, or add {'it' if one else 'them'} to "
            f"supported_hyperparameters() and read {'it' if one else 'them'} from prm in the Net.")

# --- repeatable and comparable runs (issue 13) --------------------------------------------------------
PRECISIONS = ("fp32", "bf16")
# default: the trial selected on a validation split carved from train (JobSpec.val_fraction, split_seed),
# scored by its test accuracy; lemur: LEMUR's check_nn, trained on the whole train split, no validation,
# test accuracy after the last epoch
EVAL_PROTOCOLS = ("default", "lemur")
