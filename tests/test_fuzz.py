"""Seeded fuzzing of every tool through a real in-process MCP client (see tests/fuzzing.py for the
generator and the rule). A few hundred calls, no training: the server runs without a worker, and
submissions that would train get budgets of seconds."""

from __future__ import annotations

import pytest
from mcp import Client

from lemur_agent_server.server import build_server
from tests.fuzzing import BROKEN, fuzz
from tests.zoo_factory import build_zoo

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_fuzzed_calls_get_a_result_or_an_error_with_a_hint(make_settings, seed):
    settings = make_settings(run_workers=False)
    store = await build_zoo(settings.zoo_path, n_models=3)
    await store.close()
    async with Client(build_server(settings)) as client:
        report = await fuzz(client, calls=120, seed=seed)
        assert not [b for b in report.broken], "\n".join(map(str, report.broken))
        assert sum(report.outcomes[k] for k in BROKEN) == 0
        assert report.outcomes["ok"] > 10 and report.outcomes["tool_error"] > 10, report.outcomes
        alive = await client.call_tool("list_catalog", {})
        assert not alive.is_error and alive.structured_content["totals"]["models"] > 0
