"""Pre-started Docker containers against a real engine and the real image: nothing of a warm container
outlives its server.

Why: a warm container waits for a spec that only its server can hand over. A server that closes its
backend removes them (`aclose`); one killed without closing cannot, so each warm container watches its
server's heartbeat file and exits by itself once it goes stale, and the next server removes the stopped
container and its warm dir (`cleanup_orphans`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import docker
import pytest

from sandbox import datasets
from sandbox.docker_backend import LABEL_INSTANCE, LABEL_OWNER, LABEL_PRESTART, SLOT_PREFIX, DockerBackend

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("LEMUR_SANDBOX_IMAGE", "lemur-agent-server-sandbox:latest")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> datasets.PreparedDataset:
    return datasets.prepare("digits", REPO / "data", tmp_path_factory.getbasetemp() / "cache")


def containers_of(client: docker.DockerClient, pid: int) -> list[object]:
    return [c for c in client.containers.list(all=True, filters={"label": f"{LABEL_PRESTART}=1"})
            if (c.labels.get(LABEL_OWNER) or "").split(":")[1:2] == [str(pid)]]


async def test_a_killed_servers_warm_container_stops_by_itself_and_is_swept(tmp_path: Path, digits) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    script = textwrap.dedent(f"""
        import anyio
        from pathlib import Path
        from sandbox import docker_prestart
        from sandbox.backend import Limits
        from sandbox.docker_backend import DockerBackend
        # a short staleness, so that the test does not wait the real 30 s
        docker_prestart.HEARTBEAT_STALE_S, docker_prestart.HEARTBEAT_EVERY_S = 3.0, 0.5
        async def main():
            backend = DockerBackend({IMAGE!r}, prestart=True, jobs_root=Path({str(jobs)!r}))
            await backend.prestart(Path({str(digits.public_dir)!r}), Limits(wall_s=60, memory_bytes=1 << 30),
                                   wait_ready=True)
            print("ready", flush=True)
            await anyio.sleep(3600)
        anyio.run(main)
    """)
    client = docker.from_env()
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        (warm,) = containers_of(client, server.pid)
        warm.reload()
        assert warm.status == "running"
    finally:
        server.kill()
        server.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        warm.reload()
        if warm.status != "running":
            break
        time.sleep(0.5)
    assert warm.status == "exited", warm.status  # no process of it waits for a job any more
    assert warm.attrs["State"]["ExitCode"] == 0
    assert list(jobs.glob(f"{SLOT_PREFIX}*"))  # until the next server sweeps
    backend = DockerBackend(IMAGE, jobs_root=jobs)
    assert await backend.cleanup_orphans() >= 1
    await backend.aclose()
    assert not containers_of(client, server.pid)
    assert not list(jobs.glob(f"{SLOT_PREFIX}*"))


async def test_the_heartbeat_file_is_not_left_in_the_jobs_in_dir(tmp_path: Path, digits) -> None:
    from tests.test_docker_backend import INSTANCE, LIMITS, TINY_NET, collect, make_job

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    backend = DockerBackend(IMAGE, instance_id=INSTANCE, prestart=True, jobs_root=jobs)
    try:
        await backend.prestart(digits.public_dir, LIMITS, wait_ready=True)
        paths = make_job(jobs, "beat", digits, backend, TINY_NET, mode="check")
        handle = await backend.start(paths, LIMITS)
        _, exit, _ = await collect(handle, time.monotonic())
        assert exit.exit_code == 0 and exit.isolation["prestarted"] is True, exit.log_tail
        assert sorted(p.name for p in paths.in_dir.iterdir()) == ["model.py", "spec.json"]
    finally:
        await backend.aclose()


def _warm_containers(client: docker.DockerClient, instance: str) -> list[object]:
    return client.containers.list(all=True, filters={"label": [f"{LABEL_PRESTART}=1", f"{LABEL_INSTANCE}={instance}"]})


async def test_a_jobs_refill_and_the_evaluators_prestart_make_one_warm_container(tmp_path: Path, digits) -> None:
    """What the evaluator does for every job: start it (the pool refills itself in the background), then
    ask for a warm sandbox of the job's kind (`prestart`). With one slot that is ONE warm container: the
    prestart waits for the refill's container in flight instead of creating a second (old code: two per
    key, each with torch imported and, on a GPU, a CUDA context). Real engine and image; each container's
    creation is slowed by half a second so that the prestart asks while the refill's is in flight."""
    import secrets

    from tests.test_docker_backend import LIMITS, TINY_NET, collect, make_job

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    instance = f"pytest-{secrets.token_hex(4)}"
    backend = DockerBackend(IMAGE, instance_id=instance, prestart=True, prestart_slots=1, jobs_root=jobs)
    pool = backend._pool  # noqa: SLF001
    real, launched = pool._launch, []  # noqa: SLF001

    def slow_launch(*args: object) -> object:
        time.sleep(0.5)
        launched.append(real(*args))
        return launched[-1]

    pool._launch = slow_launch  # noqa: SLF001
    client = docker.from_env()
    try:
        paths = make_job(jobs, "first", digits, backend, TINY_NET, mode="check")
        handle = await backend.start(paths, LIMITS)  # cold: the pool was empty; its refill starts now
        await backend.prestart(digits.public_dir, LIMITS)
        _, exit, _ = await collect(handle, time.monotonic())
        assert exit.exit_code == 0 and exit.isolation["prestarted"] is False, exit.log_tail
        for _ in range(200):  # let any creation still in flight land (old code: the refill's)
            if not pool._filling:  # noqa: SLF001
                break
            time.sleep(0.05)
        assert len(launched) == 1 and len(pool) == 1, (len(launched), len(pool))
        assert len(_warm_containers(client, instance)) == 1
    finally:
        await backend.aclose()
    assert _warm_containers(client, instance) == []


async def test_prestart_on_a_backend_without_pre_start_starts_nothing(tmp_path: Path, digits) -> None:
    """`prestart=False` means no warm containers: the evaluator's prestart after each job's start used to
    create one anyway (and the next job adopted it), so pre-start could not be turned off."""
    import secrets

    from tests.test_docker_backend import LIMITS

    jobs = tmp_path / "jobs"
    jobs.mkdir()
    instance = f"pytest-{secrets.token_hex(4)}"
    backend = DockerBackend(IMAGE, instance_id=instance, prestart=False, jobs_root=jobs)
    try:
        await backend.prestart(digits.public_dir, LIMITS)
        assert len(backend._pool) == 0  # noqa: SLF001
        assert _warm_containers(docker.from_env(), instance) == []
    finally:
        await backend.aclose()
