"""Pre-started ("warm") sandbox containers and their adoption by a job.

Why: a cold container spends seconds importing torch (and initialising CUDA) before the job's
first step. A warm container has done that already and only waits for its job's files.

Mounts are fixed when a container is created, so a warm container gets its own fresh job dir at
pre-start time: `<jobs_root>/.lemur-prestart-<random>/{in,out}`, on the same filesystem as the jobs.
The pool keeps up to `slots` warm containers (the server asks for two per evaluator slot), keyed by the
dataset dir and the limits fixed at creation (memory, cpus, pids, gpu, out/log caps). When a job's key
matches a warm container, the backend *adopts* it (`WarmPool.adopt`): the files of `paths.in_dir` (all
but spec.json) and `paths.out_dir` move into the warm dirs, the warm `in/` and `out/` are renamed into
`paths.job_dir` in place of the evaluator's (bind mounts follow a directory through a rename), and
`spec.json` moves in last, which is the signal that starts the job. The caller's `JobPaths` stay valid.
A warm container that died, or one older than `max_age_s`, is removed and the job starts cold. After
each start the pool refills itself in a background thread for the key just used.

What the process in a warm container does (`PRESTART_BOOTSTRAP`, around the unchanged one-shot runner
`python -m sandbox.runner <spec>`; the runner has no waiting mode of its own and needs none):
  1. Import numpy, torch, torchvision, optuna, safetensors; if a GPU is visible
     (`NVIDIA_VISIBLE_DEVICES` is not `void`) initialise CUDA (`torch.cuda.init()` + a tiny tensor).
     Write NOTHING under /job/out while waiting.
  2. Print one line starting with `WAIT_MARKER` to stdout (`wait_ready` looks for it).
  3. Poll for /job/in/spec.json every 5 ms. The host moves model.py in first and spec.json last
     (an atomic rename), so when spec.json exists the job's files are complete.
  4. Run the runner's `__main__` (`runpy`) on it: the runner's clock starts when its module is
     executed, so the job's time budget counts from the moment spec.json was seen, not from the
     container start.
  5. Run that one job and exit; never wait for a second one. Exit 0 without output if no spec arrives
     within $LEMUR_RUNNER_WAIT_MAX_S seconds (default 3600), or as soon as the server's heartbeat file
     in its in/ is older than HEARTBEAT_STALE_S (the server died without removing it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox._docker_common import (
    IN_DIR,
    NAME_PREFIX,
    SandboxStartError,
    docker_sdk,
    log,
    prepare_out_dir,
    remove_container,
)
from sandbox.backend import JobPaths, Limits
from sandbox.prestart_files import SLOT_PREFIX, make_slot, pool_key
from sandbox.prestart_files import move_job_into as _move_job_into
from sandbox.prestart_files import same_filesystem as _same_filesystem
from sandbox.protocol import SPEC_FILE
from sandbox.warm_ledger import CreationLedger

__all__ = ["HEARTBEAT_FILE", "PRESTART_BOOTSTRAP", "SLOT_PREFIX", "WAIT_MARKER", "Warm", "WarmPool", "discard",
           "pool_key"]
WAIT_MARKER = "lemur-runner: waiting"
_DEATHS_BEFORE_GIVING_UP = 3

PRESTART_BOOTSTRAP = r"""
import os, sys, time
spec = sys.argv[1]
import numpy, torch, torchvision, optuna, safetensors
try:
    import torch._dynamo  # what the runner imports before the first step (~1 s of CPU)
except Exception:
    pass
if os.environ.get("NVIDIA_VISIBLE_DEVICES", "void") not in ("", "void", "none") and torch.cuda.is_available():
    torch.cuda.init()
    torch.zeros(1, device="cuda")
print("lemur-runner: waiting for", spec, flush=True)
deadline = time.monotonic() + float(os.environ.get("LEMUR_RUNNER_WAIT_MAX_S", "3600"))
beat, stale_s, looked = os.path.join(os.path.dirname(spec), sys.argv[2]), float(sys.argv[3]), 0.0
while not os.path.exists(spec):
    if time.monotonic() > deadline:
        sys.exit(0)
    if time.monotonic() - looked > 1.0:  # the server touches its heartbeat file; gone or stale: it is dead
        looked = time.monotonic()
        try:
            age = time.time() - os.stat(beat).st_mtime
        except OSError:
            age = float("inf")
        if age > stale_s and not os.path.exists(spec):
            sys.exit(0)
    time.sleep(0.005)
