"""Assembles the MCP server: lifespan (zoo, seed, evaluator), tools, resources, prompt, transports.

Never print to stdout here: on stdio, stdout is the protocol. Logs go to stderr.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mcp.server import MCPServer

from lemur_agent_server import __version__
from lemur_agent_server.config import Settings
from lemur_agent_server.read_tools import register_read_tools
from lemur_agent_server.seed import seed_reference_models
from lemur_agent_server.state import AppState
from zoo.store import ZooStore

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
lemur-agent-server: a zoo of neural networks with their training runs, and a sandboxed evaluator.
Workflow: list_catalog (what exists, the Net contract) -> query_models (rank) -> get_model (code,
curve) -> write a variant -> check_model (seconds) -> submit_model (returns job_id at once) ->
get_job(job_id, wait_s=50) until it ends -> query_models to see where it ranks. Accuracy is always
test accuracy computed by the server; durations are training-only nanoseconds.
"""


def build_server(settings: Settings) -> MCPServer:
    """A ready MCPServer for these settings. Nothing is opened until a client connects (lifespan)."""
    state = AppState(settings=settings)

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[AppState]:
        store = await ZooStore.open(settings.zoo_path)
        state.store = store
        try:
            if settings.seed_zoo:
                await seed_reference_models(store)
            if settings.run_workers:
                from lemur_agent_server.evaluator.queue import JobQueue

                async with JobQueue.running(settings, store) as queue:
                    state.queue = queue
                    yield state
            else:
                yield state
        finally:
            state.queue = None
            state.store = None
            await store.close()

    mcp = MCPServer("lemur-agent-server", instructions=INSTRUCTIONS, version=__version__, lifespan=lifespan)
    register_read_tools(mcp, state)
    from lemur_agent_server.job_tools import register_job_tools

    register_job_tools(mcp, state)
    try:
        from lemur_agent_server.stats_tools import register_stats_tools
    except ImportError:  # stats are optional while being built
        log.debug("stats tools not available")
    else:
        register_stats_tools(mcp, lambda: settings.zoo_path)
    mcp._lemur_state = state  # type: ignore[attr-defined]  # for tests and the HTTP runner
    return mcp
