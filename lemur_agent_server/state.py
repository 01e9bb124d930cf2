"""What the server holds while it runs: settings, the zoo store and the evaluator.

Why a holder object instead of `ctx.request_context.lifespan_context`: resources and prompts get no
Context in mcp 2.x, but they need the store too. The lifespan fills this holder once per process.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from mcp.server.mcpserver.exceptions import ToolError

from lemur_agent_server.config import Settings
from zoo.store import ZooStore

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.queue import JobQueue


@dataclasses.dataclass
class AppState:
    settings: Settings
    store: ZooStore | None = None
    queue: JobQueue | None = None

    def zoo(self) -> ZooStore:
        if self.store is None:
            raise ToolError("The zoo is not open yet (the server is starting or stopping). Retry in a moment.")
        return self.store

    def jobs(self) -> JobQueue:
        if self.queue is None:
            raise ToolError("The evaluator is not running on this server. Start the server without "
                            "--no-worker, or run `lemur-agent-server worker` beside it.")
        return self.queue
