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

# --- failure kinds (shared by host and runner) ------------------------------------------------------
KIND_SYNTAX = "syntax"
KIND_CONTRACT = "contract"
KIND_SHAPE = "shape"
KIND_EXCEPTION = "exception"
KIND_NAN_LOSS = "nan_loss"
KIND_OOM = "out_of_memory"
KIND_TIMEOUT = "timeout"
KIND_SANDBOX = "sandbox"
FAILURE_KINDS = (
    KIND_SYNTAX, KIND_CONTRACT, KIND_SHAPE, KIND_EXCEPTION, KIND_NAN_LOSS, KIND_OOM, KIND_TIMEOUT,
    KIND_SANDBOX,
)

# --- stages -----------------------------------------------------------------------------------------
STAGE_CHECK = "checking"
STAGE_TRAIN = "training"
STAGE_EVALUATE = "evaluating"

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
