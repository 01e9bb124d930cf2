"""The Ray executor: each sandbox run (one phase of a job) happens on the Ray node that Ray places it on.

Why a Backend, not a second pipeline: the phase (start, events, wait) and everything after it (scoring
with the test labels, archiving) stay exactly as on one host. `RayBackend.start` ships the phase's
inputs to a `SandboxActor` that asks Ray for one GPU (a GPU job) or its CPUs (a CPU job) and runs the
node's own sandbox backend (process or Docker) there; the returned handle streams the runner's raw
events file back into the host's out/events.jsonl while the job runs (so the host parses it with the
same guards as a local sandbox, and `get_job` shows progress as today), then copies the out/ files
(predictions, weights) back before `wait()` returns.

What travels: in/ (spec.json, model.py) and the public dataset arrays of the job's data dir (train
images and labels, test images; the prepared data dir never holds the test labels), put into Ray's
object store once per content hash and cached on each node under that hash. What never travels: the
test labels and the zoo; the server scores and archives.

Faults: a node or actor that dies mid-phase raises `WorkerLost` from the handle; the queue then stops
heart-beating the job, so the zoo's recovery re-queues it (bounded attempts, then `interrupted`)
exactly as for a server that died. `cancel()` cancels the sandbox on its node, then kills the actor;
an actor starts (and closes) by reaping sandboxes (processes, containers labelled with their job) and
job folders of dead actors. An actor whose sandbox ended by itself is kept for the next job of the
same shape (`ActorPool`): a fresh one costs seconds before its sandbox starts.
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

from lemur_agent_server.evaluator.executor import WorkerLost
from sandbox import _owner, protocol
from sandbox.backend import Backend, Exit, Handle, JobPaths, Limits, RunnerPaths

CHUNK = 1 << 20  # events bytes per poll
ACTOR_DIR = re.compile(r"o(\d+)-t(\d+)")  # a node's jobs dir holds one folder per actor: o<pid>-t<start ticks>
READ_WAIT_S = 0.5  # how long one read of the host waits on the node for something new (a long poll)
NODE_POLL_S = 0.02  # how often the node looks at the events file's size meanwhile (a stat, no Ray call)
NAMESPACE = "lemur-agent-server"
EVENTS_FILE = protocol.EVENTS_FILE


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # the optional extra
        raise RuntimeError("--executor ray needs Ray: pip install 'lemur-agent-server[ray]'") from exc
    return ray


def _read_dir(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, bytes]:
    """Every regular file under `root` (no links followed), by its path relative to `root`."""
    files: dict[str, bytes] = {}
    for dirpath, _dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root).as_posix()
            if rel in skip or path.is_symlink() or not path.is_file():
                continue
            files[rel] = path.read_bytes()
    return files


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file; never through a link (the sandbox writes out/)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(f"{path} is not a regular file")
        return f.read()


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    """Write `files` under `root`; a name that would leave `root` is dropped."""
    for rel, data in files.items():
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts:
            continue
        target = root.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


# --- the node side --------------------------------------------------------------------------------

def _node_settings(sandbox: str, image: str, root: Path) -> Any:
    from lemur_agent_server.config import Settings

    return Settings(zoo_path=root / "state" / "node.sqlite", data_root=root / "no-raw-data", sandbox=sandbox,
                    image=image, slots=1)


def _node_backend(settings: Any) -> Backend:
    """This node's sandbox backend, without warm containers (an actor is retired once it is idle, and a
    warm container would outlive it)."""
    from lemur_agent_server.evaluator.backends import choose_backend, docker_usable

    if settings.sandbox in ("auto", "docker") and docker_usable(settings):
        from sandbox.docker_backend import DockerBackend

        return DockerBackend(image=settings.image, prestart=False, jobs_root=settings.jobs_dir)
    return choose_backend(settings)


def sandbox_priority() -> dict[str, int]:
    """Give the calling thread (the actor's event loop, which forks the sandboxes: they inherit it) the
    priority of the node itself (the raylet, the actor's parent) instead of the niceness Ray gives its
    workers (`RAY_worker_niceness`, 15 by default).

    Why: a process sandbox started by a Ray worker inherited nice 15, so on a machine with any other
    load it got a fraction of the CPU a local sandbox (nice 0) gets for the same job (bench/throughput.py,
    Ray x0.76 of local under load). The actor's own threads (Ray's calls, the feed) keep Ray's niceness:
    only the sandbox, the node's real work, runs at the node's priority, bounded by its cgroup's CPU quota
    as everywhere. Lowering a niceness needs CAP_SYS_NICE (the nodes run as root for the namespaces and
    cgroups anyway); without it the sandbox stays at the worker's niceness, reported as such."""
    tid = threading.get_native_id()
    node = os.getpriority(os.PRIO_PROCESS, os.getppid())
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) > node:
            os.setpriority(os.PRIO_PROCESS, tid, node)
    except PermissionError:
        pass
    return {"node": node, "sandbox": os.getpriority(os.PRIO_PROCESS, tid),
            "worker": os.getpriority(os.PRIO_PROCESS, os.getpid())}


