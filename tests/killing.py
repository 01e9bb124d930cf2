"""The kill loop shared by tests/test_kill.py (a few kills in CI) and bench/chaos.py (`--kills N`).

A real worker process (`python -m lemur_agent_server worker`, process sandbox, digits) trains queued
submissions; each time its current attempt has archived a finished trial, it is killed with SIGKILL,
mid-way through the next trial, and a fresh worker takes over (its start re-queues the dead owner's
job at once, or fails it as `interrupted` after its second attempt). After the last kill a worker runs
until every job has ended. `audit` then reads the zoo and the host: what a kill may never cost.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lemur_agent_server.config import Settings
from lemur_agent_server.evaluator.requests import EvalRequest
from sandbox.protocol import JobStatus
from tests import models

REPO = Path(__file__).resolve().parent.parent
N_TRIALS = 3
EPOCHS = 1.0
EVAL_EVERY = 0.5
POINTS_PER_TRIAL = round(EPOCHS / EVAL_EVERY)
# SLOW sleeps 0.1 s per batch: 10 batches of 32 make an epoch of about a second on any machine, so a
# trial takes seconds and a kill after the first one lands in the middle of the next
REQUEST = EvalRequest(code=models.SLOW, dataset="digits", n_trials=N_TRIALS, epochs=EPOCHS, eval_every=EVAL_EVERY,
                      time_budget_s=300, max_train_samples=320, prm={"batch": 32, "lr": 0.05, "momentum": 0.9})


@dataclasses.dataclass
class Figures:
    jobs: int = 0
    kills: int = 0
    records_lost: list[str] = dataclasses.field(default_factory=list)  # finished trials missing afterwards
    half_written: list[str] = dataclasses.field(default_factory=list)
    unfinished_jobs: list[str] = dataclasses.field(default_factory=list)
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    orphan_processes: list[int] = dataclasses.field(default_factory=list)
    leftover_folders: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def zoo_rows(zoo: Path, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(zoo, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def finished_runs(zoo: Path) -> dict[str, int]:
    """Every stored run's uid and its number of curve points."""
    rows = zoo_rows(zoo, "SELECT r.uid, COUNT(p.epoch) AS n FROM run r LEFT JOIN point p ON p.run_id = r.id "
                         "GROUP BY r.id")
    return {r["uid"]: r["n"] for r in rows}


