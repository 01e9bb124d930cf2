"""Baselines from the first minute (issue 14): a fresh server measures its seed models and queues one
short real evaluation of each on digits, in the background, once per zoo. Real process sandbox, real
digits, real zoo; half an epoch on 64 images keeps it to seconds per model."""

from __future__ import annotations

import time

import anyio
import pytest
from mcp import Client

from lemur_agent_server.reference_models import REFERENCE_MODELS
from lemur_agent_server.server import build_server

pytestmark = pytest.mark.anyio


async def call(client, tool, **args):
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    return result.structured_content


def fast_baselines(make_settings, **extra):
    return make_settings(baselines=True, baseline_epochs=0.5, baseline_max_train_samples=64,
                         baseline_budget_s=60, **extra)


async def wait_for_baselines(client, timeout: float = 420) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        cat = await call(client, "list_catalog")
        base = cat["baselines"]
        params = [(await call(client, "get_model", name=n, include_code=False))["params"] for n in REFERENCE_MODELS]
        if base and all(s["status"] in ("succeeded", "failed", "timed_out") for s in base["seeds"].values()) \
                and all(p is not None for p in params):
            return cat
        assert time.monotonic() < deadline, base
        await anyio.sleep(2)


async def test_first_start_queues_baselines_once_and_they_land_in_the_zoo(make_settings, warm_process_sandbox):
    settings = fast_baselines(make_settings)
    async with Client(build_server(settings)) as client:
        first = await call(client, "list_catalog")  # answered at once, while the baselines are measured
        assert first["totals"]["runs"] == 0
        assert first["baselines"]["dataset"] == "digits"  # being queued, or queued: said from the first call
        cat = await wait_for_baselines(client)
        seeds = cat["baselines"]["seeds"]
        assert cat["baselines"]["dataset"] == "digits" and set(seeds) == set(REFERENCE_MODELS)
        assert {s["status"] for s in seeds.values()} == {"succeeded"}, seeds
        assert cat["baselines"]["ready"].startswith("done")
        lenet = await call(client, "get_model", name="lenet5", include_code=False)
        assert lenet["params"] > 0 and lenet["flops"] > 0 and lenet["fingerprint"]
        assert 0 < lenet["code_quality"] <= 1
        ranked = await call(client, "query_models", view="models", dataset="digits")
        scored = {m["name"] for m in ranked["models"] if m["rank"] is not None}
        assert scored == set(REFERENCE_MODELS)
        job = await call(client, "get_job", job_id=seeds["LeNet5"]["job_id"])
        assert job["result"]["isolation"]["backend"] == "process"
        assert job["standing"]["n"] == len(REFERENCE_MODELS)
        jobs_before = set(s["job_id"] for s in seeds.values())
    async with Client(build_server(settings)) as client:  # a restart does not queue them again
        await anyio.sleep(1)
        again = await call(client, "list_catalog")
        assert {s["job_id"] for s in again["baselines"]["seeds"].values()} == jobs_before
        assert again["totals"]["runs"] == cat["totals"]["runs"]


async def test_no_baselines_flag_queues_nothing(make_settings):
    settings = fast_baselines(make_settings)
    settings.baselines = False
    async with Client(build_server(settings)) as client:
        await anyio.sleep(1)
        cat = await call(client, "list_catalog")
        assert cat["baselines"] is None and cat["totals"]["runs"] == 0
        lenet = await call(client, "get_model", name="LeNet5", include_code=False)
        assert lenet["code_quality"] is None


def test_env_and_flag_turn_baselines_off(monkeypatch, tmp_path) -> None:
    from lemur_agent_server.cli import build_parser
    from lemur_agent_server.config import ENV_NO_BASELINES, Settings

    assert Settings.from_env(tmp_path / "z.sqlite").baselines is True
    monkeypatch.setenv(ENV_NO_BASELINES, "1")
    assert Settings.from_env(tmp_path / "z.sqlite").baselines is False
    assert build_parser().parse_args(["serve", "--no-baselines"]).no_baselines is True


async def test_each_seed_check_stores_params_flops_and_fingerprint(make_settings, warm_process_sandbox) -> None:
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.seed import measure_seed_facts, seed_reference_models
    from zoo.store import ZooStore

    settings = fast_baselines(make_settings)
    store = await ZooStore.open(settings.zoo_path)
    try:
        await seed_reference_models(store)
        async with JobQueue.running(settings, store, workers=False) as queue:
            assert await measure_seed_facts(store, queue, "digits") == len(REFERENCE_MODELS)
        for name in REFERENCE_MODELS:
            model = await store.model_by_name(name)
            assert model["params"] > 0 and model["flops"] > 0 and len(model["fingerprint"]) == 64, name
        assert await store.fetchone("SELECT 1 FROM run") is None  # a check trains nothing and stores no run
    finally:
        await store.close()


async def test_a_zoo_whose_seeds_were_trained_gets_no_baselines(make_settings) -> None:
    from lemur_agent_server.seed import BASELINES_KEY, queue_baselines, read_meta, seed_reference_models
    from zoo.records import Point, Run
    from zoo.store import ZooStore

    settings = fast_baselines(make_settings)
    store = await ZooStore.open(settings.zoo_path)
    try:
        await seed_reference_models(store)
        lenet = await store.model_by_name("LeNet5")
        await store.add_runs(lenet["id"], [Run(uid="old:t0", task="img-classification", dataset="digits",
                                               metric="acc", status="succeeded", source="evaluator",
                                               points=[Point(epoch=1, accuracy=0.9)])])
        assert await queue_baselines(store, None, settings) is None  # no queue needed: nothing is submitted
        assert await read_meta(store, BASELINES_KEY) is None
    finally:
        await store.close()