class OutFeed:
    """What of a sandbox's out/ on this node the host has not got yet: the events file from an offset,
    and the other files that are new or changed since they were last sent.

    Why the events are read BEFORE the files: the runner writes a file (a point's predictions, a
    trial's weights) completely and only then appends the event that names it. Events read first were
    all written before the files are looked at, so every file they name is complete by then and goes
    in the same answer; the host writes the files before it appends the events, so it never parses an
    event whose file it lacks. (Files first, the other order, loses that: a file written while they are
    listed, and its event appended before the events are read, arrive as an event without its file;
    the host then failed the point with "Bad predictions: ... cannot be opened".)"""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self._sent: dict[str, tuple[int, int, int, int]] = {}  # rel path -> (inode, size, mtime, ctime) sent

    def read(self, offset: int) -> tuple[dict[str, bytes], bytes]:
        """(the changed files, the events' bytes from `offset`, at most CHUNK); the events are read first."""
        try:
            with open(self.out_dir / EVENTS_FILE, "rb") as f:
                f.seek(offset)
                chunk = f.read(CHUNK)
        except FileNotFoundError:
            chunk = b""
        return self.changed_files(), chunk

    def poll(self, offset: int, wait_s: float, ended: Callable[[], bool]) -> tuple[dict[str, bytes], bytes, bool]:
        """`read(offset)` once the events file has grown past `offset`, the sandbox has `ended()`, or
        `wait_s` passed, whichever is first; with whether it had ended before the read.

        A long poll: the node looks at the events file's size every NODE_POLL_S (a stat; out/ is walked
        only when there is something to send), so an event reaches the host about NODE_POLL_S after it
        is written, with one Ray call per answer, instead of a call every tenth of a second whether
        anything happened or not (and up to that tenth of a second more of delay)."""
        events = self.out_dir / EVENTS_FILE
        deadline = time.monotonic() + wait_s
        while True:
            done = ended()  # sampled before the read: done and nothing read means nothing more comes
            try:
                grown = events.stat().st_size > offset
            except OSError:
                grown = False
            if grown or done or time.monotonic() >= deadline:
                files, chunk = self.read(offset)
                return files, chunk, done
            time.sleep(NODE_POLL_S)

    def changed_files(self) -> dict[str, bytes]:
        """Every regular file of out/ but the events, not sent yet in its current state."""
        changed: dict[str, bytes] = {}
        for dirpath, _dirnames, filenames in os.walk(self.out_dir, followlinks=False):
            for name in filenames:
                path = Path(dirpath, name)
                rel = path.relative_to(self.out_dir).as_posix()
                if rel == EVENTS_FILE:
                    continue
                try:
                    st = path.lstat()
                    stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                    if not stat.S_ISREG(st.st_mode) or self._sent.get(rel) == stamp:
                        continue
                    changed[rel] = _read_regular(path)
                except OSError:  # gone, or swapped for a link or a fifo since the listing
                    continue
                self._sent[rel] = stamp
        return changed


def actor_dir_name(pid: int) -> str:
    """The folder of one actor's job dirs on its node: its pid and start time (a reused pid is not it)."""
    return f"o{pid}-t{_owner.start_ticks(pid)}"


