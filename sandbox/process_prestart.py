"""Pre-started ("warm") process sandboxes and their adoption by a job.

Why: a cold process sandbox spends most of a small job's fixed cost inside itself, importing torch,
torchvision, optuna and torch._dynamo before the job's first step. A warm sandbox is the SAME chain
as a cold one (`ProcessBackend._spawn`: the job's cgroup joined first, setpriv --pdeathsig, unshare
with the same namespaces, the same bootstrap building the same private view, PID 2 under the same
rlimits, seccomp filter and dropped capabilities), with one difference: its runner is started as
`python -m sandbox.runner --wait <spec>`, so it imports the heavy stack first, prints its wait line,
writes nothing, and polls for its spec. The limits it was started with are its key (`pool_key`); a job
adopts only a warm sandbox of an equal key, so its limits and isolation are exactly those of a cold start.

Mounts are fixed when the namespace is built, so a warm sandbox gets its own job dir,
`<jobs_root>/../prestart/.lemur-prestart-p-t<ticks>-o<pid>-<hex>/{in,out}` (`warm_root`: beside the
job folders, on their filesystem, not among them; the owner in the name lets a later server sweep the
dirs of a dead one); adoption moves the job's files in and swaps the dirs into the
job's dir, spec.json last (`prestart_files.move_job_into`). The runner's clock (the job's time budget)
starts when it sees the spec; the host's wall clock starts at adoption, as a cold start's starts at
the spawn. One job per warm sandbox: it is taken out of the pool under a lock before adoption, and its
runner exits after that one job. A warm sandbox that died, or is older than `max_age_s`, is discarded
and the job starts cold; so does a job that finds only warm sandboxes whose bootstrap has not yet
bound the warm job dir (a rename before the bind would hand the sandbox the wrong dir). Each start
tops the pool up again for its key (a spawn costs milliseconds: the imports then run inside the sandbox,
outside any job's clock); a creation counts against `slots` from the moment it is decided, so a refill
and a `prestart` deciding at once start one sandbox, not two. Every warm chain is spawned by one thread
that lives as long as the pool (a chain's pdeath signal fires when the thread that spawned it ends, not
the process: see prctl(2)). `close()` kills and removes every warm sandbox (its cgroup and dir); a
server that dies without closing takes them down with it (pdeathsig, as for a running job), and
`sweep_slots` removes the dirs a dead server left.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandbox import _cgroups, _owner
from sandbox._namespaces import READY_PREFIX
from sandbox.backend import JobPaths, Limits
from sandbox.prestart_files import SLOT_PREFIX, make_slot, move_job_into, pool_key, same_filesystem
from sandbox.process_zygote import ZygoteChild
from sandbox.warm_ledger import CreationLedger

log = logging.getLogger(__name__)

WAIT_MARKER = b"lemur-runner: waiting"  # the runner's `--wait` line (sandbox.runner.__main__.WAIT_MARKER)
_DEATHS_BEFORE_GIVING_UP = 3
_SLOT_OWNER_RE = re.compile(r"^\.lemur-prestart-p-t(\d+)-o(\d+)-[0-9a-f]+$")


@dataclasses.dataclass
class Spawned:
    """One started sandbox chain: its top process (stdout+stderr merged into one pipe), its cgroup (or
    None), the nonce of its bootstrap's ready line and the pipe of its init's exit report (or -1)."""

    proc: subprocess.Popen[bytes] | ZygoteChild
    cgroup: _cgroups.JobCgroup | None
    nonce: str
    status_fd: int
    launch: str = "exec"  # "exec": the exec chain; "zygote": forked by `sandbox.zygote` (proc is a ZygoteChild)

    def kill(self) -> None:
        """SIGKILL the chain and its cgroup, reap, release the pipes and the cgroup."""
        if self.proc.returncode is None:
            kill_top(self.proc)
        if self.cgroup is not None:
            self.cgroup.kill_all(timeout_s=1.0)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.status_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.status_fd)
            self.status_fd = -1
        if self.cgroup is not None:
            self.cgroup.remove()


def kill_top(proc: subprocess.Popen[bytes] | ZygoteChild) -> None:
    """SIGKILL a chain's top: the process group of an exec chain (only its reaper's thread calls this, so
    the pid cannot have been reused), or a zygote's child through its pidfd."""
    if isinstance(proc, ZygoteChild):
        proc.kill()
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# (paths of the warm job dir, limits, wait for the spec) -> a started chain
Spawn = Callable[[JobPaths, Limits, str], Spawned]


