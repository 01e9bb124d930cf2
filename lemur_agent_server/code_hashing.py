"""Model code hashes for bulk imports, computed in other processes while the import goes on.

Why: `codehash.code_hash` tokenizes the code (0.2-0.45 s per MB); LEMUR's 10,482 models are 47 MB of
code, about 20 s of CPU, the largest single cost of an import. Sent to worker processes in chunks as
the models are read, it runs beside the parsing and writing instead of after them. A small import
(fewer than START_POOL_AT models) hashes in-process: starting a pool would cost more.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context

from zoo import codehash

START_POOL_AT = 1_000   # codes buffered before a pool is worth starting
CHUNK = 256             # codes per task sent to a worker

Hashes = tuple[str, str]  # (code_hash, lemur_id)


def hashes(code: str) -> Hashes:
    return codehash.code_hash(code), codehash.lemur_id(code)


def _chunk(codes: list[str]) -> list[Hashes]:
    return [hashes(code) for code in codes]


def worker_count() -> int:
    """One core stays with the importer: on a 2-core machine one worker, at most four."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class CodeHasher:
    """`add(code)` in order, then `results()` once: the hashes in the same order."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._futures: list[Future[list[Hashes]]] = []
        self._buffer: list[str] = []

    def add(self, code: str) -> None:
        self._buffer.append(code)
        if self._pool is None and len(self._buffer) >= START_POOL_AT:
            self._pool = ProcessPoolExecutor(max_workers=worker_count(), mp_context=get_context("spawn"))
        if self._pool is not None and len(self._buffer) >= CHUNK:
            self._submit()

    def _submit(self) -> None:
        assert self._pool is not None
        for start in range(0, len(self._buffer), CHUNK):
            self._futures.append(self._pool.submit(_chunk, self._buffer[start:start + CHUNK]))
        self._buffer = []

    def results(self) -> list[Hashes]:
        if self._pool is None:
            done = _chunk(self._buffer)
            self._buffer = []
            return done
        try:
            if self._buffer:
                self._submit()
            return [h for future in self._futures for h in future.result()]
        finally:
            self._pool.shutdown()
            self._pool = None
            self._futures = []

    def close(self) -> None:
        """Stop the workers without waiting (an import that failed half way)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