import runpy
sys.argv = [sys.argv[0], spec]
runpy.run_module("sandbox.runner", run_name="__main__", alter_sys=True)
"""
# The server's sign of life in a warm job dir's in/ (read-only inside): touched every HEARTBEAT_EVERY_S while
# the pool runs; a warm container whose heartbeat is older than HEARTBEAT_STALE_S exits by itself, so a
# server killed without closing its pool leaves stopped containers (removed by the next server's
# cleanup_orphans), not processes that wait an hour. Removed from the job's in/ once the spec is there.
HEARTBEAT_FILE = ".lemur-alive"
HEARTBEAT_EVERY_S = 5.0
HEARTBEAT_STALE_S = 30.0


def prestart_command() -> list[str]:
    """The warm container's command (HEARTBEAT_STALE_S read now)."""
    return ["python3", "-c", PRESTART_BOOTSTRAP, f"{IN_DIR}/{SPEC_FILE}", HEARTBEAT_FILE, str(HEARTBEAT_STALE_S)]


# (in_dir, out_dir, data_dir, limits, command, name, job label, slot dir) -> (container, seconds to start)
Launch = Callable[[str, str, str, Limits, list[str], str, str, "Path | None"], tuple[Any, float]]


@dataclasses.dataclass
class Warm:
    """One pre-started container and the job dir it was created with."""

    container: Any
    key: tuple[Any, ...]
    slot: Path
    created: float
    started_s: float


