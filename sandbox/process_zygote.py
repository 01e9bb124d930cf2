"""The host's side of the zygote (`sandbox.zygote`): start it, ask it for sandboxes, watch them end.

Why a separate process and not a fork of the server: the server's memory holds the test labels, the zoo
and its clients' requests; a child of the server would carry all of that into the sandbox. The zygote is
a fresh interpreter, started with a scrubbed environment, that has only imported the runner's stack.

One thread per zygote (`lemur-sbx-zygote`) starts it and lives as long as it does: the zygote is started
under `setpriv --pdeathsig KILL`, whose signal fires when the spawning *thread* ends (prctl(2)), so it
dies with the server, and its sandboxes die with it (their own pdeath signal). The same thread reads the
zygote's socket: its ready message, the pid and pidfd of each sandbox it forked, each sandbox's exit
status. A sandbox is handed to the backend as a `ZygoteChild`, the part of `subprocess.Popen` the backend
uses (pid, stdout, poll, wait, kill), with the kill going through the pidfd (the zygote reaps its
children, so a pid could be reused; a pidfd cannot).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

from sandbox import _namespaces, zygote
from sandbox.zygote import MAX_MESSAGE, READY

log = logging.getLogger(__name__)


class ZygoteUnavailable(RuntimeError):
    """The zygote could not start or answer: start this sandbox with the exec chain instead."""


class ZygoteChild:
    """A sandbox's top process forked by the zygote, seen through the part of Popen the backend uses."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = None
        self.returncode: int | None = None
        self._pidfd = pidfd
        self._exited = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(f"sandbox {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the top process (its namespace's init dies with it, and with the init every process of
        the namespace); through the pidfd, so never another process that got the pid."""
        if self.returncode is None and self._pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def exited_by_itself(self, timeout_s: float) -> bool:
        """Whether the process is gone (its pidfd readable) within `timeout_s`."""
        if self._pidfd < 0:
            return True
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))

    def _set_exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()

    def __del__(self) -> None:
        if self._pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1


class Zygote:
    """One zygote for one (interpreter, package root). `start` is idempotent and returns at once;
    `wait_ready` blocks until it has imported (or failed); `spawn` asks it for one sandbox."""

    def __init__(self, python: str, package_root: Path, ready_timeout_s: float = 180.0) -> None:
        self._python = python
        self._package_root = package_root
        self._ready_timeout = ready_timeout_s
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._settled = threading.Event()  # ready, or failed for good
        self.failure: str | None = None
        self.reported = False  # whether the backend logged the failure already
        self.info: dict[str, Any] = {}
        self._next_id = 0
        self._replies: dict[int, list[Any]] = {}
        self._waiting: set[int] = set()  # spawn requests whose caller still waits for the answer
        self._reply_cv = threading.Condition(self._lock)
        self._children: dict[int, ZygoteChild] = {}
        self._stderr_tail = bytearray()

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="lemur-sbx-zygote", daemon=True)
            self._thread.start()

    def settled(self) -> bool:
        return self._settled.is_set()

    def ready(self) -> bool:
        return self._ready.is_set() and self.failure is None

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        self.start()
        self._settled.wait(self._ready_timeout if timeout_s is None else timeout_s)
        return self.ready()

    def close(self, join: bool = True) -> None:
        """Stop the zygote (every sandbox it forked dies with it: kill those first if they matter)."""
        self._fail("closed")
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if join and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8", "PYTHONPATH": str(self._package_root),
                "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def _run(self) -> None:
        """The zygote's thread: start it, then read its socket until it ends."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [_namespaces.tool("setpriv"), "--pdeathsig", "KILL", "--", self._python, "-P", "-s",
                    os.path.abspath(zygote.__file__), str(theirs.fileno())]
            self._proc = subprocess.Popen(argv, env=self._env(), cwd="/", stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          pass_fds=(theirs.fileno(),), start_new_session=True)
        except BaseException as e:  # noqa: BLE001
            ours.close()
            theirs.close()
            self._fail(f"cannot start the zygote: {e}")
            return
        theirs.close()
        self._sock = ours
        try:
            self._read(ours, self._proc)
        except BaseException:  # noqa: BLE001
            log.exception("zygote reader failed")
        finally:
            self._fail(self._why_gone())
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            if self._proc.stderr is not None:
                self._proc.stderr.close()
            ours.close()
            self._orphan_children()

    def _read(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        err_fd = proc.stderr.fileno()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(err_fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll(1000):
                if fd == err_fd:
                    chunk = os.read(err_fd, 1 << 16)
                    if not chunk:
                        poller.unregister(err_fd)
                    self._stderr_tail = (self._stderr_tail + chunk)[-4000:]
                    continue
                msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 4)
                if not msg:
                    return
                self._dispatch(json.loads(msg), fds)

    def _dispatch(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        if op == READY:
            self.info = {k: v for k, v in msg.items() if k != "op"}
            self._ready.set()
            self._settled.set()
        elif op == "spawned":
            child = ZygoteChild(int(msg["pid"]), fds[0] if fds else -1)
            with self._lock:
                self._children[child.pid] = child
                orphan = int(msg["id"]) not in self._waiting
                if not orphan:
                    self._replies[int(msg["id"])] = [child, None]
                    self._reply_cv.notify_all()
            if orphan:  # its caller gave up waiting: nobody would ever watch or kill it
                child.kill()
        elif op == "error" and msg.get("id") is None:  # the zygote cannot start
            self._fail(str(msg.get("message")))
        elif op == "error":
            with self._lock:
                self._replies[int(msg["id"])] = [None, str(msg.get("message"))]
                self._reply_cv.notify_all()
        elif op == "exit":
            with self._lock:
                child = self._children.pop(int(msg["pid"]), None)
            if child is not None:
                child._set_exit(int(msg["status"]))

    def _why_gone(self) -> str:
        tail = bytes(self._stderr_tail).decode(errors="replace").strip()
        return "the zygote exited" + (f": {tail[-1500:]}" if tail else "")

    def _fail(self, why: str) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = why
            self._settled.set()
            self._reply_cv.notify_all()

    def _orphan_children(self) -> None:
        """The zygote is gone, so its children got their pdeath signal: wait until each is gone, then end it."""
        with self._lock:
            children, self._children = list(self._children.values()), {}
        for child in children:
            child.kill()
            child.exited_by_itself(5.0)
            child._set_exit(-signal.SIGKILL)

    # --- sandboxes -------------------------------------------------------------------------------------------
    def spawn(self, out_w: int, status_w: int, plan_r: int, cgroup_procs: list[str], userns: bool,
              timeout_s: float = 30.0) -> ZygoteChild:
        """One sandbox: the zygote forks it with these pipe ends (the caller closes its copies after)."""
        if not self.ready():
            raise ZygoteUnavailable(self.failure or "the zygote is not ready")
        with self._lock:
            self._next_id += 1
            rid = self._next_id
            self._waiting.add(rid)
        try:
            return self._spawn(rid, out_w, status_w, plan_r, cgroup_procs, userns, timeout_s)
        finally:
            with self._lock:
                self._waiting.discard(rid)
                self._replies.pop(rid, None)

    def _spawn(self, rid: int, out_w: int, status_w: int, plan_r: int, cgroup_procs: list[str], userns: bool,
               timeout_s: float) -> ZygoteChild:
        req = {"op": "spawn", "id": rid, "cgroup_procs": cgroup_procs, "userns": userns}
        try:
            with self._send_lock:
                assert self._sock is not None
                socket.send_fds(self._sock, [json.dumps(req).encode()], [out_w, status_w, plan_r])
        except OSError as e:
            raise ZygoteUnavailable(f"cannot reach the zygote: {e}") from e
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while rid not in self._replies:
                left = deadline - time.monotonic()
                if self.failure is not None or left <= 0:
                    raise ZygoteUnavailable(self.failure or f"the zygote did not answer within {timeout_s:.0f} s")
                self._reply_cv.wait(left)
            child, error = self._replies.pop(rid)
        if child is None:
            raise ZygoteUnavailable(f"the zygote could not fork a sandbox: {error}")
        return child
