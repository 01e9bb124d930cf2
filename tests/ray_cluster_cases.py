"""The Ray executor on a real two-node Ray cluster that this module starts on loopback.

Run only through tests/test_ray_executor.py, which runs this file inside a network namespace of its
own (only `lo`): there Ray's node address is 127.0.0.1 and every packet of the cluster stays on
loopback. On the host's network Ray would replace 127.0.0.1 by the address of the default route.

The head (`--num-gpus 2 --num-cpus 2`, logical resources) and a second node that joins it run as
separate raylets on this machine, with Ray's token authentication on (RAY_AUTH_MODE=token and a
fresh token, for both nodes and for this test process as the driver). The jobs run on CPU (this
machine has no GPU) in the process sandbox each node starts itself; the server (this process) keeps
the zoo and the test labels, scores and archives. Both nodes are stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from lemur_agent_server.evaluator.queue import JobQueue
from lemur_agent_server.evaluator.ray_executor import RayBackend
from lemur_agent_server.evaluator.ray_local_cluster import LocalRayCluster, alive, descendants, only_loopback
from lemur_agent_server.evaluator.requests import EvalRequest
from sandbox import _cgroups, datasets
from tests import models
from tests.zoo_factory import count
from zoo.store import ZooStore

# Ray reads its auth mode and token once, when it is imported: set them before, for this driver
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(24)}
os.environ.update(AUTH)
import ray  # noqa: E402 - the [ray] extra is a test dependency (scripts/install-test-deps.sh)

if not only_loopback():  # refuse before any cluster starts: Ray would talk to a non-loopback address
    raise RuntimeError("tests/ray_cluster_cases.py runs only inside a private network namespace: run "
                       "tests/test_ray_executor.py, which starts it there (unshare --net).")

pytestmark = pytest.mark.anyio

QUICK = {"n_trials": 1, "epochs": 0.5, "time_budget_s": 60, "max_train_samples": 64,
         "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}}
LONG = {"n_trials": 1, "epochs": 2, "time_budget_s": 90, "max_train_samples": 512,
        "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}}

# a net whose code leaves thousands of files in out/ (each look of the node at out/ then takes long
# enough for the runner to write a point's predictions and its event in the middle of it)
LITTERS_OUT = models.tiny(learn_extra=(
    "import os\n        litter = os.path.join(os.environ['HOME'], 'preds')\n"
    "        os.makedirs(litter, exist_ok=True)\n"
    "        if not os.path.exists(os.path.join(litter, 'pad0')):\n"
    "            [open(os.path.join(litter, f'pad{i}'), 'w').close() for i in range(3000)]"))
MANY_POINTS = {**QUICK, "eval_every": 0.1, "max_train_samples": 256}
FINISHED = {"succeeded", "failed", "timed_out", "cancelled"}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """Head + one joined node on 127.0.0.1 with token auth; yields the address; stops both."""
    temp = Path(tempfile.mkdtemp(prefix="lemur-ray-", dir="/tmp"))
    try:
        with LocalRayCluster(temp, ["--num-gpus", "2", "--num-cpus", "2"], [["--num-cpus", "2", "--num-gpus", "0"]],
                             env=AUTH) as cluster:
            yield cluster.address
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def ray_settings(make_settings, ray_cluster: str):
    def make(**kw: Any):
        settings = make_settings(seed_zoo=False, executor="ray", ray_address=ray_cluster,
                                 stale_after_s=3.0, **{"sandbox": "process", **kw})
        settings.threads = 1  # one CPU per job: four jobs at once on the two nodes
        return settings
    return make


async def wait_status(queue: JobQueue, job_id: str, statuses: set[str], timeout: float) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            row = await queue.jobs.get(job_id)
            assert row is not None
            if row["status"] in statuses:
                return row
            await anyio.sleep(0.2)


async def a_slow_job_training(queue: JobQueue, within_s: float = 90) -> tuple[str, dict[str, Any]]:
    """Submit the SLOW model and return (job id, where Ray placed its sandbox) once it is training."""
    job_id = await queue.submit(EvalRequest(code=models.SLOW, dataset="digits", **LONG))
    await wait_status(queue, job_id, {"training"}, within_s)
    with anyio.fail_after(30):
        while job_id not in queue.backend.placed:
            await anyio.sleep(0.1)
    return job_id, queue.backend.placed[job_id]


def sandbox_cgroups(job_id: str) -> list[Path]:
    """The job cgroups (every controller) of `job_id`'s sandboxes on this machine, whoever made them."""
    version = _cgroups.version()
    assert version is not None
    safe = re.sub(r"[^A-Za-z0-9_.]", "_", job_id)
    return [d for base in _cgroups.base_dirs(version).values() for d in base.glob(f"{_cgroups.PREFIX}{safe}-*")]


