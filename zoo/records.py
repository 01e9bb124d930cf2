"""Plain records written to the zoo. No I/O here: the store turns them into rows."""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Any

# Model code is the largest thing in an imported zoo (LEMUR's 10,482 files: 47 MB of text, 14 MB deflated).
# With COMPRESS_CODE the writers store it zlib-deflated (a BLOB); every reader passes `model.code` through
# `code_text`, which takes both forms, so a zoo may mix them (zoos written before stay readable as they are).
COMPRESS_CODE = True
CODE_ZLIB_LEVEL = 6


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: the test for numbers that arrive from files written by
    others (LEMUR's JSON, a sandbox's events), where `True` or `NaN` must not pass as a value."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stored_code(code: str) -> str | bytes:
    """What the zoo stores in `model.code` for `code` (see COMPRESS_CODE)."""
    return zlib.compress(code.encode(), CODE_ZLIB_LEVEL) if COMPRESS_CODE else code


def code_text(stored: str | bytes | None) -> str | None:
    """The model code held in a `model.code` value: deflated bytes are inflated, text is returned as is."""
    if isinstance(stored, bytes):
        return zlib.decompress(stored).decode()
    return stored


@dataclasses.dataclass
class Point:
    """One learning-curve point: the run after `epoch` epochs (half epochs allowed)."""

    epoch: float
    accuracy: float | None
    val_accuracy: float | None = None
    loss: float | None = None
    duration_ns: int | None = None  # cumulative training-only time
    accuracy_to_time: float | None = None
    elapsed_s: float | None = None
    train_accuracy: float | None = None  # what learn() said of the segment (stored in point_train)


@dataclasses.dataclass
class Run:
    uid: str
    task: str
    dataset: str
    metric: str
    status: str
    source: str
    prm: dict[str, Any] = dataclasses.field(default_factory=dict)
    transform: str | None = None
    seed: int | None = None
    device: str | None = None
    versions: dict[str, Any] | None = None
    dataset_hash: str | None = None
    job_id: str | None = None
    trial: int | None = None
    repeat: int | None = None
    selected: bool = False
    train_samples: int | None = None
    test_samples: int | None = None
    isolation: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    points: list[Point] = dataclasses.field(default_factory=list)
    created: float = dataclasses.field(default_factory=time.time)
    # how to repeat and compare it (issue 13): None where unknown (an imported record has no precision)
    protocol: str | None = None  # default | lemur (sandbox.protocol.EVAL_PROTOCOLS)
    precision: str | None = None  # fp32 | bf16
    deterministic: bool | None = None
    environment: dict[str, Any] | None = None

    @property
    def last_point(self) -> Point | None:
        scored = [p for p in self.points if p.accuracy is not None]
        return max(scored, key=lambda p: p.epoch) if scored else None


@dataclasses.dataclass
class Model:
    name: str
    code: str
    origin: str  # seed | lemur | submitted
    prefix: str | None = None
    fingerprint: str | None = None
    params: int | None = None
    flops: int | None = None
    code_quality: float | None = None
    code_quality_detail: dict[str, Any] | None = None
    supported_hyperparameters: list[str] | None = None
    created: float = dataclasses.field(default_factory=time.time)


def accuracy_to_time(accuracy: float | None, chance: float, duration_ns: int | None) -> float | None:
    """LEMUR's accuracy-to-time, `max(0, acc - chance) / (duration_ns / 1e11)`, with training time only."""
    if accuracy is None or not duration_ns or duration_ns <= 0:
        return None
    return max(0.0, accuracy - chance) / (duration_ns / 1e11)
