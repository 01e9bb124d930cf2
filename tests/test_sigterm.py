"""SIGTERM stops a server or a worker cleanly: its job is handed back at once, nothing of it is left.

Why: that is how Kubernetes, SLURM and systemd stop a process. Before, SIGTERM's default action ended
the process on the spot: the job it was training stayed `training` under a dead owner until its claim
went stale, and the process sandbox's warm runners left their dirs and cgroups for the next sweep.

Both real entry points are run as the user runs them: `python -m lemur_agent_server worker`, and
`serve` over stdio with a client that keeps stdin open (a JSON-RPC session written by hand: the MCP
SDK's stdio client does not expose the server's pid).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox import _cgroups
from sandbox.process_prestart import warm_root
from tests import models
from tests.killing import queue_jobs
from tests.test_job_lifecycle import runner_pids
from zoo.store import ZooStore

REPO = Path(__file__).resolve().parent.parent
EXIT_ON_SIGTERM = 128 + signal.SIGTERM
SLOW_PRM = {"batch": 32, "lr": 0.05, "momentum": 0.9}


def _env() -> dict[str, str]:
    # one warm sandbox per slot: the clean stop must remove it too
    return {**os.environ, "PYTHONPATH": str(REPO), "LEMUR_NO_SEED": "1", "LEMUR_NO_BASELINES": "1",
            "LEMUR_NO_CALIBRATE": "1", "LEMUR_PRESTART": "1"}


def _args(settings: Any) -> list[str]:
    return ["--zoo", str(settings.zoo_path), "--data-root", str(settings.data_root), "--sandbox", "process"]


def _job(zoo: Path, job_id: str) -> dict[str, Any]:
    conn = sqlite3.connect(zoo, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return dict(conn.execute("SELECT status, owner, attempts FROM job WHERE id=?", (job_id,)).fetchone())
    finally:
        conn.close()


def _wait_training(zoo: Path, job_id: str, proc: subprocess.Popen[Any], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _job(zoo, job_id)["status"] != "training":
        assert proc.poll() is None, f"exited with {proc.returncode} before the job trained"
        assert time.monotonic() < deadline, _job(zoo, job_id)
        time.sleep(0.2)


def _traces_of(pid: int, settings: Any) -> list[str]:
    """What a process of this pid left: its job and warm cgroups, its warm dirs, live runners."""
    mine = f"-o{pid}-"
    ver = _cgroups.version()
    bases = _cgroups.base_dirs(ver).values() if ver else []
    left = [str(d) for b in bases if b.is_dir() for d in b.iterdir() if mine in d.name]
    warm = warm_root(Path(settings.jobs_dir))
    left += [str(d) for d in warm.iterdir() if mine in d.name] if warm.is_dir() else []
    return left + [f"pid {p} on the jobs dir" for p in runner_pids(str(settings.jobs_dir))]


def _stop(proc: subprocess.Popen[Any], timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_handed_back(settings: Any, job_id: str, pid: int) -> None:
    row = _job(settings.zoo_path, job_id)
    assert row["status"] == "queued" and row["owner"] is None, row  # at once, not after a stale claim
    assert _traces_of(pid, settings) == []


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `worker &` from a script (no job control) inherits


@pytest.mark.parametrize("started", ["plainly", "with_sigint_ignored"])
def test_sigterm_stops_a_worker_and_hands_its_job_back(make_settings, started):
    """Also when the worker was started with SIGINT ignored (a script's `worker &`, `nohup`): SIGTERM is
    sent on as SIGINT, which then did nothing (a CI run started so left a worker running)."""
    settings = make_settings(seed_zoo=False)

    async def open_zoo() -> None:
        async with await ZooStore.open(settings.zoo_path):
            pass

    anyio.run(open_zoo)
    (job_id,) = queue_jobs(settings, 1)
    worker = subprocess.Popen([sys.executable, "-m", "lemur_agent_server", "worker", *_args(settings)],
                              cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              preexec_fn=_ignore_sigint if started == "with_sigint_ignored" else None)
    try:
        _wait_training(settings.zoo_path, job_id, worker)
    finally:
        code = _stop(worker)
    assert code == EXIT_ON_SIGTERM, (code, worker.stderr.read()[-2000:] if worker.stderr else "")
    _assert_handed_back(settings, job_id, worker.pid)


def _send(proc: subprocess.Popen[bytes], message: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(message) + "\n").encode())
    proc.stdin.flush()


def _answer(proc: subprocess.Popen[bytes], request_id: int, timeout: float = 60) -> dict[str, Any]:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"the server closed stdout (exit {proc.poll()})"
        message = json.loads(line)
        if message.get("id") == request_id:
            return message
    raise AssertionError(f"no answer to request {request_id} within {timeout} s")


def test_sigterm_stops_a_stdio_server_whose_client_keeps_stdin_open(make_settings):
    settings = make_settings(seed_zoo=False)
    server = subprocess.Popen([sys.executable, "-m", "lemur_agent_server", "serve", "--no-seed", *_args(settings)],
                              cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        _send(server, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "sigterm-test",
                                                                                 "version": "1"}}})
        assert "result" in _answer(server, 1)
        _send(server, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        _send(server, {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "submit_model",
              "arguments": {"code": models.SLOW, "dataset": "digits", "n_trials": 1, "epochs": 2,
                            "time_budget_s": 120, "prm": SLOW_PRM}}})
        answer = _answer(server, 2)
        job_id = answer["result"]["structuredContent"]["job_id"]
        _wait_training(settings.zoo_path, job_id, server)
    finally:
        code = _stop(server)  # stdin is still open: the server must not wait for the client to hang up
    assert code == EXIT_ON_SIGTERM, code
    _assert_handed_back(settings, job_id, server.pid)
