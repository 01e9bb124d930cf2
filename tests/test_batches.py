"""Batches of submissions: per-item checks, reuse of finished experiments, wait_jobs' cursor, list_jobs,
cancel by batch, the fair queue, and the Python API's check_nn_batch. Real zoo files, the process
sandbox, tiny models on digits with budgets of seconds."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import anyio
import pytest
from mcp import Client

from lemur_agent_server import api
from lemur_agent_server.server import build_server
from sandbox.protocol import JobStatus
from tests import models
from tests.conftest import REPO
from zoo.jobs import Claim, NewJob
from zoo.schema import MIGRATIONS
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

QUICK = {"n_trials": 1, "epochs": 0.5, "time_budget_s": 60, "max_train_samples": 64,
         "prm": {"batch": 16, "lr": 0.05, "momentum": 0.9}}
# Whole model files (over 1,000 characters): the argument door reads each nested string's own schema.
# another network (one more operation in forward): another normalized code, so another experiment
VARIANT = models.tiny(forward_extra="x = x * 1.0")
FINISHED = {"succeeded", "failed", "timed_out", "cancelled"}


async def call(client: Client, name: str, args: dict, **kwargs) -> dict:
    result = await client.call_tool(name, args, **kwargs)
    assert not result.is_error, result.content[0].text
    return result.structured_content


# --- the fair queue, at the store ----------------------------------------------------------------------
def queued(job_id: str) -> NewJob:
    return NewJob(job_id, "submit", {"code": "x", "dataset": "digits"})


async def test_a_single_job_after_a_batch_of_ten_is_claimed_second_at_the_latest(make_settings):
    settings = make_settings(seed_zoo=False)
    async with await ZooStore.open(settings.zoo_path) as store:
        await store.jobs.create_many("batch-big", [queued(f"job-b{i}") for i in range(10)])
        await anyio.sleep(0.01)
        await store.jobs.create_many(None, [queued("job-single")])
        claimed = [(await store.jobs.claim_next("me:1:a", ["submit"]))["id"] for _ in range(11)]
    assert "job-single" in claimed[:2], claimed
    assert [c for c in claimed if c != "job-single"] == [f"job-b{i}" for i in range(10)]  # items in order


async def test_two_batches_take_turns(make_settings):
    """A batch queued while another is half done does not wait for it to drain, nor starve it."""
    settings = make_settings(seed_zoo=False)
    async with await ZooStore.open(settings.zoo_path) as store:
        await store.jobs.create_many("batch-a", [queued(f"job-a{i}") for i in range(6)])
        first = [(await store.jobs.claim_next("me:1:a", ["submit"]))["id"] for _ in range(3)]
        await store.jobs.create_many("batch-b", [queued(f"job-b{i}") for i in range(3)])
        rest = [(await store.jobs.claim_next("me:1:a", ["submit"]))["id"] for _ in range(6)]
        assert await store.jobs.claim_next("me:1:a", ["submit"]) is None
    assert first == ["job-a0", "job-a1", "job-a2"]
    # a's last claim is older than b's arrival, so a goes once more; then they alternate
    assert rest == ["job-a3", "job-b0", "job-a4", "job-b1", "job-a5", "job-b2"]


async def test_every_end_gets_the_next_sequence(make_settings):
    """finished_seq grows by one per end, whichever way the job ended (claimed, cancelled, created done)."""
    settings = make_settings(seed_zoo=False)
    async with await ZooStore.open(settings.zoo_path) as store:
        jobs = store.jobs
        await jobs.create_many("batch-s", [queued("job-1"), queued("job-2"), queued("job-3")])
        claim = await jobs.claim_next("me:1:a", ["submit"])
        await jobs.request_cancel("job-3")  # queued: cancelled at once
        assert await jobs.finish(Claim.of(claim), "succeeded", {"model_name": "m"})
        assert not await jobs.finish(Claim.of(claim), "failed")  # a second end is refused and draws nothing
        await jobs.create_finished("job-4", "submit", {"code": "x"}, "failed", None, {"kind": "syntax"})
        rows = {j: await jobs.get(j) for j in ("job-1", "job-2", "job-3", "job-4")}
    assert rows["job-2"]["finished_seq"] is None
    assert [rows[j]["finished_seq"] for j in ("job-3", "job-1", "job-4")] == [1, 2, 3]


# --- the MCP tools, with real training ---------------------------------------------------------------
async def test_a_batch_end_to_end(make_settings):
    """Per-item failures, identical items training once, wait_jobs' cursor across several calls while
    jobs finish, reuse of a finished experiment (and force), list_jobs' filters, cancel by batch."""
    settings = make_settings(seed_zoo=False)
    async with Client(build_server(settings)) as client:
        items = [{"code": models.GOOD}, {"code": models.SYNTAX}, {"code": models.GOOD_REFORMATTED},
                 {"code": models.GOOD, "prm": {"dropout": 3}}, {"code": VARIANT, "n_trials": 1}]
        batch = await call(client, "submit_models", {"items": items, "dataset": "digits", **QUICK})
        entries = batch["entries"]
        assert [e["index"] for e in entries] == list(range(5))
        assert entries[0]["status"] == "queued" and entries[0]["job_id"]
        assert entries[1]["status"] == "failed" and entries[1]["problems"][0]["kind"] == "syntax"
        assert entries[2]["same_as"] == 0 and entries[2]["job_id"] == entries[0]["job_id"]  # trains once
        assert entries[3]["status"] == "invalid" and entries[3]["job_id"] is None
        assert "outside [0, 1]" in entries[3]["problems"][0]["message"]
        assert entries[4]["status"] == "queued"
        assert batch["counts"] == {"queued": 3, "failed": 1, "invalid": 1}
        job_ids = {entries[i]["job_id"] for i in (0, 1, 4)}

        seen: list[str] = []
        cursors: list[int] = []
        progress: list[str] = []
        cursor = None
        done = False
        calls = 0
        while not done:
            calls += 1
            assert calls < 40
            answer = await call(client, "wait_jobs", {"batch_id": batch["batch_id"], "cursor": cursor, "wait_s": 20,
                                                      "limit": 1},
                                progress_callback=lambda p, t, m: _record(progress, m))
            seen += [j["job_id"] for j in answer["jobs"]]
            assert all(j["done"] for j in answer["jobs"])
            cursor = answer["cursor"]
            cursors.append(int(cursor))
            done = answer["done"]
            assert answer["total"] == 3 and answer["finished"] + answer["running"] + answer["counts"].get(
                "queued", 0) == 3
        assert sorted(seen) == sorted(job_ids) and len(seen) == 3  # each end once, none missed
        assert seen[0] == entries[1]["job_id"]  # the static failure ended first
        assert cursors == sorted(cursors)
        assert progress and all(re.fullmatch(r"\d/3 finished, \d running, \d queued, \d succeeded, \d failed", m)
                                for m in progress), progress
        again = await call(client, "wait_jobs", {"batch_id": batch["batch_id"], "cursor": cursor})
        assert again["jobs"] == [] and again["done"] and again["cursor"] == cursor
        first = await call(client, "get_job", {"job_id": entries[0]["job_id"]})
        assert first["status"] == "succeeded", first

        # the same experiment again (other layout, other prefix): answered from the first job
        reuse = await call(client, "submit_models", {"items": [{"code": models.GOOD_REFORMATTED, "name_prefix": "x"}],
                                                     "dataset": "digits", **QUICK})
        entry = reuse["entries"][0]
        assert entry["status"] == "succeeded" and entry["reused_from"] == entries[0]["job_id"]
        reused = (await call(client, "wait_jobs", {"batch_id": reuse["batch_id"]}))["jobs"][0]
        assert reused["result"]["accuracy"] == first["result"]["accuracy"]
        assert reused["model_name"] == first["model_name"]
        assert reused["reused_from"] == entries[0]["job_id"] and reused["batch_id"] == reuse["batch_id"]
        other_seed = await call(client, "submit_models", {"items": [{"code": models.GOOD}], "dataset": "digits",
                                                          **{**QUICK, "seed": 1, "epochs": 5}})
        assert other_seed["entries"][0]["status"] == "queued"  # another seed is another experiment

        forced = await call(client, "submit_models", {"items": [{"code": models.GOOD}, {"code": VARIANT}],
                                                      "dataset": "digits", "force": True, **QUICK})
        assert [e["status"] for e in forced["entries"]] == ["queued", "queued"]
        cancelled = await call(client, "cancel_job", {"batch_id": forced["batch_id"]})
        assert cancelled["batch_id"] == forced["batch_id"] and cancelled["done"], cancelled
        assert cancelled["counts"] == {"cancelled": 2}
        stopped = await call(client, "cancel_job", {"batch_id": other_seed["batch_id"]})
        assert stopped["done"] and stopped["counts"] == {"cancelled": 1}, stopped

        listed = await call(client, "list_jobs", {"batch_id": batch["batch_id"]})
        assert {j["job_id"] for j in listed["jobs"]} == job_ids and listed["cursor"] is None
        assert all(j["batch_id"] == batch["batch_id"] for j in listed["jobs"])
        succeeded = await call(client, "list_jobs", {"status": "succeeded"})
        assert {j["job_id"] for j in succeeded["jobs"]} == {entries[0]["job_id"], entries[4]["job_id"],
                                                             entry["job_id"]}
        assert all(j["accuracy"] is not None for j in succeeded["jobs"])
        page1 = await call(client, "list_jobs", {"limit": 4})
        page2 = await call(client, "list_jobs", {"limit": 4, "cursor": page1["cursor"]})
        assert len(page1["jobs"]) == 4 and page1["cursor"] is not None and page2["cursor"] is None
        assert len(page2["jobs"]) == 3 and not {j["job_id"] for j in page1["jobs"]} & {
            j["job_id"] for j in page2["jobs"]}
        assert page1["jobs"][0]["job_id"] in {e["job_id"] for e in forced["entries"]}  # newest first

        bad = await client.call_tool("wait_jobs", {"batch_id": "batch-nope"})
        assert bad.is_error and "submit_models" in bad.content[0].text
        both = await client.call_tool("cancel_job", {})
        assert both.is_error and "job_id or batch_id" in both.content[0].text


