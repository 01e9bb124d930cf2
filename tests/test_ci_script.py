"""`.ci/run` fails when any of its steps fails: the install, the test dependencies or the tests.

Why: CI trusts its exit status. The script ran its steps as one `a && b && c` list under `set -e`,
where only the last command's failure stops the script; a failed install went on to the final
`echo` and ended with 0. Each case runs the real script in a scratch copy of the tree whose steps
are stubs that succeed or fail as asked.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_ci(tmp_path: Path, failing: str | None) -> subprocess.CompletedProcess[str]:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    steps = {"install": tmp_path / "scripts" / "install.sh", "test-deps": tmp_path / "scripts" / "install-test-deps.sh",
             "tests": tmp_path / ".venv" / "bin" / "python"}
    for name, path in steps.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/bin/sh\necho step {name} >> \"{tmp_path}/ran\"\nexit {1 if name == failing else 0}\n")
        path.chmod(0o755)
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("failing", ["install", "test-deps", "tests"])
def test_a_failing_step_fails_the_ci_run_and_stops_it(tmp_path: Path, failing: str) -> None:
    done = run_ci(tmp_path, failing)
    assert done.returncode != 0, done
    ran = (tmp_path / "ran").read_text().split("\n")
    assert ran[-2] == f"step {failing}", ran  # nothing after the failed step
    assert "ci: " in done.stderr  # the duration is still reported


def test_a_run_whose_steps_all_pass_passes(tmp_path: Path) -> None:
    done = run_ci(tmp_path, None)
    assert done.returncode == 0, done
    assert (tmp_path / "ran").read_text().split() == ["step", "install", "step", "test-deps", "step", "tests"]
