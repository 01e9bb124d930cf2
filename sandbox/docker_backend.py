"""Run the sandbox runner in a locked-down Docker container, one fresh container per job.

Why Docker next to the process backend: a container gives every job its own root filesystem (our
image, read-only), network, pid and IPC namespaces, a memory/pids/CPU cgroup and Docker's default
seccomp profile, on any host with an engine, and it is what production GPU hosts run anyway.

How one job runs (`DockerBackend.start`):

* `containers.create` + `start` (never `containers.run`: a failed start leaves a Created container
  behind), named `lemur-sbx-<job>-<random>` and labelled `lemur-agent-server.sandbox=1`,
  `lemur-agent-server.instance=<id>`, `lemur-agent-server.owner=<boot id>:<pid>:<start time>` (a
  reused pid is not the owner) and `lemur-agent-server.job=<job>` ("prestart" on a warm container:
  labels are fixed at creation, its name says the job once adopted), so a restarted server finds its
  orphans (`cleanup_orphans`). A container is never reused for a second job.
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
* A monitor thread per job (`sandbox.docker_handle`) owns the container from start to removal: it
  streams the log (keeping the
  last `Limits.log_cap_bytes`, `log_truncated` when more came), enforces the wall clock from outside
  (`wait(timeout)` then `kill`: never trust SIGTERM or `timeout docker run`), reads `State.ExitCode` and
  `State.OOMKilled` with `inspect` BEFORE `remove(force=True)` (OOMKilled can be true with exit 0),
  and always removes the container (after a kill it waits at most `KILL_GRACE_S` for the engine to
  report the stop). `cancel()` kills at once. If the task awaiting `wait()` is
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

Pre-start (`DockerBackend(prestart=True)`): warm containers that have imported torch wait for their
job's files; `sandbox.docker_prestart` holds the pool, the adoption of a warm container by a job, and
what the process in a warm container does. The runner itself has no waiting mode.

The per-job monitor thread and the isolation read back from `inspect` are in `sandbox.docker_handle`.
"""


from __future__ import annotations

import contextlib
import math
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from sandbox import _owner
from sandbox._docker_common import (
    DATA_DIR,
    DEFAULT_IMAGE,
    IN_DIR,
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_OWNER,
    LABEL_PRESTART,
    LABEL_SANDBOX,
    LABEL_SLOT_DIR,
    NAME_PREFIX,
    OUT_DIR,
    SANDBOX_UID,
    SANDBOX_USER,
    SandboxStartError,
    check_dir,
    docker_sdk,
    log,
    prepare_out_dir,
    refuse_private,
    remove_container,
    safe_name,
)
from sandbox.backend import Backend, Handle, JobPaths, Limits, RunnerPaths, out_cap_text
from sandbox.docker_handle import KILL_GRACE_S, DockerHandle
from sandbox.docker_prestart import SLOT_PREFIX, WarmPool, pool_key
from sandbox.prestart_files import worth_warming
from sandbox.protocol import MODEL_FILE, SPEC_FILE

__all__ = [  # the names callers and tests use, wherever they live now
    "DEFAULT_IMAGE", "KILL_GRACE_S", "LABEL_INSTANCE", "LABEL_JOB", "LABEL_OWNER", "LABEL_PRESTART",
    "LABEL_SANDBOX", "LABEL_SLOT_DIR", "SLOT_PREFIX", "DockerBackend", "SandboxStartError", "prepare_out_dir",
]

SPEC_PATH = f"{IN_DIR}/{SPEC_FILE}"
RUN_COMMAND = ["python3", "-m", "sandbox.runner", SPEC_PATH]
_NOFILE = 1024
_NO_GPU_DRIVER = "could not select device driver"
_GPU_HINT = ("this Docker engine cannot give containers a GPU: install the NVIDIA Container Toolkit "
             "(nvidia-ctk runtime configure --runtime=docker) and restart dockerd, or run without --gpus")


class DockerBackend(Backend):
    """Runs each job in a fresh, locked-down container of `image` (see the module docstring).

    `prestart`: keep `prestart_slots` warm containers ready for the next jobs (the server asks for two
    per evaluator slot: `evaluator.backends.prestart_depth`).
    `jobs_root`: where warm job dirs go (same filesystem as the jobs); learned from the first job if
    None. `instance_id`: this server's id in the container labels (random by default). `runtime`: an
    OCI runtime registered with the engine, e.g. "runsc" for gVisor. `client`: a docker.DockerClient.
    """

    name = "docker"

    def __init__(self, image: str = DEFAULT_IMAGE, *, prestart: bool = False, prestart_slots: int = 1,
                 prestart_max_age_s: float = 1800.0, jobs_root: Path | None = None, instance_id: str | None = None,
                 runtime: str | None = None, client: Any = None) -> None:
        self.image = image
        self.instance_id = instance_id or secrets.token_hex(6)
        self.runtime = runtime
        self._client = client
        self._client_lock = threading.Lock()
        self._owner = _owner.owner_id()
        self._engine: dict[str, Any] | None = None
        self._live: set[DockerHandle] = set()
        self._live_lock = threading.Lock()
        self._pool = WarmPool(self._launch, enabled=prestart, slots=prestart_slots, max_age_s=prestart_max_age_s,
                              jobs_root=Path(jobs_root) if jobs_root is not None else None)
        self._closed = False

    # --- engine ---------------------------------------------------------------------------------------
    @classmethod
    def available(cls, image: str = DEFAULT_IMAGE, timeout_s: float = 5.0) -> bool:
        """True when a Docker engine answers and has `image` locally (used by `--sandbox auto`)."""
        try:
            client = docker_sdk().from_env(timeout=timeout_s)
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
                self._client = docker_sdk().from_env(timeout=120, max_pool_size=64)
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
            "prestart": self._pool.enabled,
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
        until its runner prints the waiting line (torch imported, device initialised). A no-op without
        pre-start (`prestart=False`, or turned off after warm containers kept dying), as for the process
        backend: the evaluator asks after every job's start, and a pool that is off must stay empty."""
        if not self._pool.enabled:
            return
        await anyio.to_thread.run_sync(lambda: refuse_private(check_dir(Path(data_dir), "dataset dir")))
        if jobs_root is not None:
            self._pool.jobs_root = Path(jobs_root)
        if self._pool.jobs_root is None:
            raise ValueError("prestart needs jobs_root (the directory that holds the job dirs)")
        # the one already warm, or the one a job's refill is creating (waited for), else a new one: never a
        # second container while the first is in flight
        warm = await anyio.to_thread.run_sync(self._pool.ensure, Path(data_dir), limits, timeout_s)
        if warm is None:
            raise SandboxStartError("could not pre-start a sandbox container (see the log)")
        if wait_ready:
            await anyio.to_thread.run_sync(self._pool.wait_ready, warm, timeout_s)

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
        await anyio.to_thread.run_sync(self._pool.close)

    # --- container configuration -----------------------------------------------------------------------
    def _labels(self, job: str, prestart: bool, slot: Path | None = None) -> dict[str, str]:
        """Every container carries the sandbox marker, this server's instance id and owner identity
        (`_owner.owner_id`: boot id, pid, start time) and the job's name ("prestart" for a warm one:
        labels cannot change after creation, its name says the job once adopted)."""
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
        docker = docker_sdk()
        t0 = time.monotonic()
        container = None
        try:
            container = self.client.containers.create(**kw)
            container.start()
        except BaseException as exc:
            if container is not None:
                remove_container(container)
            if isinstance(exc, docker.errors.DockerException):
                hint = f" ({_GPU_HINT})" if _NO_GPU_DRIVER in str(exc) else ""
                raise SandboxStartError(f"the Docker engine could not start the sandbox: {exc}{hint}") from exc
            raise
        return container, time.monotonic() - t0

    def _launch(self, in_dir: str, out_dir: str, data_dir: str, limits: Limits, command: list[str], name: str,
                job: str, slot: Path | None) -> tuple[Any, float]:
        """Create and start one locked-down container (a job's, or a warm one when `slot` is given)."""
        labels = self._labels(job, prestart=slot is not None, slot=slot)
        return self._create_and_start(self._create_kwargs(in_dir, out_dir, data_dir, limits, command, name, labels))

    def _start_sync(self, paths: JobPaths, limits: Limits) -> DockerHandle:
        in_dir = check_dir(paths.in_dir, "job input dir")
        check_dir(paths.out_dir, "job output dir")
        data_dir = check_dir(paths.data_dir, "dataset dir")
        refuse_private(data_dir)
        if not os.path.isfile(os.path.join(in_dir, SPEC_FILE)):
            raise FileNotFoundError(f"{paths.in_dir / SPEC_FILE} is missing: write the spec before start()")
        if self._pool.jobs_root is None:
            self._pool.jobs_root = paths.job_dir.parent
        handle = self._start_job(paths, limits, data_dir)
        if not self._closed and worth_warming(paths):
            self._pool.refill_later(data_dir, limits)  # the next job of this kind finds a warm container
        return handle

    def _start_job(self, paths: JobPaths, limits: Limits, data_dir: str) -> DockerHandle:
        job = safe_name(paths.job_dir.name)
        warm = self._pool.take(pool_key(data_dir, limits), paths.job_dir)
        adopted = self._pool.adopt(warm, paths, job) if warm is not None else None
        if warm is not None and adopted is not None:
            t0, extra = adopted
            return self._handle(warm.container, paths, limits, t0, extra)
        out_how = prepare_out_dir(paths.out_dir)
        name = f"{NAME_PREFIX}{job}-{secrets.token_hex(3)}"
        t0 = time.monotonic()
        container, started_s = self._launch(os.path.realpath(paths.in_dir), os.path.realpath(paths.out_dir),
                                            data_dir, limits, RUN_COMMAND, name, job, None)
        return self._handle(container, paths, limits, t0, {"prestarted": False, "start_s": round(started_s, 4),
                                                           "out_dir_access": out_how})

    def _handle(self, container: Any, paths: JobPaths, limits: Limits, t0: float,
                extra: dict[str, Any]) -> DockerHandle:
        handle = DockerHandle(container, paths, limits, t0, self.describe(limits), extra, self._forget)
        with self._live_lock:
            self._live.add(handle)
        handle.begin()
        return handle

    def _forget(self, handle: DockerHandle) -> None:
        with self._live_lock:
            self._live.discard(handle)

    # --- orphans --------------------------------------------------------------------------------------------
    def _cleanup_orphans_sync(self) -> int:
        """Remove every sandbox container whose owner (another server process, named by boot id, pid
        and start time, so a reused pid does not count) is gone, with its warm job dir if it has one."""
        docker = docker_sdk()
        try:
            containers = self.client.containers.list(all=True, filters={"label": f"{LABEL_SANDBOX}=1"})
        except docker.errors.DockerException as exc:
            log.warning("cannot list sandbox containers: %s", exc)
            return 0
        removed = 0
        for c in containers:
            labels = c.labels or {}
            if labels.get(LABEL_INSTANCE) == self.instance_id or _owner.owner_alive(labels.get(LABEL_OWNER, "")):
                continue
            removed += remove_container(c)
            slot = labels.get(LABEL_SLOT_DIR)
            if slot and Path(slot).name.startswith(SLOT_PREFIX) and os.path.isdir(slot):
                shutil.rmtree(slot, ignore_errors=True)
        return removed
