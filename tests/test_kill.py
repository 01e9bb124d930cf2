"""SIGKILL a real worker process mid-trial, three times, then let a fresh worker finish: finished trials
survive with their curves, nothing is half-written, every job ends (succeeded, or failed `interrupted`
after its retries, with a run that says so), and no sandbox process or job folder is left behind.
The loop itself lives in tests/killing.py (bench/chaos.py runs it at scale)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests import killing
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

KILLS = 3


async def test_kills_mid_trial_lose_nothing_and_leave_nothing(make_settings):
    settings = make_settings(seed_zoo=False)
    async with await ZooStore.open(settings.zoo_path):
        pass  # the zoo's schema, before jobs are queued into it
    figures, seen = killing.kill_loop(settings, KILLS)
    figures = killing.audit(settings, figures, seen)

    assert figures.kills == KILLS, figures
    assert len([uid for uid in seen if ":t" in uid]) >= KILLS  # each kill came after a finished trial
    assert figures.records_lost == [], figures
    assert figures.half_written == [], figures
    assert figures.unfinished_jobs == [], figures
    # the first job was killed twice: interrupted, its trials kept, and a run that says why
    first = killing.zoo_rows(settings.zoo_path, "SELECT status, error FROM job WHERE id='job-kill000'")[0]
    assert first["status"] == "failed" and json.loads(first["error"])["kind"] == "interrupted", first
    runs = killing.zoo_rows(settings.zoo_path, "SELECT uid, status, error FROM run WHERE job_id='job-kill000'")
    uids = {r["uid"] for r in runs}
    assert {"job-kill000:t0", "job-kill000:a2:t0", "job-kill000:interrupted"} <= uids, uids
    assert figures.statuses.get("succeeded", 0) == figures.jobs - 1, figures  # the others all finished
    assert figures.orphan_processes == [], figures
    assert figures.leftover_folders == [], figures
    conn = sqlite3.connect(settings.zoo_path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
