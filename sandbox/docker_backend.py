"""Run the sandbox runner in a locked-down Docker container, one fresh container per job.

Why Docker next to the process backend: a container gives every job its own root filesystem (our
image, read-only), network, pid and IPC namespaces, a memory/pids/CPU cgroup and Docker's default
seccomp profile, on any host with an engine, and it is what production GPU hosts run anyway.

How one job runs (`DockerBackend.start`):

* `containers.create` + `start` (never `containers.run`: a failed start leaves a Created container
  behind), named `lemur-sbx-<job>-<random>` and labelled `lemur-agent-server.sandbox=1`,
  `lemur-agent-server.instance=<id>`, `lemur-agent-server.owner=<boot id>:<pid>:<start time>`, so a
  restarted server finds its orphans (`cleanup_orphans`). A container is never reused for a second job.
* Locked down: `network_mode=none` (only `lo`), read-only root, `/tmp` and `/dev/shm` size-capped
  tmpfs (noexec), `cap_drop=ALL`, `no-new-privileges`, the engine's default seccomp profile, user
  65534:65534, `pids_limit`, `mem_limit == memswap_limit`, `nano_cpus` (clamped to the engine's CPUs),
  ulimits nofile/core/fsize, a capped json-file log, `init=True` (tini reaps and forwards signals).
  Mounts: the job's `in/` (read-only) at /job/in, the dataset's public dir (read-only) at /data, and
  the job's `out/` (the only writable mount) at /job/out. No Docker socket, no other host path; the
  dataset's private dir (test labels) is never mounted. The environment is ours only (thread counts,
  HOME=/tmp, NVIDIA_*): nothing of the server's environment enters (the sandbox can read its own).
* The out dir is made writable for uid 65534 before the start: chown when the server is root; a
  POSIX ACL for 65534 plus a default ACL for the server's uid otherwise (so the server can still delete
  what the sandbox wrote), or mode 0777 where ACLs are unsupported.
* A monitor thread per job owns the container from start to removal: it streams the log (keeping the
  last `Limits.log_cap_bytes`, `log_truncated` when more came), enforces the wall clock from outside
  (`wait(timeout)` then `kill`: never trust SIGTERM or `timeout docker run`), reads `State.ExitCode` and
  `State.OOMKilled` with `inspect` BEFORE `remove(force=True)` (OOMKilled can be true with exit 0),
  and always removes the container. `cancel()` kills at once. If the task awaiting `wait()` is
  cancelled, the container is still killed and removed (shielded), and even if nobody awaits at all,
  the thread enforces the deadline and cleans up.
* Every Docker SDK call is blocking: the async methods run them with `anyio.to_thread.run_sync`.
* `Exit.isolation` is read back from `inspect` of the container that ran, not from what we asked for.

GPU: `Limits.gpu = "0"` adds `DeviceRequest(device_ids=["0"], capabilities=[["gpu"]])` (as
`--gpus device=0`) and `NVIDIA_VISIBLE_DEVICES=0`, `NVIDIA_DRIVER_CAPABILITIES=compute,utility`;
CPU jobs get `NVIDIA_VISIBLE_DEVICES=void`, so a base image's `NVIDIA_VISIBLE_DEVICES=all` exposes
nothing even when the nvidia runtime is the engine's default. Host setup for GPU jobs:
  1. an NVIDIA driver on the host;
  2. the NVIDIA Container Toolkit (>= 1.17.8; from NVIDIA's apt/yum repository, not Debian's):
     `apt-get install nvidia-container-toolkit`, then `nvidia-ctk runtime configure --runtime=docker`;
  3. restart dockerd (the engine registers its `gpu` device driver at start-up only if
     `nvidia-container-runtime-hook` is on its PATH). Without it, starts fail with
     `could not select device driver "" with capabilities: [[gpu]]`, raised by `start()`.
  Run one job per GPU: GPU memory has no cgroup limit, only the wall clock bounds a spinning kernel.
  Never give an agent a choice of image, base or environment variables (toolkit CVEs need those).

Pre-start (`DockerBackend(prestart=True)`): mounts are fixed when a container is created, so a warm
container gets its own fresh job dir at pre-start time: `<jobs_root>/.lemur-prestart-<random>/{in,out}`,
on the same filesystem as the jobs. The pool keeps ONE warm container per slot (`prestart_slots`),
keyed by the dataset dir and the limits fixed at creation (memory, cpus, pids, gpu, out/log caps).
When `start(paths, limits)` finds a matching warm container, it *adopts* it: it moves the files of
`paths.in_dir` (all but spec.json) and `paths.out_dir` into the warm dirs, renames the warm `in/` and
`out/` into `paths.job_dir` in place of the evaluator's (bind mounts follow a directory through a
rename), and moves `spec.json` in last, which is the signal that starts the job. The caller's `JobPaths`
stay valid; the evaluator needs no change. A warm container that died, or one older than
`prestart_max_age_s`, is removed and the job starts cold. After each start the pool refills itself
in a background thread for the key just used. `await prestart(data_dir, limits)` warms one ahead of
the first job. Warm containers count as sandboxes for `cleanup_orphans` and are removed by `aclose`.

The pre-start contract (what the process in a warm container does; `PRESTART_BOOTSTRAP` below
implements it around the one-shot runner, so no runner change is needed; a runner that implements it
natively as `python -m sandbox.runner --wait /job/in/spec.json` can be used with
`prestart_command=RUNNER_WAIT_COMMAND`):
  1. Import numpy, torch, torchvision, optuna, safetensors; if a GPU is visible
     (`NVIDIA_VISIBLE_DEVICES` is not `void`) initialise CUDA (`torch.cuda.init()` + a tiny tensor).
     Write NOTHING under /job/out while waiting.
  2. Print one line starting with `lemur-runner: waiting` to stdout (the backend uses it to tell a
     warm container from a starting one; optional).
  3. Poll for /job/in/spec.json every <= 20 ms. The host moves model.py in first and spec.json last
     (an atomic rename), so when spec.json exists the job's files are complete.
  4. Then behave exactly as `python -m sandbox.runner /job/in/spec.json`, with the job's time budget
     counting from the moment spec.json was seen (not from the container start).
  5. Run that one job and exit; never wait for a second one. Exit 0 without output if no spec arrives
     within $LEMUR_RUNNER_WAIT_MAX_S seconds (default 3600).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from sandbox.backend import Backend, Exit, Handle, JobPaths, Limits, MonitoredHandle, RunnerPaths, out_cap_text
from sandbox.protocol import MODEL_FILE, SPEC_FILE

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "lemur-agent-server-sandbox:latest"
SANDBOX_UID = 65534
SANDBOX_USER = f"{SANDBOX_UID}:{SANDBOX_UID}"
NAME_PREFIX = "lemur-sbx-"
LABEL_SANDBOX = "lemur-agent-server.sandbox"
LABEL_INSTANCE = "lemur-agent-server.instance"
LABEL_OWNER = "lemur-agent-server.owner"
LABEL_JOB = "lemur-agent-server.job"
LABEL_PRESTART = "lemur-agent-server.prestart"
LABEL_SLOT_DIR = "lemur-agent-server.slot-dir"
IN_DIR, OUT_DIR, DATA_DIR = "/job/in", "/job/out", "/data"
SPEC_PATH = f"{IN_DIR}/{SPEC_FILE}"
RUN_COMMAND = ["python3", "-m", "sandbox.runner", SPEC_PATH]
RUNNER_WAIT_COMMAND = ["python3", "-m", "sandbox.runner", "--wait", SPEC_PATH]
WAIT_MARKER = "lemur-runner: waiting"
SLOT_PREFIX = ".lemur-prestart-"
_NOFILE = 1024
_KILL_GRACE_S = 30.0

# The pre-start contract (module docstring) implemented around the one-shot runner.
PRESTART_BOOTSTRAP = r"""
import os, sys, time
spec = sys.argv[1]
import numpy, torch, torchvision, optuna, safetensors
if os.environ.get("NVIDIA_VISIBLE_DEVICES", "void") not in ("", "void", "none") and torch.cuda.is_available():
    torch.cuda.init()
    torch.zeros(1, device="cuda")
