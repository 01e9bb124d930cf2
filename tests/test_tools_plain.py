"""The tools' logic called as plain functions, without an MCP client: the same answers, and the
name lookups of get_model (case-insensitive when only one model fits, really similar names or none)."""

from __future__ import annotations

import pytest
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

from lemur_agent_server import job_tools, read_tools
from lemur_agent_server.seed import seed_reference_models
from lemur_agent_server.state import AppState
from tests.zoo_factory import build_zoo
from zoo.query import Filters, Page
from zoo.records import Model

pytestmark = pytest.mark.anyio


@pytest.fixture
async def state(make_settings):
    settings = make_settings(run_workers=False)
    store = await build_zoo(settings.zoo_path)
    await seed_reference_models(store)
    try:
        yield AppState(settings, store)
    finally:
        await store.close()


async def test_get_model_matches_a_name_ignoring_case_when_one_model_fits(state):
    detail = await read_tools.get_model(state, "lenet5")
    assert detail.name == "LeNet5" and detail.code.startswith(("import", '"""', "#"))
    assert (await read_tools.get_model(state, "RAG-M5", include_code=False)).name == "rag-m5"


async def test_get_model_refuses_an_ambiguous_case_insensitive_name(state):
    await state.zoo().add_model(Model(name="lenet5", code="class Net: pass\n", origin="submitted"))
    assert (await read_tools.get_model(state, "lenet5")).name == "lenet5"  # the exact name wins
    with pytest.raises(ToolError, match="Unknown model 'LENET5'"):
        await read_tools.get_model(state, "LENET5")  # LeNet5 or lenet5: not guessed


async def test_unknown_names_get_really_similar_names_or_none(state):
    with pytest.raises(ToolError) as err:
        await read_tools.get_model(state, "no-such-model-xyz")
    assert "Similar names" not in str(err.value) and "query_models" in str(err.value)
    with pytest.raises(ToolError) as err:
        await read_tools.get_model(state, "LeNet-5")
    assert "Similar names: LeNet5." in str(err.value)
    with pytest.raises(ToolError) as err:
        await read_tools.get_model(state, "rag-m55")
    similar = str(err.value).split("Similar names: ")[1].split(".")[0].split(", ")
    assert similar[0] == "rag-m5" and set(similar) <= {"rag-m1", "rag-m3", "rag-m5", "alt-m4", "alt-m0", "alt-m2"}


async def test_query_models_and_catalog_as_functions(state):
    out = await read_tools.query_models(state, Filters(dataset="cifar-10", unique_nn=True), Page(limit=2))
    assert out.total == 6 and out.returned == 2 and out.next_cursor and out.truncated
    assert [r.name for r in out.rows] == ["rag-m5", "alt-m4"]
    with pytest.raises(ToolError, match="cursor"):
        await read_tools.query_models(state, Filters(), Page(cursor="garbage"))
    catalog = await read_tools.list_catalog(state)
    assert catalog.totals["models"] == 10 and catalog.sandbox == {"backend": "none (no worker)"}


async def test_code_resource_and_prompt_as_functions(state):
    assert (await read_tools.model_code(state, "alt-m0")).startswith("import torch")
    with pytest.raises(ResourceNotFoundError):
        await read_tools.model_code(state, "nope")
    prompt = await read_tools.design_model(state, "img-classification", "cifar-10")
    assert "### rag-m5" in prompt and "Net contract" in prompt


async def test_job_functions_without_an_evaluator(state):
    with pytest.raises(ToolError, match="No job 'job-nope'. Recent jobs: none"):
        await job_tools.get_job(state, "job-nope")
    request = job_tools.build_request(code="class Net: pass\n", dataset="digits")
    queued = await job_tools.submit_model(state, request)  # a worker beside this server runs it
    assert queued.status == "queued" and queued.job_id.startswith("job-")
    with pytest.raises(ToolError, match="exceeds this server's limit"):
        await job_tools.submit_model(state, request.model_copy(update={"time_budget_s": 10**5}))