async def _record(progress: list[str], message: str | None) -> None:
    progress.append(message or "")


async def test_a_cursor_never_repeats_or_skips_while_jobs_end(make_settings):
    """Ends committed between and during polls: every job exactly once, over many calls."""
    settings = make_settings(seed_zoo=False, run_workers=False)
    server = build_server(settings)
    async with Client(server) as client:
        jobs = server.state.store.jobs  # the test finishes the jobs itself
        await jobs.create_many("batch-c", [queued(f"job-c{i}") for i in range(12)])
        seen: list[str] = []
        cursor = None

        async def finish_some() -> None:
            for _ in range(12):
                row = await jobs.claim_next("me:1:a", ["submit"])
                await jobs.finish(Claim.of(row), "failed", None, {"kind": "exception"})
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_some)
            deadline = time.monotonic() + 30
            while len(seen) < 12:
                assert time.monotonic() < deadline
                answer = await call(client, "wait_jobs", {"batch_id": "batch-c", "cursor": cursor, "wait_s": 2,
                                                          "limit": 2})
                seen += [j["job_id"] for j in answer["jobs"]]
                cursor = answer["cursor"]
        assert sorted(seen) == sorted(f"job-c{i}" for i in range(12)) and len(seen) == 12
        assert answer["done"] and answer["counts"] == {**{s.value: 0 for s in JobStatus}, "failed": 12}
        bad = await client.call_tool("wait_jobs", {"batch_id": "batch-c", "cursor": "abc"})
        assert bad.is_error and "cursor" in bad.content[0].text
        picked = await call(client, "wait_jobs", {"job_ids": ["job-c3", "job-c5", "job-c3"]})
        assert sorted(j["job_id"] for j in picked["jobs"]) == ["job-c3", "job-c5"] and picked["total"] == 2
        unknown = await client.call_tool("wait_jobs", {"job_ids": ["job-c3", "job-nope"]})
        assert unknown.is_error and "job-nope" in unknown.content[0].text