def start_worker(settings: Any, log: Path) -> subprocess.Popen[bytes]:
    """The real server's job runner (`lemur-agent-server worker --executor ray`) on `settings`' zoo,
    its output into `log`."""
    env = {**os.environ, "LEMUR_DATA": str(settings.data_root), "LEMUR_STALE_AFTER_S": str(settings.stale_after_s)}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lemur_agent_server", "--zoo", str(settings.zoo_path), "worker", "--slots", "1",
             "--executor", "ray", "--ray-address", settings.ray_address, "--sandbox", "process"],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def test_every_node_of_the_cluster_is_on_loopback(ray_cluster: str):
    if not ray.is_initialized():
        ray.init(address=ray_cluster, log_to_driver=False)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert {n["NodeManagerAddress"] for n in nodes} == {"127.0.0.1"}


async def test_a_batch_runs_on_both_nodes_and_every_result_is_archived(ray_settings):
    settings = ray_settings(slots=4)
    started = time.monotonic()
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            backend = queue.backend
            assert isinstance(backend, RayBackend)
            requests = [EvalRequest(code=models.GOOD, dataset="digits", name_prefix=f"r{i}", seed=i, **QUICK)
                        for i in range(10)]
            _, entries = await queue.submit_batch(requests)
            job_ids = [e["job_id"] for e in entries]
            rows = [await wait_status(queue, j, FINISHED, 150) for j in job_ids]
            sent = [ray.get(ref) for ref in backend.sent]
    assert all(r["error"] for r in rows if r["status"] == "failed"), rows  # a failure always says why
    assert [r["status"] for r in rows] == ["succeeded"] * 10, [(r["id"], r["status"], r["error"])
                                                              for r in rows if r["status"] != "succeeded"]
    assert all(r["result"]["accuracy"] is not None for r in rows)
    for job_id in job_ids:  # archived by the server, one run per job
        assert count(settings.zoo_path, "SELECT COUNT(*) FROM run WHERE job_id=?", (job_id,)) >= 1
    node_jobs = Path(tempfile.gettempdir()) / "lemur-ray-node" / "state" / "jobs"
    assert not [j for j in job_ids if list(node_jobs.glob(f"*/{j}"))]  # each node removed its copy of the job
    nodes = {backend.placed[j]["node"] for j in job_ids}
    assert len(nodes) == 2, nodes  # Ray placed jobs on both nodes
    actors = {backend.placed[j]["pid"] for j in job_ids}
    assert len(actors) < len(job_ids), actors  # an actor whose job ended runs a later one
    assert_no_test_labels_in(sent, settings)
    assert time.monotonic() - started < 120


def assert_no_test_labels_in(sent: list[dict[str, bytes]], settings: Any) -> None:
    """What the Ray jobs received: job inputs and the public arrays; never the test labels."""
    labels = datasets.prepare("digits", settings.data_root, settings.cache_dir).test_labels
    label_bytes = labels.tobytes()
    shipped = {name: data for files in sent for name, data in files.items()}
    assert "spec.json" in shipped and any(name.startswith("test_x") for name in shipped)
    assert not any("test_y" in name or "label" in name.lower() and "test" in name.lower() for name in shipped)
    assert not any(label_bytes in data for data in shipped.values())


