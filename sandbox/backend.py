"""The isolation-backend interface: start a runner on a prepared job directory, stream its events,
cancel it, collect how it ended.

Why an interface: the evaluator (`lemur_agent_server.evaluator`) must not care whether the untrusted
code runs in a local process with namespaces and rlimits (`sandbox.process_backend`) or in a locked
down container (`sandbox.docker_backend`). Both backends run the same runner (`python -m
sandbox.runner <spec.json>`) over the same file protocol (`sandbox.protocol`), and both report the
isolation they really achieved, so every result can state it.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from sandbox import protocol


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits for one sandbox. The wall clock is enforced from outside (kill)."""

    wall_s: float
    memory_bytes: int = 4 << 30
    cpus: float = 1.0
    pids: int = 256
    log_cap_bytes: int = 64 << 10  # stdout+stderr kept (the tail), the rest discarded
    out_cap_bytes: int = 512 << 20  # total size of files the sandbox may write to out/
    gpu: str | None = None  # a device id ("0") or None for CPU only


@dataclasses.dataclass
class JobPaths:
    """Host-side paths of one job. `data_dir` holds train_x/train_y/test_x only (never test labels)."""

    job_dir: Path
    data_dir: Path

    @property
    def in_dir(self) -> Path:
        return self.job_dir / "in"

    @property
    def out_dir(self) -> Path:
        return self.job_dir / "out"


@dataclasses.dataclass
class Exit:
    """How a sandbox ended, read from outside (never from what the sandbox says about itself)."""

    exit_code: int | None
    timed_out: bool = False
    cancelled: bool = False
    oom_killed: bool = False
    signal: int | None = None
    log_tail: str = ""
    log_truncated: bool = False
    wall_s: float = 0.0
    isolation: dict[str, Any] = dataclasses.field(default_factory=dict)


class Handle(abc.ABC):
    """A running sandbox."""

    paths: JobPaths

    @abc.abstractmethod
    async def wait(self) -> Exit:
        """Wait until the sandbox ends (or the wall clock kills it) and release its resources."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Kill the sandbox now (every process in it). Idempotent."""

    async def events(self, poll_s: float = 0.05) -> AsyncIterator[dict[str, Any]]:
        """Yield the runner's events as they are appended to out/events.jsonl, until the sandbox ends.

        Lines that are not JSON objects are skipped (the file is written by untrusted code); the file
        is opened without following links and read at most `Limits.out_cap_bytes` far.
        """
        path = self.paths.out_dir / protocol.EVENTS_FILE
        offset = 0
        buf = b""
        done = False
        while True:
            chunk = _read_from(path, offset, 1 << 20)
            if chunk:
                offset += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    event = _parse_event(line)
                    if event is not None:
                        yield event
                continue
            if done:
                return
            if self.finished():
                done = True  # one more read after the end, then stop
                continue
            await anyio.sleep(poll_s)

    @abc.abstractmethod
    def finished(self) -> bool:
        """True once the sandbox's processes have ended."""


@dataclasses.dataclass(frozen=True)
class RunnerPaths:
    """Where the runner sees the job's files (written into spec.json by the evaluator)."""

    spec: str
    model: str
    data_dir: str
    out_dir: str


class Backend(abc.ABC):
    """A way to run the runner in isolation."""

    name: str

    @abc.abstractmethod
    def runner_paths(self, paths: JobPaths) -> RunnerPaths:
        """The paths of in/spec.json, in/model.py, the data dir and out/ as seen inside the sandbox."""

    @abc.abstractmethod
    async def start(self, paths: JobPaths, limits: Limits) -> Handle:
        """Start `python -m sandbox.runner` on `paths.in_dir/spec.json`. Returns at once."""

    def describe(self) -> dict[str, Any]:
        """What isolation this backend provides on this machine (for results and `list_catalog`)."""
        return {"backend": self.name}

    async def cleanup_orphans(self) -> int:
        """Remove sandboxes left behind by a previous server process. Returns how many."""
        return 0

    async def aclose(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release pre-started sandboxes and other resources."""


def _read_from(path: Path, offset: int, size: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        import stat as _stat

        if not _stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _parse_event(line: bytes) -> dict[str, Any] | None:
    if len(line) > 1 << 20:
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("event"), str):
        return obj
    return None
