"""A job's status says how its selected trial ended: a trial that failed after its first curve point is
still the job's best evidence (its points are archived), but the job is not `succeeded` with `error: null`."""

from __future__ import annotations

import pytest
from mcp import Client

from lemur_agent_server.server import build_server
from tests import models
from tests.test_evaluate import call, run_job

pytestmark = pytest.mark.anyio


async def test_a_job_whose_only_trial_failed_after_a_point_fails_with_that_trials_error(make_settings):
    async with Client(build_server(make_settings(seed_zoo=False))) as client:
        job = await run_job(client, code=models.NAN_AFTER_FIRST_POINT, epochs=1.0, eval_every=0.5,
                            prm={"batch": 32, "lr": 0.05, "momentum": 0.9})
        detail = await call(client, "get_model", name=job["model_name"], include_code=False)
    assert job["status"] == "failed", job
    assert job["error"]["kind"] == "nan_loss", job["error"]
    [trial] = job["result"]["trials"]
    assert trial["status"] == "failed"
    assert job["result"]["accuracy"] is not None  # the point it reached is still reported and archived
    runs = detail["recent_runs"]
    assert [r["status"] for r in runs] == ["failed"] and runs[0]["epochs"] == 0.5