# --- the Python API --------------------------------------------------------------------------------------
def test_check_nn_batch_returns_tuples_and_exceptions_in_order(make_settings, tmp_path):
    settings = make_settings(seed_zoo=False)
    prm = {"lr": 0.05, "momentum": 0.9, "batch": 32, "epoch": 1}
    items = [models.SYNTAX, {"nn_code": models.GOOD, "prefix": "b"}, {"nn_code": models.GOOD, "prm": {"dropout": 3}},
             models.RAISES_IN_LEARN]
    out = api.check_nn_batch(items, "img-classification", "digits", "acc", prm, zoo=settings.zoo_path,
                             sandbox="process")
    assert isinstance(out[0], api.CodeSyntaxError)
    name, accuracy, a2t, quality = out[1]
    assert name == api.lemur_name(models.GOOD, "b") and 0 < accuracy <= 1 and a2t > 0 and 0 <= quality <= 1
    assert isinstance(out[2], api.InvalidRequestError)
    assert isinstance(out[3], api.TrainingError) and "boom in learn" in str(out[3].error)
    assert len(out) == 4

    # asynchronous use: queue now, wait later (here the waiting process runs the jobs itself)
    queued = api.submit_batch([{"nn_code": models.GOOD, "prefix": "b"}, models.SYNTAX, {"nn_code": models.GOOD,
                               "prm": {"batch": 0}}], "img-classification", "digits", "acc", prm,
                              zoo=settings.zoo_path)
    assert queued["batch_id"] and queued["job_ids"][0] and queued["job_ids"][1] and queued["job_ids"][2] is None
    assert isinstance(queued["errors"][2], api.InvalidRequestError) and queued["errors"][:2] == [None, None]
    jobs = api.wait(queued["batch_id"], timeout=60, zoo=settings.zoo_path, sandbox="process")
    assert [j["job_id"] for j in jobs] == queued["job_ids"][:2]
    assert [j["status"] for j in jobs] == ["succeeded", "failed"]
    assert jobs[0]["result"]["accuracy"] == out[1][1]  # the same experiment: answered from the first batch
    with pytest.raises(api.InvalidRequestError, match="no batch"):
        api.wait("batch-nope", zoo=settings.zoo_path)


