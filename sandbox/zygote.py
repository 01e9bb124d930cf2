"""The process backend's zygote: a runner that imported the heavy stack once and forks one sandbox per job.

Why: on a small machine a process sandbox spends ~5 CPU-seconds importing numpy, optuna, torch,
torchvision and torch._dynamo before its job's first step, several times the training of a small model;
with two cores a batch of models is bound by those imports, warm sandboxes or not. A fork of a process
that has imported them costs milliseconds (the pages are shared copy-on-write, `gc.freeze` keeps them so).

What runs where (`python -P -s <this file> <socket fd>` with PYTHONPATH = the backend's package root,
started by `sandbox.process_zygote.Zygote`; a script, not `-m`, so that the `sandbox` package it imports
the runner from is the package root's, as in the sandbox, while this file and `_namespaces` are the host's):

- the zygote itself never runs submitted code and never holds a job's data: it imports, then answers
  "spawn" requests on its socket (SOCK_SEQPACKET; each request carries three pipe fds: the sandbox's
  stdout+stderr, the init's status pipe and the plan pipe) with the child's pid and a pidfd, and reports
  each child's exit status. Its environment is scrubbed by the host and it holds no capability the host
  user lacks. It is single-threaded (a fork copies only the calling thread, so no lock can be held by a
  thread that does not exist in the child), and it never touches CUDA (a CUDA context does not survive a
  fork; GPU jobs use the exec chain).
- its child (the sandbox's top process, what `setpriv --pdeathsig` + the shell + `unshare` are in the
  exec chain) leaves the zygote's session, dies with the zygote (PR_SET_PDEATHSIG), joins the job's
  cgroup, creates the user/net/mount/pid namespaces with unshare(2) (uid/gid maps as `--map-root-user`),
  makes every mount private and forks the namespace's PID 1, then waits for it like `unshare --fork
  --kill-child`.
- PID 1 mounts a fresh /proc and runs the same bootstrap as the exec chain (`sandbox._namespaces`: the
  plan read from its pipe, the private view, the ready line, the init). Its PID 2 installs the same
  seccomp filter and then, instead of exec'ing prlimit -> setpriv -> python, calls `become_runner`:
  the same rlimits (setrlimit), the same capability drop (bounding set, securebits, ambient, then
  capset to nothing, checked in /proc/self/status), the job's environment and argv, and the runner's
  `main` -- with torch already imported.

What differs from the exec chain, on purpose: the runner's imports are shared pages of the zygote, so they
are charged to the zygote's cgroup, not the job's; the interpreter's hash seed is the zygote's (the
`random` and numpy global generators are reseeded in each child). The plan's host paths stay in the
runner's memory (the exec chain's exec wiped them); the paths themselves are covered in its view.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import io
import json
import os
import select
import signal
import socket
import sys
import time
from types import ModuleType
from typing import Any

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_GET_SECUREBITS, PR_SET_SECUREBITS, PR_CAP_AMBIENT = 1, 24, 27, 28, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# setpriv --securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked,+keep_caps_locked
SECUREBITS = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 5)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# the fds a sandbox's top process keeps: 0 /dev/null, 1 and 2 the output pipe, then these two
STATUS_FD, PLAN_FD = 3, 4
MAX_MESSAGE = 1 << 16
READY = "ready"

SETUP_FAILED_CODE = 125  # = sandbox._namespaces.SETUP_FAILED_CODE (the bootstrap's)
RUNNER_MODULE = "sandbox.runner.__main__"
# the modules of sandbox.runner that a job imports after its start (imported here when the package has them)
RUNNER_SUBMODULES = ("environment", "budget", "check", "contract", "loader", "search", "trainer", "analyze",
                     "calibrate", "onnx_export")

_libc = ctypes.CDLL(None, use_errno=True)
_bootstrap: list[ModuleType] = []  # sandbox/_namespaces.py, loaded from beside this file
_host_package_root: list[str] = []  # the package root the runner was imported from (PYTHONPATH)
_import_env: dict[str, str] = {}  # what the imports themselves put into os.environ (torch._dynamo does)


def _load_bootstrap() -> ModuleType:
    """This file's sibling `_namespaces.py` under a private name: the `sandbox` package on sys.path is the
    runner's (the backend's package root), which need not hold the host's modules."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_namespaces.py")
    spec = importlib.util.spec_from_file_location("_lemur_sbx_namespaces", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


# --- the zygote's loop -------------------------------------------------------------------------------------
def main(sock_fd: int) -> None:
    t0 = time.monotonic()
    sock = socket.socket(fileno=sock_fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host stops it (SIGKILL, or the socket's end)
    _bootstrap.append(_load_bootstrap())
    _host_package_root.append(os.environ.get("PYTHONPATH", ""))
    before = dict(os.environ)
    try:
        _import_stack()
        _import_env.update({k: v for k, v in os.environ.items() if before.get(k) != v})
    except BaseException as e:  # noqa: BLE001 - the host starts its sandboxes with the exec chain
        _send(sock, {"op": "error", "id": None, "message": f"cannot import the runner: {type(e).__name__}: {e}"})
        os._exit(1)
    gc.collect()
    gc.freeze()  # the imported objects stay out of the collector: their pages stay shared with each child
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that SIGCHLD writes to the wakeup fd
    _send(sock, {"op": READY, "import_s": round(time.monotonic() - t0, 3), "pid": os.getpid(),
                 "threads": len(os.listdir("/proc/self/task"))})
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        for fd, _ in poller.poll(1000):
            if fd == wake_r:
                os.read(wake_r, 4096)
                continue
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 8)
            if not msg:  # the host closed its end: stop (the children die with us)
                os._exit(0)
            _serve(sock, json.loads(msg), fds, (wake_r, wake_w))
        _reap(sock)


def _import_stack() -> None:
    """What a runner imports before and during a job: its `__main__` module (which must only define things
    and have a `main(argv)`), the warm runner's `_warm_up` and the modules of `sandbox.runner` that `_run`
    imports. Never CUDA: `_warm_up` initialises it only where NVIDIA_VISIBLE_DEVICES says so (Docker)."""
    runner = importlib.import_module(RUNNER_MODULE)
    if not callable(getattr(runner, "main", None)):
        raise ImportError(f"{RUNNER_MODULE} has no main(argv)")
    warm_up = getattr(runner, "_warm_up", None)
    if callable(warm_up):
        warm_up()
    for name in RUNNER_SUBMODULES:
        if importlib.util.find_spec(f"sandbox.runner.{name}") is not None:
            importlib.import_module(f"sandbox.runner.{name}")
    sys.stdout.flush()
    sys.stderr.flush()


def _send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [json.dumps(msg).encode()], fds or [])


def _serve(sock: socket.socket, req: dict[str, Any], fds: list[int], wake: tuple[int, int]) -> None:
    try:
        if req.get("op") != "spawn" or len(fds) != 3:
            raise ValueError(f"bad request {req.get('op')!r} with {len(fds)} fds")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                _sandbox_top(req, fds, sock, wake)
            except BaseException as e:  # noqa: BLE001 - fail closed, before anything untrusted exists
                with contextlib.suppress(BaseException):
                    os.write(2, f"lemur-sbx: sandbox setup failed: {e}\n".encode())
            finally:
                os._exit(SETUP_FAILED_CODE)
        pidfd = os.pidfd_open(pid)
        try:
            _send(sock, {"op": "spawned", "id": req.get("id"), "pid": pid}, [pidfd])
        finally:
            os.close(pidfd)
    except Exception as e:  # noqa: BLE001 - the host falls back to the exec chain
        _send(sock, {"op": "error", "id": req.get("id"), "message": f"{type(e).__name__}: {e}"})
    finally:
        for fd in fds:
            os.close(fd)


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(sock, {"op": "exit", "pid": pid, "status": os.waitstatus_to_exitcode(status)})


# --- the sandbox's top process (a child of the zygote) -----------------------------------------------------
def _sandbox_top(req: dict[str, Any], fds: list[int], sock: socket.socket, wake: tuple[int, int]) -> None:
    """Become the chain's top: own session, die with the zygote, the job's cgroup, new namespaces, PID 1."""
    zygote = os.getppid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    os.close(sock.detach())
    for fd in wake:
        os.close(fd)
    os.setsid()
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != zygote:  # the zygote died before the pdeath signal was armed
        os._exit(SETUP_FAILED_CODE)
    _arrange_fds(fds)
    for procs in req["cgroup_procs"]:  # every later process is born inside the job's cgroup
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    os.chdir("/")
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (CLONE_NEWUSER if req["userns"] else 0)
    _check(_libc.unshare(flags), "unshare")
    if req["userns"]:  # unshare --map-root-user
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _check(_libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None), "mount --make-rprivate /")
    init = os.fork()
    if init == 0:
        _namespace_init()
    os.close(STATUS_FD)
    os.close(PLAN_FD)
    while True:
        try:
            _pid, status = os.waitpid(init, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):  # die of the same signal, so the host reads what unshare would report
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status))