def remove_dead_actors_dirs(jobs_dir: Path) -> int:
    """Remove the job folders of actors on this node that are gone (Ray killed them, or their driver
    died): a killed actor never reaches its `close`. Returns how many actors' folders went."""
    removed = 0
    for entry in jobs_dir.iterdir() if jobs_dir.is_dir() else ():
        m = ACTOR_DIR.fullmatch(entry.name)
        if m and not entry.is_symlink() and not _owner.is_running(int(m.group(1)), m.group(2)):
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed


class SandboxRunner:
    """One phase's sandbox on this node (the body of the Ray actor; plain Python so it can be read
    and tested without Ray). Its event loop runs in a thread: Ray calls its methods from its own.

    Each actor keeps its job's files in a folder of its own (`actor_dir_name`), not in one named by the
    job alone: two nodes of one machine share the node root, and a job given back (its worker or its
    server died) may start again here while the dead attempt's files, or even its sandbox, are still
    there; the new attempt must never read the old one's events. Every actor, when it starts and when
    it closes, removes what dead actors left on the node: their sandboxes (cgroups, containers) and
    their folders."""

    def __init__(self, sandbox: str, image: str, root: str | None = None):
        self.root = Path(root or Path(tempfile.gettempdir()) / "lemur-ray-node")
        self.settings = _node_settings(sandbox, image, self.root)
        self.jobs_dir = self.settings.jobs_dir / actor_dir_name(os.getpid())
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self.niceness = self._portal.call(sandbox_priority)  # in the loop's thread, before it forks a sandbox
        self.backend = _node_backend(self.settings)
        self._sweep()
        self.handle: Handle | None = None
        self.exit: Exit | None = None
        self.exited_at = 0.0
        self.paths: JobPaths | None = None
        self.out: OutFeed | None = None

    def _sweep(self) -> None:
        """Remove the sandboxes and folders of dead actors on this node."""
        self._portal.call(self.backend.cleanup_orphans)
        remove_dead_actors_dirs(self.settings.jobs_dir)

    def _data_dir(self, data: list[Any], digest: str) -> tuple[Path, bool]:
        """The dataset arrays, cached on this node under their content hash: fetched from the object store
        and written once per node (atomically, one actor at a time), then only looked up. Returns the
        folder and whether this call fetched them.

        Why `data` is a list holding the object's reference: Ray resolves an ObjectRef passed as an
        argument before the call, i.e. it copied the whole dataset into every actor for every job (MNIST:
        ~50 MB a job) even when the node had it cached; a reference inside a list is left alone, so it is
        fetched only here, only when the cache lacks it."""
        ray_dir = self.settings.cache_dir / "ray"
        target = ray_dir / digest
        if target.is_dir():
            return target, False
        ray_dir.mkdir(parents=True, exist_ok=True)
        with open(ray_dir / f".{digest}.lock", "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other actors of this node wait, then find it cached
            if target.is_dir():
                return target, False
            files = _ray().get(data[0])
            tmp = Path(tempfile.mkdtemp(dir=ray_dir, prefix=".incoming-"))
            _write_files(tmp, files)
            for path in tmp.rglob("*"):
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            os.chmod(tmp, 0o755)
            tmp.rename(target)
        return target, True

    def start(self, job_id: str, in_files: dict[str, bytes], data: list[Any], digest: str,
              limits: dict[str, Any]) -> dict[str, Any]:
        """Write the job's inputs here, point its spec at this node's paths and start the sandbox."""
        assert self.handle is None, "one sandbox at a time: reset() the one that ended first"
        t = {"node_entered": time.time()}
        self.settings.cache_dir.mkdir(parents=True, exist_ok=True)
        data_dir, fetched = self._data_dir(data, digest)
        t["node_data"] = time.time()
        job_dir = self.jobs_dir / job_id
        (job_dir / "in").mkdir(parents=True, exist_ok=True)
        (job_dir / "out").mkdir(exist_ok=True)
        paths = self.paths = JobPaths(job_dir=job_dir, data_dir=data_dir)
        self.out = OutFeed(paths.out_dir)
        _write_files(paths.in_dir, in_files)
        spec_path = paths.in_dir / protocol.SPEC_FILE
        spec = json.loads(spec_path.read_text())
        rp = self.backend.runner_paths(paths)
        spec.update(model_path=rp.model, data_dir=rp.data_dir, out_dir=rp.out_dir)
        spec_path.write_text(json.dumps(spec))
        for path in (paths.in_dir, *paths.in_dir.iterdir(), paths.out_dir, job_dir):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(paths.out_dir, 0o777)
        gpu_ids = _ray().get_gpu_ids() if limits.get("gpu") is not None else []
        gpu = str(gpu_ids[0]) if gpu_ids else None  # the GPU Ray gave this actor, not the host's id
        t["node_staged"] = time.time()
        self.handle = self._portal.call(self.backend.start, paths, Limits(**{**limits, "gpu": gpu}))
        t["node_sandbox_started"] = time.time()
        self._portal.start_task_soon(self._wait)
        return {"gpu": gpu, "node": _ray().get_runtime_context().get_node_id(), "pid": os.getpid(), "t": t,
                "data_fetched": fetched, "niceness": self.niceness}

    async def _wait(self) -> None:
        assert self.handle is not None
        exit_ = await self.handle.wait()
        self.exited_at = time.time()
        self.exit = exit_

    def read(self, offset: int, wait_s: float = 0.0) -> tuple[dict[str, bytes], bytes, bool]:
        """The out/ files new or changed since the last read, the raw bytes of out/events.jsonl from
        `offset` (the host parses them), and whether the sandbox had ended before this read; waits up
        to `wait_s` for something new (`OutFeed.poll`)."""
        assert self.out is not None
        return self.out.poll(offset, wait_s, lambda: self.exit is not None)

    def result(self) -> dict[str, Any]:
        """How the sandbox ended and the out/ files not sent yet (the events are streamed)."""
        assert self.exit is not None and self.out is not None
        return {"exit": dataclasses.asdict(self.exit), "files": self.out.changed_files(),
                "exited_at": self.exited_at}

    def cancel(self) -> None:
        if self.handle is not None:
            self._portal.call(self.handle.cancel)

    def pid(self) -> int:
        return os.getpid()

    def reset(self) -> None:
        """Forget the job that ended (its files go: the host has its copy); the actor, its event loop and
        its sandbox backend stay for the host's next job of the same shape (see `RayBackend`)."""
        assert self.exit is not None, "reset() of a sandbox that has not ended"
        if self.paths is not None:
            shutil.rmtree(self.paths.job_dir, ignore_errors=True)
        self.handle = self.exit = self.paths = self.out = None

    def close(self) -> None:
        """Remove this actor's files from the node (the host has its copy) and stop the event loop."""
        self.cancel()  # idempotent; a host that gave up on this sandbox leaves nothing running
        shutil.rmtree(self.jobs_dir, ignore_errors=True)
        self._sweep()  # an actor that died after this one started (its driver killed) left its sandbox
        self._portal.call(self.backend.aclose)
        self._portal_cm.__exit__(None, None, None)


_actor_class: Any = None


def sandbox_actor() -> Any:
    """The Ray actor class around `SandboxRunner` (made on first use: Ray is an optional extra)."""
    global _actor_class
    if _actor_class is None:
        _actor_class = _ray().remote(max_restarts=0, max_concurrency=4)(SandboxRunner)
    return _actor_class


# --- the host side --------------------------------------------------------------------------------

IDLE_S = 30.0  # an actor idle longer than this is retired (at the next start or return)
Shape = tuple[float, float]  # (GPUs, CPUs) an actor asks Ray for


def retire(actor: Any) -> None:
    """Close the actor (its sandbox stopped, its files and dead neighbours' leftovers removed), then kill it."""
    ray = _ray()
    try:
        ray.get(actor.close.remote(), timeout=protocol.TimeBudget.STOP_GRACE_S)
    except Exception:  # noqa: BLE001 - a dead actor has nothing left to close
        pass
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass


class ActorPool:
    """Actors whose sandbox ended normally, kept for the next job of the same shape.

    Why: a fresh actor costs a Ray worker process (Python, Ray, our modules) and the node's sandbox
    backend (its probes) before its sandbox even starts, seconds per job on a loaded machine
    (bench/throughput.py); a kept one starts the next sandbox at once. An actor whose sandbox was
    cancelled, or that was lost, is never kept.

    Why it cannot starve other jobs: an idle actor holds the CPUs (and GPU) it asked for. Every start
    first retires the idle actors of other shapes (they might hold what it needs) and those idle longer
    than IDLE_S; the server's stop (`close`) retires them all. At most `max_idle` are kept."""

    def __init__(self, max_idle: int = 16):
        self.max_idle = max_idle
        self._idle: list[tuple[Shape, float, Any]] = []  # (shape, idle since, actor)
        self._lock = threading.Lock()
        self._closed = False

    def take(self, shape: Shape) -> Any | None:
        """An idle actor of `shape` (now this caller's), or None."""
        with self._lock:
            now = time.monotonic()
            usable = [entry for entry in self._idle if entry[0] == shape and now - entry[1] <= IDLE_S]
            gone = [entry[2] for entry in self._idle if entry not in usable]
            mine = usable.pop() if usable else None  # the most recently idle: its pages are warmest
            self._idle = usable
        for actor in gone:
            retire(actor)
        return mine[2] if mine else None

    def give(self, shape: Shape, actor: Any) -> bool:
        """Keep `actor` (its ended job forgotten on its node) for a later job; False: the caller retires it."""
        try:
            _ray().get(actor.reset.remote(), timeout=protocol.TimeBudget.STOP_GRACE_S)
        except Exception:  # noqa: BLE001 - a dead or stuck actor is not kept
            return False
        with self._lock:
            if self._closed or len(self._idle) >= self.max_idle:
                return False
            self._idle.append((shape, time.monotonic(), actor))
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for _shape, _since, actor in idle:
            retire(actor)


class RayHandle(Handle):
    """The host's view of a sandbox on a Ray node: a thread copies its events into the host's out/
    as they come and its out/ files at the end; `finished()` once those are here."""

    def __init__(self, backend: RayBackend, paths: JobPaths, actor: Any, shape: Shape, started: Any,
                 wall_s: float, stamps: dict[str, float]):
        self.paths = paths
        self._shape = shape
        # the node kills its sandbox at wall_s; if no end came by then plus the stop grace (a node that
        # hangs, a job Ray cannot place), the host gives the job back
        self._patience_s = wall_s + 2 * protocol.TimeBudget.STOP_GRACE_S
        self._backend = backend
        self._actor = actor
        self._started = started
        self._exit: Exit | None = None
        self.placement: dict[str, Any] = {}  # node id, actor pid, GPU of the sandbox once started
        self.timings: dict[str, float] = dict(stamps)  # time.time() stamps (bench/throughput.py)
        self._lost: str | None = None
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._pump, name=f"ray-{paths.job_dir.name}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        ray = _ray()
        try:
            self.placement = ray.get(self._started, timeout=self._patience_s)
            self.placement["t"].update(self.timings, host_placed=time.time())
            self.timings = self.placement["t"]
            deadline = time.monotonic() + self._patience_s
            self._backend.placed[self.paths.job_dir.name] = self.placement
            while len(self._backend.placed) > 1024:  # the newest jobs are the ones anyone asks about
                self._backend.placed.pop(next(iter(self._backend.placed)))
            offset = 0
            events = self.paths.out_dir / EVENTS_FILE
            with open(events, "ab") as sink:
                while True:
                    files, chunk, done = ray.get(self._actor.read.remote(offset, READ_WAIT_S))
                    _write_files(self.paths.out_dir, files)
                    if chunk:
                        sink.write(chunk)
                        sink.flush()
                        offset += len(chunk)
                        continue
                    if done:
                        self.timings["host_end_seen"] = time.time()
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no end from the Ray node {self._patience_s:.0f} s after the start")
            result = ray.get(self._actor.result.remote())
            _write_files(self.paths.out_dir, result["files"])
            self.timings.update(node_exited=result["exited_at"], host_result=time.time())
            exit_ = result["exit"]
            exit_["isolation"] = {**exit_.get("isolation", {}), "executor": "ray"}
            self._exit = Exit(**exit_)
        except Exception as exc:  # noqa: BLE001 - a dead node, actor or connection: the job goes back
            self._lost = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            self._done.set()
            self._release()
            self.timings["host_released"] = time.time()

    def _release(self) -> None:
        """The actor goes back to the pool when its sandbox ended by itself; else it is retired."""
        ended = self._exit is not None and not self._cancel.is_set()
        if not (ended and self._backend.pool.give(self._shape, self._actor)):
            retire(self._actor)

    def finished(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> Exit:
        await anyio.to_thread.run_sync(self._thread.join)
        if self._exit is None:
            if self._cancel.is_set():
                return Exit(exit_code=None, cancelled=True, isolation={"executor": "ray"})
            raise WorkerLost(f"the Ray worker running this sandbox was lost ({self._lost})")
        if self._cancel.is_set():
            self._exit = dataclasses.replace(self._exit, cancelled=True)
        return self._exit

    async def cancel(self) -> None:
        """Stop the sandbox on its node (the node's backend kills it, container included), then the actor."""
        if self._done.is_set() or self._cancel.is_set():
            return
        self._cancel.set()

        def stop() -> None:
            ray = _ray()
            try:
                ray.get(self._actor.cancel.remote(), timeout=protocol.TimeBudget.STOP_GRACE_S)
            except Exception:  # noqa: BLE001 - the actor is gone already: so is its sandbox
                pass

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(stop)
            await anyio.to_thread.run_sync(self._thread.join)


class RayBackend(Backend):
    """Runs each sandbox in a `SandboxActor` on the Ray cluster at `address`, with the nodes' own
    `sandbox` backend (process or Docker, `image`)."""

    name = "ray"

    def __init__(self, address: str, sandbox: str = "process", image: str = "", node_root: str | None = None):
        ray = _ray()
        self.address = address
        self.sandbox = sandbox
        self.image = image
        self.node_root = node_root
        if not ray.is_initialized():
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, ignore_reinit_error=True)
        self._data: dict[str, tuple[str, Any]] = {}  # data dir -> (content hash, object ref)
        self._data_lock = threading.Lock()
        self.placed: dict[str, dict[str, Any]] = {}  # job id -> where its last sandbox ran
        self.sent: collections.deque[Any] = collections.deque(maxlen=256)  # the last objects put (for tests)
        self.pool = ActorPool()

    def runner_paths(self, paths: JobPaths) -> RunnerPaths:
        """Placeholders: the node rewrites them to where its own sandbox sees the files."""
        return RunnerPaths(spec=str(paths.in_dir / protocol.SPEC_FILE), model=str(paths.in_dir / "model.py"),
                           data_dir=str(paths.data_dir), out_dir=str(paths.out_dir))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "executor": "ray", "ray_address": self.address,
                "node_backend": self.sandbox}

    def _dataset(self, data_dir: Path) -> tuple[str, Any]:
        """The data dir's arrays in the object store, once per content (hash of names and bytes)."""
        key = os.path.realpath(data_dir)
        with self._data_lock:
            if key not in self._data:
                files = _read_dir(Path(data_dir))
                digest = hashlib.sha256()
                for rel in sorted(files):
                    digest.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
                ref = _ray().put(files)
                self.sent.append(ref)
                self._data[key] = (digest.hexdigest()[:32], ref)
            return self._data[key]

    async def start(self, paths: JobPaths, limits: Limits) -> Handle:
        return await anyio.to_thread.run_sync(self._start, paths, limits)

    def _start(self, paths: JobPaths, limits: Limits) -> Handle:
        ray = _ray()
        stamps = {"host_start": time.time()}
        digest, data_ref = self._dataset(paths.data_dir)
        in_ref = ray.put(_read_dir(paths.in_dir))
        self.sent.append(in_ref)
        gpu_job = limits.gpu is not None
        shape = (1.0, 1.0) if gpu_job else (0.0, max(1.0, float(limits.cpus)))
        actor = self.pool.take(shape) or sandbox_actor().options(num_gpus=shape[0], num_cpus=shape[1]).remote(
            self.sandbox, self.image, self.node_root)
        stamps["host_called"] = time.time()
        # the dataset's reference inside a list: the node fetches it only if its cache lacks it (_data_dir)
        started = actor.start.remote(paths.job_dir.name, in_ref, [data_ref], digest, dataclasses.asdict(limits))
        return RayHandle(self, paths, actor, shape, started, limits.wall_s, stamps)

    async def aclose(self) -> None:
        """Retire the idle actors (their CPUs and GPUs go back to the cluster)."""
        await anyio.to_thread.run_sync(self.pool.close)
