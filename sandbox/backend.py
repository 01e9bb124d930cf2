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
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from sandbox import protocol

EVENTS_CHUNK = 1 << 20
OUT_ENTRIES_CAP = 10_000  # files and directories in out/: predictions, checkpoints, events are a few dozen
OUT_WATCH_S = 0.2
MAX_EVENT_LINE = 256 << 10  # the runner's largest event (an error with its traceback) is far smaller


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
    out_exceeded: str | None = None  # why the out/ watchdog killed the sandbox (see OutDirWatch)


class Handle(abc.ABC):
    """A running sandbox."""

    paths: JobPaths
    # host monotonic time before which none of the events being yielded now had been written (the last
    # read that found nothing new): a bound the sandbox cannot forge, for timing from the outside
    written_after: float = 0.0

    @abc.abstractmethod
    async def wait(self) -> Exit:
        """Wait until the sandbox ends (or the wall clock kills it) and release its resources."""

    @abc.abstractmethod
    async def cancel(self) -> None:
        """Kill the sandbox now (every process in it). Idempotent."""

    async def events(self, poll_s: float = 0.05) -> AsyncIterator[dict[str, Any]]:
        """Yield the runner's events as they are appended to out/events.jsonl, until the sandbox ends.

        The file is written by untrusted code, so reading it must never stall the server: lines are
        parsed in a worker thread a chunk at a time with a checkpoint between chunks, lines that are not
        JSON objects with an `event` name are dropped there, and a line longer than `MAX_EVENT_LINE` is
        skipped whole. The file is opened without following links.
        """
        path = self.paths.out_dir / protocol.EVENTS_FILE
        reader = _LineReader()
        offset = 0
        done = False
        caught_up = time.monotonic()  # the last read that found nothing new
        while True:
            read_at = time.monotonic()
            chunk = _read_from(path, offset, EVENTS_CHUNK)
            if not chunk:
                caught_up = read_at
            else:
                self.written_after = caught_up
                offset += len(chunk)
                lines = reader.feed(chunk)
                if len(lines) > 32:  # a burst: json.loads of a whole chunk would hold the loop
                    parsed = await anyio.to_thread.run_sync(_parse_events, lines)
                else:
                    parsed = _parse_events(lines)
                for event in parsed:
                    yield event
                await anyio.lowlevel.checkpoint()
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