async def test_a_batch_fetches_the_dataset_onto_the_nodes_once(ray_settings, tmp_path: Path):
    """The public arrays go into Ray's object store once and come out of it once onto this machine's
    node cache (both nodes share it here), however many jobs and actors the batch has: every later job
    finds them cached by their content hash. (Before, Ray resolved the dataset's reference for every
    call, so each job's actor received the whole dataset again: MNIST is ~50 MB a job.)"""
    settings = ray_settings(slots=2)
    backend = RayBackend(settings.ray_address, sandbox="process", node_root=str(tmp_path / "node"))
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, backend=backend) as queue:
            requests = [EvalRequest(code=models.GOOD, dataset="digits", name_prefix=f"d{i}", seed=i, **QUICK)
                        for i in range(4)]
            _, entries = await queue.submit_batch(requests)
            rows = [await wait_status(queue, e["job_id"], FINISHED, 150) for e in entries]
    assert [r["status"] for r in rows] == ["succeeded"] * 4, [r["error"] for r in rows]
    fetched = [backend.placed[e["job_id"]]["data_fetched"] for e in entries]
    assert sorted(fetched) == [False, False, False, True], fetched
    cached = [d for d in (tmp_path / "node" / "state" / "dataset-cache" / "ray").iterdir() if d.is_dir()]
    assert len(cached) == 1 and any(f.name.startswith("test_x") for f in cached[0].iterdir()), cached
    assert not [f for f in cached[0].rglob("*") if "test_y" in f.name]  # the labels never travel


async def test_the_sandbox_on_a_node_runs_at_the_nodes_priority_not_at_rays_worker_niceness(ray_settings):
    """Ray starts its workers at nice 15 (RAY_worker_niceness); a process sandbox forked by one
    inherited it and got a fraction of the CPU a local sandbox gets for the same job on a machine
    with any other load. The sandbox runs at the raylet's niceness; the actor keeps Ray's."""
    settings = ray_settings(slots=1)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            job_id, placed = await a_slow_job_training(queue)
            actor = placed["pid"]
            raylet = int(Path(f"/proc/{actor}/stat").read_text().rsplit(")", 1)[1].split()[1])
            node, worker = niceness(raylet), niceness(actor)
            sandbox = {pid: niceness(pid) for pid in descendants(actor)}
            await queue.cancel(job_id)
    assert sandbox, "no sandbox below the actor"
    assert worker > node  # the case at hand: Ray's workers run below the node's priority
    assert set(sandbox.values()) == {node}, sandbox


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


async def test_every_point_arrives_with_its_predictions_while_the_node_reads_out(ray_settings):
    """The node hands the host each event only with the files it names. Its sandbox's out/ holds
    thousands of files here, so each look at out/ is long: the old order (the files, then the
    events) let a point's event through before its predictions and failed the job."""
    settings = ray_settings(slots=2)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            requests = [EvalRequest(code=LITTERS_OUT, dataset="digits", name_prefix=f"p{i}", seed=i, **MANY_POINTS)
                        for i in range(2)]
            _, entries = await queue.submit_batch(requests)
            rows = [await wait_status(queue, e["job_id"], FINISHED, 120) for e in entries]
    assert [(r["status"], r["error"]) for r in rows] == [("succeeded", None)] * 2, rows
    trials = [t for r in rows for t in r["result"]["trials"]]
    assert [t["error"] for t in trials] == [None, None]
    for row in rows:  # all five points of the curve, each scored from its predictions
        points = count(settings.zoo_path, "SELECT COUNT(*) FROM point p JOIN run r ON r.id = p.run_id "
                                          "WHERE r.job_id=?", (row["id"],))
        assert points == 5


async def test_a_job_whose_ray_worker_is_killed_is_requeued_and_finishes(ray_settings):
    settings = ray_settings(slots=2)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            backend = queue.backend
            job_id, placed = await a_slow_job_training(queue)
            first = placed  # where the first attempt ran
            sandbox = descendants(first["pid"])
            os.kill(first["pid"], signal.SIGKILL)  # the Ray worker process dies mid-training
            row = await wait_status(queue, job_id, {"succeeded", "failed", "timed_out", "cancelled"}, 150)
    assert row["status"] == "succeeded", row.get("error")
    assert row["attempts"] == 2  # given back once, then run again from the start
    assert backend.placed[job_id]["pid"] != first["pid"]
    assert not [p for p in sandbox if alive(p)]  # the killed worker's sandbox died with it
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM run WHERE job_id=?", (job_id,)) == 1  # no half run


