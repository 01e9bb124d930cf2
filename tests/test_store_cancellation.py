"""A cancelled caller never leaves the zoo's connections inside a transaction.

A client cancels tool calls (a time-out, an agent changing its mind, a task group ending), and the
server's handler is cancelled at its next await. If that await is the one on a transaction's BEGIN,
aiosqlite has already queued the statement on its thread: it runs, and nothing ends it. The reader then
refused every later read and the writer held SQLite's write lock for good (a CI run's hostile case saw
every query_models fail after its pinging task was cancelled).

Which await a cancellation lands on is a matter of microseconds, so the tests pin it there: they occupy
the connection's own worker thread for a moment (the only fault injected) so that the BEGIN waits in its
queue while the caller is cancelled. Everything else is real: the zoo file, the store, a second SQLite connection."""

from __future__ import annotations

import sqlite3
import time

import aiosqlite
import anyio
import pytest

from zoo.query import Filters, Page
from zoo.records import Model
from zoo.store import ZooStore

pytestmark = pytest.mark.anyio

HOLD_S = 0.4  # how long the connection's thread is kept busy
CANCEL_AFTER_S = 0.1  # the caller is cancelled while its BEGIN still waits behind the hold


async def _hold_thread(conn: aiosqlite.Connection) -> None:
    """Queue a sleep on the connection's worker thread, as a slow statement would occupy it."""
    await conn._execute(time.sleep, HOLD_S)  # noqa: SLF001 - the fault: a busy worker thread


async def _cancelled_inside(enter, conn: aiosqlite.Connection) -> bool:  # noqa: ANN001
    """Enter `enter()` while `conn`'s thread is held, cancelled before the BEGIN runs; True if the
    cancellation was delivered (the test means nothing if the caller was never cancelled)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold_thread, conn)
        await anyio.sleep(0.02)  # the hold is queued first
        with anyio.move_on_after(CANCEL_AFTER_S) as scope:
            async with enter() as db:
                await db.execute("SELECT 1")  # a checkpoint inside, like any real body
    return scope.cancelled_caught


async def test_a_read_cancelled_at_its_begin_leaves_later_reads_working(tmp_path):
    async with await ZooStore.open(tmp_path / "zoo.sqlite") as store:
        await store.add_model(Model(name="kept", code="class Net: pass\n", origin="submitted"))
        assert await _cancelled_inside(store.snapshot, store._r)  # noqa: SLF001
        # old code: "cannot start a transaction within a transaction" here, and on every read after
        result = await store.query(Filters(), Page(limit=5))
        assert result["total"] == 0  # a model without runs is no row of query_models ...
        assert (await store.model_detail("kept"))["model"]["name"] == "kept"  # ... but it is read
        assert not store._r.in_transaction  # noqa: SLF001


async def test_a_write_cancelled_at_its_begin_holds_no_write_lock(tmp_path):
    path = tmp_path / "zoo.sqlite"
    async with await ZooStore.open(path) as store:
        assert await _cancelled_inside(store.transaction, store._w)  # noqa: SLF001
        # old code: the writer stayed in BEGIN IMMEDIATE: this write failed, and every other process's
        # writes waited out the busy timeout and failed with "database is locked"
        await store.add_model(Model(name="after", code="class Net: pass\n", origin="submitted"))
        other = sqlite3.connect(path, timeout=1.0)
        try:
            other.execute("BEGIN IMMEDIATE")
            names = [r[0] for r in other.execute("SELECT name FROM model")]
            other.execute("ROLLBACK")
        finally:
            other.close()
        assert names == ["after"]

