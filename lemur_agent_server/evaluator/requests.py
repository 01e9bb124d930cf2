"""Validated evaluation requests, shared by the MCP tools, the CLI and the Python API.

Why one model: the same argument must mean the same thing whichever door it came through, and be
checked (with an error that says how to fix it) before any job exists.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from sandbox import datasets

TASK = "img-classification"
METRICS = ("acc",)
RESERVED_PRM = ("batch", "epoch", "transform")
MAX_BATCH = 4096


class EvalRequest(BaseModel):
    """What to check or train. `prm` fixes hyperparameters; the rest is searched."""

    code: str = Field(min_length=1, max_length=400_000)
    task: str = TASK
    dataset: str
    metric: str = "acc"
    prm: dict[str, Any] = Field(default_factory=dict)
    search_space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    n_trials: int = Field(default=3, ge=1, le=200)
    epochs: float = Field(default=1.0, gt=0, le=200)
    time_budget_s: float = Field(default=300.0, ge=5, le=24 * 3600)
    eval_every: float = Field(default=0.5, gt=0, le=200)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    repeats: int = Field(default=1, ge=1, le=10)
    name_prefix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*$")
    max_train_samples: int | None = Field(default=None, ge=16)

    @field_validator("task")
    @classmethod
    def _task(cls, value: str) -> str:
        if value != TASK:
            raise ValueError(f"task '{value}' is not evaluated here; use '{TASK}'. list_catalog shows the zoo's "
                             "other tasks, which can be queried but not trained.")
        return value

    @field_validator("metric")
    @classmethod
    def _metric(cls, value: str) -> str:
        if value not in METRICS:
            raise ValueError(f"metric '{value}' is not supported; use one of {list(METRICS)}.")
        return value

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        names = [i.name for i in datasets.known_datasets()]
        if value not in names:
            raise ValueError(f"unknown dataset '{value}'; choose one of {names} (list_catalog says which "
                             "are present on this server).")
        return value

    @field_validator("prm")
    @classmethod
    def _prm(cls, prm: dict[str, Any]) -> dict[str, Any]:
        for key, value in prm.items():
            if key == "transform":
                if value not in datasets.TRANSFORMS:
                    raise ValueError(f"prm.transform '{value}' is not allowed; choose one of {datasets.TRANSFORMS}.")
            elif key == "batch":
                if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BATCH:
                    raise ValueError(f"prm.batch must be an integer in 1..{MAX_BATCH}, got {value!r}.")
            elif key == "epoch":
                raise ValueError("prm.epoch is set from `epochs`; remove it from prm.")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"prm.{key} must be a finite number, got {value!r}.")
            elif not 0 <= value <= 1 and key != "lr":
                raise ValueError(f"prm.{key}={value} is outside [0, 1]; LEMUR hyperparameters lie in [0, 1].")
            elif key == "lr" and not 0 < value <= 10:
                raise ValueError(f"prm.lr={value} must lie in (0, 10].")
        return prm

    @field_validator("search_space")
    @classmethod
    def _space(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in space.items():
            if "choices" in spec:
                if not isinstance(spec["choices"], list) or not spec["choices"]:
                    raise ValueError(f"search_space.{key}.choices must be a non-empty list.")
            elif {"low", "high"} <= spec.keys():
                low, high = spec["low"], spec["high"]
                if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
                    raise ValueError(f"search_space.{key} needs numbers low < high, got {low!r}, {high!r}.")
                if spec.get("log") and low <= 0:
                    raise ValueError(f"search_space.{key}: a log range needs low > 0.")
            else:
                raise ValueError(f"search_space.{key} must be {{'low': x, 'high': y, 'log': bool}} or "
                                 "{'choices': [...]}.")
        return space

    @model_validator(mode="after")
    def _consistent(self) -> EvalRequest:
        if self.eval_every > self.epochs:
            self.eval_every = self.epochs
        fixed_and_searched = set(self.prm) & set(self.search_space)
        if fixed_and_searched:
            raise ValueError(f"{sorted(fixed_and_searched)} are both fixed in prm and searched in search_space; "
                             "keep one.")
        return self

    @property
    def info(self) -> datasets.DatasetInfo:
        return datasets.get_info(self.dataset)
