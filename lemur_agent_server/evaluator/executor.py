"""Where a job's sandboxes run: this host (`local`, the default) or a Ray cluster (`ray`).

The executor is chosen by `make_backend`: `local` is the sandbox backend of this host (Docker or
process) run in the queue's slots; `ray` is `ray_executor.RayBackend`, a backend whose sandboxes run
on the Ray node that Ray places each one on, with that node's own Docker or process backend. The queue,
the phases, scoring and archiving are the same for both.

The local executor's GPU pool:

Why a pool of leases, not "slot i uses GPU i": every job that trains takes one GPU for as long as
its sandbox lives and gives it back when the sandbox is gone (ended, or killed at its budget plus the
kill grace), whoever runs it: a worker slot or the Python API's `run_now` in the caller's task. So
two sandboxes never share a GPU, a job never waits behind a dead slot (the kill frees the lease), and
a CPU-only job (the check stage of `check_model`) takes no lease at all. A host without GPUs has an
empty pool: every lease is "no GPU" at once and the slot count alone bounds the parallelism.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from lemur_agent_server.config import Settings
    from sandbox.backend import Backend

EXECUTORS = ("local", "ray")


def make_backend(settings: Settings) -> Backend:
    """The backend the queue starts sandboxes with, for `settings.executor`."""
    if settings.executor not in EXECUTORS:
        raise ValueError(f"--executor must be local or ray, not {settings.executor!r}")
    if settings.executor == "ray":
        from lemur_agent_server.evaluator.ray_executor import RayBackend

        # each node picks its own sandbox (auto: Docker where the engine and image are there)
        return RayBackend(settings.ray_address, sandbox=settings.sandbox, image=settings.image)
    from lemur_agent_server.evaluator.backends import choose_backend

    return choose_backend(settings)


def pool_gpus(settings: Settings) -> tuple[str, ...]:
    """The GPU ids the queue's pool hands out: this host's (local), or on Ray one token per GPU job in
    flight (the node pins the GPU Ray gave its actor; the token only says "this job needs one")."""
    if settings.executor == "ray":
        return tuple(str(i) for i in range(settings.slot_count)) if settings.gpus else ()
    return settings.gpus[:settings.slot_count]


class GpuPool:
    """One lease per GPU id; `lease()` waits for a free one (or yields None at once on a CPU host)."""

    def __init__(self, gpus: Sequence[str]):
        self.gpus = tuple(gpus)
        self._send, self._free = anyio.create_memory_object_stream[str](max_buffer_size=max(1, len(self.gpus)))
        for gpu in self.gpus:
            self._send.send_nowait(gpu)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[str | None]:
        """Hold one GPU (its id) for the body; None when this host has no GPUs to pin."""
        if not self.gpus:
            yield None
            return
        gpu = await self._free.receive()
        try:
            yield gpu
        finally:
            self._send.send_nowait(gpu)  # never blocks: the buffer holds every id

    def free(self) -> int:
        """How many GPUs no job holds now."""
        return self._free.statistics().current_buffer_used


class WorkerLost(Exception):
    """The machine or process running a job's sandbox elsewhere (a Ray worker) is gone mid-phase. The
    queue hands the job back like a job of a dead server: re-queued, with bounded attempts."""