class WarmPool:
    """At most `slots` warm containers, created with `launch` (the backend's locked-down container
    configuration). `enabled` turns itself off when warm containers keep dying."""

    def __init__(self, launch: Launch, *, enabled: bool, slots: int, max_age_s: float,
                 jobs_root: Path | None) -> None:
        self.enabled = enabled
        self.jobs_root = jobs_root
        self._launch = launch
        self._slots = max(1, int(slots))
        self._max_age = max_age_s
        self._pool: list[Warm] = []
        self._lock = threading.Lock()
        self._ledger = CreationLedger(self._lock)  # warm containers being created, per key
        self._filling = 0  # background creations running (close waits for them)
        self._deaths = 0
        self._beating = False
        self._closed = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._pool)

    def find(self, key: tuple[Any, ...]) -> Warm | None:
        with self._lock:
            return next((w for w in self._pool if w.key == key), None)

    # --- creating ---------------------------------------------------------------------------------------
    def create(self, data_dir: Path, limits: Limits) -> Warm | None:
        """Create one warm container with its own job dir under jobs_root and add it to the pool."""
        key = pool_key(data_dir, limits)
        with self._lock:
            self._ledger.add(key)
        return self._create_claimed(Path(data_dir), limits, key)

    def _claim(self, key: tuple[Any, ...]) -> bool:
        """Under the lock: reserve the creation of one more warm container for `key` (`CreationLedger`)."""
        in_pool = sum(1 for w in self._pool if w.key == key)
        return not self._closed and self.enabled and self._ledger.claim(key, in_pool, self._slots)

    def _create_claimed(self, data_dir: Path, limits: Limits, key: tuple[Any, ...]) -> Warm | None:
        """`create` once a creation for `key` is counted in the ledger (released here, whatever happens:
        in the same locked step that puts the container in the pool, so an `ensure` woken finds it)."""
        released = False
        try:
            if self._closed or self.jobs_root is None:
                return None
            slot = make_slot(self.jobs_root, secrets.token_hex(6))
            (slot / "in" / HEARTBEAT_FILE).touch()
            self._start_heartbeat()
            try:
                prepare_out_dir(slot / "out")
                name = f"{NAME_PREFIX}prestart-{secrets.token_hex(4)}"
                container, started_s = self._launch(str(slot / "in"), str(slot / "out"), os.path.realpath(data_dir),
                                                    limits, prestart_command(), name, "prestart", slot)
            except BaseException:
                shutil.rmtree(slot, ignore_errors=True)
                raise
            warm = Warm(container=container, key=key, slot=slot, created=time.monotonic(), started_s=started_s)
            with self._lock:
                excess = self._ledger.arrive(self._pool, warm, self._slots, self._closed)
                released = True
            for w in excess:
                discard(w)
            return None if self._closed else warm
        finally:
            if not released:
                with self._lock:
                    self._ledger.release(key)

    def ensure(self, data_dir: Path, limits: Limits, timeout_s: float = 120.0) -> Warm | None:
        """One warm container for this key: an existing one, the one being created (waited for), else a
        new one. None when the pool is closed or off, or the one in flight did not come in time."""
        key = pool_key(data_dir, limits)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                found = next((w for w in self._pool if w.key == key), None)
                if found is not None or self._closed or not self.enabled:
                    return found
                if self._claim(key):
                    break
                if not self._ledger.wait(deadline - time.monotonic()):
                    return None
        return self._create_claimed(Path(data_dir), limits, key)

    def refill_later(self, data_dir: str, limits: Limits) -> None:
        """Top the pool up to `slots` warm containers for this key, in background threads."""
        key = pool_key(data_dir, limits)
        missing = 0
        with self._lock:
            while self._claim(key):
                missing += 1
            self._filling += missing
        for _ in range(missing):
            self._fill_in_background(Path(data_dir), limits, key)

    def _fill_in_background(self, data_dir: Path, limits: Limits, key: tuple[Any, ...]) -> None:
        """Create one claimed warm container in a thread (counted in `_filling` by the caller)."""

        def fill() -> None:
            try:
                self._create_claimed(data_dir, limits, key)
            except Exception:  # the next job simply starts cold
                log.exception("pre-starting a sandbox failed")
            finally:
                with self._lock:
                    self._filling -= 1

        threading.Thread(target=fill, name="lemur-sbx-prestart", daemon=True).start()

    def wait_ready(self, warm: Warm, timeout_s: float) -> None:
        """Block until the warm container printed WAIT_MARKER (torch imported, device initialised)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                text = warm.container.logs(stdout=True, stderr=True).decode(errors="replace")
            except Exception as exc:
                raise SandboxStartError(f"pre-started container vanished: {exc}") from exc
            if WAIT_MARKER in text:
                return
            warm.container.reload()
            if warm.container.status not in ("created", "running"):
                raise SandboxStartError(f"pre-started container exited: {text[-2000:]}")
            time.sleep(0.05)
        raise SandboxStartError(f"pre-started container not ready after {timeout_s:.0f} s")

    # --- taking one ------------------------------------------------------------------------------------
    def take(self, key: tuple[Any, ...], job_dir: Path) -> Warm | None:
        """Remove and return a warm container for `key` (None when there is none); drops stale ones,
        and one whose slot is not on `job_dir`'s filesystem (the renames of `adopt` need it)."""
        if not self._pool:
            return None
        found, stale = self._pop(key)
        for warm in stale:
            discard(warm)
        if found is not None and not _same_filesystem(found.slot, job_dir):
            log.warning("warm job dir %s is not on the filesystem of %s; starting cold", found.slot, job_dir)
            discard(found)
            return None
        return found

    def _pop(self, key: tuple[Any, ...]) -> tuple[Warm | None, list[Warm]]:
        now = time.monotonic()
        stale: list[Warm] = []
        found = None
        with self._lock:
            for warm in list(self._pool):
                if now - warm.created > self._max_age:
                    self._pool.remove(warm)
                    stale.append(warm)
                elif found is None and warm.key == key:
                    self._pool.remove(warm)
                    found = warm
        return found, stale

    def adopt(self, warm: Warm, paths: JobPaths, job: str) -> tuple[float, dict[str, Any]] | None:
        """Hand the job's files to `warm` (module docstring). Returns when the job's clock started and
        the timings for `Exit.isolation`, or None when the warm container had died (it is removed:
        start the job cold)."""
        if not self._still_running(warm):
            return None
        t0 = time.monotonic()
        try:
            _move_job_into(warm.slot, paths)
        except BaseException:
            remove_container(warm.container)
            raise
        finally:
            shutil.rmtree(warm.slot, ignore_errors=True)
        with contextlib.suppress(OSError):  # the spec is there: the container no longer looks at it
            (paths.in_dir / HEARTBEAT_FILE).unlink()
        with contextlib.suppress(docker_sdk().errors.DockerException):
            warm.container.rename(f"{NAME_PREFIX}{job}-{secrets.token_hex(3)}")
        return t0, {"prestarted": True, "start_s": round(warm.started_s, 4),
                    "adopt_s": round(time.monotonic() - t0, 4), "warm_age_s": round(t0 - warm.created, 1)}

    def _still_running(self, warm: Warm) -> bool:
        docker = docker_sdk()
        try:
            warm.container.reload()
            if warm.container.status == "running":
                self._deaths = 0
                return True
        except docker.errors.DockerException:
            pass
        self._deaths += 1
        tail = ""
        with contextlib.suppress(Exception):
            tail = warm.container.logs(tail=20).decode(errors="replace")
        log.warning("a pre-started sandbox had exited; starting cold. Its log: %s", tail[-1000:])
        discard(warm)
        if self._deaths >= _DEATHS_BEFORE_GIVING_UP:
            log.error("pre-started sandboxes keep dying; pre-start is off for this backend")
            self.enabled = False
        return False

    def _start_heartbeat(self) -> None:
        """Start the thread that touches every warm job dir's heartbeat file (once per pool)."""
        with self._lock:
            if self._beating or self._closed:
                return
            self._beating = True
        threading.Thread(target=self._heartbeat, name="lemur-sbx-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._closed:
            for warm in list(self._pool):
                with contextlib.suppress(OSError):
                    os.utime(warm.slot / "in" / HEARTBEAT_FILE)
            time.sleep(HEARTBEAT_EVERY_S)

    # --- closing ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop refilling, wait (up to a minute) for pre-starts in flight, remove every warm container."""
        self._closed = True
        for _ in range(1200):  # a pre-start in flight discards its container itself once it sees _closed
            with self._lock:
                if not self._filling:
                    break
            time.sleep(0.05)
        with self._lock:
            pool, self._pool = self._pool, []
        for warm in pool:
            discard(warm)


def discard(warm: Warm) -> None:
    """Remove a warm container and its job dir."""
    remove_container(warm.container)
    shutil.rmtree(warm.slot, ignore_errors=True)
