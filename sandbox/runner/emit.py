"""Append-only JSON-lines event writer for `out/events.jsonl`.

Why flush after every line: the host tails the file while the runner works (progress, the first step,
learning-curve points) and may kill the sandbox at any moment; whatever was emitted before must be on
disk. Non-finite floats become null because `NaN` is not JSON and the host parses strictly.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, TextIO

from sandbox import protocol


def _clean(value: Any) -> Any:
    """Make `value` strict-JSON: NaN/inf -> None, numpy/torch scalars -> Python, tuples -> lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_clean(v) for v in items]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _clean(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


class Emitter:
    """Writes one event per line; every event carries `t` (unix time) and `elapsed_s` since start."""

    def __init__(self, out_dir: Path, started: float) -> None:
        self.started = started  # time.monotonic() at runner start
        self._file: TextIO = open(Path(out_dir) / protocol.EVENTS_FILE, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the job

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def emit(self, event: str, **fields: Any) -> None:
        record = {"event": event, "t": time.time(), "elapsed_s": round(self.elapsed(), 4)}
        record.update(fields)
        line = json.dumps(_clean(record), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()
        if event in (protocol.EVENT_DONE, protocol.EVENT_ERROR):  # the last words before exiting
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
