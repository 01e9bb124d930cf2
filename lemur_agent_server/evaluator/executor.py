"""Where a training job runs: the local executor's GPU pool.

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

import anyio


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
