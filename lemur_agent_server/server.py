"""Assembles the MCP server: lifespan (zoo, seed, evaluator), tools, resources, prompt, transports.

Never print to stdout here: on stdio, stdout is the protocol. Logs go to stderr.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError, ToolError, UnexpectedToolError
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS
from pydantic import ValidationError

from lemur_agent_server import __version__
from lemur_agent_server.arguments import DEFAULT_STRING_CHARS, argument_problem, validation_message
from lemur_agent_server.clip import MAX_MESSAGE_CHARS, clip, clip_message
from lemur_agent_server.config import Settings
from lemur_agent_server.job_tools import register_job_tools
from lemur_agent_server.read_tools import register_read_tools
from lemur_agent_server.seed import seed_reference_models, start_baselines
from lemur_agent_server.state import AppState
from lemur_agent_server.stats_tools import register_stats_tools
from zoo.store import ZooStore

log = logging.getLogger(__name__)
MAX_URI_CHARS = 2_000

INSTRUCTIONS = """\
lemur-agent-server: a zoo of neural networks with their training runs, and a sandboxed evaluator.
Workflow: list_catalog (what exists, the Net contract) -> query_models (rank) -> get_model (code,
curve) -> write a variant -> check_model (seconds) -> submit_model (returns job_id at once) ->
get_job(job_id, wait_s=50) until it ends -> get_job's `standing` or leaderboard shows where it ranks;
query_models(view='models') lists every model, runs or not. For many models at
once: submit_models(items, dataset) -> wait_jobs(batch_id, cursor, wait_s=50) until done. Accuracy is
always test accuracy computed by the server; durations are training-only nanoseconds.
"""


class LemurServer(MCPServer[Any]):
    """MCPServer with one door every tool call passes: unknown tools get the list of tools, arguments
    are checked (see `arguments`) before any tool runs, pydantic's rejections and internal errors are
    answered with a next step, and no error text leaves longer than `clip.MAX_MESSAGE_CHARS`.

    Why `call_tool`: the SDK's tools/call handler calls this public method for every call, so one
    override covers every tool (the tool modules stay plain registrations)."""

    def __init__(self, state: AppState, **kwargs: Any):
        super().__init__("lemur-agent-server", **kwargs)
        self.state = state  # for tests and the runners: the zoo store and the job queue of this server
        self._schemas: dict[str, dict[str, Any]] | None = None

    async def tool_schemas(self) -> dict[str, dict[str, Any]]:
        """Input schema per tool name (tools are registered once, at build time)."""
        if self._schemas is None:
            self._schemas = {t.name: t.input_schema for t in await self.list_tools()}
        return self._schemas

    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Context[Any, Any] | None = None) -> Any:
        schemas = await self.tool_schemas()
        if name not in schemas:
            raise ToolError(f"Unknown tool {clip(name, 60)}. This server's tools: {', '.join(schemas)}. "
                            "Call one of them (tools/list shows their arguments).")
        problem = argument_problem(name, arguments, schemas[name])
        if problem:
            raise ToolError(problem)
        try:
            return await super().call_tool(name, arguments, context)
        except UnexpectedToolError as exc:
            raise UnexpectedToolError(f"Error executing tool {name}: an internal error, logged on the server. "
                                      "Retry once; if it happens again, call the tool with other arguments and "
                                      "tell the server's operator.") from exc.__cause__
        except ToolError as exc:
            invalid = _validation_cause(exc)
            if invalid is not None:  # the SDK's argument check, or a request model inside the tool
                raise ToolError(clip_message(validation_message(name, invalid, schemas[name]))) from invalid
            if len(str(exc)) > MAX_MESSAGE_CHARS:
                raise ToolError(clip_message(str(exc))) from exc.__cause__
            raise

    async def read_resource(self, uri: Any, context: Context[Any, Any] | None = None) -> Any:
        """Resource errors quote the URI; cut it (the SDK's "Unknown resource: <uri>" repeats it whole)."""
        if len(str(uri)) > MAX_URI_CHARS:
            raise ResourceNotFoundError(f"The URI has {len(str(uri)):,} characters; at most {MAX_URI_CHARS:,} are "
                                        "allowed. Use a URI from resources/list or resources/templates/list.")
        try:
            return await super().read_resource(uri, context)
        except ResourceError as exc:
            if len(str(exc)) <= MAX_MESSAGE_CHARS:
                raise
            raise type(exc)(clip_message(str(exc), 500)) from exc

    async def get_prompt(self, name: str, arguments: dict[str, Any] | None = None,
                         context: Context[Any, Any] | None = None) -> Any:
        """Prompt arguments are pasted into the prompt's text: bound them like tool arguments."""
        for key, value in (arguments or {}).items():
            if isinstance(value, str) and len(value) > DEFAULT_STRING_CHARS:
                raise MCPError(INVALID_PARAMS, f"Prompt argument {clip(key, 40)} has {len(value):,} characters; at "
                                               f"most {DEFAULT_STRING_CHARS:,} are allowed. Shorten it and ask again.")
        return await super().get_prompt(name, arguments, context)

    async def run_stdio_async(self) -> None:
        """stdio with a guard: every line gets a JSON-RPC answer, a parse error too (see stdio_guard)."""
        from lemur_agent_server.stdio_guard import guarded_stdio_server

        lowlevel = self._lowlevel_server  # the SDK has no public accessor yet (its own Client reads it too)
        async with guarded_stdio_server() as (read_stream, write_stream):
            await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def _validation_cause(exc: BaseException) -> ValidationError | None:
    """The pydantic rejection behind a ToolError: its cause, or its cause's cause (a tool that builds a
    request model raises ToolError from it, and the SDK wraps that ToolError once more)."""
    cause = exc.__cause__
    for _ in range(3):
        if isinstance(cause, ValidationError):
            return cause
        cause = cause.__cause__ if cause is not None else None
    return None


def build_server(settings: Settings) -> LemurServer:
    """A ready server for these settings. Nothing is opened until a client connects (lifespan)."""
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

                async with JobQueue.running(settings, store) as queue, anyio.create_task_group() as background:
                    state.queue = queue
                    if settings.seed_zoo and settings.baselines:  # in the background: never delays initialize
                        background.start_soon(start_baselines, store, queue, settings)
                    try:
                        yield state
                    finally:
                        background.cancel_scope.cancel()
            else:
                yield state
        finally:
            state.queue = None
            state.store = None
            await store.close()

    mcp = LemurServer(state, instructions=INSTRUCTIONS, version=__version__, lifespan=lifespan)
    register_read_tools(mcp, state)
    register_job_tools(mcp, state)
    register_stats_tools(mcp, lambda: settings.zoo_path)
    return mcp
