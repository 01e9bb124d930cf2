"""Run the sandbox runner as a local process: Linux namespaces, a per-job cgroup, rlimits, no caps.

Why a process backend next to Docker: it needs nothing but util-linux and a kernel with namespaces
(CI machines, the lent GPU machines without Docker), starts in tens of milliseconds, and runs the
same runner over the same file protocol. Every result carries `Exit.isolation`, a truthful account
of what this backend achieved on this machine (including "nothing" in the `isolation="none"`
fallback).

How one job runs (see `sandbox._namespaces` for the bootstrap and `sandbox._cgroups` for limits):

    setpriv --pdeathsig KILL : if the server dies without cleaning up, the chain's top process
        (unshare) gets SIGKILL, which takes the whole PID namespace down.
      -> /bin/sh -c <outer> : joins the job's cgroup *itself* (writes its own pid into
         cgroup.procs), then exec's the next step, so every later process is born inside the
         cgroup. (No `preexec_fn`: it is unsafe in a threaded server; a shell writing `$$` needs
         no handshake with the host, and a failed join ends the job before anything runs.)
        -> unshare --user --net --mount --pid --fork --kill-child ...
          -> python -I -S sandbox/_namespaces.py <plan fd> : builds the private view (read-only
             host, hidden paths covered, private /tmp, /dev), then stays as PID 1 (reaps, reports
             the runner's exit status on a pipe only the host holds)
            -> PID 2: prlimit (fsize, core, nofile) -> setpriv (no capabilities, no_new_privs)
              -> python -m sandbox.runner <spec>

Without namespaces (isolation="none", or the probe failed) the outer shell exec's prlimit ->
setpriv -> the runner directly, and the isolation report says that nothing is isolated.

Zygote (`ProcessBackend(zygote=True)`, the default, with namespaces and for CPU jobs): the same view,
limits and capability drop, but the chain's top is forked by a pre-imported runner (`sandbox.zygote`,
its host side `sandbox.process_zygote`) that does unshare's, prlimit's and setpriv's work in-process, so
a job does not pay torch's import (`Exit.isolation["launch"]` says which ran). GPU jobs, and any spawn
while the zygote is not available, use the exec chain above.

Pre-start (`ProcessBackend(prestart=True)`, with namespaces only): the same chain started before its
job, on a warm job dir of its own, its runner waiting for the spec with torch imported; a job of the
same limits adopts it (`sandbox.process_prestart`; `Exit.isolation["prestarted"]` says which ran).

The host side (`_ProcessHandle`) never trusts the sandbox: a monitor thread drains the merged
stdout/stderr pipe (keeping the last `log_cap_bytes`), enforces the wall clock with SIGKILL to the
process group and to every pid of the cgroup, and after the exit kills whatever is left in the
cgroup and removes it. A thread (not an anyio task) because `start` must return at once, and the
draining and the deadline must go on even if nobody awaits the handle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import anyio

from sandbox import _cgroups, _namespaces, prestart_files, process_prestart, process_zygote, zygote
from sandbox.backend import Backend, Exit, Handle, JobPaths, Limits, LogTail, MonitoredHandle, RunnerPaths, out_cap_text
from sandbox.protocol import MODEL_FILE, SPEC_FILE

log = logging.getLogger(__name__)

# Host paths that a uid-0 process without capabilities could still read or use (it owns them):
# credentials, the Docker socket under /run (root on the host), logs, and the places where other
# programs keep scratch files and unix sockets (/var/tmp): a read-only mount does not stop a connect().
# Hidden in addition to the caller's `hidden_paths`; the interpreter is re-exposed read-only if it
# lives under one of them.
DEFAULT_SENSITIVE_PATHS: tuple[str, ...] = (
    "/root", "/home", "/run", "/var/run", "/etc/shadow", "/etc/gshadow", "/etc/ssh", "/etc/sudoers",
    "/etc/sudoers.d", "/etc/ssl/private", "/var/lib/docker", "/var/log", "/var/spool", "/var/mail",
    "/var/backups", "/var/tmp", "/var/cache", "/media",
)
# Where the private root is mounted inside the namespaces: an empty host directory (created once),
# the first one that is not itself under a hidden path.
SANDBOX_ROOT_CANDIDATES = (Path("/mnt/lemur-sbx"), Path("/srv/lemur-sbx"), Path("/opt/lemur-sbx"), Path("/mnt"))
_FORBIDDEN_ROOTS = ("/tmp", "/dev", "/proc", "/sys", "/run")
_NOFILE = 1024
_ZYGOTE_RESTARTS = 3
_READY_SEARCH_BYTES = 1 << 16


def _default_package_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _is_under(path: Path | str, parent: Path | str) -> bool:
    p, q = str(path), str(parent).rstrip("/") or "/"
    return p == q or p.startswith(q + "/") or q == "/"


@lru_cache(maxsize=8)
def _interpreter_dirs(python: str) -> tuple[str, ...]:
    """The directories the interpreter needs (prefixes of the venv and of its base Python)."""
    code = ("import json,sys;print(json.dumps([sys.prefix,sys.base_prefix,sys.exec_prefix,"
            "sys.base_exec_prefix]))")
    r = subprocess.run([python, "-I", "-c", code], capture_output=True, timeout=30, check=True,
                       env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    dirs = {os.path.realpath(p) for p in json.loads(r.stdout)}
    dirs.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    dirs.add(os.path.dirname(os.path.dirname(os.path.abspath(python))))
    return tuple(sorted(dirs))


@lru_cache(maxsize=1)
def _cgroup_probe() -> tuple[str | None, str]:
    """(cgroup version usable for jobs or None, why). Creates and removes one test cgroup."""
    try:
        cg = _cgroups.JobCgroup.create(_cgroups.job_name("probe"), 64 << 20, 16, 1.0)
    except OSError as e:
        return None, f"cgroups not usable: {e}"
    version = cg.version
    cg.remove()
    return version, "ok"


def _choose_root(requested: Path | None, hidden: list[Path]) -> Path:
    """An existing host directory to mount the private root on (created when possible): the first
    candidate not under a hidden path (covering that path would bury the job's files)."""
    if requested is not None:
        return requested
    for cand in SANDBOX_ROOT_CANDIDATES:
        if any(_is_under(cand, h) for h in hidden):
            continue
        try:
            cand.mkdir(mode=0o755, exist_ok=True)
        except OSError:
            continue
        return cand
    raise ValueError(f"no usable sandbox root among {SANDBOX_ROOT_CANDIDATES}; pass sandbox_root=")


class ProcessBackend(Backend):
    """Runs each job as a local process tree, isolated with namespaces when the kernel allows.

    `hidden_paths`: host paths the submission must never see (the zoo database dir, the jobs root
    holding other jobs, the dataset cache and raw dataset files). `DEFAULT_SENSITIVE_PATHS` are
    hidden as well. `isolation`: "auto" (namespaces when the probe succeeds, else a plain process,
    reported as such), "namespaces" (raise if unavailable), or "none". `prestart`: keep
    `prestart_slots` warm sandboxes per key ready (`sandbox.process_prestart`; with namespaces only),
    their job dirs under `jobs_root` (learned from the first job if None). `zygote`: fork CPU jobs'
    sandboxes from a pre-imported runner (`sandbox.zygote`) instead of exec'ing a fresh interpreter.
    """

    name = "process"

    def __init__(
        self,
        hidden_paths: Sequence[Path | str],
        python: str = sys.executable,
        package_root: Path | None = None,
        isolation: str = "auto",
        *,
        sandbox_root: Path | None = None,
        sensitive_paths: Sequence[str] = DEFAULT_SENSITIVE_PATHS,
        prestart: bool = False,
        prestart_slots: int = 1,
        prestart_max_age_s: float = 1800.0,
        jobs_root: Path | None = None,
        zygote: bool = True,
    ) -> None:
        if isolation not in ("auto", "namespaces", "none"):
            raise ValueError(f"isolation must be auto, namespaces or none, not {isolation!r}")
        self._python = os.path.abspath(python)
        self._package_root = Path(package_root or _default_package_root()).resolve()
        if not (self._package_root / "sandbox" / "runner").is_dir():
            raise ValueError(f"{self._package_root} holds no sandbox/runner package")
        self._hidden = [Path(os.path.abspath(p)) for p in (*hidden_paths, *sensitive_paths)]
        self._live: set[_ProcessHandle] = set()
        self._mode, self._mode_reason = "none", "isolation='none' requested"
        self._root = Path("/")
        if isolation != "none":
            self._root = _choose_root(sandbox_root, self._hidden_resolved())
            self._mode, self._mode_reason = _namespaces.probe(str(self._root))
            if self._mode == "none" and isolation == "namespaces":
                raise RuntimeError(f"namespaces unavailable: {self._mode_reason}")
            if self._mode != "none":
                self._check_root()
                _interpreter_dirs(self._python)  # warm the cache: start() must stay quick
        self._cg_version, self._cg_reason = _cgroup_probe()
        self._zygote = process_zygote.Zygote(self._python, self._package_root) if zygote and self.namespaces else None
        self._zygote_lock = threading.Lock()
        self._zygote_restarts = 0
        # a backend dropped without aclose() must not keep a zygote (~0.5 GB of imports) alive with it
        self._zygotes = [self._zygote] if self._zygote is not None else []
        weakref.finalize(self, _close_zygotes, self._zygotes)
        self._pool = process_prestart.ProcessWarmPool(
            self._spawn, slots=prestart_slots, max_age_s=prestart_max_age_s,
            jobs_root=Path(jobs_root) if jobs_root is not None else None) if prestart else None
        if self._pool is not None and jobs_root is not None:
            self._hide_warm_root(Path(jobs_root))

    # --- configuration checks -------------------------------------------------------------------
    def _check_root(self) -> None:
        root = self._root
        if not root.is_absolute() or not root.is_dir():
            raise ValueError(f"sandbox root {root} must be an existing absolute directory")
        for bad in (*_FORBIDDEN_ROOTS, *map(str, self._hidden_resolved())):
            if _is_under(root, bad) and bad != "/":
                raise ValueError(f"sandbox root {root} lies under {bad}, which the sandbox covers")

    def _hidden_resolved(self) -> list[Path]:
        """Existing hidden paths, symlinks resolved, without the private /dev and /proc."""
        out = []
        for p in self._hidden:
            if os.path.lexists(p):
                real = Path(os.path.realpath(p))
                if real != Path("/") and not any(_is_under(real, x) for x in ("/dev", "/proc")):
                    out.append(real)
        return sorted(set(out), key=lambda p: (len(p.parts), str(p)))

    @property
    def namespaces(self) -> bool:
        return self._mode != "none"

    # --- Backend API ------------------------------------------------------------------------------
    def runner_paths(self, paths: JobPaths) -> RunnerPaths:
        """Inside the namespaces: <root>/job/in/{spec.json,model.py}, <root>/data, <root>/job/out.
        Without namespaces: the host paths."""
        if not self.namespaces:
            return RunnerPaths(spec=str(paths.in_dir / SPEC_FILE), model=str(paths.in_dir / MODEL_FILE),
                               data_dir=str(paths.data_dir), out_dir=str(paths.out_dir))
        r = str(self._root)
        return RunnerPaths(spec=f"{r}/job/in/{SPEC_FILE}", model=f"{r}/job/in/{MODEL_FILE}",
                           data_dir=f"{r}/data", out_dir=f"{r}/job/out")

    def describe(self) -> dict[str, Any]:
        """The isolation this backend provides here (no per-job values)."""
        return self._isolation(None, None)

    async def start(self, paths: JobPaths, limits: Limits) -> Handle:
        """Spawn the sandbox, or adopt a warm one (synchronously: a few ms, and no await point at
        which a cancelled caller could lose a running sandbox), and return its handle."""
        for d in (paths.in_dir, paths.out_dir, paths.data_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"job directory {d} is missing")
        if self._zygote is not None and limits.gpu is None:
            await self._zygote_settled()  # nothing is spawned yet: a cancel here loses nothing
        handle = self._adopt_warm(paths, limits) if self._pool is not None else None
        if handle is None:
            spawned = self._spawn(paths, limits, paths.job_dir.name)
            handle = _ProcessHandle(self, paths, limits, spawned, {**self._isolation(limits, spawned.cgroup),
                                                                   "prestarted": False, "launch": spawned.launch})
        self._live.add(handle)
        if self._pool is not None and self.namespaces and prestart_files.worth_warming(paths):
            if self._pool.jobs_root is None:
                self._pool.jobs_root = paths.job_dir.parent
                self._hide_warm_root(paths.job_dir.parent)
            self._pool.refill_later(paths.data_dir, limits)  # the next jobs of this kind find warm sandboxes
        return handle

    def _adopt_warm(self, paths: JobPaths, limits: Limits) -> _ProcessHandle | None:
        """The job in a warm sandbox of its key (`sandbox.process_prestart`), or None: start cold."""
        assert self._pool is not None
        warm = self._pool.take(prestart_files.pool_key(paths.data_dir, limits), paths.job_dir)
        if warm is None:
            return None
        t0 = time.monotonic()
        if not self._pool.adopt(warm, paths):
            return None
        extra = {"prestarted": True, "adopt_s": round(time.monotonic() - t0, 4),
                 "warm_age_s": round(t0 - warm.created, 1),
                 "warm_ready_s": None if warm.waiting_s is None else round(warm.waiting_s, 3)}
        return _ProcessHandle(self, paths, limits, warm.spawned, {**self._isolation(limits, warm.spawned.cgroup),
                                                                  **extra, "launch": warm.spawned.launch},
                              early_output=warm.early_output())

    async def _zygote_settled(self) -> None:
        """Start the zygote if it is not running, and wait until it imported (or failed: the exec chain)."""
        z = self._current_zygote()
        assert z is not None
        z.start()
        deadline = time.monotonic() + 180.0
        while not z.settled() and time.monotonic() < deadline:
            await anyio.sleep(0.02)

    def _current_zygote(self) -> process_zygote.Zygote | None:
        """The zygote, replaced by a fresh one when it died after having served (killed, out of memory):
        at most `_ZYGOTE_RESTARTS` times, then the exec chain for good. One that never became ready (a
        runner package it cannot import) is not restarted."""
        with self._zygote_lock:
            z = self._zygote
            if (z is not None and z.failure is not None and z.failure != "closed" and z.info
                    and self._zygote_restarts < _ZYGOTE_RESTARTS):
                log.warning("the sandbox zygote died (%s); starting a new one", z.failure[:300])
                self._zygote_restarts += 1
                z = self._zygote = process_zygote.Zygote(self._python, self._package_root)
                self._zygotes.append(z)
            return z

    def _spawn(self, paths: JobPaths, limits: Limits, label: str) -> process_prestart.Spawned:
        """Start the sandbox on `paths` (see the module docstring): forked by the zygote when it is ready and
        the job has no GPU, else the exec chain. `label` "prestart": its runner waits for its spec
        (`--wait`); the chain, its limits and its isolation are the same."""
        z = self._current_zygote() if limits.gpu is None else None
        if z is not None:
            if label == "prestart":  # the pool's spawner thread: waiting here delays no job
                z.wait_ready()
            if z.ready():
                try:
                    return self._spawn_forked(z, paths, limits, label)
                except process_zygote.ZygoteUnavailable as e:
                    log.warning("zygote unavailable, starting the sandbox with the exec chain: %s", e)
            elif z.failure is not None and z.failure != "closed" and not z.reported:
                z.reported = True  # once per zygote, not once per job
                log.warning("zygote failed, sandboxes start with the exec chain: %s", z.failure[:500])
        return self._spawn_exec(paths, limits, label)

    def _spawn_forked(self, z: process_zygote.Zygote, paths: JobPaths, limits: Limits,
                      label: str) -> process_prestart.Spawned:
        """The sandbox forked by the zygote: the same plan, with `inproc` for PID 2 instead of an exec."""
        cgroup = self._make_cgroup(label, limits)
        nonce = secrets.token_hex(8)
        runner_argv = [*(["--wait"] if label == "prestart" else []), self.runner_paths(paths).spec]
        fds: list[int] = []
        try:
            out_r, out_w = os.pipe()
            status_r, status_w = os.pipe()
            plan_r, plan_w = os.pipe()
            fds += [out_r, out_w, status_r, status_w, plan_r, plan_w]
            inproc = {"rlimits": self._rlimits(limits, cgroup), "drop_caps": True, "env": self._env(paths, limits),
                      "argv": runner_argv, "pkg": f"{self._root}/pkg"}
            plan = self._plan(paths, limits, self._final_argv(paths, limits, cgroup, label == "prestart"),
                              _namespaces.READY_PREFIX + nonce, zygote.STATUS_FD, inproc)
            _send_plan(plan, plan_w, fds)
            procs = [str(f) for f in cgroup.procs_files()] if cgroup is not None else []
            child = z.spawn(out_w, status_w, plan_r, procs, self._mode == "userns")
        except BaseException:
            _undo_spawn(cgroup, fds)
            raise
        for fd in (out_w, status_w, plan_r):
            os.close(fd)
        child.stdout = os.fdopen(out_r, "rb", buffering=0)
        return process_prestart.Spawned(child, cgroup, nonce, status_r, launch="zygote")

    def _spawn_exec(self, paths: JobPaths, limits: Limits, label: str) -> process_prestart.Spawned:
        """The exec chain: setpriv -> sh -> unshare -> bootstrap -> prlimit -> setpriv -> python runner."""
        cgroup = self._make_cgroup(label, limits)
        nonce = secrets.token_hex(8)
        wait = label == "prestart"
        fds: list[int] = []  # pipes whose other end the child gets
        try:
            status_r, status_w, plan_r = -1, -1, -1
            if self.namespaces:
                status_r, status_w = os.pipe()
                plan_r, plan_w = os.pipe()
                fds += [status_r, status_w, plan_r, plan_w]
                plan = self._plan(paths, limits, self._final_argv(paths, limits, cgroup, wait),
                                  _namespaces.READY_PREFIX + nonce, status_w)
                _send_plan(plan, plan_w, fds)
            argv = self._argv(paths, limits, cgroup, nonce, plan_r)
            proc = subprocess.Popen(
                argv, env=self._env(paths, limits), cwd=str(paths.out_dir), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                pass_fds=tuple(fd for fd in (status_w, plan_r) if fd >= 0))
        except BaseException:
            _undo_spawn(cgroup, fds)
            raise
        for fd in (status_w, plan_r):
            if fd >= 0:
                os.close(fd)
        return process_prestart.Spawned(proc, cgroup, nonce, status_r)

    async def prestart(self, data_dir: Path, limits: Limits, jobs_root: Path | None = None,
                       wait_ready: bool = False, timeout_s: float = 120.0) -> None:
        """Make sure one warm sandbox for (data_dir, limits) exists; with `wait_ready`, also wait until
        its runner printed its wait line (the heavy imports done). A no-op without pre-start or
        without namespaces (a plain process has nothing fixed at start to keep warm)."""
        if self._pool is None or not self.namespaces:
            return
        if jobs_root is not None:
            self._pool.jobs_root = Path(jobs_root)
            self._hide_warm_root(Path(jobs_root))
        if self._pool.jobs_root is None:
            raise ValueError("prestart needs jobs_root (the directory that holds the job dirs)")
        warm = await anyio.to_thread.run_sync(self._pool.ensure, Path(data_dir), limits)
        if warm is not None and wait_ready:
            await anyio.to_thread.run_sync(self._pool.wait_ready, warm, timeout_s)

    def _hide_warm_root(self, jobs_root: Path) -> None:
        """Create the warm job dirs' root now and hide it from every sandbox (warm or cold)."""
        root = process_prestart.warm_root(jobs_root)
        root.mkdir(parents=True, exist_ok=True)
        if Path(os.path.abspath(root)) not in self._hidden:
            self._hidden.append(Path(os.path.abspath(root)))

    @property
    def pool(self) -> process_prestart.ProcessWarmPool | None:
        """The warm sandboxes (None without pre-start)."""
        return self._pool

    async def cleanup_orphans(self) -> int:
        """Kill and remove lemur-sbx-* cgroups whose server process is gone (and its warm job dirs)."""
        jobs_root = self._pool.jobs_root if self._pool is not None else None
        await anyio.to_thread.run_sync(process_prestart.sweep_slots, jobs_root)
        return await anyio.to_thread.run_sync(_cgroups.sweep_orphans)

    async def aclose(self) -> None:
        """Kill every sandbox this backend still runs, and every warm one, then the zygote."""
        if self._pool is not None:
            await anyio.to_thread.run_sync(self._pool.close)
        for handle in list(self._live):
            await handle.cancel()
        if self._zygote is not None:
            await anyio.to_thread.run_sync(self._zygote.close)

    @property
    def zygote(self) -> process_zygote.Zygote | None:
        """The zygote CPU jobs are forked from (None when off or without namespaces)."""
        return self._zygote

    # --- building one job ---------------------------------------------------------------------
    def _make_cgroup(self, label: str, limits: Limits) -> _cgroups.JobCgroup | None:
        if self._cg_version is None:
            return None
        try:
            return _cgroups.JobCgroup.create(_cgroups.job_name(label), limits.memory_bytes,
                                             limits.pids, limits.cpus)
        except OSError as e:
            log.warning("job cgroup not created, falling back to rlimits: %s", e)
            return None

    def _env(self, paths: JobPaths, limits: Limits) -> dict[str, str]:
        """The complete environment of the sandbox: nothing is inherited from the server."""
        inside = self.runner_paths(paths)
        threads = str(max(1, math.ceil(limits.cpus)))
        pythonpath = f"{self._root}/pkg" if self.namespaces else str(self._package_root)
        return {
            "PATH": "/usr/bin:/bin", "HOME": inside.out_dir, "LANG": "C.UTF-8", "PYTHONPATH": pythonpath,
            "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": limits.gpu or "",
        }

    def _rlimits(self, limits: Limits, cgroup: _cgroups.JobCgroup | None) -> list[tuple[str, int]]:
        """(resource name, soft = hard limit) for the runner: prlimit's flags, or setrlimit in the zygote's child."""
        fsize = max(1 << 20, limits.out_cap_bytes)
        out = [("RLIMIT_NOFILE", _NOFILE), ("RLIMIT_CORE", 0), ("RLIMIT_FSIZE", fsize)]
        if cgroup is None:
            if limits.gpu is None:  # RLIMIT_AS breaks CUDA initialisation
                out.append(("RLIMIT_AS", limits.memory_bytes))
            if os.geteuid() != 0:  # ignored for uid 0 (and counts all processes of the uid)
                out.append(("RLIMIT_NPROC", limits.pids))
        return out

    def _rlimit_args(self, limits: Limits, cgroup: _cgroups.JobCgroup | None) -> list[str]:
        flags = [f"--{name.removeprefix('RLIMIT_').lower()}={v}:{v}" for name, v in self._rlimits(limits, cgroup)]
        return [_namespaces.tool("prlimit"), *flags, "--"]

    def _final_argv(self, paths: JobPaths, limits: Limits, cgroup: _cgroups.JobCgroup | None,
                    wait: bool = False) -> list[str]:
        drop_caps = self.namespaces or os.geteuid() == 0
        return [*self._rlimit_args(limits, cgroup), *_namespaces.setpriv_argv(drop_caps),
                self._python, "-m", "sandbox.runner", *(["--wait"] if wait else []), self.runner_paths(paths).spec]

    def _argv(self, paths: JobPaths, limits: Limits, cgroup: _cgroups.JobCgroup | None, nonce: str,
              plan_fd: int) -> list[str]:
        """setpriv --pdeathsig KILL /bin/sh -c <outer> lemur-sbx <next step...>.

        The pdeath signal kills the chain's top (unshare, or the runner without namespaces) if the
        server dies without cleaning up; the outer shell joins the cgroup, then exec's the
        namespaced bootstrap (reading its plan from `plan_fd`) or, without namespaces, the runner."""
        join = [f"echo $$ > {shlex.quote(str(f))}" for f in (cgroup.procs_files() if cgroup else [])]
        if self.namespaces:
            nxt = [*_namespaces.unshare_argv(self._mode == "userns"),
                   *_namespaces.bootstrap_argv(self._python, plan_fd)]
        else:
            join.append(f"printf '%s\\n' {shlex.quote(_namespaces.READY_PREFIX + nonce)} >&2")
            nxt = self._final_argv(paths, limits, cgroup)
        outer = "\n".join(["set -eu", *join, "unset PWD OLDPWD", 'exec "$@"'])
        return [_namespaces.tool("setpriv"), "--pdeathsig", "KILL", "--", "/bin/sh", "-c", outer,
                "lemur-sbx", *nxt]

    def _plan(self, paths: JobPaths, limits: Limits, final: list[str], ready: str,
              status_fd: int, inproc: dict[str, Any] | None = None) -> _namespaces.Plan:
        hidden = self._hidden_resolved()
        sources = [paths.in_dir, paths.out_dir, paths.data_dir, self._package_root / "sandbox"]
        for src in sources:
            if _is_under(Path(os.path.realpath(src)), self._root):
                raise ValueError(f"{src} lies under the sandbox root {self._root}")
        covered = [*hidden, *(Path(p) for p in _namespaces.SCRATCH_DIRS)]
        exposed = [d for d in _interpreter_dirs(self._python)
                   if any(_is_under(d, h) for h in covered) and os.path.exists(d)]
        return _namespaces.Plan(
            root=str(self._root), userns=self._mode == "userns",
            job_in=os.path.realpath(paths.in_dir), job_out=os.path.realpath(paths.out_dir),
            data_dir=os.path.realpath(paths.data_dir),
            sandbox_pkg=os.path.realpath(self._package_root / "sandbox"),
            hidden=[str(h) for h in hidden],
            exposed=exposed, tmp_bytes=min(limits.memory_bytes // 4, 1 << 30),
            gpu_nodes=_gpu_nodes() if limits.gpu is not None else [],
            final_argv=final, ready_line=ready, status_fd=status_fd, inproc=inproc)

    # --- the isolation report ---------------------------------------------------------------------
    def _isolation(self, limits: Limits | None, cgroup: _cgroups.JobCgroup | None) -> dict[str, Any]:
        ns = self.namespaces
        info: dict[str, Any] = {"backend": self.name}
        if ns:
            info["mode"] = "namespaces (" + ("user+" if self._mode == "userns" else "") + "net+mount+pid)"
            info["network"] = "none (new network namespace: only a loopback that is down)"
            info["filesystem"] = (
                "private mount namespace: every host mount read-only; writable only out/, /tmp and "
                "/dev/shm (size-capped tmpfs); hidden_paths (zoo, datasets, other jobs as configured) "
                "and sensitive host paths (credentials, /run, /var/tmp, logs) covered; the rest of the host "
                "filesystem stays readable (out/'s cap: see out_cap)")
            info["seccomp"] = "setuid/setgid mode bits refused (chmod, open, mknod); the rest allowed"
            info["devices"] = "minimal /dev (null, zero, full, random, urandom" + (
                ", all /dev/nvidia* nodes)" if limits is not None and limits.gpu is not None else ")")
            info["pid_namespace"] = True
            info["user"] = "uid 0 without capabilities" + (
                " in a user namespace (nested user namespaces blocked)" if self._mode == "userns"
                else " (no user namespace: nested user namespaces NOT blocked)")
            info["capabilities"] = "none (bounding, inheritable, ambient cleared; no_new_privs; securebits noroot)"
        else:
            info["mode"] = "none: plain subprocess (NOT isolated)"
            info["network"] = "host network (NOT isolated)"
            info["filesystem"] = "host filesystem visible with the server's permissions (NOT isolated)"
            info["pid_namespace"] = False
            info["capabilities"] = ("none, but uid 0 (owner of most host files)" if os.geteuid() == 0
                                    else f"uid {os.geteuid()}, no_new_privs")
            info["isolation_fallback_reason"] = self._mode_reason
        info["hidden_paths"] = [str(p) for p in self._hidden_resolved()] if ns else []
        if ns:  # per job: "zygote" or "exec"
            exec_chain = "exec chain (unshare, prlimit, setpriv)"
            info["launch"] = exec_chain if self._zygote is None else (
                "zygote: CPU jobs forked from a pre-imported runner, the namespaces, rlimits, capability drop and "
                f"seccomp applied in the child before the job; GPU jobs: {exec_chain}")
        info["environment"] = "scrubbed (PATH, HOME, LANG, PYTHON*, thread counts, CUDA_VISIBLE_DEVICES)"
        info.update(self._limit_report(limits, cgroup))
        info["out_cap"] = out_cap_text(limits)
        info["wall_clock"] = "enforced by the host (SIGKILL of the process group and the cgroup)"
        return info

    def _limit_report(self, limits: Limits | None, cgroup: _cgroups.JobCgroup | None) -> dict[str, Any]:
        if limits is None:
            if self._cg_version is not None:
                kind = f"cgroup {self._cg_version}"
                return {"memory_limit": kind, "pids_limit": kind, "cpu_quota": kind,
                        "rlimits": "fsize (per file = out_cap_bytes), core=0, nofile=1024"}
            return {"memory_limit": "RLIMIT_AS (CPU jobs only; none on GPU jobs)",
                    "pids_limit": self._nproc_text(), "cpu_quota": "none (no cgroup)",
                    "rlimits": "fsize (per file = out_cap_bytes), core=0, nofile=1024",
                    "cgroup_fallback_reason": self._cg_reason}
        fsize = max(1 << 20, limits.out_cap_bytes)
        rl = f"fsize={fsize} (per file), core=0, nofile={_NOFILE}"
        if cgroup is not None:
            return {**cgroup.applied, "rlimits": rl}
        mem = (f"RLIMIT_AS {limits.memory_bytes}" if limits.gpu is None
               else "none (RLIMIT_AS breaks CUDA and there is no cgroup)")
        return {"memory_limit": mem, "pids_limit": self._nproc_text(limits.pids),
                "cpu_quota": "none (no cgroup)", "rlimits": rl,
                "cgroup_fallback_reason": self._cg_reason}

    @staticmethod
    def _nproc_text(n: int | None = None) -> str:
        if os.geteuid() == 0:
            return "none (no cgroup; RLIMIT_NPROC is ignored for uid 0)"
        value = "" if n is None else f" {n}"
        return f"RLIMIT_NPROC{value} (counts every process of the uid on the host)"

    def _forget(self, handle: _ProcessHandle) -> None:
        self._live.discard(handle)


def _close_zygotes(zygotes: list[process_zygote.Zygote]) -> None:
    for z in zygotes:
        z.close(join=False)


def _send_plan(plan: _namespaces.Plan, plan_w: int, fds: list[int]) -> None:
    """Write the plan into its pipe and close that end (the bootstrap reads to end of file)."""
    _write_all(plan_w, plan.to_json().encode())
    os.close(plan_w)
    fds.remove(plan_w)


def _undo_spawn(cgroup: _cgroups.JobCgroup | None, fds: list[int]) -> None:
    """A spawn that failed: remove its cgroup and close the pipe ends it still holds."""
    if cgroup is not None:
        cgroup.remove()
    for fd in fds:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    """Into a fresh pipe (64 KiB buffer): a plan is a few KiB, so this never blocks."""
    if len(data) > 60_000:
        raise ValueError("sandbox plan too large (too many hidden paths?)")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _parse_report(text: str) -> tuple[str, int] | None:
    """"exit 3" -> ("exit", 3), "signal 9" -> ("signal", 9); anything else -> None."""
    parts = text.split()
    if len(parts) == 2 and parts[0] in ("exit", "signal") and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None


def _gpu_nodes() -> list[str]:
    """Every NVIDIA device node: CUDA_VISIBLE_DEVICES picks the device, it is not a boundary."""
    dev = Path("/dev")
    names = [n for n in _namespaces.GPU_NODE_NAMES if (dev / n).exists()]
    names += sorted(p.name for p in dev.glob("nvidia[0-9]*"))
    nodes = [f"/dev/{n}" for n in names]
    if (dev / "nvidia-caps").is_dir():
        nodes.append("/dev/nvidia-caps")
    return nodes


class _ProcessHandle(MonitoredHandle):
    """A running sandbox; a daemon thread (`_monitor`) owns the process from spawn to cleanup."""

    def __init__(self, backend: ProcessBackend, paths: JobPaths, limits: Limits, spawned: process_prestart.Spawned,
                 isolation: dict[str, Any], early_output: bytes = b"") -> None:
        self.paths = paths
        self._backend = backend
        self._limits = limits
        self._proc = spawned.proc
        self._cgroup = spawned.cgroup
        self._isolation = isolation
        self._ready = (_namespaces.READY_PREFIX + spawned.nonce + "\n").encode()
        self._status_fd = spawned.status_fd  # the namespace init's report ("exit N" / "signal N"), or -1
        self._t0 = time.monotonic()
        self._deadline = self._t0 + limits.wall_s
        self._lock = threading.Lock()
        self._reason: str | None = None  # "timeout" | "cancel" | "disk"
        self._killed = False
        self._ready_s: float | None = None
        self._pre = bytearray()  # output before the ready marker (bootstrap errors)
        self._log = LogTail(limits.log_cap_bytes)
        self._exit: Exit | None = None
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._out_watch = self._out_dir_watch()
        if early_output:  # a warm sandbox's output before its job (the bootstrap's ready line)
            self._feed(early_output)
        self._thread = threading.Thread(target=self._monitor, name=f"lemur-sbx-{self._proc.pid}", daemon=True)
        self._thread.start()
        self._out_watch.start()

    # --- kill requests (the rest of the Handle API is MonitoredHandle's) ------------------
    def _request(self, reason: str) -> None:
        """Ask the monitor to kill (first reason wins). Under the lock: the monitor closes the
        wake pipe under the same lock, so this never writes to a closed (or reused) fd."""
        with self._lock:
            if self._reason is not None or self._done.is_set():
                return
            self._reason = reason
            os.write(self._wake_w, b"x")

    # --- monitor thread -----------------------------------------------------------------------
    def _monitor(self) -> None:
        try:
            self._pump()
        except BaseException:
            log.exception("sandbox monitor failed; killing the sandbox")
            self._kill()
            self._proc.wait()
        finally:
            try:
                self._exit = self._finish()
            except BaseException:
                log.exception("sandbox cleanup failed")
                self._exit = Exit(exit_code=None, log_tail=self._tail(), isolation=self._isolation)
            finally:
                self._backend._forget(self)
                with self._lock:
                    self._done.set()
                    os.close(self._wake_r)
                    os.close(self._wake_w)

    def _pump(self) -> None:
        """Drain the pipe and watch the clock until the sandbox's top process has exited."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        os.set_blocking(fd, False)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        out_open = True
        while True:
            if time.monotonic() >= self._deadline:
                self._request("timeout")
            if self._reason is not None and not self._killed:
                self._kill()
            if self._proc.poll() is not None:
                return
            remaining = self._deadline - time.monotonic()
            timeout = 0.02 if self._killed else max(0.0, min(remaining, 0.25 if out_open else 0.02))
            for ready_fd, _ in poller.poll(timeout * 1000):
                if ready_fd == self._wake_r:
                    os.read(self._wake_r, 64)
                elif not self._read_available(fd):
                    out_open = False
                    poller.unregister(fd)

    def _read_available(self, fd: int) -> bool:
        """Read what the pipe holds; False at end of file."""
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            self._feed(chunk)

    def _feed(self, chunk: bytes) -> None:
        """Output up to the bootstrap's ready line is held back (it marks the moment the sandbox
        was built); the line itself is dropped, everything else goes to the log."""
        if self._ready_s is None:
            self._pre += chunk
            i = self._pre.find(self._ready)
            if i < 0:
                if len(self._pre) > _READY_SEARCH_BYTES:  # cannot be the bootstrap any more
                    self._ready_s = float("nan")
                    chunk, self._pre = bytes(self._pre), bytearray()
                else:
                    return
            else:
                self._ready_s = time.monotonic() - self._t0
                chunk = bytes(self._pre[:i] + self._pre[i + len(self._ready):])
                self._pre = bytearray()
        self._feed_log(chunk)

    def _kill(self) -> None:
        """SIGKILL the process group (unshare, or the runner itself) and every pid of the cgroup.
        Only this thread reaps the process, so its pid (the group id) cannot have been reused."""
        self._killed = True
        if self._proc.returncode is None:
            process_prestart.kill_top(self._proc)
        if self._cgroup is not None:
            self._cgroup.kill_all(timeout_s=1.0)

    def _finish(self) -> Exit:
        """After the top process exited: kill leftovers, drain the log, read OOM, remove the cgroup."""
        rc = self._proc.wait()
        wall = time.monotonic() - self._t0
        if self._cgroup is not None:
            self._cgroup.kill_all()
        elif not self._backend.namespaces:
            try:  # best effort without cgroup and pid namespace: same process group only
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._drain_rest()
        report = _parse_report(self._read_status())
        sigkilled = rc == -signal.SIGKILL or report == ("signal", signal.SIGKILL)
        oom = self._cgroup is not None and self._cgroup.oom_killed(sigkilled)
        code, sig = self._status(rc, report, oom)
        if self._cgroup is not None:
            self._cgroup.remove()
        isolation = dict(self._isolation)
        if self._ready_s is None:
            isolation["sandbox_error"] = "the sandbox setup did not complete; the runner never started"
        elif not math.isnan(self._ready_s):
            isolation["setup_s"] = round(self._ready_s, 4)
        reason = self._reason if self._killed else None  # a request after a normal exit is moot
        return Exit(exit_code=code, signal=sig, timed_out=reason == "timeout",
                    cancelled=reason == "cancel", oom_killed=oom, log_tail=self._tail(),
                    log_truncated=self._log.truncated, wall_s=wall, isolation=isolation,
                    out_exceeded=self._out_watch.over_cap())

    def _read_status(self) -> str:
        """The init's report (written before the init exited, so it is there now or never)."""
        if self._status_fd < 0:
            return ""
        try:
            os.set_blocking(self._status_fd, False)
            return os.read(self._status_fd, 64).decode("ascii", errors="replace")
        except OSError:
            return ""
        finally:
            os.close(self._status_fd)
            self._status_fd = -1

    def _status(self, rc: int, report: tuple[str, int] | None, oom: bool) -> tuple[int | None, int | None]:
        """(exit_code, signal) of the runner. With namespaces the init's report is authoritative.
        Without one (the init itself died) unshare's status stands, except that unshare 2.38 exits
        1 ("sigprocmask unblock failed") when its child was SIGKILLed, as by the OOM killer."""
        if report is not None:
            return (None, report[1]) if report[0] == "signal" else (report[1], None)
        if rc < 0:
            return None, -rc
        if oom and rc == 1 and self._backend.namespaces:
            return None, int(signal.SIGKILL)
        return rc, None

    def _drain_rest(self, timeout_s: float = 2.0) -> None:
        """Read the pipe to its end (it may still hold output); give up after `timeout_s` if a
        leftover process we could not kill keeps it open (only possible with no cgroup/namespace)."""
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        poller = select.poll()  # not select(): a busy server may have fds above FD_SETSIZE
        poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                if poller.poll(left * 1000) and not self._read_available(fd):
                    break
        finally:
            self._proc.stdout.close()
        if self._pre:  # no ready marker: keep the bootstrap's messages
            pre, self._pre = bytes(self._pre), bytearray()
            self._feed_log(pre)
