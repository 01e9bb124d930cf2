"""The `plot` and `leaderboard` MCP tools and the plot resources, through the in-process client in both
protocol eras (2026-07-28 "auto" and 2025-11-25 "legacy")."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from mcp import Client, MCPError
from mcp.server import MCPServer
from PIL import Image
from test_stats import CIFAR, assert_png, raw_runs, zoo  # noqa: F401  (zoo is a fixture)

from lemur_agent_server.stats_tools import register_stats_tools
from stats.plots import PLOT_KINDS

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server(zoo: Path) -> MCPServer:  # noqa: F811
    mcp = MCPServer("stats-test")
    register_stats_tools(mcp, lambda: zoo)
    return mcp


@pytest.fixture(params=["auto", "legacy"])
async def client(request: pytest.FixtureRequest, server: MCPServer):
    async with Client(server, mode=request.param) as c:
        yield c


def _png(item) -> bytes:
    assert item.type == "image" and item.mime_type == "image/png"
    return base64.b64decode(item.data)


async def test_tools_are_listed_with_described_arguments(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {"plot", "leaderboard"} <= tools.keys()
    plot = tools["plot"]
    assert set(plot.input_schema["properties"]["kind"]["enum"]) == set(PLOT_KINDS)
    for name, prop in plot.input_schema["properties"].items():
        assert prop.get("description"), name
    assert plot.input_schema["properties"]["width"]["maximum"] == 2400
    for kind in PLOT_KINDS:
        assert kind in plot.description
    assert tools["leaderboard"].output_schema["properties"]["rows"]
    assert plot.annotations.read_only_hint and tools["leaderboard"].annotations.read_only_hint


@pytest.mark.parametrize("kind", ["curves", "pareto", "failures"])
async def test_plot_returns_an_image_and_a_summary(client: Client, kind: str) -> None:
    res = await client.call_tool("plot", {"kind": kind, "dataset": "cifar-10", "width": 720, "height": 480})
    assert not res.is_error, res.content
    image, text = res.content
    png = _png(image)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (720, 480)
    arr = np.asarray(img.convert("RGB")).astype(int)
    assert arr.std() > 0 and ((arr.max(-1) - arr.min(-1)) > 60).mean() > 0.001
    assert text.type == "text" and "720x480 px PNG" in text.text and len(text.text) > 60


async def test_plot_curves_of_named_models_matches_direct_render(client: Client, zoo: Path) -> None:  # noqa: F811
    res = await client.call_tool("plot", {"kind": "curves", "models": ["alt-m0", "rag-m1"], "task": CIFAR.task,
                                          "dataset": CIFAR.dataset, "metric": CIFAR.metric})
    assert not res.is_error
    from stats.plots import render

    direct = render("curves", zoo, CIFAR, models=["alt-m0", "rag-m1"])
    assert res.content[1].text.startswith(direct.summary)
    assert_png(_png(res.content[0]), 1000, 600, direct.axes_px)


async def test_bad_plot_arguments_are_tool_errors_with_a_next_step(client: Client) -> None:
    res = await client.call_tool("plot", {"kind": "pie"})
    assert res.is_error and "curves" in res.content[0].text and "timeline" in res.content[0].text
    res = await client.call_tool("plot", {"kind": "curves", "models": ["nope"]})
    assert res.is_error and "Unknown model 'nope'" in res.content[0].text and "query_models" in res.content[0].text
    res = await client.call_tool("plot", {"kind": "box", "dataset": "svhn"})
    assert res.is_error and "No scored runs match dataset='svhn'" in res.content[0].text
    assert "list_catalog" in res.content[0].text
    res = await client.call_tool("plot", {"kind": "box", "width": 5000})
    assert res.is_error and "width" in res.content[0].text


async def test_leaderboard_is_structured_and_equals_the_zoo(client: Client, zoo: Path) -> None:  # noqa: F811
    import sqlite3

    args = {"by": "accuracy_to_time", "task": CIFAR.task, "dataset": CIFAR.dataset, "metric": CIFAR.metric,
            "limit": 4}
    res = await client.call_tool("leaderboard", args)
    assert not res.is_error
    board = res.structured_content
    conn = sqlite3.connect(f"file:{zoo}?mode=ro", uri=True)
    try:
        runs = raw_runs(conn).query("dataset == 'cifar-10' and accuracy_to_time.notna()")
    finally:
        conn.close()
    best = runs.sort_values("accuracy_to_time", ascending=False).groupby("model_id").head(1)
    assert board["total"] == len(best) and board["next_offset"] == 4 and board["by"] == "accuracy_to_time"
    assert [r["name"] for r in board["rows"]] == best["nn"].head(4).tolist()
    assert [r["accuracy_to_time"] for r in board["rows"]] == pytest.approx(best["accuracy_to_time"].head(4).tolist())
    assert [r["run_uid"] for r in board["rows"]] == best["uid"].head(4).tolist()
    assert board["rows"][0]["rank"] == 1 and "cifar-10" in board["scope"]
    last = await client.call_tool("leaderboard", {**args, "offset": board["total"] - 1})
    assert len(last.structured_content["rows"]) == 1 and last.structured_content["next_offset"] is None


async def test_leaderboard_errors(client: Client) -> None:
    res = await client.call_tool("leaderboard", {"models": ["ghost"]})
    assert res.is_error and "Unknown model 'ghost'" in res.content[0].text
    res = await client.call_tool("leaderboard", {"task": "txt-generation"})
    assert res.is_error and "list_catalog" in res.content[0].text


async def test_plots_are_resources(client: Client) -> None:
    templates = (await client.list_resource_templates()).resource_templates
    tpl = next(t for t in templates if t.uri_template.startswith("lemur://plots/{kind}"))
    assert tpl.mime_type == "image/png"
    got = await client.read_resource("lemur://plots/mean_std?dataset=mnist")
    blob = got.contents[0]
    assert blob.mime_type == "image/png"
    img = Image.open(io.BytesIO(base64.b64decode(blob.blob)))
    assert img.format == "PNG" and img.size == (1000, 600)
    kinds = await client.read_resource("lemur://plots")
    assert "accuracy_vs_time" in kinds.contents[0].text
    with pytest.raises(MCPError, match="Unknown plot kind 'pie'"):
        await client.read_resource("lemur://plots/pie")
    with pytest.raises(MCPError, match="list_catalog"):
        await client.read_resource("lemur://plots/box?dataset=svhn")


async def test_the_tools_are_plain_functions_too(client: Client, zoo: Path) -> None:  # noqa: F811
    from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError

    from lemur_agent_server import stats_tools
    from zoo.query import Filters

    f = Filters(task=CIFAR.task, dataset=CIFAR.dataset, metric=CIFAR.metric)
    board = await stats_tools.leaderboard(zoo, f, "accuracy_to_time", limit=4)
    via_mcp = (await client.call_tool("leaderboard", {"by": "accuracy_to_time", "task": CIFAR.task,
                                                      "dataset": CIFAR.dataset, "metric": CIFAR.metric,
                                                      "limit": 4})).structured_content
    assert board.model_dump(mode="json") == via_mcp
    image, text = await stats_tools.plot(zoo, "mean_std", f, width=800, height=400)
    assert Image.open(io.BytesIO(_png(image))).size == (800, 400)
    assert "cifar-10" in text.text
    with pytest.raises(ToolError, match="Unknown model 'ghost'"):
        await stats_tools.leaderboard(zoo, Filters(nn=("ghost",)))
    with pytest.raises(ResourceNotFoundError, match="Unknown plot kind 'pie'"):
        await stats_tools.plot_png(zoo, "pie")