class LogTail:
    """The last `cap` bytes of a sandbox's stdout+stderr; `truncated` once more than that came.

    Why a cap: the output is the submission's, so it can be gigabytes; only its end (where the
    traceback is) is kept for the result.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.truncated = False
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._buf += chunk
        if len(self._buf) > self.cap:
            del self._buf[: len(self._buf) - self.cap]
            self.truncated = True

    def text(self) -> str:
        return bytes(self._buf).decode("utf-8", errors="replace")


class MonitoredHandle(Handle):
    """A sandbox owned by a daemon monitor thread (both backends): the thread sets `_exit`, then
    `_done` once everything of the job is released; `_request(reason)` asks for a kill from any thread.
    The thread keeps the output's tail in `_log` (`_feed_log`, capped at `Limits.log_cap_bytes`).

    Why threads: a blocking wait on a process or the engine must never run on the server's loop.
    """

    _done: threading.Event
    _exit: Exit | None
    _limits: Limits
    _log: LogTail

    def _feed_log(self, chunk: bytes) -> None:
        """Keep the output's tail (the last `Limits.log_cap_bytes`)."""
        self._log.feed(chunk)

    def _tail(self) -> str:
        return self._log.text()

    @abc.abstractmethod
    def _request(self, reason: str) -> None:
        """Record why ("timeout" | "cancel" | "disk"; the first reason wins) and kill. May block."""

    def finished(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> Exit:
        """Wait for the end. If the awaiting task is cancelled, the sandbox is killed and released first."""
        try:
            await self._until_done()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._request, "cancel")
                await self._until_done()
            raise
        assert self._exit is not None
        return self._exit

    async def cancel(self) -> None:
        """Kill everything now and return once nothing of the job is left. Idempotent."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._request, "cancel")
            await self._until_done()

    async def _until_done(self) -> None:
        delay = 0.002
        while not self._done.is_set():
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _out_dir_watch(self) -> OutDirWatch:
        """The out/ cap for this sandbox (started by the subclass once its monitor runs)."""
        return OutDirWatch(self.paths.out_dir, self._limits, lambda: self._request("disk"), self.finished)


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


class _LineReader:
    """Splits a byte stream into lines, dropping any line longer than MAX_EVENT_LINE whole."""

    def __init__(self) -> None:
        self.buf = b""
        self.skipping = False  # inside an overlong line: drop bytes up to its newline

    def feed(self, chunk: bytes) -> list[bytes]:
        *lines, self.buf = (self.buf + chunk).split(b"\n")
        if self.skipping and lines:
            lines = lines[1:]  # the end of the overlong line
            self.skipping = False
        if len(self.buf) > MAX_EVENT_LINE:
            self.buf = b""
            self.skipping = True
        return [line for line in lines if len(line) <= MAX_EVENT_LINE]


def _parse_events(lines: list[bytes]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        if not line.lstrip().startswith(b"{"):
            continue  # an event is an object: arrays (deeply nested ones too) are never parsed
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: `{"a": [[[[...` nested past the stack
            continue
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            events.append(obj)
    return events


def out_usage(out_dir: Path, max_entries: int) -> tuple[int, int]:
    """Disk bytes really allocated (st_blocks, so sparse files count what they use) and the number of
    entries under `out_dir`, links not followed; stops counting entries past `max_entries`."""
    used, entries = 0, 0
    stack = [str(out_dir)]
    while stack and entries <= max_entries:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    used += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return used, entries


def out_cap_text(limits: Limits | None = None) -> str:
    """How out/ is capped, for the `isolation` record of both backends (the same mechanism in each)."""
    cap = "Limits.out_cap_bytes" if limits is None else f"{limits.out_cap_bytes} bytes"
    return (f"each file <= {cap} (RLIMIT_FSIZE); out/ in all <= {cap} and <= {OUT_ENTRIES_CAP} entries, "
            f"watched by the host every {OUT_WATCH_S} s and once more after the sandbox ends")


class OutDirWatch:
    """Kills a sandbox whose out/ grows past `Limits.out_cap_bytes` in all or past OUT_ENTRIES_CAP entries.

    Why from the host: RLIMIT_FSIZE caps each file, not their number, so without this a submission
    could fill the host's disk with many capped files. The overshoot is bounded by what it can write
    in one OUT_WATCH_S interval.
    """

    def __init__(self, out_dir: Path, limits: Limits, kill: Callable[[], None], finished: Callable[[], bool]):
        self.out_dir = out_dir
        self.cap = limits.out_cap_bytes
        self.exceeded: str | None = None
        self._kill = kill
        self._finished = finished
        self._thread = threading.Thread(target=self._run, name="lemur-sbx-out-watch", daemon=True)

    def start(self) -> OutDirWatch:
        self._thread.start()
        return self

    def over_cap(self) -> str | None:
        """Why out/ is over its caps now, or None. Also the handles' last look after the sandbox ended,
        so that a burst written between two looks is caught before the host reads any output."""
        if self.exceeded is not None:
            return self.exceeded
        used, entries = out_usage(self.out_dir, OUT_ENTRIES_CAP)
        if used <= self.cap and entries <= OUT_ENTRIES_CAP:
            return None
        what = f"more than {OUT_ENTRIES_CAP} files" if entries > OUT_ENTRIES_CAP else f"{used >> 20} MiB"
        self.exceeded = (f"The job wrote {what} to out/, over its cap of {self.cap >> 20} MiB and "
                         f"{OUT_ENTRIES_CAP} files, and was stopped. Keep checkpoints and files written from "
                         "learn() small.")
        return self.exceeded

    def check(self) -> bool:
        """One look; True (and the sandbox killed) when out/ is over its caps."""
        if self.over_cap() is None:
            return False
        self._kill()
        return True

    def _run(self) -> None:
        while not self._finished():
            try:
                if self.check():
                    return
            except Exception:  # noqa: BLE001 - a failed look is retried; the wall clock still applies
                pass
            time.sleep(OUT_WATCH_S)