def test_cli_submits_several_files_as_one_batch(tmp_path, data_root):
    """Without --epochs the epochs come from prm's `epoch` (LEMUR's way), for every file."""
    files = []
    for name, code in (("a.py", models.GOOD), ("b.py", models.SYNTAX), ("c.py", models.GOOD_REFORMATTED)):
        (tmp_path / name).write_text(code)
        files.append(str(tmp_path / name))
    proc = subprocess.run(
        [sys.executable, "-m", "lemur_agent_server", "submit", *files, "--zoo", str(tmp_path / "zoo.sqlite"),
         "--data-root", str(data_root), "--sandbox", "process", "--dataset", "digits", "--trials", "1",
         "--prm", json.dumps({"epoch": 0.5}), "--max-train-samples", "64", "--budget-s", "60", "--wait"],
        cwd=REPO, env={**os.environ, "LEMUR_NO_SEED": "1"}, capture_output=True, text=True, timeout=300)
    out = json.loads(proc.stdout)
    jobs = out["jobs"]
    assert out["batch_id"].startswith("batch-") and [j["file"] for j in jobs] == files
    assert [j["status"] for j in jobs] == ["succeeded", "failed", "succeeded"], proc.stderr[-2000:]
    assert jobs[2]["same_as"] == 0 and jobs[2]["job_id"] == jobs[0]["job_id"]  # one training for both
    assert proc.returncode == 1  # not every file succeeded
    assert "3/3" not in proc.stderr and "2/2" in proc.stderr  # one bar over the batch's two jobs


