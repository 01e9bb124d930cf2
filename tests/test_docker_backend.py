"""DockerBackend against a real Docker engine and the real sandbox image: no mocks.

CI runs `scripts/build-sandbox-image.sh` first (it installs and starts the engine and builds the image
from Debian packages). Every job here goes through `DockerBackend.start()` with the real runner; the
submitted "models" are stand-ins: a tiny real network for the normal job, and files whose import
probes the sandbox (printing JSON to the log), spins, sleeps or hogs memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import anyio
import docker
import numpy as np
import pytest

from sandbox import datasets, protocol
from sandbox.backend import Exit, Handle, Limits
from sandbox.docker_backend import (
    LABEL_INSTANCE,
    LABEL_JOB,
    LABEL_OWNER,
    LABEL_SANDBOX,
    SLOT_PREFIX,
    DockerBackend,
    SandboxStartError,
)
from tests.sandbox_jobs import TINY_NET, make_job

pytestmark = pytest.mark.anyio
IMAGE = os.environ.get("LEMUR_SANDBOX_IMAGE", "lemur-agent-server-sandbox:latest")
INSTANCE = f"pytest-{secrets.token_hex(4)}"
SECRET_ENV = "LEMUR_TEST_SERVER_SECRET"

# Runs as the submission (on import of model.py) and reports what it can see and do.
PROBE = r'''
import errno, json, os, resource, socket, subprocess, sys
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
    s = socket.socket(); s.settimeout(2); s.connect(("1.1.1.1", 80))
def mount_opts(target):
    for line in open("/proc/self/mountinfo"):
        parts = line.split()
        if parts[4] == target:
            return parts[5]
def cgroup(*names):
    for name in names:
        try:
            return open(name).read().strip()
        except OSError:
            pass
found_labels = []
for root, dirs, files in os.walk("/", onerror=lambda e: None):
    if root.startswith(("/proc", "/sys")):
        dirs[:] = []
        continue
    found_labels += [os.path.join(root, f) for f in files if f == "test_y.npy"]
tmp = os.statvfs("/tmp"); shm = os.statvfs("/dev/shm")
report = {
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "cwd": os.getcwd(),
    "CapEff": status("CapEff"), "CapBnd": status("CapBnd"), "NoNewPrivs": status("NoNewPrivs"),
    "Seccomp": status("Seccomp"),
    "write_root": attempt(lambda: write("/probe")), "write_image": attempt(lambda: write("/opt/lemur/probe")),
    "write_in": attempt(lambda: write("/job/in/probe")), "write_data": attempt(lambda: write("/data/probe")),
    "write_out": attempt(lambda: write("/job/out/probe.txt")), "write_tmp": attempt(lambda: write("/tmp/probe")),
    "interfaces": sorted(os.listdir("/sys/class/net")), "connect": attempt(connect),
    "tmp_bytes": tmp.f_blocks * tmp.f_frsize, "shm_bytes": shm.f_blocks * shm.f_frsize,
    "tmp_opts": mount_opts("/tmp"), "root_opts": mount_opts("/"),
    "data": sorted(os.listdir("/data")), "test_labels_found": found_labels,
    "docker_sock": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
    "env": sorted(os.environ), "pid1": open("/proc/1/cmdline").read().replace("\0", " "),
    "pids_max": cgroup("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids.max"),
    "mem_max": cgroup("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"),
    "nofile": resource.getrlimit(resource.RLIMIT_NOFILE), "core": resource.getrlimit(resource.RLIMIT_CORE),
    "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
}
print("PROBE " + json.dumps(report), flush=True)
raise SystemExit(0)
'''

SPIN = "print('spinning', flush=True)\nwhile True:\n    pass\n"
SLEEP = "import time\nprint('sleeping', flush=True)\ntime.sleep(3600)\n"
HOG = "hog = []\nwhile True:\n    hog.append(bytearray(64 << 20))\n"
FLOOD = "import sys\nfor _ in range(4000):\n    sys.stdout.write('x' * 1023 + '\\n')\nsys.stdout.flush()\n"


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    client = docker.from_env()
    client.ping()
    client.images.get(IMAGE)  # built by scripts/build-sandbox-image.sh
    return client


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.PreparedDataset:
    return datasets.prepare("digits", tmp_path_factory.mktemp("raw"), tmp_path_factory.getbasetemp() / "cache")


@pytest.fixture(autouse=True)
def no_container_left(engine: docker.DockerClient):
    yield
    left = engine.containers.list(all=True, filters={"label": f"{LABEL_INSTANCE}={INSTANCE}"})
    for c in left:
        c.remove(force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


async def collect(handle: Handle, t0: float) -> tuple[list[dict[str, Any]], Exit, dict[str, float]]:
    """All events (first arrival time of each kind relative to t0; `_live`: it came before the end)."""
    events, times = [], {}
    async for event in handle.events():
        event["_live"] = not handle.finished()
        times.setdefault(event["event"], time.monotonic() - t0)
        events.append(event)
    return events, await handle.wait(), times


def probe_report(exit: Exit) -> dict[str, Any]:
    line = next((ln for ln in exit.log_tail.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, exit.log_tail
    return json.loads(line[len("PROBE "):])


LIMITS = Limits(wall_s=90, memory_bytes=2 << 30, cpus=1.0, pids=128, log_cap_bytes=64 << 10,
                out_cap_bytes=64 << 20)


async def test_normal_job_streams_events_and_writes_out(tmp_path: Path, digits, engine) -> None:
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    space = {"lr": {"low": 0.05, "high": 0.1, "log": True}, "momentum": {"low": 0.8, "high": 0.9},
             "batch": {"choices": [32]}}
    paths = make_job(tmp_path, "normal", digits, backend, TINY_NET, mode="train", n_trials=1, epochs=1.0,
                     eval_every=1.0, max_train_samples=300, max_test_samples=100, time_budget_s=60,
                     search_space=space)
    t0 = time.monotonic()
    # a wall clock for a slow disk: a CI run here saw this cold container print nothing for 90 s (cold reads
    # at 35 MB/s); the test is about the events and files, not the start-up time
    handle = await backend.start(paths, dataclasses.replace(LIMITS, wall_s=240))
    assert time.monotonic() - t0 < 10
    events, exit, times = await collect(handle, t0)
    kinds = [e["event"] for e in events]
    assert exit.exit_code == 0, (kinds, exit.log_tail)
    assert kinds[0] == protocol.EVENT_READY and kinds[-1] == protocol.EVENT_DONE, kinds
    assert {protocol.EVENT_CHECK, protocol.EVENT_POINT, protocol.EVENT_TRIAL_END} <= set(kinds)
    assert events[0]["_live"], "the ready event must arrive while the sandbox still runs"
    point = next(e for e in events if e["event"] == protocol.EVENT_POINT)
    preds = np.load(paths.out_dir / point["preds"], allow_pickle=False)
    assert preds.shape == (100,)
    assert not (exit.timed_out or exit.cancelled or exit.oom_killed or exit.signal)
    iso = exit.isolation
    assert iso["backend"] == "docker" and iso["verified"] and iso["prestarted"] is False
    assert iso["network"] == "none" and iso["read_only_root"] and iso["user"] == "65534"
    assert iso["capabilities"] == "none" and iso["no_new_privileges"] and iso["seccomp"] == "default"
    assert iso["memory_limit"] == iso["memory_swap_limit"] == LIMITS.memory_bytes
    assert iso["pids_limit"] == LIMITS.pids and iso["cpus"] == 1.0 and iso["gpu"] is None
    assert sorted(iso["mounts"]) == ["/data:ro", "/job/in:ro", "/job/out:rw"]
    print(f"\ncold start: start() {iso['start_s']:.2f} s, ready event after {times['ready']:.2f} s, "
          f"job {exit.wall_s:.1f} s")
    await backend.aclose()


async def test_hardening_seen_from_inside(tmp_path: Path, digits, engine, monkeypatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "must-not-leak")
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    paths = make_job(tmp_path, "probe", digits, backend, PROBE)
    exit = await (await backend.start(paths, LIMITS)).wait()
    r = probe_report(exit)
    assert (r["uid"], r["gid"]) == (65534, 65534) and set(r["groups"]) <= {65534} and r["cwd"] == "/job/out"
    assert int(r["CapEff"], 16) == 0 and int(r["CapBnd"], 16) == 0
    assert r["NoNewPrivs"] == "1" and r["Seccomp"] == "2"
    assert r["write_root"] == r["write_image"] == r["write_in"] == r["write_data"] == "EROFS", r
    assert r["write_out"] == "ok" and (paths.out_dir / "probe.txt").read_text() == "x"
    assert r["write_tmp"] == "ok" and "noexec" in r["tmp_opts"] and r["root_opts"].startswith("ro")
    assert r["interfaces"] == ["lo"] and r["connect"] in ("ENETUNREACH", "EHOSTUNREACH"), r
    assert 0 < r["tmp_bytes"] <= LIMITS.memory_bytes // 4 and 0 < r["shm_bytes"] <= LIMITS.memory_bytes // 4
    assert r["data"] == sorted(datasets.PUBLIC_FILES) and r["test_labels_found"] == []
    assert not r["docker_sock"]
    assert SECRET_ENV not in r["env"] and "DOCKER_HOST" not in r["env"]
    assert "init" in r["pid1"] or "tini" in r["pid1"], r["pid1"]
    assert r["pids_max"] == str(LIMITS.pids) and int(r["mem_max"]) == LIMITS.memory_bytes
    assert r["nofile"] == [1024, 1024] and r["core"] == [0, 0] and r["fsize"] == [LIMITS.out_cap_bytes] * 2
    await backend.aclose()


async def test_wall_clock_kill(tmp_path: Path, digits, engine) -> None:
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    paths = make_job(tmp_path, "spin", digits, backend, SPIN)
    limits = Limits(wall_s=6, memory_bytes=1 << 30, cpus=1.0)
    exit = await (await backend.start(paths, limits)).wait()
    assert exit.timed_out and not exit.cancelled and exit.signal == 9 and exit.exit_code is None, exit
    assert 6 <= exit.wall_s < 15
    await backend.aclose()


async def test_cancel_and_cancelled_waiter(tmp_path: Path, digits, engine) -> None:
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    limits = Limits(wall_s=120, memory_bytes=1 << 30, cpus=1.0)
    handle = await backend.start(make_job(tmp_path, "sleep1", digits, backend, SLEEP), limits)
    async for event in handle.events():
        if event["event"] == protocol.EVENT_READY:
            break
    t0 = time.monotonic()
    await handle.cancel()
    assert handle.finished() and time.monotonic() - t0 < 5
    exit = await handle.wait()
    assert exit.cancelled and not exit.timed_out and exit.signal == 9
    await handle.cancel()  # idempotent

    # the task awaiting wait() is cancelled: the container is still killed and removed
    handle = await backend.start(make_job(tmp_path, "sleep2", digits, backend, SLEEP), limits)
    with anyio.move_on_after(1.0):
        await handle.wait()
    assert handle.finished()
    exit = await handle.wait()
    assert exit.cancelled
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(handle.container.id)  # type: ignore[attr-defined]
    await backend.aclose()


async def test_oom_and_log_cap(tmp_path: Path, digits, engine) -> None:
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    limits = Limits(wall_s=90, memory_bytes=768 << 20, cpus=1.0, log_cap_bytes=8 << 10)
    async with anyio.create_task_group() as tg:
        results: dict[str, Exit] = {}

        async def run(name: str, code: str) -> None:
            results[name] = await (await backend.start(make_job(tmp_path, name, digits, backend, code), limits)).wait()

        tg.start_soon(run, "hog", HOG)
        tg.start_soon(run, "flood", FLOOD)
    oom, flood = results["hog"], results["flood"]
    assert oom.oom_killed and oom.signal == 9 and not oom.timed_out, oom
    assert flood.log_truncated and len(flood.log_tail.encode()) <= limits.log_cap_bytes
    assert not flood.oom_killed
    await backend.aclose()


async def test_gpu_request_on_a_host_without_the_nvidia_toolkit_fails_at_start(tmp_path: Path, digits,
                                                                                  engine) -> None:
    """CI's engine (like this machine's) has no GPU device driver: a GPU job must fail in start() with the
    engine's reason and what to install, leaving no Created container behind (`no_container_left`)."""
    assert "nvidia" not in (engine.info().get("Runtimes") or {}), "this test is for an engine without the toolkit"
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    paths = make_job(tmp_path, "gpu", digits, backend, PROBE)
    limits = Limits(wall_s=60, memory_bytes=2 << 30, cpus=1.0, gpu="0")
    with pytest.raises(SandboxStartError, match='could not select device driver "" with capabilities: \\[\\[gpu\\]\\]'
                       ) as caught:
        await backend.start(paths, limits)
    assert "NVIDIA Container Toolkit" in str(caught.value)
    await backend.aclose()