async def test_a_server_killed_mid_training_leaves_its_job_to_the_next_server(ray_settings):
    """A server (the real `worker` process, a Ray driver) is killed -9 while its job trains on Ray: Ray
    ends the dead driver's actor, its sandbox goes with it, and the next server on the zoo re-queues
    the job and finishes it: one run, from the second attempt, and nothing of the first left on the node."""
    settings = ray_settings(slots=1)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, workers=False) as queue:
            job_id = await queue.submit(EvalRequest(code=models.SLOW, dataset="digits", **LONG))
    log = settings.state_dir / "worker.log"
    worker = start_worker(settings, log)
    try:
        with anyio.fail_after(120):  # killed once the first point is in (the node holds its events and files)
            while not (count(settings.zoo_path, "SELECT COUNT(*) FROM job WHERE id=? AND status='training' AND "
                             "json_extract(progress, '$.epoch') >= 0.5", (job_id,)) and sandbox_cgroups(job_id)):
                assert worker.poll() is None, log.read_text()[-3000:]
                await anyio.sleep(0.2)
        first = sandbox_cgroups(job_id)
        owner = {int(m.group(1)) for d in first if (m := re.search(r"-o(\d+)-", d.name))}
        sandbox = {int(p) for d in first for p in (d / "cgroup.procs").read_text().split()}
        assert len(owner) == 1 and sandbox, (first, sandbox)
        actor_pid = owner.pop()
        worker.kill()
    finally:
        worker.kill()
        worker.wait(timeout=30)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            row = await wait_status(queue, job_id, FINISHED, 180)
            placed = queue.backend.placed[job_id]
    assert (row["status"], row["error"], row["attempts"]) == ("succeeded", None, 2), row
    assert placed["pid"] != actor_pid
    with closing(sqlite3.connect(settings.zoo_path)) as conn:
        uids = [uid for (uid,) in conn.execute("SELECT uid FROM run WHERE job_id=?", (job_id,))]
        elapsed = [e for (e,) in conn.execute("SELECT p.elapsed_s FROM point p JOIN run r ON r.id = p.run_id "
                                              "WHERE r.job_id=? ORDER BY p.epoch", (job_id,))]
    assert len(uids) == 1 and uids[0].startswith(f"{job_id}:a2:"), uids  # no run of the killed attempt
    # every point is the second attempt's own: SLOW sleeps 0.1 s a batch, 1.6 s to its first point (the
    # first attempt's events, read again, would put that point at once after the trial's start: 0.05 s was
    # measured so); the host dates a trial's start by when it saw the event, so its count may be a bit short
    assert len(elapsed) == 4 and elapsed[0] >= 0.8, elapsed
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM run WHERE job_id=? AND selected=1", (job_id,)) == 1
    with anyio.fail_after(30):  # Ray ends the actors of a dead driver (fate sharing)
        while alive(actor_pid):
            await anyio.sleep(0.2)
    assert not [p for p in sandbox if alive(p)]
    assert not [d for d in sandbox_cgroups(job_id) if f"-o{actor_pid}-" in d.name]
    node_jobs = Path(tempfile.gettempdir()) / "lemur-ray-node" / "state" / "jobs"
    assert not list(node_jobs.glob(f"*/{job_id}"))  # neither attempt left its files on the node


async def test_cancel_across_ray_stops_the_sandbox_on_its_node(ray_settings):
    settings = ray_settings(slots=2)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            job_id, placed = await a_slow_job_training(queue)
            actor_pid = placed["pid"]
            processes = descendants(actor_pid)
            assert processes  # the sandbox runs below the actor
            await queue.cancel(job_id)
            row = await wait_status(queue, job_id, {"cancelled", "succeeded", "failed"}, 60)
            with anyio.fail_after(30):  # the actor is killed once its sandbox is gone
                while alive(actor_pid):
                    await anyio.sleep(0.2)
    assert row["status"] == "cancelled", row
    assert not [p for p in processes if alive(p)]


