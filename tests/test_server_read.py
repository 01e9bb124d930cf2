"""The read-side tools, resource and prompt through a real in-process MCP client, in both protocol eras."""

from __future__ import annotations

import anyio
import pytest
from mcp import Client

from lemur_agent_server import api
from lemur_agent_server.reference_models import REFERENCE_MODELS
from lemur_agent_server.server import build_server
from tests import lemur_fixture
from tests.zoo_factory import build_zoo

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["auto", "legacy"])
async def client(request, make_settings):
    settings = make_settings(run_workers=False)
    store = await build_zoo(settings.zoo_path)
    await store.close()
    async with Client(build_server(settings), mode=request.param) as c:
        yield c


async def call(client, tool, **args):
    result = await client.call_tool(tool, args)
    assert not result.is_error, result.content
    return result.structured_content


async def test_tools_listed_with_described_arguments(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {"list_catalog", "query_models", "get_model", "check_model", "submit_model", "get_job",
            "cancel_job"} <= set(tools)
    props = tools["query_models"].input_schema["properties"]
    assert all(p.get("description") for p in props.values()), props
    assert tools["query_models"].output_schema is not None
    assert "Next" in tools["get_model"].description


async def test_catalog_counts_and_contract(client):
    cat = await call(client, "list_catalog")
    by_ds = {(c["dataset"]): c for c in cat["zoo"]}
    assert by_ds["cifar-10"]["models"] == 6 and by_ds["cifar-10"]["runs"] == 12
    assert cat["totals"]["models"] == 6 + len(REFERENCE_MODELS)
    assert "supported_hyperparameters" in cat["net_contract"]
    names = {d["name"]: d for d in cat["evaluator_datasets"]}
    assert names["digits"]["available"] is True and names["digits"]["chance"] == pytest.approx(0.1)
    assert "norm_32" in cat["transforms"]


async def test_query_best_only_one_row_per_model_sorted(client):
    out = await call(client, "query_models", task="img-classification", dataset="cifar-10", epoch=2.0,
                     only_best_accuracy=True, limit=100)
    assert out["total"] == 6 and out["returned"] == 6 and out["truncated"] is False
    names = [r["name"] for r in out["rows"]]
    assert len(set(names)) == len(names)  # one row per model
    assert names[0] == "rag-m5"
    accs = [r["accuracy"] for r in out["rows"]]
    assert accs == sorted(accs, reverse=True)
    assert out["rows"][0]["accuracy"] == pytest.approx(0.3 + 0.25 + 0.01 + 0.1)  # m5, trial 1, epoch 2
    assert out["rows"][0]["code"] is None


async def test_query_filters_prefix_half_epochs_and_pages(client):
    out = await call(client, "query_models", dataset="mnist", epoch=0.5, nn_prefix=["rag-"], limit=2)
    assert out["total"] == 6  # 3 rag- models x 2 trials
    assert {r["name"][:4] for r in out["rows"]} == {"rag-"}
    assert out["next_cursor"] and out["truncated"]
    seen = [r["name"] + str(r["prm"]["lr"]) for r in out["rows"]]
    cursor = out["next_cursor"]
    while cursor:
        page = await call(client, "query_models", dataset="mnist", epoch=0.5, nn_prefix=["rag-"], limit=2,
                          cursor=cursor)
        seen += [r["name"] + str(r["prm"]["lr"]) for r in page["rows"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 6


async def test_query_unique_nn_and_code_on_demand(client):
    out = await call(client, "query_models", unique_nn=True, include_code=True, sort="params", limit=3)
    assert out["total"] == 6
    assert [r["params"] for r in out["rows"]] == [1000, 2000, 3000]
    assert all("class Net" in r["code"] for r in out["rows"])


async def test_query_prefix_is_not_sql(client):
    out = await call(client, "query_models", nn_prefix=["' OR 1=1 --", "%"])
    assert out["total"] == 0 and "list_catalog" in out["hint"]


async def test_get_model_detail(client):
    out = await call(client, "get_model", name="rag-m5")
    assert out["code"].startswith("import torch")
    assert {s["dataset"] for s in out["summary"]} == {"cifar-10", "mnist"}
    assert [p["epoch"] for p in out["curve"]] in ([1.0, 2.0], [0.5, 1.0, 2.0])
    assert out["best_run"]["accuracy"] == pytest.approx(0.66)
    no_code = await call(client, "get_model", name="rag-m5", include_code=False)
    assert no_code["code"] is None


async def test_unknown_model_and_bad_args_are_clear_errors(client):
    result = await client.call_tool("get_model", {"name": "rag-m55"})
    assert result.is_error
    text = result.content[0].text
    assert "Unknown model 'rag-m55'" in text and "query_models" in text
    result = await client.call_tool("query_models", {"limit": 1000})
    assert result.is_error and "limit" in result.content[0].text
    result = await client.call_tool("query_models", {"cursor": "garbage"})
    assert result.is_error and "cursor" in result.content[0].text.lower()


async def test_get_model_names_ignore_case_and_suggest_only_similar_names(client):
    out = await call(client, "get_model", name="lenet5", include_code=False)
    assert out["name"] == "LeNet5"
    result = await client.call_tool("get_model", {"name": "no-such-model-xyz"})
    assert result.is_error and "Similar names" not in result.content[0].text
    result = await client.call_tool("get_model", {"name": "LeNet-5"})
    assert result.is_error and "Similar names: LeNet5." in result.content[0].text


async def test_code_resource_and_prompt(client):
    templates = (await client.list_resource_templates()).resource_templates
    assert any("models/{name}/code" in t.uri_template for t in templates)
    res = await client.read_resource("lemur://models/alt-m0/code")
    assert res.contents[0].text.startswith("import torch")
    assert res.contents[0].mime_type == "text/x-python"
    prompt = await client.get_prompt("design_model", {"task": "img-classification", "dataset": "cifar-10"})
    text = prompt.messages[0].content.text
    assert "Net contract" in text and "rag-m5" in text


async def test_api_data_equals_tool(client, make_settings):
    settings = make_settings()
    tool = await call(client, "query_models", task="img-classification", dataset="mnist", epoch=1.0,
                      only_best_accuracy=True, limit=100)
    frame = api.data(only_best_accuracy=True, task="img-classification", dataset="mnist", epoch=1.0,
                     zoo=settings.zoo_path)
    assert len(frame) == tool["total"]
    from_tool = {(r["name"], r["epoch"], r["accuracy"], r["duration"]) for r in tool["rows"]}
    from_api = {(r.nn, r.epoch, r.accuracy, r.duration) for r in frame.itertuples()}
    assert from_tool == from_api
    assert {"task", "dataset", "metric", "nn", "nn_code", "epoch", "accuracy", "duration", "prm",
            "transform"} <= set(frame.columns)
    assert isinstance(frame.iloc[0]["prm"], dict)
    prefixed = api.data(nn_prefixes=("rag-",), unique_nn=True, zoo=settings.zoo_path)
    assert sorted(prefixed["nn"]) == ["rag-m1", "rag-m3", "rag-m5"]


# --- a zoo that imported a LEMUR 2.2 database (tests/lemur_fixture.py) ---------------------------------------
@pytest.fixture
async def lemur_client(make_settings, tmp_path):
    settings = make_settings(run_workers=False)
    lemur_fixture.import_fixture(settings.zoo_path, tmp_path / "lemur")
    async with Client(build_server(settings)) as c:
        yield c


async def test_get_model_shows_lemur_measurements_and_training_diagnostics(lemur_client):
    out = await call(lemur_client, "get_model", name="TinyNet", include_code=False)
    lemur = out["lemur"]
    assert set(lemur) == {"architecture", "mobile_benchmarks", "tflite", "pruning"}
    arch = lemur["architecture"]
    assert arch["total"] == 2 and [r["lemur_id"] for r in arch["rows"]] == ["ns-good", "ns-bad"]  # good first
    assert (arch["rows"][0]["max_depth"], arch["rows"][0]["meta"]) == (3, {"input": [1, 3, 32, 32]})
    mobile = lemur["mobile_benchmarks"]
    assert mobile["total"] == 2 and mobile["rows"][0]["device_type"] == "Pixel 7"  # the valid one first
    assert mobile["rows"][0]["gpu_duration"] == 900
    assert lemur["tflite"] == {"total": 1, "rows": [{"lemur_id": "tf-tiny", "accuracy": 0.49, "transform": "norm_32",
                                                     "precision_type": "int8"}]}
    assert lemur["pruning"]["rows"][0]["params_after"] == 617
    # the best run's curve carries LEMUR's train_stat, the hardware comes once
    assert [(p["epoch"], p["accuracy"]) for p in out["curve"]] == [(1.0, 0.5), (2.0, 0.7)]
    second = out["curve"][1]
    assert (second["train_loss"], second["test_loss"], second["train_accuracy"], second["samples_per_second"]) == (
        0.5, 0.75, pytest.approx(0.6), 1000.0)
    assert out["train_hardware"]["gpu_type"] == lemur_fixture.GPU and out["train_hardware"]["cpu_count"] == 4


async def test_get_model_lemur_fields_only_where_lemur_measured(lemur_client):
    wide = await call(lemur_client, "get_model", name="WideNet", include_code=False)
    assert set(wide["lemur"]) >= {"mobile_benchmarks", "pruning"}
    assert wide["lemur"]["architecture"] is None and wide["lemur"]["tflite"] is None
    assert wide["train_hardware"] is None and wide["curve"][0]["train_loss"] is None  # no train_stat
    only = await call(lemur_client, "get_model", name="OnlyCode", include_code=False)
    assert only["lemur"] is None and only["curve"] == [] and only["best_run"] is None


async def test_get_model_without_lemur_data_answers_as_before(client):
    out = await call(client, "get_model", name="rag-m5", include_code=False)
    assert out["lemur"] is None and out["train_hardware"] is None
    assert all(p["train_loss"] is None and p["samples_per_second"] is None for p in out["curve"])
    assert out["best_run"]["accuracy"] == pytest.approx(0.66)


async def test_query_models_filters_by_lemur_device_type(lemur_client):
    out = await call(lemur_client, "query_models", device_type="Galaxy S23", sort="name", limit=100)
    assert {r["name"] for r in out["rows"]} == {"TinyNet"} and out["total"] == 2
    none = await call(lemur_client, "query_models", device_type="iPhone")
    assert none["total"] == 0


async def test_an_empty_page_while_evaluations_are_pending_says_so(make_settings):
    """A fresh zoo holds its seed models and queues their baseline evaluations; a query before any of them
    finished must say that they are coming, not send the agent to look for an empty zoo. Here a batch
    queued with api.submit_batch waits in a zoo whose server runs no worker."""
    from tests import models

    settings = make_settings(run_workers=False)  # the seed models, no run yet
    queued = await anyio.to_thread.run_sync(lambda: api.submit_batch(
        [models.GOOD], "img-classification", "digits", zoo=settings.zoo_path, sandbox="process"))
    assert queued["job_ids"][0], queued
    async with Client(build_server(settings)) as c:
        page = await call(c, "query_models", limit=3)
        assert page["total"] == 0
        assert "1 evaluation(s) are queued or running" in page["hint"] and "list_jobs" in page["hint"], page
        empty = await call(c, "query_models", dataset="digits", min_accuracy=0.99)
        assert "queued or running" in empty["hint"]


async def test_an_empty_page_with_nothing_pending_says_to_loosen_the_filters(client):
    page = await call(client, "query_models", nn="no-such-model-anywhere")
    assert page["total"] == 0 and page["hint"].startswith("No rows match. Loosen the filters"), page