async def test_a_zoo_from_before_batches_numbers_its_finished_jobs_in_order(tmp_path):
    """Migration: jobs that ended before the sequence existed get 1..n by end time; the next end follows."""
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta(key, value) VALUES('schema_version', '1')")
    for job_id, status, finished in (("job-late", "failed", 30.0), ("job-early", "succeeded", 10.0),
                                     ("job-open", "queued", None)):
        conn.execute("INSERT INTO job(id, kind, status, request, created, finished) VALUES(?,?,?,?,?,?)",
                     (job_id, "submit", status, json.dumps({"code": "x"}), 1.0, finished))
    conn.commit()
    conn.close()
    async with await ZooStore.open(path) as store:
        seqs = {j: (await store.jobs.get(j))["finished_seq"] for j in ("job-early", "job-late", "job-open")}
        await store.jobs.request_cancel("job-open")
        after = (await store.jobs.get("job-open"))["finished_seq"]
    assert seqs == {"job-early": 1, "job-late": 2, "job-open": None}
    assert after == 3


async def test_a_server_without_evaluator_queues_a_batch_for_a_worker(make_settings):
    """--no-worker: the batch goes into the zoo's queue; static problems are reported, the jobs stay queued
    for a worker on the same zoo (which fails the broken one at its first look), and a batch cancel
    unqueues them at once."""
    settings = make_settings(seed_zoo=False, run_workers=False)
    async with Client(build_server(settings)) as client:
        batch = await call(client, "submit_models", {"items": [{"code": models.GOOD}, {"code": models.SYNTAX}],
                                                     "dataset": "digits", **QUICK})
        assert [e["status"] for e in batch["entries"]] == ["queued", "queued"]
        assert batch["entries"][0]["problems"] == [] and batch["entries"][1]["problems"][0]["kind"] == "syntax"
        listed = await call(client, "list_jobs", {"batch_id": batch["batch_id"], "status": "queued"})
        assert len(listed["jobs"]) == 2
        cancelled = await call(client, "cancel_job", {"batch_id": batch["batch_id"]})
        assert cancelled["done"] and cancelled["counts"] == {"cancelled": 2}
        ended = await call(client, "wait_jobs", {"batch_id": batch["batch_id"], "wait_s": 5})
        assert [j["status"] for j in ended["jobs"]] == ["cancelled", "cancelled"] and ended["done"]
        nothing = await call(client, "submit_models", {"items": [{"code": models.GOOD, "n_trials": 0}],
                                                       "dataset": "digits"})
        assert nothing["batch_id"] is None and nothing["entries"][0]["status"] == "invalid"


def test_cli_submit_without_epochs_takes_prm_epoch(tmp_path, data_root):
    """One file, no --epochs: the request's epochs come from prm (the parser's default is no value)."""
    (tmp_path / "broken.py").write_text(models.SYNTAX)
    proc = subprocess.run(
        [sys.executable, "-m", "lemur_agent_server", "submit", str(tmp_path / "broken.py"), "--zoo",
         str(tmp_path / "zoo.sqlite"), "--data-root", str(data_root), "--dataset", "digits",
         "--prm", json.dumps({"epoch": 2})],
        cwd=REPO, env={**os.environ, "LEMUR_NO_SEED": "1"}, capture_output=True, text=True, timeout=120)
    row = json.loads(proc.stdout)
    assert row["status"] == "failed" and row["error"]["kind"] == "syntax", proc.stderr[-2000:]
    assert row["request"]["epochs"] == 2.0
