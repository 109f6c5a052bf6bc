"""The one place that opens a SQLite database: ``studio.db`` (the store, the plans, the runs) and
``jobs.db`` (background jobs) are opened here with the same settings.

Settings of every connection:
* ``check_same_thread=False`` — one connection is shared by the UI worker threads and the job
  threads; each owner (``Store``, ``CurationDB``, ``RunLog``, ``JobManager``) serialises it with
  its own lock;
* a 30 s busy timeout (:data:`BUSY_TIMEOUT_S`, both the driver's and ``PRAGMA busy_timeout``):
  writers of several processes / connections wait for each other instead of failing;
* ``journal_mode = WAL`` (readers never block; the switch is retried while another connection
  holds the file at creation), ``synchronous = FULL`` (a committed row survives a power loss) and
  ``foreign_keys = ON``.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Callable, TypeVar

import sqlite_utils

BUSY_TIMEOUT_S = 30.0

T = TypeVar("T")


def retry_while_locked(fn: Callable[[], T], timeout_s: float = BUSY_TIMEOUT_S) -> T:
    """Run ``fn``, retrying on 'database is locked' (journal-mode switch races at creation)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connect(path: str | Path, *, row_factory=None) -> sqlite3.Connection:
    """Open ``path`` with the project's settings (see the module docstring). Raises
    ``sqlite3.DatabaseError`` when the file is not a database; the connection is closed then."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        retry_while_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone())
        conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    if row_factory is not None:
        conn.row_factory = row_factory
    return conn


def database(path: str | Path) -> sqlite_utils.Database:
    """:func:`connect` wrapped in a ``sqlite_utils.Database`` (no sqlite-utils plugins run)."""
    conn = connect(path)
    try:
        return sqlite_utils.Database(conn, execute_plugins=False)
    except BaseException:
        conn.close()
        raise
