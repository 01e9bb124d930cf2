"""The crash inputs a hostile tester found (issue 11), each answered with a clear error instead of an
internal one: deep model code, offsets and cursors SQLite cannot bind, megabyte echoes, pydantic's
bare messages, unknown tools. Through a real in-process MCP client where a tool is involved."""

from __future__ import annotations

import base64
import json

import pytest
from mcp import Client

from lemur_agent_server.arguments import argument_problem
from lemur_agent_server.evaluator.quality import code_quality
from lemur_agent_server.evaluator.static_checks import MAX_NESTING, static_problems
from lemur_agent_server.reference_models import REFERENCE_MODELS, read_code
from lemur_agent_server.server import build_server
from sandbox.protocol import MAX_CODE_CHARS
from tests.zoo_factory import build_zoo
from zoo.query import Page, QueryError

DEEP_CODE = {
    "minus_100k": "x = " + "-" * 100_000 + "1",
    "not_30k": "not " * 30_000 + "x",
    "plus_100k": "x = 1" + "+1" * 100_000,
    "minus_1k": "x = " + "-" * 1_000 + "1",  # valid Python; radon's cc_visit recursed to death on it
    "minus_150": "x = " + "-" * 150 + "1",  # under the token bound, over the AST depth bound
    "fstring_inner": 'x = f"{' + "-" * 100_000 + '1}"',  # one STRING token: only the parser sees the depth
}


@pytest.mark.parametrize("name", DEEP_CODE)
def test_deep_code_is_a_syntax_problem(name):
    problems = static_problems(DEEP_CODE[name])
    assert len(problems) == 1
    assert problems[0].kind == "syntax"
    assert problems[0].message.startswith("expression nested too deeply")
    assert f"at most {MAX_NESTING} levels" in problems[0].message


@pytest.mark.parametrize("name", DEEP_CODE)
def test_deep_code_scores_none_with_a_reason(name):
    score, detail = code_quality(DEEP_CODE[name])
    assert score is None
    assert detail["error"].startswith("not scored: expression nested too deeply")


def test_lone_surrogate_is_a_syntax_problem_and_not_scored():
    code = 'x = "\ud800"\n'
    problems = static_problems(code)
    assert [p.kind for p in problems] == ["syntax"]
    assert "lone surrogate U+D800" in problems[0].message
    assert code_quality(code)[0] is None


def test_real_code_still_passes_and_scores():
    for name in REFERENCE_MODELS:
        code = read_code(name)
        assert static_problems(code) == [], name
        score, detail = code_quality(code)
        assert 0 <= score <= 1 and "error" not in detail, name
    long_flat = "supported_hyperparameters = None\nNet = None\nx = [" + ", ".join(["1"] * 20_000) + "]\n"
    assert static_problems(long_flat) == []


def test_a_syntax_error_still_scores_zero():
    score, detail = code_quality("def f(:\n")
    assert score == 0.0 and detail["counts"]["errors"] >= 20


@pytest.fixture
async def client(make_settings):
    settings = make_settings(run_workers=False)
    store = await build_zoo(settings.zoo_path, n_models=3)
    await store.close()
    async with Client(build_server(settings)) as c:
        yield c


def error_text(result) -> str:
    assert result.is_error, result.structured_content
    return result.content[0].text


@pytest.mark.anyio
@pytest.mark.parametrize("tool", ["query_models", "leaderboard"])
async def test_offset_beyond_sqlite_is_a_clear_error(client, tool):
    text = error_text(await client.call_tool(tool, {"offset": 2**63}))
    assert "offset" in text and "integer" in text and "call " + tool + " again" in text
    assert "Error executing tool" not in text


@pytest.mark.anyio
async def test_offset_beyond_the_page_bound_is_refused_by_the_schema(client):
    text = error_text(await client.call_tool("query_models", {"offset": 2**62}))
    assert "offset" in text and "1000000000" in text and "call query_models again" in text


def test_offset_beyond_the_page_bound_is_refused_by_the_query():
    """The CLI and data() reach the query without the tool schema: Page.check bounds them too."""
    with pytest.raises(QueryError, match=r"offset must be an integer in 0..1,000,000,000; call again with a smaller"):
        Page(offset=2**62).check()


def tampered(cursor: str, **changes) -> str:
    payload = json.loads(base64.urlsafe_b64decode(cursor))
    payload.update(changes)
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


@pytest.mark.anyio
@pytest.mark.parametrize("change", [{"v": {"a": 1}}, {"v": [1, 2]}, {"r": 2**70}, {"e": [0]}, {"r": "1"},
                                    {"v": 2**70}])
async def test_tampered_cursor_values_are_refused(client, change):
    first = await client.call_tool("query_models", {"limit": 2})
    cursor = first.structured_content["next_cursor"]
    assert cursor
    text = error_text(await client.call_tool("query_models", {"limit": 2, "cursor": tampered(cursor, **change)}))
    assert "Malformed cursor" in text and "restart the listing without a cursor" in text
    again = await client.call_tool("query_models", {"limit": 2, "cursor": cursor})
    assert not again.is_error and again.structured_content["returned"] == 2


