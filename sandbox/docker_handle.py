"""One running sandbox container, owned from its start to its removal by a monitor thread.

Why a thread per job: every Docker SDK call blocks, and the wall clock must be enforced and the
container removed even when nobody awaits the handle (a crashed caller, a cancelled task). The
thread streams the log (keeping the tail, `MonitoredHandle`), enforces the deadline from outside
(`wait(timeout)` then `kill`: never trust SIGTERM or `timeout docker run`), reads `State.ExitCode` and
`State.OOMKilled` with `inspect` BEFORE `remove(force=True)` (OOMKilled can be true with exit 0), and
always removes the container. `Exit.isolation` is read back from that `inspect` (`applied_isolation`),
not from what was asked for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from sandbox._docker_common import NAME_PREFIX, docker_sdk, log, remove_container, timeout_errors
from sandbox.backend import Exit, JobPaths, Limits, LogTail, MonitoredHandle
from sandbox.protocol import TimeBudget

KILL_GRACE_S = TimeBudget.STOP_GRACE_S
"""How long a container may take to stop after our kill before the monitor gives up on it.

Docker's own overrun of a job's wall clock: `kill` is sent at the deadline (and again every few
seconds), and the monitor waits at most this long for the engine to report the stop before it
treats the engine as stuck (the job ends without an exit code; removal is still attempted). Also
the wait after a kill when `inspect` still shows the container running. A healthy engine stops a
killed container in well under a second, so the grace only matters when the engine is in trouble.
"""
_WAIT_SLICE_S = 60.0  # one blocking `wait` call at most (the deadline is re-checked between calls)
_REKILL_EVERY_S = 5.0


class DockerHandle(MonitoredHandle):
    """A running container. `isolation` is what the backend promised for these limits (overwritten
    by what `inspect` shows); `extra` goes into `Exit.isolation` as it is (start timings and the like);
    `on_done(self)` is called once the container is gone."""

    def __init__(self, container: Any, paths: JobPaths, limits: Limits, t0: float, isolation: dict[str, Any],
                 extra: dict[str, Any], on_done: Callable[[DockerHandle], None]) -> None:
        self.paths = paths
        self.container = container
        self._limits = limits
        self._t0 = t0
        self._deadline = t0 + limits.wall_s
        self._promised = isolation
        self._extra = extra
        self._on_done = on_done
        self._lock = threading.Lock()
        self._reason: str | None = None  # "timeout" | "cancel" | "disk"
        self._killed = False
        self._log = LogTail(limits.log_cap_bytes)
        self._exit: Exit | None = None
        self._done = threading.Event()
        self._out_watch = self._out_dir_watch()
        self._thread = threading.Thread(target=self._monitor, name=f"{NAME_PREFIX}{container.short_id}",
                                        daemon=True)

    def begin(self) -> None:
        self._thread.start()
        self._out_watch.start()

    # --- kill requests (the rest of the Handle API is MonitoredHandle's) ------------------
    def _request(self, reason: str) -> None:
        """Record why we kill (first reason wins) and kill now (blocking engine call)."""
        with self._lock:
            if self._done.is_set():
                return
            if self._reason is None:
                self._reason = reason
        self._kill()

    def _kill(self) -> None:
        docker = docker_sdk()
        self._killed = True
        try:
            self.container.kill()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:  # 409: not running any more
            if exc.status_code not in (404, 409):
                log.warning("kill %s: %s", self.container.name, exc)

    # --- monitor thread ---------------------------------------------------------------------------------
    def _monitor(self) -> None:
        logs = threading.Thread(target=self._pump_logs, name=f"{self._thread.name}-logs", daemon=True)
        status: int | None = None
        try:
            logs.start()
            status = self._wait_for_exit()
        except BaseException:
            log.exception("sandbox monitor failed; killing the sandbox")
            self._request("cancel")
        finally:
            try:
                self._exit = self._finish(logs, status)
            except BaseException:
                log.exception("sandbox cleanup failed")
                remove_container(self.container)
                self._exit = Exit(exit_code=None, log_tail=self._tail(), log_truncated=self._log.truncated,
                                  wall_s=time.monotonic() - self._t0, isolation=dict(self._promised))
            finally:
                self._on_done(self)
                self._done.set()

    def _wait_for_exit(self) -> int | None:
        """Block until the container stops; kill it at the deadline (and again every few seconds while
        it has not stopped). Returns the engine's status code, None if the container vanished or the
        engine stopped answering KILL_GRACE_S after the kill."""
        docker = docker_sdk()
        slow = timeout_errors()
        give_up = None
        while True:
            now = time.monotonic()
            remaining = self._deadline - now
            if remaining <= 0:
                self._request("timeout")  # the first reason wins: a cancel stays a cancel
                give_up = give_up or now + KILL_GRACE_S
                if now > give_up:
                    log.error("sandbox %s did not stop after kill", self.container.name)
                    return None
                remaining = _REKILL_EVERY_S
            try:
                result = self.container.wait(timeout=max(0.5, min(remaining, _WAIT_SLICE_S)))
                return int(result.get("StatusCode", -1))
            except docker.errors.NotFound:
                return None
            except slow:
                time.sleep(0.1)  # a timeout, or an engine that does not answer: no hot loop
            except docker.errors.APIError as exc:
                log.warning("wait on %s: %s", self.container.name, exc)
                time.sleep(0.5)

    def _pump_logs(self) -> None:
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                if chunk:
                    self._feed_log(chunk)
        except Exception as exc:  # noqa: BLE001 - the container went away: the log ends here
            log.debug("log stream of %s ended: %s", self.container.name, exc)

    def _inspect(self) -> dict[str, Any]:
        try:
            self.container.reload()
            return self.container.attrs
        except Exception as exc:  # noqa: BLE001
            log.warning("inspect %s failed: %s", getattr(self.container, "name", "?"), exc)
            return {}

    def _stop_if_running(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """When the wait ended without the container stopping (engine trouble): kill, wait, inspect again."""
        if not (attrs.get("State") or {}).get("Running"):
            return attrs
        self._request("cancel")
        with contextlib.suppress(Exception):
            self.container.wait(timeout=KILL_GRACE_S)
            return self._inspect() or attrs
        return attrs

    def _finish(self, logs: threading.Thread, status: int | None) -> Exit:
        """Inspect (exit code, OOMKilled, what was applied), then remove the container."""
        wall = time.monotonic() - self._t0
        logs.join(timeout=5.0)
        attrs = self._stop_if_running(self._inspect())
        state = attrs.get("State") or {}
        removed = remove_container(self.container)
        code, sig = _exit_status(state.get("ExitCode", status))
        reason = self._reason if self._killed else None
        isolation = {**applied_isolation(attrs, self._promised), **self._extra}
        if state.get("Error"):
            isolation["engine_error"] = state["Error"]
        if not removed:
            isolation["container_left_behind"] = self.container.name
        return Exit(exit_code=code, signal=sig, timed_out=reason == "timeout", cancelled=reason == "cancel",
                    oom_killed=bool(state.get("OOMKilled")), log_tail=self._tail(),
                    log_truncated=self._log.truncated, wall_s=wall, isolation=isolation,
                    out_exceeded=self._out_watch.over_cap())


def _exit_status(code: Any) -> tuple[int | None, int | None]:
    """(exit code, signal): tini and the engine report death by signal N as 128 + N."""
    if code is None:
        return None, None
    code = int(code)
    if 128 < code <= 128 + 64:
        return None, code - 128
    return code, None


# --- what the engine really applied ------------------------------------------------------------------------
def _capabilities(host: dict[str, Any]) -> str:
    caps = host.get("CapDrop") or []
    if "ALL" in caps and not host.get("CapAdd"):
        return "none"
    return f"drop {caps} add {host.get('CapAdd')}"


def _gpu_ids(host: dict[str, Any]) -> str | None:
    ids = [i for request in host.get("DeviceRequests") or [] for i in request.get("DeviceIDs") or []]
    return ",".join(ids) or None


def _mounts(attrs: dict[str, Any]) -> list[str]:
    return [f"{m.get('Destination')}:{'rw' if m.get('RW') else 'ro'}" for m in attrs.get("Mounts") or []]


def _user(config: dict[str, Any]) -> str:
    return str(config.get("User", "")).split(":")[0] or "root"


def applied_isolation(attrs: dict[str, Any], promised: dict[str, Any]) -> dict[str, Any]:
    """`promised` (the backend's describe() keys) overwritten with what `inspect` shows; `verified`
    says whether there was an inspect to read."""
    info = dict(promised)
    host = attrs.get("HostConfig") or {}
    if not host:
        info["verified"] = False
        return info
    config = attrs.get("Config") or {}
    sec = host.get("SecurityOpt") or []
    info.update(
        verified=True, container=attrs.get("Name", "").lstrip("/"), image_id=attrs.get("Image"),
        network=host.get("NetworkMode"), read_only_root=bool(host.get("ReadonlyRootfs")), user=_user(config),
        capabilities=_capabilities(host), no_new_privileges=any(s.startswith("no-new-privileges") for s in sec),
        memory_limit=host.get("Memory"), memory_swap_limit=host.get("MemorySwap"), pids_limit=host.get("PidsLimit"),
        cpus=(host.get("NanoCpus") or 0) / 1e9, gpu=_gpu_ids(host), runtime=host.get("Runtime"),
        init=host.get("Init"), privileged=host.get("Privileged"), tmpfs=host.get("Tmpfs"),
        shm_size=host.get("ShmSize"), ulimits={u["Name"]: u["Hard"] for u in host.get("Ulimits") or []},
        mounts=_mounts(attrs),
    )
    if any("seccomp=unconfined" in s for s in sec) or host.get("Privileged"):
        info["seccomp"] = "unconfined"
    return info
