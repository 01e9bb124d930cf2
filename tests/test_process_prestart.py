"""Pre-started ("warm") process sandboxes with the real runner and real namespaces, cgroups and rlimits.

What must hold: a job adopts a warm sandbox (its runner is the process that was started before the job),
a dead warm sandbox falls back to a cold start, a warm sandbox serves one job only, what the submission
sees from inside is the same as from a cold start, and nothing of a warm sandbox outlives the backend
(closed) or the server (killed).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox import _cgroups, datasets, protocol
from sandbox.backend import Exit, Handle, Limits
from sandbox.prestart_files import SLOT_PREFIX
from sandbox.process_backend import ProcessBackend
from tests.sandbox_jobs import TINY_NET, make_job

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parent.parent
LIMITS = Limits(wall_s=90, memory_bytes=2 << 30, cpus=1.0, pids=128, log_cap_bytes=64 << 10, out_cap_bytes=64 << 20)

# Runs as the submission (on import of model.py): what it can see and do, printed as one JSON line.
PROBE = r'''
import errno, json, os, resource, socket
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
def write(path):
    with open(path, "w") as f:
        f.write("x")
def connect():
    s = socket.socket(); s.settimeout(1); s.connect(("1.1.1.1", 80))
def cgroup_limits():
    rel = open("/proc/self/cgroup").read().strip().splitlines()
    found = {}
    for name in ("memory.max", "pids.max", "cpu.max", "memory/memory.limit_in_bytes", "pids/pids.max"):
        for line in rel:
            path = "/sys/fs/cgroup/" + name
            try:
                found[name] = open(path).read().strip()
            except OSError:
                pass
    return found, [line.split(":")[-1].split("/")[-1].split("-t")[0] for line in rel]
here = os.path.dirname(os.path.abspath(__file__))
limits, groups = cgroup_limits()
report = {
    "uid": os.getuid(), "CapEff": status("CapEff"), "CapBnd": status("CapBnd"), "CapPrm": status("CapPrm"),
    "NoNewPrivs": status("NoNewPrivs"), "Seccomp": status("Seccomp"), "pid": os.getpid(),
    "ppid_is_init": os.getppid() == 1,
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "core": resource.getrlimit(resource.RLIMIT_CORE),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE), "as": resource.getrlimit(resource.RLIMIT_AS),
    "write_in": attempt(lambda: write(os.path.join(here, "probe"))), "write_root": attempt(lambda: write("/probe")),
    "write_out": attempt(lambda: write("probe.txt")), "write_tmp": attempt(lambda: write("/tmp/probe")),
    "setuid_bit": attempt(lambda: os.chmod("probe.txt", 0o4755)),
    "connect": attempt(connect), "interfaces": sorted(os.listdir("/sys/class/net")),
    "env": sorted(os.environ), "cgroup_limits": limits, "cgroup_names": groups, "cwd": os.getcwd(),
    "mounts": sorted(line.split()[4] + " " + line.split()[5].split(",")[0] for line in open("/proc/self/mountinfo")),
}
print("PROBE " + json.dumps(report), flush=True)
raise SystemExit(0)
'''


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.PreparedDataset:
    return datasets.prepare("digits", REPO / "data", tmp_path_factory.getbasetemp() / "cache")


def make_backend(jobs: Path) -> ProcessBackend:
    backend = ProcessBackend(hidden_paths=[jobs], prestart=True, jobs_root=jobs)
    assert backend.namespaces, "these tests need namespaces (unshare)"
    return backend


async def collect(handle: Handle) -> tuple[list[str], Exit]:
    kinds = [event["event"] async for event in handle.events()]
    return kinds, await handle.wait()


def runner_pid(handle: Handle) -> int:
    return handle._proc.pid  # type: ignore[attr-defined] - the chain's top process (its start is the sandbox's)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def our_cgroups() -> set[str]:
    ver = _cgroups.version()
    assert ver is not None
    own = f"-o{os.getpid()}-"
    return {d.name for base in _cgroups.base_dirs(ver).values() for d in base.iterdir()
            if d.name.startswith(_cgroups.PREFIX) and own in d.name}


def probe(exit: Exit) -> dict[str, Any]:
    line = next((ln for ln in exit.log_tail.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, exit.log_tail
    return json.loads(line[len("PROBE "):])


async def test_a_job_adopts_the_warm_sandbox_and_the_pool_refills(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    backend = make_backend(jobs)
    try:
        await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)
        assert backend.pool is not None
        (warm,) = backend.pool.warm()
        warm_pid = warm.spawned.proc.pid
        paths = make_job(jobs, "warm-job", digits, backend, TINY_NET)
        handle = await backend.start(paths, LIMITS)
        assert runner_pid(handle) == warm_pid  # the job runs in the process started before it
        kinds, exit = await collect(handle)
        assert exit.exit_code == 0, (kinds, exit.log_tail)
        assert kinds[0] == protocol.EVENT_READY and protocol.EVENT_CHECK in kinds and kinds[-1] == protocol.EVENT_DONE
        assert exit.isolation["prestarted"] is True and exit.isolation["warm_ready_s"] is not None
        assert "lemur-runner: waiting" not in exit.log_tail  # the wait line is not the job's output
        assert (paths.in_dir / protocol.MODEL_FILE).read_text() == TINY_NET
        assert sorted(p.name for p in paths.job_dir.iterdir()) == ["in", "out"]
        assert sorted(p.name for p in jobs.iterdir()) == ["warm-job"]  # warm dirs are not among the job folders
        # the start refilled the pool (in a thread) with a new sandbox, started for the next job
        for _ in range(200):
            if backend.pool.warm():
                break
            await anyio.sleep(0.05)
        (refill,) = backend.pool.warm()
        assert refill.spawned.proc.pid != warm_pid
        assert not alive(warm_pid)
    finally:
        await backend.aclose()
    assert not list((jobs.parent / "prestart").glob(f"{SLOT_PREFIX}*"))
    assert not alive(refill.spawned.proc.pid)
    assert not our_cgroups()


async def test_a_dead_warm_sandbox_falls_back_to_a_cold_start(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    backend = make_backend(jobs)
    try:
        await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)
        assert backend.pool is not None
        (warm,) = backend.pool.warm()
        os.killpg(warm.spawned.proc.pid, signal.SIGKILL)
        warm.spawned.proc.wait(timeout=10)
        paths = make_job(jobs, "after-dead", digits, backend, TINY_NET)
        handle = await backend.start(paths, LIMITS)
        assert runner_pid(handle) != warm.spawned.proc.pid
        kinds, exit = await collect(handle)
        assert exit.exit_code == 0, (kinds, exit.log_tail)
        assert exit.isolation["prestarted"] is False
        assert not warm.slot.exists()  # the dead one's dir went with it
    finally:
        await backend.aclose()
    assert not our_cgroups()


async def test_a_warm_sandbox_serves_one_job_only(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    backend = make_backend(jobs)
    try:
        await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)
        first = await backend.start(make_job(jobs, "one", digits, backend, TINY_NET), LIMITS)
        await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)  # the refill, made by that start
        second = await backend.start(make_job(jobs, "two", digits, backend, TINY_NET), LIMITS)
        assert runner_pid(first) != runner_pid(second)
        (kinds1, exit1), (kinds2, exit2) = await collect(first), await collect(second)
        assert exit1.exit_code == 0 and exit2.exit_code == 0, (exit1.log_tail, exit2.log_tail)
        # each runner ran its own job and exited: no second spec is ever read by the same process
        assert kinds1.count(protocol.EVENT_DONE) == 1 and kinds2.count(protocol.EVENT_DONE) == 1
        assert not alive(runner_pid(first)) and not alive(runner_pid(second))
        assert exit1.isolation["prestarted"] is True and exit2.isolation["prestarted"] is True
    finally:
        await backend.aclose()


async def test_warm_and_cold_sandboxes_look_the_same_from_inside(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    reports = {}
    (jobs.parent / "prestart").mkdir(parents=True)  # hidden by the warm backend: the cold one hides it too
    for how in ("cold", "warm"):
        backend = make_backend(jobs) if how == "warm" else ProcessBackend(hidden_paths=[jobs, jobs.parent / "prestart"])
        try:
            if how == "warm":
                await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)
            handle = await backend.start(make_job(jobs, how, digits, backend, PROBE), LIMITS)
            _, exit = await collect(handle)
            assert exit.isolation["prestarted"] is (how == "warm")
            reports[how] = probe(exit)
        finally:
            await backend.aclose()
    cold, warm = reports["cold"], reports["warm"]
    assert cold["CapEff"] == "0000000000000000" and cold["NoNewPrivs"] == "1" and cold["connect"] != "ok"
    assert cold["write_in"] != "ok" and cold["write_root"] != "ok" and cold["setuid_bit"] == "EPERM"
    assert {n for n in cold["cgroup_names"] if n} == {"lemur-sbx-cold"}  # each in a job cgroup of its own
    assert {n for n in warm["cgroup_names"] if n} == {"lemur-sbx-prestart"}
    for report in (cold, warm):
        report.pop("pid"), report.pop("cgroup_names")
        # torch._dynamo's import sets this in its own process: a warm runner (or the zygote both are forked
        # from) imports it before the model, an exec'd cold one right after the model's module
        # (sandbox.runner.__main__._run); the sandbox's env is the same
        if "TORCHINDUCTOR_CACHE_DIR" in report["env"]:
            report["env"].remove("TORCHINDUCTOR_CACHE_DIR")
    assert warm == cold


async def test_a_killed_server_leaves_no_warm_sandbox(tmp_path: Path, digits) -> None:
    """A server killed with SIGKILL takes its warm sandboxes down (pdeathsig); the next server sweeps
    their cgroups and dirs."""
    jobs = tmp_path / "jobs"
    script = textwrap.dedent(f"""
        import anyio, sys
        from pathlib import Path
        from sandbox.backend import Limits
        from sandbox.process_backend import ProcessBackend
        async def main():
            backend = ProcessBackend(hidden_paths=[Path({str(jobs)!r})], prestart=True, jobs_root=Path({str(jobs)!r}))
            limits = Limits(wall_s=90, memory_bytes={LIMITS.memory_bytes}, pids={LIMITS.pids},
                            out_cap_bytes={LIMITS.out_cap_bytes})
            await backend.prestart(Path({str(digits.public_dir)!r}), limits, wait_ready=True)
            (warm,) = backend.pool.warm()
            print(warm.spawned.proc.pid, flush=True)
            await anyio.sleep(3600)
        anyio.run(main)
    """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        line = server.stdout.readline() if server.stdout else ""
        warm_pid = int(line)
        assert alive(warm_pid)
    finally:
        server.kill()
        server.wait()
    for _ in range(100):
        if not alive(warm_pid):
            break
        time.sleep(0.05)
    assert not alive(warm_pid)
    assert list((jobs.parent / "prestart").glob(f"{SLOT_PREFIX}*"))  # left by the dead server until a sweep
    backend = make_backend(jobs)
    await backend.cleanup_orphans()
    await backend.aclose()
    assert not list((jobs.parent / "prestart").glob(f"{SLOT_PREFIX}*"))
    owner = f"-o{server.pid}-"
    ver = _cgroups.version()
    assert ver is not None
    assert not [d for base in _cgroups.base_dirs(ver).values() for d in base.iterdir() if owner in d.name]


async def test_a_warm_sandbox_outlives_the_thread_that_asked_for_it(tmp_path: Path, digits) -> None:
    """The chain's pdeath signal fires when the THREAD that spawned it ends (prctl(2)), so a warm sandbox
    asked for from a short-lived thread (a refill, an anyio worker) must still be spawned by one that lives
    as long as the pool."""
    import threading

    jobs = tmp_path / "jobs"
    backend = make_backend(jobs)
    try:
        assert backend.pool is not None
        def ask() -> None:
            backend.pool.create(digits.public_dir, LIMITS)  # type: ignore[union-attr]
            time.sleep(1.0)  # past the chain's prctl(PR_SET_PDEATHSIG): the thread's end would then kill it

        asker = threading.Thread(target=ask)
        asker.start()
        asker.join()
        (warm,) = backend.pool.warm()
        backend.pool.wait_ready(warm, 120)
        time.sleep(0.5)
        assert alive(warm.spawned.proc.pid), bytes(warm.output)[-2000:]
        handle = await backend.start(make_job(jobs, "after-thread", digits, backend, TINY_NET), LIMITS)
        kinds, exit = await collect(handle)
        assert exit.exit_code == 0 and exit.isolation["prestarted"] is True, (kinds, exit.log_tail)
    finally:
        await backend.aclose()


async def test_a_refill_and_a_prestart_at_once_make_one_warm_sandbox(tmp_path: Path, digits) -> None:
    """The server's `prestart` (ensure) and a job's refill can decide at the same moment; with one slot
    they must start ONE warm sandbox between them (each holds its imports' memory, and a CUDA context
    when a GPU is lent). The real chain is spawned, slowed by a quarter second so that both decide while
    the first spawn is in flight (a bench run had 2-3 warm sandboxes for one slot)."""
    import threading

    jobs = tmp_path / "jobs"
    backend = make_backend(jobs)
    try:
        pool = backend.pool
        assert pool is not None
        real, spawned = pool._spawn, []

        def slow_spawn(*args: Any) -> Any:
            time.sleep(0.25)
            spawned.append(real(*args))
            return spawned[-1]

        pool._spawn = slow_spawn  # type: ignore[method-assign]
        found: list[Any] = []
        askers = [threading.Thread(target=lambda: pool.refill(digits.public_dir, LIMITS)),
                  threading.Thread(target=lambda: found.append(pool.ensure(digits.public_dir, LIMITS)))]
        for asker in askers:
            asker.start()
            time.sleep(0.05)
        for asker in askers:
            asker.join()
        assert len(spawned) == 1 and len(pool) == 1, (len(spawned), len(pool))
        assert found == pool.warm(), "ensure returns the warm sandbox the refill was creating"
    finally:
        await backend.aclose()