async def test_every_container_is_labelled_with_its_job_and_owner(tmp_path: Path, digits, engine) -> None:
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    handle = await backend.start(make_job(tmp_path, "labelled-job", digits, backend, SLEEP), LIMITS)
    try:
        labels = engine.containers.get(handle.container.id).labels  # type: ignore[attr-defined]
        assert labels[LABEL_SANDBOX] == "1" and labels[LABEL_INSTANCE] == INSTANCE
        assert labels[LABEL_JOB] == "labelled-job"
        boot, pid, ticks = labels[LABEL_OWNER].rsplit(":", 2)
        assert (boot, int(pid)) == (Path("/proc/sys/kernel/random/boot_id").read_text().strip(), os.getpid())
        assert ticks == Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    finally:
        await handle.cancel()
        await backend.aclose()


async def test_orphan_cleanup(tmp_path: Path, engine) -> None:
    backend = DockerBackend(IMAGE, instance_id=INSTANCE)
    sleeper = ["python3", "-c", "import time; time.sleep(600)"]
    base = {LABEL_SANDBOX: "1", LABEL_INSTANCE: INSTANCE}
    dead = engine.containers.create(IMAGE, sleeper, name=f"lemur-sbx-orphan-{secrets.token_hex(3)}",
                                    network_mode="none",
                                    labels={**base, LABEL_INSTANCE: "gone-server", LABEL_OWNER: "x:999999:1"})
    dead.start()
    # another live server on this host (our own process identity, another instance id): not an orphan
    alive = engine.containers.create(IMAGE, sleeper, name=f"lemur-sbx-alive-{secrets.token_hex(3)}",
                                     network_mode="none",
                                     labels={**base, LABEL_INSTANCE: "other-live-server",
                                             LABEL_OWNER: backend._owner})
    # a dead server whose pid now belongs to a live process (pid reuse): same boot and pid, other start time
    boot, pid, _ticks = backend._owner.rsplit(":", 2)
    reused = engine.containers.create(IMAGE, sleeper, name=f"lemur-sbx-reused-{secrets.token_hex(3)}",
                                      network_mode="none",
                                      labels={**base, LABEL_INSTANCE: "gone-server-2", LABEL_OWNER: f"{boot}:{pid}:1"})
    reused.start()
    try:
        assert await backend.cleanup_orphans() >= 2
        for gone in (dead, reused):
            with pytest.raises(docker.errors.NotFound):
                engine.containers.get(gone.id)
        engine.containers.get(alive.id)
    finally:
        for c in (alive, dead, reused):
            try:
                c.remove(force=True)
            except docker.errors.NotFound:
                pass
    await backend.aclose()


