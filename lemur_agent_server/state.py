"""What the server holds while it runs: settings, the zoo store and the evaluator.

Why a holder object instead of `ctx.request_context.lifespan_context`: resources and prompts get no
Context in mcp 2.x, but they need the store too. The lifespan fills this holder once per process.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING, Any

from mcp.server.mcpserver.exceptions import ToolError

from lemur_agent_server.config import Settings
from zoo.jobs import JobKind
from zoo.store import ZooStore

if TYPE_CHECKING:
    from lemur_agent_server.evaluator.queue import JobQueue
    from lemur_agent_server.evaluator.requests import EvalRequest


class WorkerElsewhere:
    """The job side of a `--no-worker` server: jobs go into the zoo file's queue, where a
    `lemur-agent-server worker` on the same zoo claims and runs them (its poll picks them up).

    Why not refuse: the zoo's job table is the queue every worker reads, so accepting the job is
    all this process has to do; checking needs a sandbox now, so `check` is the one refusal."""

    def __init__(self, store: ZooStore, settings: Settings):
        self.store = store
        self.settings = settings

    async def submit(self, request: EvalRequest) -> str:
        from lemur_agent_server.evaluator.dedup import experiment_key
        from lemur_agent_server.evaluator.requests import admit

        request = admit(request, self.settings)  # the same door as the evaluator's own queue
        job_id = "job-" + uuid.uuid4().hex[:12]
        await self.store.jobs.create(job_id, JobKind.SUBMIT, request.model_dump(), dedup_key=experiment_key(request))
        return job_id

    async def check(self, request: EvalRequest) -> Any:
        raise ToolError("check_model needs the evaluator in this server process, and this server runs without "
                        "one (--no-worker). Use submit_model instead (a `lemur-agent-server worker` on the same "
                        "zoo runs it; poll get_job), or ask the operator to start the server without --no-worker.")

    async def cancel(self, job_id: str) -> str | None:
        return await self.store.jobs.request_cancel(job_id)  # the worker running it sees the flag and stops


@dataclasses.dataclass
class AppState:
    settings: Settings
    store: ZooStore | None = None
    queue: JobQueue | None = None

    def zoo(self) -> ZooStore:
        if self.store is None:
            raise ToolError("The zoo is not open yet (the server is starting or stopping). Retry in a moment.")
        return self.store

    def jobs(self) -> JobQueue | WorkerElsewhere:
        """The evaluator of this process, or (with --no-worker) the shared queue a worker runs."""
        if self.queue is None:
            return WorkerElsewhere(self.zoo(), self.settings)
        return self.queue