print("lemur-runner: waiting for", spec, flush=True)
deadline = time.monotonic() + float(os.environ.get("LEMUR_RUNNER_WAIT_MAX_S", "3600"))
while not os.path.exists(spec):
    if time.monotonic() > deadline:
        sys.exit(0)
    time.sleep(0.005)
import runpy
sys.argv = [sys.argv[0], spec]
runpy.run_module("sandbox.runner", run_name="__main__", alter_sys=True)
"""
PRESTART_COMMAND = ["python3", "-c", PRESTART_BOOTSTRAP, SPEC_PATH]


class SandboxStartError(RuntimeError):
    """The engine refused to create or start the container (the message says why)."""


def _docker():  # type: ignore[no-untyped-def]
    import docker

    return docker


def _requests_errors() -> tuple[type[BaseException], ...]:
    import requests

    return (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _proc_start(pid: int) -> str:
    """The start time of process `pid` (clock ticks since boot): with the boot id, a unique identity."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return raw.rsplit(")", 1)[-1].split()[19]


def _owner_id() -> str:
    return f"{_boot_id()}:{os.getpid()}:{_proc_start(os.getpid())}"


def _owner_alive(owner: str) -> bool:
    try:
        boot, pid, start = owner.rsplit(":", 2)
    except ValueError:
        return False
    return boot == _boot_id() and pid.isdigit() and bool(start) and _proc_start(int(pid)) == start