async def test_gpu_jobs_ask_ray_for_a_gpu_and_checks_do_not(ray_settings):
    """Only the head has (logical) GPUs: every GPU job lands there, pinned to the GPU Ray gave its
    actor; a check job asks for CPUs only. No real GPU here: the runner then refuses cuda."""
    settings = ray_settings(gpus=("0",), slots=2)  # on Ray: two GPU jobs in flight, devices chosen by Ray
    assert settings.slot_count == 2
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            backend = queue.backend
            gpu_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
            job_ids = [await queue.submit(EvalRequest(code=models.GOOD, dataset="digits", seed=i, **QUICK))
                       for i in range(2)]
            check = await queue.check(EvalRequest(code=models.GOOD, dataset="digits", **QUICK))
            rows = [await wait_status(queue, j, {"succeeded", "failed", "timed_out", "cancelled"}, 90)
                    for j in job_ids]
    placed = [backend.placed[j] for j in job_ids]
    assert len(gpu_nodes) == 1 and {p["node"] for p in placed} == gpu_nodes
    assert all(p["gpu"] in ("0", "1") for p in placed)
    checks = [p for j, p in backend.placed.items() if j.startswith("check-")]
    assert checks and all(p["gpu"] is None for p in checks)
    assert check.status == "succeeded"
    assert all("cuda" in json.dumps(r["error"]) for r in rows), rows


async def test_a_job_whose_ray_worker_dies_every_time_ends_interrupted(ray_settings):
    """Bounded retries: the second death of its worker fails the job as `interrupted`, no run written."""
    settings = ray_settings(slots=1)
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            backend = queue.backend
            job_id = await queue.submit(EvalRequest(code=models.SLOW, dataset="digits", **LONG))
            killed: set[int] = set()
            with anyio.fail_after(120):
                while len(killed) < 2:
                    row = await queue.jobs.get(job_id)
                    pid = backend.placed.get(job_id, {}).get("pid")
                    if row["status"] == "training" and pid and pid not in killed:
                        os.kill(pid, signal.SIGKILL)
                        killed.add(pid)
                    await anyio.sleep(0.2)
            row = await wait_status(queue, job_id, {"succeeded", "failed", "timed_out", "cancelled"}, 60)
    assert row["status"] == "failed" and row["error"]["kind"] == "interrupted", row
    assert count(settings.zoo_path, "SELECT COUNT(*) FROM run WHERE job_id=?", (job_id,)) == 0


def test_the_executor_comes_from_flags_or_the_environment(monkeypatch, tmp_path: Path):
    from lemur_agent_server import cli
    from lemur_agent_server.config import Settings

    monkeypatch.setenv("LEMUR_EXECUTOR", "ray")
    monkeypatch.setenv("LEMUR_RAY_ADDRESS", "127.0.0.1:6379")
    settings = Settings.from_env(tmp_path / "zoo.sqlite")
    assert (settings.executor, settings.ray_address) == ("ray", "127.0.0.1:6379")
    monkeypatch.delenv("LEMUR_EXECUTOR")
    monkeypatch.delenv("LEMUR_RAY_ADDRESS")
    assert (Settings.from_env(tmp_path / "zoo.sqlite").executor, Settings.from_env(tmp_path / "z").ray_address) \
        == ("local", "auto")
    args = cli.build_parser().parse_args(["--zoo", str(tmp_path / "zoo.sqlite"), "serve", "--executor", "ray",
                                          "--ray-address", "127.0.0.1:7000"])
    settings = cli._settings(args)
    assert (settings.executor, settings.ray_address) == ("ray", "127.0.0.1:7000")


async def test_a_killed_workers_container_does_not_outlive_it(ray_settings, warm_docker_sandbox):
    """Docker on the nodes: the container of a Ray worker killed mid-training is reaped (it is labelled
    with its job and its owner, the dead worker) by the next actor on that node; the job finishes."""
    import docker

    from sandbox.docker_backend import LABEL_JOB

    settings = ray_settings(slots=1, sandbox="docker")
    engine = docker.from_env()
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            job_id, placed = await a_slow_job_training(queue, 120)
            first = placed  # where the first attempt ran
            labelled = engine.containers.list(filters={"label": f"{LABEL_JOB}={job_id}"})
            assert len(labelled) == 1  # the job's container, running
            os.kill(first["pid"], signal.SIGKILL)
            row = await wait_status(queue, job_id, {"succeeded", "failed", "timed_out", "cancelled"}, 150)
    assert row["status"] == "succeeded", row.get("error")
    assert engine.containers.list(all=True, filters={"label": f"{LABEL_JOB}={job_id}"}) == []