def start_worker(settings: Settings) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LEMUR_NO_SEED": "1",
           "LEMUR_STALE_AFTER_S": str(settings.stale_after_s)}
    return subprocess.Popen(
        [sys.executable, "-m", "lemur_agent_server", "worker", "--zoo", str(settings.zoo_path),
         "--data-root", str(settings.data_root), "--sandbox", "process"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def queue_jobs(settings: Settings, n: int) -> list[str]:
    """`n` queued submissions, written as the queue writes them (the zoo must exist: open it once first)."""
    ids = [f"job-kill{i:03d}" for i in range(n)]
    with sqlite3.connect(settings.zoo_path) as conn:
        for i, job_id in enumerate(ids):
            conn.execute("INSERT INTO job(id, kind, status, request, created) VALUES(?,?,?,?,?)",
                         (job_id, "submit", JobStatus.QUEUED, json.dumps(REQUEST.model_dump()), time.time() + i))
    conn.close()
    return ids


def jobs_for(kills: int) -> int:
    """Enough jobs that the queue never runs dry while killing: a job takes at most two kills."""
    return math.ceil(kills / 2) + 1


def _wait_new_run(settings: Settings, known: set[str], worker: subprocess.Popen, timeout: float) -> bool:
    """Until this worker has archived a trial (a trial's run not in `known`; a failed `interrupted` run
    the worker wrote at its start does not count); False if the queue ran dry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(":t" in uid for uid in set(finished_runs(settings.zoo_path)) - known):
            return True
        active = zoo_rows(settings.zoo_path, "SELECT COUNT(*) AS n FROM job WHERE status NOT IN (?,?,?,?)",
                          tuple(s for s in JobStatus if s.is_finished()))
        if active[0]["n"] == 0 or worker.poll() is not None:
            return False
        time.sleep(0.1)
    raise AssertionError(f"no trial archived within {timeout} s")


def kill_loop(settings: Settings, kills: int, timeout: float = 120) -> tuple[Figures, dict[str, int]]:
    """SIGKILL a worker `kills` times, each after its attempt archived a trial; then finish every job.
    Returns the figures so far and every run seen before the last kill (uid -> points)."""
    figures = Figures()
    started = time.monotonic()
    job_ids = queue_jobs(settings, jobs_for(kills))
    figures.jobs = len(job_ids)
    seen: dict[str, int] = {}
    for _ in range(kills):
        worker = start_worker(settings)
        try:
            if not _wait_new_run(settings, set(seen), worker, timeout):
                break
            seen = finished_runs(settings.zoo_path)
            worker.send_signal(signal.SIGKILL)
            figures.kills += 1
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.wait(timeout=30)
    last = start_worker(settings)
    try:
        _wait_all_ended(settings, job_ids, timeout=timeout + 60 * len(job_ids))
    finally:
        last.send_signal(signal.SIGTERM)
        try:
            last.wait(timeout=30)
        except subprocess.TimeoutExpired:
            last.kill()
            last.wait()
    figures.seconds = time.monotonic() - started
    return figures, seen


def _wait_all_ended(settings: Settings, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = zoo_rows(settings.zoo_path, f"SELECT status FROM job WHERE id IN ({','.join('?' * len(job_ids))})",
                        tuple(job_ids))
        if all(JobStatus(r["status"]).is_finished() for r in rows):
            return
        time.sleep(0.3)


def runner_processes(job_ids: list[str], root: Path) -> list[int]:
    """Sandbox runners (`sandbox.runner` in the command line) of these jobs: named in their command line,
    environment or cgroup (the process backend's job cgroup is named after the job's folder)."""
    found = []
    markers = [*job_ids, str(root)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "sandbox.runner" not in cmdline:
                continue
            about = cmdline + (entry / "cgroup").read_text(errors="replace")
            try:
                about += (entry / "environ").read_bytes().decode(errors="replace")
            except OSError:
                pass
        except OSError:
            continue
        if any(m in about for m in markers):
            found.append(int(entry.name))
    return found


def audit(settings: Settings, figures: Figures, seen: dict[str, int]) -> Figures:
    """What the kills cost: lost or half-written records, jobs not ended, processes and folders left."""
    zoo = settings.zoo_path
    now = finished_runs(zoo)
    figures.records_lost = sorted(uid for uid, n in seen.items() if now.get(uid) != n)
    half = [f"{uid}: {n} points" for uid, n in now.items()
            if ":t" in uid and n != POINTS_PER_TRIAL and _run_status(zoo, uid) == "succeeded"]
    half += [f"point of missing run {r['run_id']}" for r in zoo_rows(
        zoo, "SELECT DISTINCT run_id FROM point WHERE run_id NOT IN (SELECT id FROM run)")]
    half += [f"best_point of missing run {r['run_id']}" for r in zoo_rows(
        zoo, "SELECT DISTINCT run_id FROM best_point WHERE run_id NOT IN (SELECT id FROM run)")]
    weights_root = zoo.parent / (zoo.stem + "-weights")
    for w in zoo_rows(zoo, "SELECT w.path, w.size, w.run_id FROM weights w"):
        file = weights_root / w["path"]
        if not file.is_file() or file.stat().st_size != w["size"]:
            half.append(f"weights of run {w['run_id']} missing: {w['path']}")
    figures.half_written = half
    jobs = zoo_rows(zoo, "SELECT id, status, error FROM job")
    figures.statuses = {}
    for job in jobs:
        figures.statuses[job["status"]] = figures.statuses.get(job["status"], 0) + 1
    figures.unfinished_jobs = [j["id"] for j in jobs if not JobStatus(j["status"]).is_finished()]
    figures.orphan_processes = runner_processes([j["id"] for j in jobs], settings.state_dir)
    jobs_dir = settings.jobs_dir
    figures.leftover_folders = sorted(p.name for p in jobs_dir.iterdir()) if jobs_dir.exists() else []
    return figures


def _run_status(zoo: Path, uid: str) -> str:
    return zoo_rows(zoo, "SELECT status FROM run WHERE uid=?", (uid,))[0]["status"]
