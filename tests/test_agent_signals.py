"""What an agent sees when it checks and trains a model (issue 14): the check's speed estimate and
per-layer costs, exception problems with their line and a hint, unknown prm keys refused, the job's
timing (evaluation next to training, the host's load), the budget's forecast message, flags raised on
small models built to trigger them, pruned reasons, cancelled trials and progress while evaluating."""

from __future__ import annotations

import pytest
from mcp import Client

from lemur_agent_server.server import build_server
from tests import models

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(make_settings, warm_process_sandbox):
    async with Client(build_server(make_settings())) as c:
        yield c


async def call(client, tool, **args):
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content


async def finished(client, job_id: str) -> dict:
    for _ in range(12):
        job = await call(client, "get_job", job_id=job_id, wait_s=50)
        if job["done"]:
            return job
    raise AssertionError(f"{job_id} did not finish: {job}")


async def test_check_model_estimates_epoch_and_evaluation_seconds_and_lists_the_heaviest_layers(client):
    out = await call(client, "check_model", code=models.GOOD, dataset="digits", prm={"batch": 32})
    assert out["ok"], out["problems"]
    speed = out["speed"]
    assert speed["batch"] == 32 and speed["transform"] and speed["timed_steps"] >= 1
    assert speed["train_samples"] > 1000 and speed["eval_samples"] > 100  # digits: 1797 images in all
    assert 0 < speed["epoch_s"] < 60 and 0 < speed["eval_pass_s"] < 60
    layers = out["layers"]
    assert [row["name"] for row in layers][:2] == ["features.0", "head"]  # the conv costs most FLOPs
    conv = layers[0]
    assert conv["type"] == "Conv2d" and conv["params"] == 1 * 8 * 9 + 8 and conv["flops"] > 0
    assert conv["out_shape"][1:] == [8, 32, 32]  # digits resized to 32x32 by the default transform
    assert [r["flops"] for r in layers] == sorted((r["flops"] for r in layers), reverse=True)


KEY_ERROR = models.GOOD.replace('momentum=prm["momentum"])', 'momentum=prm["momentum"] * (1 - prm["dropout"]))')


async def test_an_exception_names_its_line_and_an_undeclared_prm_key_gets_the_hint(client):
    out = await call(client, "check_model", code=KEY_ERROR, dataset="digits")
    assert not out["ok"]
    problem = out["problems"][0]
    line = next(i for i, text in enumerate(KEY_ERROR.splitlines(), 1) if 'prm["dropout"]' in text)
    assert problem["kind"] == "exception" and "KeyError: 'dropout'" in problem["message"]
    assert problem["line"] == line and problem["function"] == "train_setup"
    assert 'prm["dropout"]' in problem["source"]
    assert "declare it in supported_hyperparameters()" in problem["hint"]


async def test_an_unknown_prm_key_is_refused_with_the_known_ones(client):
    out = await call(client, "check_model", code=models.GOOD, dataset="digits", prm={"foo": 0.5})
    assert not out["ok"]
    problem = out["problems"][0]
    assert problem["kind"] == "contract"
    assert "['foo'] is not a hyperparameter of this model" in problem["message"]
    assert "['lr', 'momentum', 'batch', 'epoch', 'transform']" in problem["message"]
