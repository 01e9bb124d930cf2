"""Out of memory: a trial whose batch the caller did not fix runs again once with half the batch; a fixed
batch that does not fit fails naming the batch, the model's size and the way on. Real sandboxes (the
process backend, with its real cgroup memory limit), the real runner, digits, a model that asks for
16 GiB at batches above 32 (tests/models.py BATCH_HOG)."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest
from mcp import Client

from lemur_agent_server.evaluator import jobfiles
from lemur_agent_server.evaluator.executor import make_backend
from lemur_agent_server.evaluator.oom_retry import apply_retry
from lemur_agent_server.evaluator.phase import Trial
from lemur_agent_server.server import build_server
from sandbox import datasets, protocol
from sandbox.backend import Limits
from sandbox.protocol import FailureKind
from tests import models
from tests.conftest import REPO

pytestmark = pytest.mark.anyio

SMALL = {"n_trials": 1, "epochs": 0.5, "eval_every": 0.5, "max_train_samples": 256}
SANDBOX_MEMORY = 2 << 30


async def sandbox_events(settings: Any, code: str, **spec: Any) -> list[dict[str, Any]]:
    """Run the real runner in train mode in a real sandbox (the settings' backend, its memory limit) the way
    the pipeline does, and return every event it wrote."""
    prepared = datasets.prepare("digits", settings.data_root, settings.cache_dir)
    backend = make_backend(settings)
    paths = jobfiles.create_job_dir(settings.jobs_dir, "job-oomtest", prepared.public_dir, code)
    try:
        rp = backend.runner_paths(paths)
        fields = {**prepared.spec_fields(), "model_path": rp.model, "data_dir": rp.data_dir, "out_dir": rp.out_dir}
        jobfiles.write_spec(paths, protocol.JobSpec(
            mode="train", **fields, transforms=[prepared.info.default_transform], time_budget_s=90,
            threads=2, **{**SMALL, **spec}))
        handle = await backend.start(paths, Limits(wall_s=120, memory_bytes=SANDBOX_MEMORY, cpus=2.0))
        events = [event async for event in handle.events()]
        exit = await handle.wait()
        assert not exit.oom_killed and exit.exit_code == 0, (exit, events)
        return events
    finally:
        jobfiles.remove_job_dir(paths)
        await backend.aclose()


def of(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name]


async def test_a_searched_batch_that_runs_out_of_memory_is_retried_with_half(make_settings):
    events = await sandbox_events(make_settings(), models.BATCH_HOG, search_space={"batch": {"choices": [64]}},
                                  fixed_prm={"lr": 0.05, "momentum": 0.9})
    [start], [retry], [end] = (of(events, n) for n in ("trial_start", "trial_retry", "trial_end"))
    assert start["prm"]["batch"] == 64
    assert (retry["trial"], retry["from_batch"], retry["to_batch"], retry["reason"]) == (0, 64, 32, "out_of_memory")
    assert retry["prm"] == {**start["prm"], "batch": 32}
    assert "can't allocate memory" in retry["message"] or "MemoryError" in retry["message"], retry
    assert end["status"] == "completed" and end["points"] == 1, end
    assert end["oom_retry"] == {"from_batch": 64, "to_batch": 32}
    assert of(events, "done")[0]["best_trial"] == 0

    # the host takes the retry: the trial's prm is the batch it trained with, and its note says why
    trial = Trial(trial=0, prm=dict(start["prm"]))
    assert apply_retry(trial, retry)
    assert trial.prm == retry["prm"] and trial.error["oom_retry"] == {"from_batch": 64, "to_batch": 32}
    assert trial.error["kind"] == FailureKind.OOM and trial.error["recovered"] is True
    assert not apply_retry(trial, retry)  # once only


def test_the_host_refuses_a_retry_the_runner_may_not_make():
    started = {"batch": 64, "lr": 0.1}
    for bad in ({"from_batch": 64, "to_batch": 16}, {"from_batch": 128, "to_batch": 64},
                {"from_batch": 64, "to_batch": "32"}, {"from_batch": True, "to_batch": 0}, {}):
        trial = Trial(trial=0, prm=dict(started))
        assert not apply_retry(trial, {"trial": 0, **bad}), bad
        assert trial.prm == started and trial.error is None
    ended = Trial(trial=0, prm=dict(started), status="succeeded")
    assert not apply_retry(ended, {"trial": 0, "from_batch": 64, "to_batch": 32})


async def test_a_fixed_batch_that_does_not_fit_names_the_batch_and_the_model_size(make_settings):
    events = await sandbox_events(make_settings(), models.BATCH_HOG,
                                  fixed_prm={"batch": 64, "lr": 0.05, "momentum": 0.9})
    assert not of(events, "trial_retry")
    [end] = of(events, "trial_end")
    assert end["status"] == "failed" and end["error"]["kind"] == "out_of_memory", end
    message = end["error"]["message"]
    check = of(events, "check")[0]
    assert "batch 64 (fixed by prm.batch)" in message and f"{check['params']:,} parameters" in message, message
    assert "smaller prm.batch" in message and "leave batch out of prm" in message


async def test_through_the_job_door_a_fixed_batch_fails_as_out_of_memory_and_a_searched_one_trains(make_settings):
    async with Client(build_server(make_settings(seed_zoo=False))) as client:
        async def run(**args: Any) -> dict[str, Any]:
            job = (await client.call_tool("submit_model", {"code": models.BATCH_HOG, "dataset": "digits",
                                                           "time_budget_s": 90, **SMALL, **args})).structured_content
            deadline = time.monotonic() + 240
            while not job["done"]:
                assert time.monotonic() < deadline, job
                job = (await client.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 20})).structured_content
            return job

        fixed = await run(prm={"batch": 64, "lr": 0.05, "momentum": 0.9})
        assert fixed["status"] == "failed" and fixed["error"]["kind"] == "out_of_memory", fixed
        assert "batch 64 (fixed by prm.batch)" in fixed["error"]["message"]
        assert f"{fixed['result']['params']:,} parameters" in fixed["error"]["message"]
        searched = await run(prm={"lr": 0.05, "momentum": 0.9}, search_space={"batch": {"choices": [64]}})
        assert searched["status"] == "succeeded", searched
        assert searched["result"]["accuracy"] is not None
        # recorded as such: the trial and its run show the batch it trained with and the retry
        [trial] = searched["result"]["trials"]
        assert trial["prm"]["batch"] == 32 and searched["result"]["prm"]["batch"] == 32, trial
        assert trial["error"]["oom_retry"] == {"from_batch": 64, "to_batch": 32} and trial["status"] == "succeeded"
        detail = (await client.call_tool("get_model", {"name": searched["model_name"], "include_code": False})
                  ).structured_content
        run = next(r for r in detail["recent_runs"] if r["status"] == "succeeded")
        assert run["prm"]["batch"] == 32 and run["error"]["oom_retry"] == {"from_batch": 64, "to_batch": 32}, run


def test_the_memory_limit_is_read_from_cgroup_v1_and_v2_layouts(tmp_path):
    from sandbox.runner.memguard import cgroup_memory_limit

    def tree(name: str, files: dict[str, str], proc: str):
        root = tmp_path / name
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        root.mkdir(exist_ok=True)
        (root / "proc").write_text(proc)
        return cgroup_memory_limit(root / "fs", root / "proc")

    # v2 (CI runners, Docker with a private cgroup namespace): the job's memory.max, its parent's "max"
    assert tree("v2", {"fs/memory.max": "max\n", "fs/srv/job/memory.max": "2147483648\n",
                       "fs/srv/memory.max": "max\n"}, "0::/srv/job\n") == 2 << 30
    # v1 (this host): the job's limit under the memory controller, the root's "unlimited" 2^63 - 4096
    assert tree("v1", {"fs/memory/memory.limit_in_bytes": "9223372036854771712\n",
                       "fs/memory/api/job/memory.limit_in_bytes": "1610612736\n",
                       "fs/memory/api/memory.limit_in_bytes": "9223372036854771712\n"},
                "5:pids:/api/job\n4:memory:/api/job\n0::/\n") == 1610612736
    assert tree("none", {}, "0::/\n") is None


def test_the_data_cap_leaves_headroom_below_the_cgroup_limit_for_file_pages():
    # a cap at the limit itself lets private memory crowd out the runner's code pages (thrashing, then the
    # budget ran out in a CI run instead of a MemoryError); the cap is a quarter (256 MiB..1 GiB) below it
    probe = (
        "import resource\n"
        "from sandbox.runner import memguard\n"
        "out = []\n"
        "for limit in (4 << 30, 1 << 30, 16 << 30):\n"
        "    resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "    memguard.cgroup_memory_limit = lambda limit=limit: limit\n"
        "    cap = memguard.cap_data_segment('cpu')\n"
        "    out.append((cap, resource.getrlimit(resource.RLIMIT_DATA)[0]))\n"
        "print(out)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str([(3 << 30, 3 << 30), (768 << 20, 768 << 20), (15 << 30, 15 << 30)])
