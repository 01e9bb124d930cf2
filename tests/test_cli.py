"""The command line fails politely: one line on stderr that says what to do, exit status 2 for bad
input, no traceback unless --debug asks for it. Run as a user runs it, `python -m lemur_agent_server`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import models
from tests.conftest import REPO


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "LEMUR_NO_SEED": "1"}
    return subprocess.run([sys.executable, "-m", "lemur_agent_server", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def zoo(tmp_path: Path) -> str:
    return str(tmp_path / "zoo.sqlite")


def test_import_of_an_unsupported_file_is_one_line(tmp_path: Path, zoo: str) -> None:
    (tmp_path / "notes.txt").write_text("not a wheel\n")
    proc = cli(tmp_path, "import-lemur", "--zoo", zoo, "notes.txt")
    assert proc.returncode == 2
    line = one_line(proc)
    assert line.startswith("lemur-agent-server import-lemur: ") and "pass" in line
    assert "neither a zip nor an SQLite database" in line


def test_debug_shows_the_traceback_and_still_ends_with_the_line(tmp_path: Path, zoo: str) -> None:
    (tmp_path / "notes.txt").write_text("not a wheel\n")
    proc = cli(tmp_path, "import-lemur", "--zoo", zoo, "--debug", "notes.txt")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ValueError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("lemur-agent-server import-lemur: ")


def test_a_missing_model_file_is_one_line(tmp_path: Path, zoo: str) -> None:
    proc = cli(tmp_path, "check", "--zoo", zoo, "--dataset", "digits", "missing.py")
    assert proc.returncode == 2
    assert "cannot read missing.py" in one_line(proc)


def test_an_invalid_request_names_each_field(tmp_path: Path, zoo: str) -> None:
    (tmp_path / "model.py").write_text(models.GOOD)
    proc = cli(tmp_path, "submit", "--zoo", zoo, "--dataset", "imagenet-22k", "--trials", "0", "model.py")
    assert proc.returncode == 2
    line = one_line(proc)
    assert "dataset: unknown dataset 'imagenet-22k'" in line and "n_trials:" in line and "run again" in line


def test_a_zoo_that_is_not_a_zoo_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.sqlite").write_text("x" * 200)
    proc = cli(tmp_path, "query", "--zoo", "junk.sqlite")
    assert proc.returncode == 2
    assert "pass --zoo the path of a zoo SQLite file" in one_line(proc)
    proc = cli(tmp_path, "query", "--zoo", str(tmp_path))
    assert proc.returncode == 2
    assert "is a directory" in one_line(proc)


def test_a_bad_prm_is_refused_by_the_parser(tmp_path: Path, zoo: str) -> None:
    (tmp_path / "model.py").write_text(models.GOOD)
    proc = cli(tmp_path, "check", "--zoo", zoo, "--dataset", "digits", "--prm", "[1, 2]", "model.py")
    assert proc.returncode == 2
    assert "is not a JSON object" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr
