"""The GPU pool of the local executor: one training job per GPU, pinned, check jobs on CPU only, and a
slot whose sandbox hung is free again once the kill at its budget came.

This machine has no GPU, so the pool is given logical ids ("0", "1"): the sandboxes really start
(process backend) with those ids in their spec and environment, and the runner then refuses the
cuda device it cannot see. What is asserted is what the pool decided and what reached the sandbox."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator.backends import choose_backend
from lemur_agent_server.evaluator.executor import GpuPool
from lemur_agent_server.evaluator.queue import JobQueue
from lemur_agent_server.evaluator.requests import EvalRequest
from sandbox import gpus as gpu_discovery
from sandbox.backend import Backend, Handle, JobPaths, Limits
from tests import models
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

QUICK = {"n_trials": 1, "epochs": 0.5, "time_budget_s": 60, "max_train_samples": 64,
         "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}}
HANGS_IN_LEARN = models.tiny(learn_extra="while True:\n            pass")


class WatchedBackend:
    """The real backend, watched: what each sandbox was started with, and which GPUs were held by
    sandboxes alive at the same time (a GPU started twice while held is recorded as a clash)."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.started: list[dict[str, Any]] = []
        self.held: set[str] = set()
        self.clashes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def start(self, paths: JobPaths, limits: Limits) -> Handle:
        spec = json.loads(Path(paths.in_dir, "spec.json").read_text())
        self.started.append({"job": paths.job_dir.name, "gpu": limits.gpu, "device": spec["device"],
                             "env": self.inner._env(paths, limits)["CUDA_VISIBLE_DEVICES"],
                             "at": time.monotonic()})
        if limits.gpu is not None:
            if limits.gpu in self.held:
                self.clashes.append(limits.gpu)
            self.held.add(limits.gpu)
        handle = await self.inner.start(paths, limits)
        wait = handle.wait

        async def wait_and_release() -> Any:
            try:
                return await wait()
            finally:
                self.held.discard(limits.gpu)

        handle.wait = wait_and_release  # type: ignore[method-assign]
        return handle


async def wait_finished(queue: JobQueue, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    rows = {}
    with anyio.fail_after(timeout):
        for job_id in job_ids:
            row = await queue.wait(job_id, timeout)
            assert row is not None
            rows[job_id] = row
    return rows


# --- settings and discovery -------------------------------------------------------------------------

def test_one_slot_per_gpu_and_never_more_slots_than_gpus(tmp_path: Path):
    def settings(**kw: Any) -> Settings:
        return Settings(zoo_path=tmp_path / "zoo.sqlite", data_root=tmp_path, **kw)

    assert settings(gpus=("0", "1", "2")).slot_count == 3
    assert settings(gpus=("0", "1", "2"), slots=2).slot_count == 2
    assert settings(gpus=("0", "1"), slots=4).slot_count == 2  # one job per GPU
    assert settings(slots=3).slot_count == 3  # a CPU host: --slots alone
    assert settings().slot_count == 1


def test_gpus_all_reads_the_driver_and_an_empty_host_has_none(tmp_path: Path):
    assert gpu_discovery.parse("0, 1") == ("0", "1")
    assert gpu_discovery.parse("") is None and gpu_discovery.parse(None) is None
    assert gpu_discovery.discover(tmp_path / "no-driver") == ()  # no nvidia-smi on this host either
    proc = tmp_path / "gpus"
    for pci in ("0000:01:00.0", "0000:02:00.0"):
        (proc / pci).mkdir(parents=True)
    assert gpu_discovery.discover(proc) == ("0", "1")


async def test_a_lease_waits_until_a_gpu_is_given_back():
    pool = GpuPool(("0", "1"))
    got: list[str | None] = []

    async def third() -> None:
        async with pool.lease() as gpu:
            got.append(gpu)

    async with anyio.create_task_group() as tg:
        async with pool.lease() as first:
            async with pool.lease() as second:
                assert {first, second} == {"0", "1"} and pool.free() == 0
                tg.start_soon(third)
                await anyio.sleep(0.2)
                assert got == []  # both GPUs held: the third job waits
    assert got == [second]  # it got the GPU given back first
    assert pool.free() == 2


async def test_a_cpu_host_pool_leases_no_gpu_at_once():
    pool = GpuPool(())
    with anyio.fail_after(1):
        async with pool.lease() as a, pool.lease() as b:
            assert a is None and b is None


# --- the queue on the process sandbox ---------------------------------------------------------------

async def test_every_training_job_gets_its_own_gpu_and_a_check_gets_none(make_settings, warm_process_sandbox):
    settings = make_settings(seed_zoo=False, gpus=("0", "1"))
    assert settings.slot_count == 2
    backend = WatchedBackend(await anyio.to_thread.run_sync(choose_backend, settings))
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store, backend) as queue:  # type: ignore[arg-type]
            job_ids = [await queue.submit(EvalRequest(code=models.GOOD, dataset="digits", name_prefix=f"g{i}",
                                                      seed=i, **QUICK)) for i in range(4)]
            check = await queue.check(EvalRequest(code=models.GOOD, dataset="digits", **QUICK))
            rows = await wait_finished(queue, job_ids, 240)
    by_job = {s["job"]: s for s in backend.started}
    trained = [by_job[j] for j in job_ids]
    assert {s["gpu"] for s in trained} == {"0", "1"}  # both GPUs used
    assert all(s["device"] == "cuda" and s["env"] == s["gpu"] for s in trained)  # pinned in spec and env
    assert backend.clashes == []  # never two live sandboxes on one GPU
    checks = [s for s in backend.started if s["job"].startswith("check-")]
    assert checks and all(s["gpu"] is None and s["device"] == "cpu" and s["env"] == "" for s in checks)
    assert check.status == "succeeded", check  # the check really ran, on CPU
    # no GPU on this machine: the runner refuses the cuda device it was pinned to
    assert all("cuda" in json.dumps(rows[j]["error"]) for j in job_ids), rows


async def test_a_slot_whose_sandbox_hung_is_free_after_the_budget_and_the_kill(make_settings, warm_process_sandbox):
    settings = make_settings(seed_zoo=False, slots=1)
    budget = 8.0
    async with await ZooStore.open(settings.zoo_path) as store:
        async with JobQueue.running(settings, store) as queue:
            hung = await queue.submit(EvalRequest(code=HANGS_IN_LEARN, dataset="digits",
                                                  **{**QUICK, "time_budget_s": budget}))
            good = await queue.submit(EvalRequest(code=models.GOOD, dataset="digits", **QUICK))
            rows = await wait_finished(queue, [hung, good], 180)
    assert rows[hung]["status"] == "timed_out", rows[hung]
    assert rows[good]["status"] == "succeeded", rows[good]
    # the next job on the one slot started once the hung one was killed, within budget + kill grace
    assert rows[good]["started"] >= rows[hung]["finished"] - 0.5
    assert rows[good]["started"] - rows[hung]["started"] <= budget + 5.0 + 10.0