def _safe_name(text: str, limit: int = 40) -> str:
    text = re.sub(r"[^a-zA-Z0-9_.-]+", "-", text).strip("-.") or "job"
    return text[:limit]


# --- making out/ writable for uid 65534 -------------------------------------------------------------------
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _acl_blob(users: dict[int, int]) -> bytes:
    """A POSIX ACL in the kernel's xattr format (version 2): owner rwx, `users` {uid: perm}, group r-x,
    mask rwx, other r-x."""
    undefined = 0xFFFFFFFF
    entries = [(_ACL_USER_OBJ, 7, undefined)]
    entries += [(_ACL_USER, perm, uid) for uid, perm in sorted(users.items())]
    entries += [(_ACL_GROUP_OBJ, 5, undefined), (_ACL_MASK, 7, undefined), (_ACL_OTHER, 5, undefined)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


def prepare_out_dir(out_dir: Path) -> str:
    """Make `out_dir` (a real directory, not a link) writable for the sandbox user. Returns how."""
    st = os.lstat(out_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{out_dir} is not a directory (or is a symbolic link)")
    if os.geteuid() == 0:
        os.chown(out_dir, SANDBOX_UID, SANDBOX_UID)
        os.chmod(out_dir, 0o755)
        return "chown 65534"
    me = os.geteuid()
    try:
        os.setxattr(out_dir, "system.posix_acl_access", _acl_blob({SANDBOX_UID: 7}))
        os.setxattr(out_dir, "system.posix_acl_default", _acl_blob({SANDBOX_UID: 7, me: 7}))
        return "acl"
    except OSError:
        os.chmod(out_dir, 0o777)
        return "mode 0777"


PRIVATE_NAMES = ("test_y.npy", "private")  # sandbox.datasets keeps test labels in <dataset>/private/


def _refuse_private(data_dir: str) -> None:
    """Defence in depth: never mount a dataset dir that holds test labels (the public dir never does)."""
    for name in PRIVATE_NAMES:
        if os.path.lexists(os.path.join(data_dir, name)):
            raise ValueError(f"refusing to mount {data_dir}: it contains {name!r} (test labels stay unmounted)")


def _check_dir(path: Path, what: str) -> str:
    """The real path of an existing directory that is not itself a symbolic link."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise FileNotFoundError(f"{what} {path} is missing") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{what} {path} is not a directory (or is a symbolic link)")
    return os.path.realpath(path)


# --- the pool of pre-started containers ---------------------------------------------------------------
@dataclasses.dataclass
class _Warm:
    container: Any
    key: tuple[Any, ...]
    slot: Path
    created: float
    started_s: float


def _pool_key(data_dir: Path | str, limits: Limits) -> tuple[Any, ...]:
    return (os.path.realpath(data_dir), limits.memory_bytes, float(limits.cpus), limits.pids, limits.gpu,
            limits.out_cap_bytes, limits.log_cap_bytes)


class DockerBackend(Backend):
    """Runs each job in a fresh, locked-down container of `image` (see the module docstring).

    `prestart`: keep `prestart_slots` warm containers (one per evaluator slot) ready for the next job.
    `jobs_root`: where warm job dirs go (same filesystem as the jobs); learned from the first job if
    None. `instance_id`: this server's id in the container labels (random by default). `runtime`: an
    OCI runtime registered with the engine, e.g. "runsc" for gVisor. `client`: a docker.DockerClient.
    """

    name = "docker"

    def __init__(self, image: str = DEFAULT_IMAGE, *, prestart: bool = False, prestart_slots: int = 1,
                 prestart_command: list[str] | None = None, prestart_max_age_s: float = 1800.0,
                 jobs_root: Path | None = None, instance_id: str | None = None, runtime: str | None = None,
                 client: Any = None) -> None:
        self.image = image
        self.instance_id = instance_id or secrets.token_hex(6)
        self.runtime = runtime
        self._prestart = prestart
        self._slots = max(1, int(prestart_slots))
        self._prestart_command = list(prestart_command or PRESTART_COMMAND)
        self._max_age = prestart_max_age_s
        self._jobs_root = Path(jobs_root) if jobs_root is not None else None
        self._client = client
        self._client_lock = threading.Lock()
        self._owner = _owner_id()
        self._engine: dict[str, Any] | None = None
        self._live: set[_DockerHandle] = set()
        self._live_lock = threading.Lock()
        self._pool: list[_Warm] = []
        self._pool_lock = threading.Lock()
        self._filling = 0
        self._warm_failures = 0
        self._closed = False

    # --- engine ---------------------------------------------------------------------------------------
    @classmethod
    def available(cls, image: str = DEFAULT_IMAGE, timeout_s: float = 5.0) -> bool:
        """True when a Docker engine answers and has `image` locally (used by `--sandbox auto`)."""
        try:
            client = _docker().from_env(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - no engine, no socket, no SDK config
            return False
        try:
            client.ping()
            client.images.get(image)
            return True
        except Exception:  # noqa: BLE001
            return False
        finally:
            with contextlib.suppress(Exception):
                client.close()

    @property
    def client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                self._client = _docker().from_env(timeout=120, max_pool_size=64)
            return self._client

    def _engine_info(self) -> dict[str, Any]:
        if self._engine is None:
            info = self.client.info()
            sec = info.get("SecurityOptions") or []
            seccomp = next((s for s in sec if "seccomp" in s), None)
            profile = None
            if seccomp:
                m = re.search(r"profile=([^,]+)", seccomp)
                profile = m.group(1) if m else "default"
            self._engine = {"ncpu": int(info.get("NCPU") or os.cpu_count() or 1),
                            "version": info.get("ServerVersion"), "seccomp": profile,
                            "cgroup": info.get("CgroupVersion"), "runtime": info.get("DefaultRuntime"),
                            "security_options": sec}
        return self._engine

    # --- Backend API ----------------------------------------------------------------------------------
    def runner_paths(self, paths: JobPaths) -> RunnerPaths:
        return RunnerPaths(spec=SPEC_PATH, model=f"{IN_DIR}/{MODEL_FILE}", data_dir=DATA_DIR, out_dir=OUT_DIR)

    def describe(self, limits: Limits | None = None) -> dict[str, Any]:
        """What isolation this backend provides here (per-job values when `limits` is given)."""
        try:
            engine = self._engine_info()
        except Exception:  # noqa: BLE001 - describe must not fail when the engine is down
            engine = {"ncpu": os.cpu_count() or 1, "version": None, "seccomp": None}
        seccomp = engine.get("seccomp")
        info: dict[str, Any] = {
            "backend": self.name, "image": self.image, "engine": engine.get("version"),
            "runtime": self.runtime or engine.get("runtime") or "runc",
            "network": "none", "read_only_root": True, "user": str(SANDBOX_UID), "capabilities": "none",
            "no_new_privileges": True,
            "seccomp": "default" if seccomp == "default" else (seccomp or "unavailable on this engine"),
            "mounts": {IN_DIR: "job in/ (read-only)", DATA_DIR: "dataset public dir (read-only)",
                       OUT_DIR: "job out/ (read-write)"},
            "tmpfs": "/tmp and /dev/shm, size-capped, noexec",
            "out_cap": out_cap_text(limits),
            "orphan_cleanup": "containers labelled with this server's identity",
            "wall_clock": "enforced by the host (wait with timeout, then kill)",
            "prestart": self._prestart,
        }
        if limits is None:
            info.update(memory_limit="per job: Limits.memory_bytes (swap off)", pids_limit="per job: Limits.pids",
                        cpus=f"per job: Limits.cpus (<= {engine['ncpu']})", gpu="per job: Limits.gpu or none")
        else:
            info.update(memory_limit=limits.memory_bytes, pids_limit=limits.pids,
                        cpus=min(float(limits.cpus), float(engine["ncpu"])), gpu=limits.gpu)
        return info

    async def start(self, paths: JobPaths, limits: Limits) -> Handle:
        """Create and start the job's container (or adopt a warm one); return at once."""
        if self._closed:
            raise RuntimeError("the Docker backend is closed")
        return await anyio.to_thread.run_sync(self._start_sync, paths, limits)

    async def prestart(self, data_dir: Path, limits: Limits, jobs_root: Path | None = None,
                       wait_ready: bool = False, timeout_s: float = 120.0) -> None:
        """Make sure one warm container for (data_dir, limits) exists; with `wait_ready`, also wait
        until its runner prints the waiting line (torch imported, device initialised)."""
        await anyio.to_thread.run_sync(lambda: _refuse_private(_check_dir(Path(data_dir), "dataset dir")))
        if jobs_root is not None:
            self._jobs_root = Path(jobs_root)
        if self._jobs_root is None:
            raise ValueError("prestart needs jobs_root (the directory that holds the job dirs)")
        key = _pool_key(data_dir, limits)
        with self._pool_lock:
            warm = next((w for w in self._pool if w.key == key), None)
        if warm is None:
            warm = await anyio.to_thread.run_sync(self._create_warm, Path(data_dir), limits)
            if warm is None:
                raise SandboxStartError("could not pre-start a sandbox container (see the log)")
        if wait_ready:
            await anyio.to_thread.run_sync(self._wait_warm_ready, warm, timeout_s)

    async def cleanup_orphans(self) -> int:
        """Remove sandbox containers (and warm job dirs) whose server process is gone."""
        return await anyio.to_thread.run_sync(self._cleanup_orphans_sync)

    async def aclose(self) -> None:
        """Kill every running sandbox of this backend and remove the warm ones."""
        self._closed = True
        with self._live_lock:
            live = list(self._live)
        for handle in live:
            await handle.cancel()
        for _ in range(1200):  # a pre-start in flight discards its container itself once it sees _closed
            with self._pool_lock:
                if not self._filling:
                    break
            await anyio.sleep(0.05)
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for warm in pool:
            await anyio.to_thread.run_sync(self._discard, warm)

    # --- container configuration -----------------------------------------------------------------------
    def _labels(self, job: str, prestart: bool, slot: Path | None = None) -> dict[str, str]:
        labels = {LABEL_SANDBOX: "1", LABEL_INSTANCE: self.instance_id, LABEL_OWNER: self._owner, LABEL_JOB: job,
                  LABEL_PRESTART: "1" if prestart else "0"}
        if slot is not None:
            labels[LABEL_SLOT_DIR] = str(slot)
        return labels

    def _create_kwargs(self, in_dir: str, out_dir: str, data_dir: str, limits: Limits, command: list[str],
                       name: str, labels: dict[str, str]) -> dict[str, Any]:
        from docker.types import DeviceRequest, LogConfig, Mount, Ulimit

        ncpu = self._engine_info()["ncpu"]
        cpus = max(0.01, min(float(limits.cpus), float(ncpu)))
        threads = str(max(1, math.ceil(cpus)))
        tmp_bytes = int(min(max(limits.memory_bytes // 4, 64 << 20), 1 << 30))
        fsize = max(1 << 20, int(limits.out_cap_bytes))
        env = {"HOME": "/tmp", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "OPENBLAS_NUM_THREADS": threads, "NVIDIA_VISIBLE_DEVICES": "void",
               "NVIDIA_DRIVER_CAPABILITIES": "compute,utility", "LEMUR_SANDBOX": "docker"}
        log_size = str(max(1 << 20, 2 * limits.log_cap_bytes))
        kw: dict[str, Any] = {
            "image": self.image, "command": command, "name": name, "labels": labels,
            "user": SANDBOX_USER, "working_dir": OUT_DIR, "hostname": "sandbox", "environment": env,
            "network_mode": "none", "read_only": True, "ipc_mode": "private",
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,noexec,size={tmp_bytes}"}, "shm_size": tmp_bytes,
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "privileged": False,
            "pids_limit": int(limits.pids), "mem_limit": int(limits.memory_bytes),
            "memswap_limit": int(limits.memory_bytes), "nano_cpus": int(cpus * 1e9), "init": True,
            "ulimits": [Ulimit(name="nofile", soft=_NOFILE, hard=_NOFILE), Ulimit(name="core", soft=0, hard=0),
                        Ulimit(name="fsize", soft=fsize, hard=fsize)],
            "log_config": LogConfig(type="json-file", config={"max-size": log_size, "max-file": "1"}),
            "mounts": [Mount(target=IN_DIR, source=in_dir, type="bind", read_only=True),
                       Mount(target=DATA_DIR, source=data_dir, type="bind", read_only=True),
                       Mount(target=OUT_DIR, source=out_dir, type="bind", read_only=False)],
        }
        if limits.gpu is not None:
            kw["device_requests"] = [DeviceRequest(device_ids=[str(limits.gpu)], capabilities=[["gpu"]])]
            env["NVIDIA_VISIBLE_DEVICES"] = str(limits.gpu)
        if self.runtime:
            kw["runtime"] = self.runtime
        return kw

    def _create_and_start(self, kw: dict[str, Any]) -> tuple[Any, float]:
        """containers.create + start; on any failure remove what was created. Returns (container, s)."""
        docker = _docker()
        t0 = time.monotonic()
        container = None
        try:
            container = self.client.containers.create(**kw)
            container.start()
        except BaseException as exc:
            if container is not None:
                _remove(container)
            if isinstance(exc, docker.errors.DockerException):
                raise SandboxStartError(f"the Docker engine could not start the sandbox: {exc}") from exc
            raise
        return container, time.monotonic() - t0

    def _start_sync(self, paths: JobPaths, limits: Limits) -> _DockerHandle:
        in_dir = _check_dir(paths.in_dir, "job input dir")
        _check_dir(paths.out_dir, "job output dir")
        data_dir = _check_dir(paths.data_dir, "dataset dir")
        _refuse_private(data_dir)
        if not os.path.isfile(os.path.join(in_dir, SPEC_FILE)):
            raise FileNotFoundError(f"{paths.in_dir / SPEC_FILE} is missing: write the spec before start()")
        if self._jobs_root is None:
            self._jobs_root = paths.job_dir.parent
        handle = self._start_job(paths, limits, data_dir)
        if self._prestart and not self._closed:
            self._refill_later(data_dir, limits)  # the next job of this kind finds a warm container
        return handle

    def _start_job(self, paths: JobPaths, limits: Limits, data_dir: str) -> _DockerHandle:
        job = _safe_name(paths.job_dir.name)
        warm = self._take_warm(_pool_key(data_dir, limits), paths)
        if warm is not None:
            handle = self._adopt(warm, paths, limits, job)
            if handle is not None:
                return handle
        out_how = prepare_out_dir(paths.out_dir)
        name = f"{NAME_PREFIX}{job}-{secrets.token_hex(3)}"
        kw = self._create_kwargs(os.path.realpath(paths.in_dir), os.path.realpath(paths.out_dir), data_dir, limits,
                                 RUN_COMMAND, name, self._labels(job, prestart=False))
        t0 = time.monotonic()
        container, started_s = self._create_and_start(kw)
        return self._handle(container, paths, limits, t0, {"prestarted": False, "start_s": round(started_s, 4),
                                                           "out_dir_access": out_how})

    def _handle(self, container: Any, paths: JobPaths, limits: Limits, t0: float,
                extra: dict[str, Any]) -> _DockerHandle:
        handle = _DockerHandle(self, container, paths, limits, t0, extra)
        with self._live_lock:
            self._live.add(handle)
        handle.begin()
        return handle

    # --- pre-start pool ------------------------------------------------------------------------------------
    def _create_warm(self, data_dir: Path, limits: Limits) -> _Warm | None:
        """Create one warm container with its own job dir under jobs_root and add it to the pool."""
        if self._closed or self._jobs_root is None:
            return None
        slot = self._jobs_root / f"{SLOT_PREFIX}{secrets.token_hex(6)}"
        try:
            self._jobs_root.mkdir(parents=True, exist_ok=True)
            (slot / "in").mkdir(parents=True)
            (slot / "out").mkdir()
            os.chmod(slot, 0o755)
            os.chmod(slot / "in", 0o755)
            prepare_out_dir(slot / "out")
            key = _pool_key(data_dir, limits)
            name = f"{NAME_PREFIX}prestart-{secrets.token_hex(4)}"
            kw = self._create_kwargs(str(slot / "in"), str(slot / "out"), os.path.realpath(data_dir), limits,
                                     self._prestart_command, name, self._labels("prestart", True, slot))
            container, started_s = self._create_and_start(kw)
        except BaseException:
            shutil.rmtree(slot, ignore_errors=True)
            raise
        warm = _Warm(container=container, key=key, slot=slot, created=time.monotonic(), started_s=started_s)
        with self._pool_lock:
            self._pool.append(warm)
            excess = [w for w in self._pool if w.key != key][: max(0, len(self._pool) - self._slots)]
            for w in excess:
                self._pool.remove(w)
        for w in excess:
            self._discard(w)
        if self._closed:
            self._discard_from_pool(warm)
            return None
        return warm

    def _discard_from_pool(self, warm: _Warm) -> None:
        with self._pool_lock:
            if warm in self._pool:
                self._pool.remove(warm)
        self._discard(warm)

    def _discard(self, warm: _Warm) -> None:
        _remove(warm.container)
        shutil.rmtree(warm.slot, ignore_errors=True)

    def _wait_warm_ready(self, warm: _Warm, timeout_s: float) -> None:
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

    def _take_warm(self, key: tuple[Any, ...], paths: JobPaths) -> _Warm | None:
        if not self._pool:
            return None
        now = time.monotonic()
        stale: list[_Warm] = []
        found = None
        with self._pool_lock:
            for warm in list(self._pool):
                if now - warm.created > self._max_age:
                    self._pool.remove(warm)
                    stale.append(warm)
                elif found is None and warm.key == key:
                    self._pool.remove(warm)
                    found = warm
        for warm in stale:
            self._discard(warm)
        if found is not None:
            try:
                same_fs = os.stat(found.slot).st_dev == os.stat(paths.job_dir).st_dev
            except OSError:
                same_fs = False
            if not same_fs:
                log.warning("warm job dir %s is not on the filesystem of %s; starting cold", found.slot, paths.job_dir)
                self._discard(found)
                return None
        return found

    def _adopt(self, warm: _Warm, paths: JobPaths, limits: Limits, job: str) -> _DockerHandle | None:
        """Hand the job's files to a warm container (see the module docstring); None -> start cold."""
        docker = _docker()
        try:
            warm.container.reload()
            running = warm.container.status == "running"
        except docker.errors.DockerException:
            running = False
        if not running:
            self._warm_failures += 1
            tail = ""
            with contextlib.suppress(Exception):
                tail = warm.container.logs(tail=20).decode(errors="replace")
            log.warning("a pre-started sandbox had exited; starting cold. Its log: %s", tail[-1000:])
            self._discard(warm)
            if self._warm_failures >= 3:
                log.error("pre-started sandboxes keep dying; pre-start is off for this backend")
                self._prestart = False
            return None
        self._warm_failures = 0
        t0 = time.monotonic()
        slot_in, slot_out = warm.slot / "in", warm.slot / "out"
        tag = secrets.token_hex(4)
        old_in, old_out = paths.job_dir / f".old-in-{tag}", paths.job_dir / f".old-out-{tag}"
        try:
            for entry in os.listdir(paths.in_dir):
                if entry != SPEC_FILE:
                    os.rename(paths.in_dir / entry, slot_in / entry)
            for entry in os.listdir(paths.out_dir):
                os.rename(paths.out_dir / entry, slot_out / entry)
            os.rename(paths.in_dir, old_in)
            os.rename(slot_in, paths.in_dir)
            os.rename(paths.out_dir, old_out)
            os.rename(slot_out, paths.out_dir)
            os.rename(old_in / SPEC_FILE, paths.in_dir / SPEC_FILE)  # the go signal, last
        except BaseException:
            _remove(warm.container)
            raise
        finally:
            for d in (old_in, old_out, warm.slot):
                with contextlib.suppress(OSError):
                    d.rmdir()
            shutil.rmtree(warm.slot, ignore_errors=True)
        with contextlib.suppress(docker.errors.DockerException):
            warm.container.rename(f"{NAME_PREFIX}{job}-{secrets.token_hex(3)}")
        return self._handle(warm.container, paths, limits, t0,
                            {"prestarted": True, "start_s": round(warm.started_s, 4),
                             "adopt_s": round(time.monotonic() - t0, 4),
                             "warm_age_s": round(t0 - warm.created, 1)})

    def _refill_later(self, data_dir: str, limits: Limits) -> None:
        """Top the pool up to one warm container per slot for this key, in a background thread."""
        key = _pool_key(data_dir, limits)
        with self._pool_lock:
            have = sum(1 for w in self._pool if w.key == key) + self._filling
            if self._closed or have >= self._slots:
                return
            self._filling += 1

        def fill() -> None:
            try:
                self._create_warm(Path(data_dir), limits)
            except Exception:  # the next job simply starts cold
                log.exception("pre-starting a sandbox failed")
            finally:
                with self._pool_lock:
                    self._filling -= 1

        threading.Thread(target=fill, name="lemur-sbx-prestart", daemon=True).start()

    # --- orphans --------------------------------------------------------------------------------------------
    def _cleanup_orphans_sync(self) -> int:
        docker = _docker()
        removed = 0
        try:
            containers = self.client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})
        except docker.errors.DockerException as exc:
            log.warning("cannot list sandbox containers: %s", exc)
            return 0
        for c in containers:
            labels = c.labels or {}
            if labels.get(LABEL_INSTANCE) == self.instance_id or _owner_alive(labels.get(LABEL_OWNER, "")):
                continue
            if _remove(c):
                removed += 1
            slot = labels.get(LABEL_SLOT_DIR)
            if slot and Path(slot).name.startswith(SLOT_PREFIX) and os.path.isdir(slot):
                shutil.rmtree(slot, ignore_errors=True)
        return removed

    def _forget(self, handle: _DockerHandle) -> None:
        with self._live_lock:
            self._live.discard(handle)


def _remove(container: Any, attempts: int = 5) -> bool:
    """Kill and remove a container; True when it is gone."""
    docker = _docker()
    for i in range(attempts):
        try:
            container.remove(force=True, v=True)
            return True
        except docker.errors.NotFound:
            return True
        except docker.errors.DockerException as exc:
            if i == attempts - 1:
                log.error("could not remove sandbox container %s: %s", getattr(container, "name", "?"), exc)
                return False
            time.sleep(0.2 * (i + 1))
    return False


class _DockerHandle(MonitoredHandle):
    """A running container; a daemon thread (`_monitor`) owns it from start to removal."""

    def __init__(self, backend: DockerBackend, container: Any, paths: JobPaths, limits: Limits, t0: float,
                 extra: dict[str, Any]) -> None:
        self.paths = paths
        self.container = container
        self._backend = backend
        self._limits = limits
        self._t0 = t0
        self._deadline = t0 + limits.wall_s
        self._extra = extra
        self._lock = threading.Lock()
        self._reason: str | None = None  # "timeout" | "cancel" | "disk"
        self._killed = False
        self._log = bytearray()
        self._log_bytes = 0
        self._truncated = False
        self._exit: Exit | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name=f"{NAME_PREFIX}{container.short_id}",
                                        daemon=True)

    def begin(self) -> None:
        self._out_watch = self._out_dir_watch()
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
        docker = _docker()
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
                _remove(self.container)
                self._exit = Exit(exit_code=None, log_tail=self._tail(), log_truncated=self._truncated,
                                  wall_s=time.monotonic() - self._t0, isolation=self._backend.describe(self._limits))
            finally:
                self._backend._forget(self)
                self._done.set()

    def _wait_for_exit(self) -> int | None:
        """Block until the container stops; kill it at the deadline (and again every few seconds while
        it has not stopped). Returns the engine's status code, None if the container vanished or the
        engine stopped answering long after the kill."""
        docker = _docker()
        timeout_errors = _requests_errors()
        give_up = None
        while True:
            now = time.monotonic()
            remaining = self._deadline - now
            if remaining <= 0:
                self._request("timeout")  # the first reason wins: a cancel stays a cancel
                give_up = give_up or now + _KILL_GRACE_S
                if now > give_up:
                    log.error("sandbox %s did not stop after kill", self.container.name)
                    return None
                remaining = 5.0
            try:
                result = self.container.wait(timeout=max(0.5, min(remaining, 60.0)))
                return int(result.get("StatusCode", -1))
            except docker.errors.NotFound:
                return None
            except timeout_errors:
                time.sleep(0.1)  # a timeout, or an engine that does not answer: no hot loop
            except docker.errors.APIError as exc:
                log.warning("wait on %s: %s", self.container.name, exc)
                time.sleep(0.5)

    def _pump_logs(self) -> None:
        try:
            for chunk in self.container.logs(stream=True, follow=True, stdout=True, stderr=True):
                self._feed(chunk)
        except Exception as exc:  # noqa: BLE001 - the container went away: the log ends here
            log.debug("log stream of %s ended: %s", self.container.name, exc)

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._log_bytes += len(chunk)
        self._log += chunk
        cap = self._limits.log_cap_bytes
        if len(self._log) > cap:
            del self._log[: len(self._log) - cap]
            self._truncated = True

    def _tail(self) -> str:
        return bytes(self._log).decode("utf-8", errors="replace")

    def _finish(self, logs: threading.Thread, status: int | None) -> Exit:
        """Inspect (exit code, OOMKilled, what was applied), then remove the container."""
        wall = time.monotonic() - self._t0
        logs.join(timeout=5.0)
        attrs: dict[str, Any] = {}
        try:
            self.container.reload()
            attrs = self.container.attrs
        except Exception as exc:  # noqa: BLE001
            log.warning("inspect %s failed: %s", getattr(self.container, "name", "?"), exc)
        state = attrs.get("State") or {}
        if state.get("Running"):  # the wait ended without the container stopping (engine trouble)
            self._request("cancel")
            with contextlib.suppress(Exception):
                self.container.wait(timeout=_KILL_GRACE_S)
                self.container.reload()
                attrs = self.container.attrs
                state = attrs.get("State") or {}
        removed = _remove(self.container)
        code = state.get("ExitCode", status)
        code = int(code) if code is not None else None
        sig = None
        if code is not None and 128 < code <= 128 + 64:  # tini and the engine report signal N as 128 + N
            sig, code = code - 128, None
        reason = self._reason if self._killed else None
        isolation = self._isolation(attrs)
        if state.get("Error"):
            isolation["engine_error"] = state["Error"]
        if not removed:
            isolation["container_left_behind"] = self.container.name
        return Exit(exit_code=code, signal=sig, timed_out=reason == "timeout", cancelled=reason == "cancel",
                    oom_killed=bool(state.get("OOMKilled")), log_tail=self._tail(), log_truncated=self._truncated,
                    wall_s=wall, isolation=isolation,
                    out_exceeded=self._out_watch.over_cap())

    def _isolation(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """What the engine really applied to this container (from inspect), in describe()'s keys."""
        info = self._backend.describe(self._limits)
        host = attrs.get("HostConfig") or {}
        config = attrs.get("Config") or {}
        if not host:
            info["verified"] = False
            return {**info, **self._extra}
        caps = host.get("CapDrop") or []
        sec = host.get("SecurityOpt") or []
        info.update(
            verified=True, container=attrs.get("Name", "").lstrip("/"), image_id=attrs.get("Image"),
            network=host.get("NetworkMode"), read_only_root=bool(host.get("ReadonlyRootfs")),
            user=str(config.get("User", "")).split(":")[0] or "root",
            capabilities=("none" if "ALL" in caps and not host.get("CapAdd")
                          else f"drop {caps} add {host.get('CapAdd')}"),
            no_new_privileges=any(s.startswith("no-new-privileges") for s in sec),
            memory_limit=host.get("Memory"), memory_swap_limit=host.get("MemorySwap"),
            pids_limit=host.get("PidsLimit"), cpus=(host.get("NanoCpus") or 0) / 1e9,
            gpu=",".join(i for d in host.get("DeviceRequests") or [] for i in d.get("DeviceIDs") or []) or None,
            runtime=host.get("Runtime"), init=host.get("Init"), privileged=host.get("Privileged"),
            tmpfs=host.get("Tmpfs"), shm_size=host.get("ShmSize"),
            ulimits={u["Name"]: u["Hard"] for u in host.get("Ulimits") or []},
            mounts=[f"{m.get('Destination')}:{'rw' if m.get('RW') else 'ro'}" for m in attrs.get("Mounts") or []],
        )
        if any("seccomp=unconfined" in s for s in sec) or host.get("Privileged"):
            info["seccomp"] = "unconfined"
        return {**info, **self._extra}

