"""What a job returns: its status, a typed result, the error.

Why typed: the result grows in stages (static checks, the sandbox's check, the search, the archive);
each stage fills its own part here instead of adding keys to one shared dict. `as_dict` gives the
JSON shape the queue stores and every door shows (only the parts a job reached).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Outcome:
    status: str  # a JobStatus: succeeded | failed | timed_out | cancelled
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # the job's row already holds this end (written in the archive's transaction), or its claim was lost:
    # the queue writes nothing more
    recorded: bool = False


@dataclasses.dataclass
class CheckStats:
    """What the sandbox's check measured of the model."""

    params: int | None
    flops: int | None
    fingerprint: str | None
    in_shape: Any
    out_shape: Any
    layers: list[dict[str, Any]] | None = None  # the heaviest modules: name, type, out_shape, params, flops
    speed: dict[str, Any] | None = None  # check_model only: epoch_s and eval_pass_s measured in the sandbox


@dataclasses.dataclass
class Selection:
    """The selected trial's last learning-curve point: the job's score."""

    accuracy: float | None
    accuracy_to_time: float | None
    duration_ns: int | None
    epochs: float
    selected_trial: int
    prm: dict[str, Any]
    val_accuracy: float | None


@dataclasses.dataclass
class Archived:
    """What the archive transaction wrote (submissions only)."""

    runs_archived: int
    resubmission: bool
    weights: dict[str, Any] | None = None  # {sha256, size} of the selected trial's weights


@dataclasses.dataclass
class JobResult:
    model_name: str
    code_quality: float | None
    code_quality_detail: dict[str, Any]
    isolation: dict[str, Any] | None = None  # set once a sandbox ran
    check: CheckStats | None = None
    duplicates: dict[str, list[str]] | None = None
    selection: Selection | None = None
    trials: list[dict[str, Any]] | None = None  # one summary per trial, search and repeats
    weights_error: str | None = None
    archived: Archived | None = None
    timing: dict[str, Any] | None = None  # train/eval/warm-up seconds and the host's load (flags.timing)
    flags: list[dict[str, str]] | None = None  # what a researcher would remark, each with why and next_step
    curve: list[dict[str, Any]] | None = None  # the selected trial's points: accuracy, training loss and accuracy

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model_name": self.model_name, "code_quality": self.code_quality,
                               "code_quality_detail": self.code_quality_detail}
        if self.isolation is not None:
            out["isolation"] = self.isolation
        for part in (self.check, self.selection):
            if part is not None:
                out.update(dataclasses.asdict(part))
        optional = {"duplicates": self.duplicates, "trials": self.trials, "weights_error": self.weights_error,
                    "timing": self.timing, "flags": self.flags, "curve": self.curve}
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.archived is not None:
            if self.archived.weights is not None:
                out["weights"] = self.archived.weights
            out.update(runs_archived=self.archived.runs_archived, resubmission=self.archived.resubmission)
        return out
