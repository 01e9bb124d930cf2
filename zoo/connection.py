"""Opening the zoo file: location, pragmas, migration.

Why here: the async store (server) and the synchronous readers (Python API, CLI exports) must open
the file the same way: WAL so readers never block the writer and never see half a transaction,
foreign keys on, a busy timeout so two server processes on one zoo wait instead of failing.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import platformdirs

from zoo import schema

ENV_ZOO = "LEMUR_ZOO"
APP_NAME = "lemur-agent-server"
BUSY_TIMEOUT_MS = 30_000
# A new zoo's page size. Why 16 KiB, not SQLite's 4 KiB: an imported zoo is a few hundred MB of narrow
# rows and index entries; larger pages hold more cells per page header and fill better (measured: the
# 2.1.2 wheel's zoo 3.4 MB smaller, the synthetic 2.2 zoo 2 MB), and a page read serves more index entries.
# Only a new (empty) file takes it: an existing zoo keeps its size (WAL files cannot change it).
NEW_ZOO_PAGE_SIZE = 16_384


def default_zoo_path() -> Path:
    """$LEMUR_ZOO, else the user's data dir (XDG_DATA_HOME on Linux)/zoo.sqlite."""
    env = os.environ.get(ENV_ZOO)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir(APP_NAME)) / "zoo.sqlite"


def resolve_zoo_path(path: str | os.PathLike[str] | None) -> Path:
    return Path(path).expanduser().resolve() if path else default_zoo_path().resolve()


PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA cache_size=-65536",  # 64 MiB page cache
    "PRAGMA mmap_size=268435456",
)


def apply_pragmas(conn: sqlite3.Connection) -> None:
    for pragma in PRAGMAS:
        conn.execute(pragma)


def initialize(path: Path) -> None:
    """Create the file (mode 0600, in a 0700 dir when we create it) and migrate it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not path.exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        if path.stat().st_size == 0:  # before journal_mode=WAL writes the header
            conn.execute(f"PRAGMA page_size={NEW_ZOO_PAGE_SIZE}")
        apply_pragmas(conn)
        schema.migrate(conn)
    finally:
        conn.close()


def connect_sync(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A plain sqlite3 connection for synchronous readers (the Python API, exports)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
    conn.row_factory = sqlite3.Row
    for pragma in PRAGMAS:
        if readonly and "journal_mode" in pragma:
            continue
        conn.execute(pragma)
    return conn