@dataclasses.dataclass
class WarmProcess:
    """A pre-started sandbox waiting for its spec, and what it printed so far."""

    spawned: Spawned
    key: tuple[Any, ...]
    slot: Path
    created: float
    output: bytearray = dataclasses.field(default_factory=bytearray)
    waiting_s: float | None = None  # seconds from the spawn to the runner's wait line

    def read_output(self) -> None:
        """Read what the pipe holds now (without blocking); note when the wait line came."""
        stdout = self.spawned.proc.stdout
        if stdout is None or stdout.closed:
            return
        fd = stdout.fileno()
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(fd, 1 << 16):
                self.output += chunk
                if len(self.output) > 1 << 16:
                    break
        if self.waiting_s is None and WAIT_MARKER in self.output:
            self.waiting_s = time.monotonic() - self.created

    def alive(self) -> bool:
        return self.spawned.proc.poll() is None

    def built(self) -> bool:
        """Whether its bootstrap finished the private view (printed its ready line): only then have its
        mounts taken hold of the warm job dir, and only then may that dir be renamed into a job's."""
        self.read_output()
        return (READY_PREFIX + self.spawned.nonce + "\n").encode() in self.output

    def early_output(self) -> bytes:
        """What it printed before its job, without the runner's wait line (the bootstrap's ready line
        stays: the handle looks for it)."""
        lines = bytes(self.output).splitlines(keepends=True)
        return b"".join(line for line in lines if not line.startswith(WAIT_MARKER))

    def discard(self) -> None:
        self.spawned.kill()
        shutil.rmtree(self.slot, ignore_errors=True)