@pytest.mark.anyio
@pytest.mark.parametrize("tool,args", [
    ("check_model", {"code": "x = 1", "dataset": "d" * 1_000_000}),
    ("query_models", {"dataset": "d" * 1_000_000}),
    ("get_model", {"name": "n" * 1_000_000}),
    ("leaderboard", {"nn_prefix": ["p" * 1_000_000]}),
])
async def test_huge_values_are_not_echoed(client, tool, args):
    text = error_text(await client.call_tool(tool, args))
    assert len(text) < 2_000
    assert "characters" in text and "allowed" in text


@pytest.mark.anyio
async def test_integer_too_large_for_pydantic_gets_field_range_and_next_step(client):
    text = error_text(await client.call_tool("query_models", {"limit": 1e308}))
    assert "limit" in text and "allowed: integer 1..100" in text and "call query_models again" in text
    assert "exceeded maximum size" not in text


@pytest.mark.anyio
async def test_validation_errors_name_field_range_and_next_step(client):
    text = error_text(await client.call_tool("get_job", {"job_id": "j", "wait_s": 99}))
    assert "wait_s" in text and "got 99" in text and "allowed: number 0..50" in text
    assert "call get_job again" in text


@pytest.mark.anyio
async def test_unknown_tool_lists_the_tools(client):
    text = error_text(await client.call_tool("no_such_tool", {}))
    assert "Unknown tool no_such_tool" in text
    for name in ("list_catalog", "query_models", "get_model", "submit_model", "leaderboard", "plot"):
        assert name in text


@pytest.mark.anyio
async def test_unknown_argument_lists_the_arguments(client):
    text = error_text(await client.call_tool("get_model", {"name": "rag-m1", "includ_code": False}))
    assert "unknown argument includ_code" in text and "name, include_code" in text


@pytest.mark.anyio
async def test_surrogate_arguments_are_refused(client):
    text = error_text(await client.call_tool("query_models", {"dataset": "\ud800"}))
    assert "lone surrogate" in text


@pytest.mark.anyio
async def test_no_worker_server_queues_a_submission_that_a_worker_beside_it_runs(make_settings):
    import anyio

    from lemur_agent_server.evaluator.queue import JobQueue
    from zoo.store import ZooStore

    settings = make_settings(run_workers=False)
    async with Client(build_server(settings)) as c:
        submitted = await c.call_tool("submit_model", {"code": "x = 1", "dataset": "digits", "time_budget_s": 5})
        assert not submitted.is_error, submitted.content
        job_id = submitted.structured_content["job_id"]
        assert submitted.structured_content["status"] == "queued"
        check = await c.call_tool("check_model", {"code": "x = 1", "dataset": "digits"})
        assert "--no-worker" in error_text(check) and "submit_model" in error_text(check)
    store = await ZooStore.open(settings.zoo_path)
    try:
        async with JobQueue.running(make_settings(), store):  # `lemur-agent-server worker` on the same zoo
            with anyio.fail_after(60):
                while (row := await store.jobs.get(job_id))["status"] in ("queued", "checking"):
                    await anyio.sleep(0.2)
        assert row["status"] == "failed" and row["error"]["kind"] == "contract"
    finally:
        await store.close()


@pytest.mark.anyio
@pytest.mark.parametrize("uri", ["lemur://models/" + "n" * 100_000 + "/code", "lemur://plots/" + "k" * 100_000])
async def test_long_resource_uris_are_not_echoed(client, uri):
    from mcp import MCPError

    with pytest.raises(MCPError) as refused:
        await client.read_resource(uri)
    assert len(refused.value.error.message) < 500
    assert "at most 2,000 are allowed" in refused.value.error.message


@pytest.mark.anyio
async def test_long_prompt_arguments_are_refused(client):
    from mcp import MCPError

    with pytest.raises(MCPError) as refused:
        await client.get_prompt("design_model", {"task": "t" * 1_000_000, "dataset": "mnist"})
    assert "at most 1,000 are allowed" in refused.value.error.message
    assert len(refused.value.error.message) < 500


@pytest.mark.anyio
async def test_a_nested_string_may_be_as_long_as_its_own_schema_says(make_settings):
    """A batch item's code is a whole model file: the argument check reads the nested schema's maxLength
    (400,000 for code) instead of the 1,000-character default for undeclared strings."""
    server = build_server(make_settings(run_workers=False))
    schema = (await server.tool_schemas())["submit_models"]
    code = "# a long comment\n" * 300 + "class Net: pass\n"
    assert len(code) > 1_000
    assert argument_problem("submit_models", {"items": [{"code": code}], "dataset": "digits"}, schema) is None
    too_long = argument_problem("submit_models", {"items": [{"code": "x" * (MAX_CODE_CHARS + 1)}],
                                                  "dataset": "digits"}, schema)
    assert too_long is not None and "items[0].code" in too_long
    assert argument_problem("submit_models", {"items": [{"code": code, "name_prefix": "p" * 2_000}],
                                              "dataset": "digits"}, schema) is not None
