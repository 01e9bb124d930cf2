"""Validated evaluation requests, shared by the MCP tools, the CLI and the Python API.

Why one model: the same argument must mean the same thing whichever door it came through, and be
checked (with an error that says how to fix it) before any job exists.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from lemur_agent_server.clip import clip
from lemur_agent_server.config import ENV_DATA, Settings
from lemur_agent_server.evaluator import protocols
from sandbox import datasets, protocol

TASK = "img-classification"
METRICS = ("acc",)
RESERVED_PRM = ("batch", "epoch", "transform")
MAX_BATCH = 2**protocol.MAX_BATCH_POWER
MAX_EPOCHS = 200
MAX_LR = 1.0  # LEMUR's range for lr, like every other hyperparameter's: (0, 1]


def canonical_dataset(value: str, names: list[str] | tuple[str, ...]) -> str:
    """The known dataset name `value` means ignoring case and '_' for '-' (`Fashion-MNIST`, `fashion_mnist`),
    when exactly one fits; else `value` unchanged (the caller's check then names the choices)."""
    if value in names:
        return value
    key = value.lower().replace("_", "-")
    fits = [n for n in names if n.lower().replace("_", "-") == key]
    return fits[0] if len(fits) == 1 else value


class EvalRequest(BaseModel):
    """What to check or train. `prm` fixes hyperparameters; the rest is searched."""

    code: str = Field(min_length=1, max_length=protocol.MAX_CODE_CHARS)
    task: str = TASK
    dataset: str
    metric: str = "acc"
    prm: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    n_trials: int = Field(default=3, ge=1, le=200)
    epochs: float = Field(default=1.0, gt=0, le=MAX_EPOCHS)
    time_budget_s: float = Field(default=300.0, ge=5, le=24 * 3600)
    eval_every: float = Field(default=0.5, gt=0, le=200)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    repeats: int = Field(default=1, ge=1, le=10)
    name_prefix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
    max_train_samples: int | None = Field(default=None, ge=16)
    # the selected trial's model with its weights as ONNX too (exported in the sandbox, archived next to the
    # safetensors); a model that cannot be exported still succeeds, with the reason as `onnx_error`
    export_onnx: bool = False
    # repeatable and comparable runs (issue 13)
    deterministic: bool | None = None  # None: on when repeats > 1 (the repeats then differ only by their seed)
    precision: Literal["fp32", "bf16"] = "fp32"
    protocol: Literal["default", "lemur"] = "default"  # evaluator.protocols.DESCRIPTIONS says what each means

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value != TASK:
            raise ValueError(f"task '{clip(value)}' is not evaluated here; use '{TASK}'. list_catalog shows the zoo's "
                             "other tasks, which can be queried but not trained.")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"metric '{clip(value)}' is not supported; use one of {list(METRICS)}.")
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        names = [i.name for i in datasets.known_datasets()]
        value = canonical_dataset(value, names)
        if value not in names:
            raise ValueError(f"unknown dataset '{clip(value)}'; choose one of {names} (list_catalog says which "
                             "are present on this server).")
        return value

    @field_validator("prm")
    @classmethod
    def _prm(cls, prm: dict[str, Any]) -> dict[str, Any]:
        for key, value in prm.items():
            problem = _prm_problem(key, value)
            if problem:
                raise ValueError(problem)
        return prm

    @field_validator("search_space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = protocol.validate_search_space(space)
        if problems:
            raise ValueError("; ".join(problems) + ". Format: " + protocol.SEARCH_SPACE_FORMAT)
        return space

    @model_validator(mode="after")
    def _consistent(self) -> EvalRequest:
        self._take_prm_epoch()
        if self.deterministic is None:
            self.deterministic = self.repeats > 1
        if self.protocol == protocols.LEMUR and "n_trials" not in self.model_fields_set:
            self.n_trials = 1  # LEMUR's check_nn trains one trial
        problem = protocols.check(self.protocol, self.n_trials)
        if problem:
            raise ValueError(problem)
        if self.eval_every > self.epochs:
            self.eval_every = self.epochs
        fixed_and_searched = set(self.prm) & set(self.search_space)
        if fixed_and_searched:
            raise ValueError(f"{sorted(fixed_and_searched)} are both fixed in prm and searched in search_space; "
                             "keep one.")
        return self

    def _take_prm_epoch(self) -> None:
        """LEMUR's prm dicts always carry `epoch`: it stands for `epochs` unless that says otherwise."""
        if "epoch" not in self.prm:
            return
        epoch = float(self.prm["epoch"])
        if "epochs" in self.model_fields_set and epoch != self.epochs:
            raise ValueError(f"prm.epoch={self.prm['epoch']!r} disagrees with epochs={self.epochs:g}; keep one: "
                             f"drop prm.epoch to train {self.epochs:g} epochs, or drop epochs (or set it to "
                             f"{epoch:g}) to train {epoch:g}.")
        self.epochs = epoch
        self.prm = {k: v for k, v in self.prm.items() if k != "epoch"}

    @property
    def info(self) -> datasets.DatasetInfo:
        return datasets.get_info(self.dataset)

    @property
    def budget(self) -> protocol.TimeBudget:
        """The job's time budget and its margins; a check job's is `budget.for_check()`."""
        return protocol.TimeBudget(self.time_budget_s)


def _prm_problem(key: str, value: Any) -> str | None:
    """What is wrong with one fixed hyperparameter, or None."""
    if key == "transform":
        if not isinstance(value, str):
            return f"prm.transform must be a transform name (list_catalog.transforms), got {clip(value)}."
        try:
            protocol.parse_transform(value)
        except ValueError as exc:  # the grammar's own message names the closest supported names
            return f"prm.transform: {clip(str(exc), 600)}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"prm.{clip(key)} must be a finite number, got {clip(value)}."
    if key == "batch":
        return None if isinstance(value, int) and 1 <= value <= MAX_BATCH else (
            f"prm.batch must be an integer in 1..{MAX_BATCH}, got {clip(value)}.")
    if key == "epoch":
        return None if 0 < value <= MAX_EPOCHS else (
            f"prm.epoch={value} must lie in (0, {MAX_EPOCHS}]; it sets the number of epochs, like `epochs`.")
    if key == "lr":
        return None if 0 < value <= MAX_LR else (
            f"prm.lr={value} must lie in (0, {MAX_LR:g}], LEMUR's learning-rate range (its search is log-uniform "
            "in [1e-5, 1]); e.g. prm.lr=0.01.")
    if not 0 <= value <= 1:
        return f"prm.{clip(key)}={value} is outside [0, 1]; LEMUR hyperparameters lie in [0, 1]."
    return None


class RequestRefused(ValueError):
    """A well-formed request this server will not take (its limits, its installed data). Every door turns
    it into its own error: a ToolError for MCP, exit code 2 for the CLI, InvalidRequestError for the API."""


def admit(request: EvalRequest, settings: Settings) -> EvalRequest:
    """The server's own limits, the same for every door (MCP tool, CLI, Python API, batch): the time
    budget under `settings.max_time_budget_s`, the dataset's files present under `settings.data_root`.
    Returns the request unchanged; raises RequestRefused saying what to change. The message names the
    dataset and how to get it, never the server's own paths (an agent cannot act on them)."""
    if request.time_budget_s > settings.max_time_budget_s:
        raise RequestRefused(f"time_budget_s={request.time_budget_s:g} exceeds this server's limit of "
                             f"{settings.max_time_budget_s:g} s; lower it (or split the work into several jobs).")
    if not datasets.available(request.dataset, settings.data_root):
        raise RequestRefused(
            f"Dataset '{request.dataset}' is not installed on this server. Choose a dataset list_catalog marks "
            "available (digits always is), or ask the operator to install it (files in torchvision layout "
            f"under the server's data root, ${ENV_DATA}: {_public_source(request.info.source)}).")
    return request


def _public_source(source: str) -> str:
    """A dataset's source text without the server's data root (it says `<data_root>` already)."""
    return source.split("; ")[0]