class ProcessWarmPool:
    """At most `slots` warm sandboxes per key (and in all), made with `spawn` (the backend's own chain)."""

    def __init__(self, spawn: Spawn, *, slots: int, max_age_s: float, jobs_root: Path | None) -> None:
        self.enabled = True
        self.jobs_root = jobs_root
        self._spawn = spawn
        self._slots = max(1, int(slots))
        self._max_age = max_age_s
        self._pool: list[WarmProcess] = []
        self._lock = threading.Lock()
        self._ledger = CreationLedger(self._lock)  # warm sandboxes being spawned, per key
        self._deaths = 0
        self._filling = 0  # refill threads running
        self._closed = False
        # Every warm chain is spawned by this one thread, which lives as long as the pool: the chain's
        # pdeath signal (setpriv --pdeathsig KILL) fires when the THREAD that spawned it ends (prctl(2)),
        # so a spawn from a refill thread or an anyio worker would die with that thread.
        self._spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lemur-sbx-spawner")

    def __len__(self) -> int:
        with self._lock:
            return len(self._pool)

    def warm(self) -> list[WarmProcess]:
        with self._lock:
            return list(self._pool)

    # --- creating ---------------------------------------------------------------------------------------
    def create(self, data_dir: Path, limits: Limits) -> WarmProcess | None:
        """Start one warm sandbox for (data_dir, limits) on a fresh warm job dir and add it to the pool."""
        key = pool_key(data_dir, limits)
        with self._lock:
            self._ledger.add(key)
        return self._create_claimed(data_dir, limits, key)

    def _claim(self, key: tuple[Any, ...]) -> bool:
        """Under the lock: reserve the creation of one more warm sandbox for `key` (`CreationLedger`)."""
        in_pool = sum(1 for w in self._pool if w.key == key)
        return not self._closed and self.enabled and self._ledger.claim(key, in_pool, self._slots)

    def _create_claimed(self, data_dir: Path, limits: Limits, key: tuple[Any, ...]) -> WarmProcess | None:
        """`create` once a creation for `key` is counted in the ledger (released here, whatever happens)."""
        released = False
        try:
            if self._closed or not self.enabled or self.jobs_root is None:
                return None
            pid = os.getpid()
            slot = make_slot(warm_root(self.jobs_root), f"p-t{_owner.start_ticks(pid)}-o{pid}-{secrets.token_hex(4)}")
            try:
                spawned = self._spawner.submit(self._spawn, JobPaths(job_dir=slot, data_dir=Path(data_dir)), limits,
                                               "prestart").result()
            except BaseException:
                shutil.rmtree(slot, ignore_errors=True)
                raise
            warm = WarmProcess(spawned=spawned, key=key, slot=slot, created=time.monotonic())
            with self._lock:  # in the pool in the same step as it stops counting as in flight
                excess = self._ledger.arrive(self._pool, warm, self._slots, self._closed)
                released = True
            for w in excess:
                w.discard()
            return None if self._closed else warm
        finally:
            if not released:
                with self._lock:
                    self._ledger.release(key)

    def refill(self, data_dir: Path, limits: Limits) -> None:
        """Top the pool up to `slots` warm sandboxes for this key (each spawn takes milliseconds)."""
        key = pool_key(data_dir, limits)
        while True:
            with self._lock:
                if not self._claim(key):
                    return
            try:
                if self._create_claimed(data_dir, limits, key) is None:
                    return
            except Exception:  # noqa: BLE001 - the next job simply starts cold
                log.exception("pre-starting a process sandbox failed")
                return

    def refill_later(self, data_dir: Path, limits: Limits) -> None:
        """`refill` in a background thread (a spawn is a fork and an exec or two: not on the server's loop)."""
        with self._lock:
            if self._closed or not self.enabled or self._filling:
                return
            self._filling += 1

        def fill() -> None:
            try:
                self.refill(data_dir, limits)
            finally:
                with self._lock:
                    self._filling -= 1

        threading.Thread(target=fill, name="lemur-sbx-prestart", daemon=True).start()

    def ensure(self, data_dir: Path, limits: Limits, timeout_s: float = 30.0) -> WarmProcess | None:
        """One warm sandbox for this key: an existing one, the one being created (waited for: a spawn
        takes milliseconds), else a new one."""
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
        return self._create_claimed(data_dir, limits, key)

    def wait_ready(self, warm: WarmProcess, timeout_s: float) -> None:
        """Block until `warm` printed its wait line (the heavy imports done)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            warm.read_output()
            if warm.waiting_s is not None:
                return
            if not warm.alive():
                raise RuntimeError(f"pre-started sandbox exited: {bytes(warm.output)[-2000:].decode(errors='replace')}")
            time.sleep(0.05)
        raise TimeoutError(f"pre-started sandbox not ready after {timeout_s:.0f} s")

    # --- taking one ------------------------------------------------------------------------------------
    def take(self, key: tuple[Any, ...], job_dir: Path) -> WarmProcess | None:
        """Remove and return a live warm sandbox for `key` (None when there is none); discards stale
        and dead ones, and one whose dir is not on `job_dir`'s filesystem (the renames need it)."""
        now = time.monotonic()
        found, dropped = None, []
        with self._lock:
            for warm in list(self._pool):
                if now - warm.created > self._max_age or not warm.alive():
                    self._pool.remove(warm)
                    dropped.append(warm)
                elif found is None and warm.key == key and warm.built():
                    self._pool.remove(warm)
                    found = warm
        for warm in dropped:
            self._died(warm)
        if found is not None and not same_filesystem(found.slot, job_dir):
            log.warning("warm job dir %s is not on the filesystem of %s; starting cold", found.slot, job_dir)
            found.discard()
            return None
        return found

    def _died(self, warm: WarmProcess) -> None:
        if not warm.alive():
            warm.read_output()
            self._deaths += 1
            log.warning("a pre-started process sandbox had exited; its output: %s",
                        bytes(warm.output)[-1000:].decode(errors="replace"))
            if self._deaths >= _DEATHS_BEFORE_GIVING_UP:
                log.error("pre-started process sandboxes keep dying; pre-start is off for this backend")
                self.enabled = False
        warm.discard()

    def adopt(self, warm: WarmProcess, paths: JobPaths) -> bool:
        """Hand the job's files to `warm` (spec.json last). False (and `warm` discarded) when it had
        died meanwhile: start the job cold."""
        warm.read_output()
        if not warm.alive():
            self._died(warm)
            return False
        self._deaths = 0
        try:
            move_job_into(warm.slot, paths)
        except BaseException:
            warm.spawned.kill()
            raise
        finally:
            shutil.rmtree(warm.slot, ignore_errors=True)
        return True

    # --- closing ---------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop refilling, wait (up to a minute) for a refill in flight (it discards what it spawns once it
        sees the pool closed), then kill and remove every warm sandbox (its processes, cgroup and dir)."""
        self._closed = True
        for _ in range(1200):
            with self._lock:
                if not self._filling:
                    break
            time.sleep(0.05)
        with self._lock:
            pool, self._pool = self._pool, []
        for warm in pool:
            warm.discard()
        self._spawner.shutdown(wait=False)


def warm_root(jobs_root: Path) -> Path:
    """Where warm job dirs go: `prestart/` beside the jobs dir (under the server's state dir, which the
    sandbox never sees; `ProcessBackend` hides it as well)."""
    return jobs_root.parent / "prestart"


def sweep_slots(jobs_root: Path | None) -> int:
    """Remove warm job dirs of the process backend whose server is gone (its pid and start time are
    in the dir's name). Their processes died with that server (pdeathsig); the cgroups are swept by
    `_cgroups.sweep_orphans`."""
    if jobs_root is None or not warm_root(jobs_root).is_dir():
        return 0
    removed = 0
    for entry in warm_root(jobs_root).iterdir():
        m = _SLOT_OWNER_RE.match(entry.name)
        if m and entry.is_dir() and not _owner.is_running(int(m.group(2)), m.group(1)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


__all__ = ["SLOT_PREFIX", "WAIT_MARKER", "ProcessWarmPool", "Spawned", "WarmProcess", "sweep_slots", "warm_root"]
