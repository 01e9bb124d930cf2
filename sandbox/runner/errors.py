"""The one exception type that carries a protocol failure kind from wherever it happens to `__main__`.

Why one type: every failure ends the same way (an `error` event with stage, kind, message, traceback,
then a non-zero exit), so the modules only need to say *what kind* of failure it is.
"""

from __future__ import annotations

import traceback

TRACEBACK_CHARS = 4000


class RunnerFailure(Exception):
    """A failure the runner reports as an `error` event and then stops."""

    def __init__(self, kind: str, message: str, stage: str = "", tb: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.stage = stage
        self.tb = tb


def traceback_tail(exc: BaseException, limit: int = TRACEBACK_CHARS) -> str:
    """The last `limit` characters of the formatted traceback (the model's frames are at the end)."""
    text = "".join(traceback.format_exception(exc))
    return text[-limit:]


def describe(exc: BaseException) -> str:
    """`Type: message`, short enough for a one-line summary."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:500]}" if msg else type(exc).__name__


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python MemoryError, or the CPU allocator failing under an address-space rlimit."""
    import torch

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