async def test_prestarted_container_runs_the_next_job(tmp_path: Path, digits, engine) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    backend = DockerBackend(IMAGE, instance_id=INSTANCE, prestart=True, jobs_root=jobs)
    t0 = time.monotonic()
    await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)
    warm_s = time.monotonic() - t0
    assert len(list(jobs.glob(f"{SLOT_PREFIX}*"))) == 1
    paths = make_job(jobs, "warm-job", digits, backend, TINY_NET, mode="check")
    t0 = time.monotonic()
    handle = await backend.start(paths, LIMITS)
    events, exit, times = await collect(handle, t0)
    kinds = [e["event"] for e in events]
    assert exit.exit_code == 0, (kinds, exit.log_tail)
    assert kinds[0] == protocol.EVENT_READY and protocol.EVENT_CHECK in kinds and kinds[-1] == protocol.EVENT_DONE
    assert exit.isolation["prestarted"] is True and exit.isolation["verified"]
    assert handle.container.name.startswith("lemur-sbx-warm-job-")  # type: ignore[attr-defined]
    # the evaluator's paths stay valid: model.py and spec.json in in/, the events in out/
    assert (paths.in_dir / protocol.MODEL_FILE).read_text() == TINY_NET
    assert (paths.out_dir / protocol.EVENTS_FILE).is_file()
    assert sorted(p.name for p in paths.job_dir.iterdir()) == ["in", "out"]
    print(f"\nwarm start: pre-start until waiting {warm_s:.2f} s; start() -> ready event {times['ready']:.2f} s "
          f"(adopt {exit.isolation['adopt_s'] * 1000:.1f} ms)")
    # the pool refills itself for the next job, and aclose removes the warm container and its dir
    for _ in range(200):
        if len(backend._pool):
            break
        await anyio.sleep(0.05)
    assert len(backend._pool) == 1
    await backend.aclose()
    assert not list(jobs.glob(f"{SLOT_PREFIX}*"))


def test_available() -> None:
    assert DockerBackend.available(IMAGE)
    assert not DockerBackend.available("lemur-no-such-image:never")