def _arrange_fds(fds: list[int]) -> None:
    """0 /dev/null, 1 and 2 the output pipe, STATUS_FD and PLAN_FD; every other fd closed."""
    high = [os.dup(fd) for fd in fds]  # above every target number, so no dup2 below overwrites a source
    null = os.open("/dev/null", os.O_RDONLY)
    out, status, plan = high
    for src, dst in ((null, 0), (out, 1), (out, 2)):  # inheritable, as an exec'd runner's are
        os.dup2(src, dst)
    for src, dst in ((status, STATUS_FD), (plan, PLAN_FD)):
        os.dup2(src, dst, inheritable=False)
    keep = {0, 1, 2, STATUS_FD, PLAN_FD}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(BaseException):
                os.close(fd)


def _namespace_init() -> None:
    """PID 1 of the new namespaces: what `unshare --kill-child --mount-proc` and the bootstrap do."""
    try:
        # (no getppid() check as in the top process: a parent outside the namespace always reads 0; a top
        # process killed before this line leaves this init in the job's cgroup, which the host kills)
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
        ms_nosuid, ms_nodev, ms_noexec = 2, 4, 8
        _check(_libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(ms_nosuid | ms_nodev | ms_noexec), None),
               "mount /proc")
    except BaseException as e:  # noqa: BLE001
        with contextlib.suppress(BaseException):
            os.write(2, f"lemur-sbx: sandbox setup failed: {e}\n".encode())
        os._exit(SETUP_FAILED_CODE)
    _bootstrap[0]._bootstrap_main(str(PLAN_FD), handover=become_runner)  # never returns


