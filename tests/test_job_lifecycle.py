"""Jobs survive their server: a SIGKILLed worker's job is re-queued and finishes once, a cleanly
stopped server hands its job back at once; and the job tools answer in the legacy protocol era too."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp import Client

from lemur_agent_server.evaluator.queue import JobQueue
from lemur_agent_server.evaluator.requests import EvalRequest
from lemur_agent_server.server import build_server
from tests import models
from tests.conftest import REPO
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio


def runner_pids(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (a job id or a zoo dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "pytest" not in cmdline:
            found.append(int(entry.name))
    return found


def start_worker(settings, stale_s: float) -> subprocess.Popen:
    env = {**os.environ, "LEMUR_STALE_AFTER_S": str(stale_s), "LEMUR_NO_SEED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "lemur_agent_server", "worker", "--zoo", str(settings.zoo_path),
         "--data-root", str(settings.data_root), "--sandbox", settings.sandbox],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def wait_status(store: ZooStore, job_id: str, wanted: set[str], timeout: float) -> dict:
    import anyio

    deadline = time.monotonic() + timeout
    while True:
        row = await store.jobs.get(job_id)
        if row["status"] in wanted:
            return row
        assert time.monotonic() < deadline, row
        await anyio.sleep(0.2)


async def test_killed_worker_leaves_no_stuck_job_and_no_half_run(make_settings):
    settings = make_settings(seed_zoo=False)
    async with await ZooStore.open(settings.zoo_path) as store:
        await killed_worker_scenario(settings, store)
    conn = sqlite3.connect(settings.zoo_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


async def killed_worker_scenario(settings, store: ZooStore) -> None:
    request = EvalRequest(code=models.SLOW, dataset="digits", n_trials=2, epochs=1, time_budget_s=120,
                          prm={"batch": 32, "lr": 0.05, "momentum": 0.9})
    async with JobQueue.running(settings, store, workers=False) as queue:
        job_id = await queue.submit(request)
    first = start_worker(settings, stale_s=2)
    try:
        row = await wait_status(store, job_id, {"training"}, 120)
        while not (row.get("progress") or {}).get("epoch"):  # mid-trial, a curve point already made
            row = await wait_status(store, job_id, {"training"}, 60)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        if first.poll() is None:
            first.kill()
    time.sleep(1.0)
    assert not runner_pids(job_id), "the sandbox outlived its killed server"
    assert (await store.jobs.get(job_id))["status"] == "training"  # looks alive until someone notices
    assert await store.fetchall("SELECT id FROM run WHERE job_id=?", (job_id,)) == []

    second = start_worker(settings, stale_s=2)
    try:
        row = await wait_status(store, job_id, {"succeeded", "failed", "timed_out"}, 240)
    finally:
        second.terminate()
        second.wait(timeout=30)
    # the error first: a CI run failed here once and pytest cut the whole row before its error
    assert row["status"] == "succeeded", (row.get("error"), row.get("attempts"), row.get("result"))
    assert row["attempts"] == 2
    runs = await store.fetchall("SELECT uid, status FROM run WHERE job_id=? ORDER BY uid", (job_id,))
    # the second attempt writes fresh runs (the first one had finished no trial, so nothing else is there)
    assert [r["uid"] for r in runs] == [f"{job_id}:a2:t0", f"{job_id}:a2:t1"]
    points = await store.fetchall("SELECT run_id, COUNT(*) AS n FROM point WHERE run_id IN "
                                  "(SELECT id FROM run WHERE job_id=?) GROUP BY run_id", (job_id,))
    assert len(points) == 2 and all(p["n"] == 2 for p in points)  # epochs 0.5 and 1.0, once each


async def test_clean_shutdown_hands_the_job_back(make_settings):
    settings = make_settings(seed_zoo=False)
    async with Client(build_server(settings)) as client:
        job = (await client.call_tool("submit_model", {
            "code": models.SLOW, "dataset": "digits", "n_trials": 1, "epochs": 2, "time_budget_s": 120,
            "prm": {"batch": 32, "lr": 0.05, "momentum": 0.9}})).structured_content
        while job["status"] != "training":
            job = (await client.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 1})).structured_content
            assert not job["done"], job
    async with await ZooStore.open(settings.zoo_path) as store:
        row = await store.jobs.get(job["job_id"])
    assert row["status"] == "queued" and row["owner"] is None  # handed back, not stuck as training
    assert not runner_pids(job["job_id"])
    async with Client(build_server(settings)) as client:
        done = job
        while not done["done"]:
            done = (await client.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 20})).structured_content
    assert done["status"] == "succeeded", done


async def test_job_tools_in_the_legacy_era(make_settings):
    settings = make_settings(seed_zoo=False)
    async with Client(build_server(settings), mode="legacy") as client:
        checked = (await client.call_tool("check_model", {"code": models.GOOD, "dataset": "digits"}))
        assert not checked.is_error and checked.structured_content["ok"] is True
        assert checked.structured_content["params"] > 0
        bad = (await client.call_tool("submit_model", {"code": models.SYNTAX, "dataset": "digits"}))
        assert bad.structured_content["status"] == "failed"
        assert bad.structured_content["error"]["kind"] == "syntax"
        job = (await client.call_tool("submit_model", {"code": models.SLOW, "dataset": "digits", "epochs": 5,
                                                       "prm": {"batch": 16}})).structured_content
        while job["status"] != "training":  # then the long poll below sees trial 0 train
            job = (await client.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 1})).structured_content
            assert not job["done"], job
        seen = []

        async def on_progress(progress, total, message):
            seen.append((progress, total, message))

        polled = await client.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 4},
                                        progress_callback=on_progress)
        assert not polled.is_error and polled.structured_content["job_id"] == job["job_id"]
        assert not polled.structured_content["done"]  # 5 slow epochs: still running after 4 s
        assert len(seen) >= 2, seen  # the long poll reports while it waits
        assert all(total == 4 for _, total, _ in seen)
        steps = [p for p, _, _ in seen]
        assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[-1] <= 4 + 1e-3
        assert all(re.fullmatch(r"(queued|checking|training|evaluating): trial \S+ epoch \S+ best val \S+", m)
                   for _, _, m in seen), seen
        assert any(m.startswith("training: trial 0 ") for _, _, m in seen), seen
        cancelled = (await client.call_tool("cancel_job", {"job_id": job["job_id"]})).structured_content
        assert cancelled["status"] == "cancelled"
        unknown = await client.call_tool("get_job", {"job_id": "job-nope"})
        assert unknown.is_error and "submit_model" in unknown.content[0].text
        invalid = await client.call_tool("submit_model", {"code": models.GOOD, "dataset": "imagenet-22k"})
        assert invalid.is_error and "unknown dataset" in invalid.content[0].text
        invalid = await client.call_tool("submit_model", {"code": models.GOOD, "dataset": "digits",
                                                          "prm": {"dropout": 3}})
        assert invalid.is_error and "outside [0, 1]" in invalid.content[0].text
