"""The code-quality score when its tool fails: a failed ruff run is tried once more, and a tool that keeps
failing leaves the score None with the reason (never an exception: the code is nobody's vetted code)."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from lemur_agent_server.evaluator import quality
from tests import models


def test_a_good_model_gets_a_score_from_the_real_tools() -> None:
    score, detail = quality.code_quality(models.GOOD)
    assert score is not None and 0 < score <= 1 and "error" not in detail, detail


def failing_runs(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[list[str]]:
    """subprocess.run as quality calls it, failing its first `failures` ruff calls as a busy host can (a
    fake: a thread pool that cannot start cannot be provoked on purpose); later calls run for real."""
    real, calls = subprocess.run, []

    def run(cmd: list[str], *args: Any, **kwargs: Any) -> Any:
        calls.append(cmd)
        if len(calls) <= failures:
            return subprocess.CompletedProcess(cmd, 101, "", "failed to spawn thread: Resource temporarily unavailable")
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(quality.subprocess, "run", run)
    return calls


def test_one_failed_ruff_run_is_tried_again_and_the_model_is_scored(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = quality.code_quality(models.GOOD)
    calls = failing_runs(monkeypatch, failures=1)
    assert quality.code_quality(models.GOOD) == expected
    assert len(calls) == 2 and expected[0] is not None


def test_a_tool_that_keeps_failing_leaves_no_score_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = failing_runs(monkeypatch, failures=quality.TOOL_ATTEMPTS)
    score, detail = quality.code_quality(models.GOOD)
    assert len(calls) == quality.TOOL_ATTEMPTS
    assert score is None and "ruff failed" in detail["error"] and "Resource temporarily" in detail["error"]