# --- PID 2: the runner, in this interpreter ------------------------------------------------------------------
def become_runner(inproc: dict[str, Any]) -> None:
    """prlimit's, setpriv's and exec's work done in-process, then the runner's main. Never returns."""
    status = SETUP_FAILED_CODE
    try:
        import resource

        for name, value in inproc["rlimits"]:
            resource.setrlimit(getattr(resource, name), (value, value))
        if inproc["drop_caps"]:
            drop_capabilities()
        _adopt_interpreter(inproc)
        runner = sys.modules[RUNNER_MODULE]
        runner._STARTED = time.monotonic()  # type: ignore[attr-defined]  # the budget counts from here
    except BaseException as e:  # noqa: BLE001 - nothing untrusted has run yet: fail closed
        with contextlib.suppress(BaseException):
            os.write(2, f"lemur-sbx: sandbox setup failed: {e}\n".encode())
        os._exit(status)
    argv = [f"{inproc['pkg']}/sandbox/runner/__main__.py", *inproc["argv"]]  # what `python -m` would give
    sys.argv[:] = argv
    sys.orig_argv[:] = [sys.executable, "-m", "sandbox.runner", *inproc["argv"]]
    try:
        status = runner.main(argv)
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status)


def drop_capabilities() -> None:
    """setpriv --bounding-set=-all --inh-caps=-all --ambient-caps=-all --securebits=+noroot,... and, as the
    exec after it would, no permitted or effective capability either. Checked afterwards (fail closed)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"prctl(PR_CAPBSET_DROP, {cap})")
    bits = _libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0)
    _check(_libc.prctl(PR_SET_SECUREBITS, bits | SECUREBITS, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    _check(_libc.capset(ctypes.byref(Header(_LINUX_CAPABILITY_VERSION_3, 0)), (Data * 2)()), "capset")
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f if line.startswith("Cap"))}
    if any(int(v, 16) for v in caps.values()):
        raise OSError(f"capabilities left after the drop: {caps}")


def _adopt_interpreter(inproc: dict[str, Any]) -> None:
    """The job's environment, unbuffered stdio, the runner package as the sandbox sees it, fresh RNGs."""
    os.environ.clear()
    os.environ.update({**_import_env, **inproc["env"]})  # as after the same imports in an exec'd runner
    sys.dont_write_bytecode = True
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True, write_through=True)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    pkg = inproc["pkg"]
    host = _host_package_root[0] if _host_package_root else ""
    sys.path[:] = [pkg] + [p for p in sys.path if p and p != host]
    import sandbox
    import sandbox.runner

    sandbox.__path__[:] = [f"{pkg}/sandbox"]
    sandbox.runner.__path__[:] = [f"{pkg}/sandbox/runner"]
    sys.path_importer_cache.clear()
    import random

    random.seed()
    try:
        import numpy

        numpy.random.seed()
    except ImportError:
        pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
