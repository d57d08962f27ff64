"""Transcripts in SQLite, on one dedicated worker thread; and ``open_store``, which picks the
backend: SQLite (the embedded default, one machine) or PostgreSQL (``store.url``, several
replicas: :mod:`gateway.store_pg`). The abstract :class:`Store` and what the backends share are
in :mod:`gateway.store_base`, re-exported here.

aiosqlite is asyncio-only (it hands trio asyncio futures), so the store follows aiosqlite's own
design in a trio-safe way: one thread owns the stdlib ``sqlite3`` connection and runs jobs from a
queue, and callers await an anyio event the thread sets. The thread is started inside the caller's
task group (``open_store``), so it cannot outlive the application.

Only complete transcripts are written, each in one transaction, so a failure or a crash never
leaves a half-finished transcript that could be served from cache. The database runs in WAL mode;
its schema is versioned with ``PRAGMA user_version``.

Durability. A transaction is in the WAL file (the OS's page cache) before its COMMIT returns, and
an answer is sent only after that, so whatever an answered request wrote survives the gateway
process being killed (SIGKILL, OOM), at any synchronous level: the kernel still writes the pages.
The level decides what survives a power loss or a kernel crash. Machine transcripts are written
with ``synchronous=NORMAL`` (the WAL is fsynced at checkpoints only): after a power loss the
database is consistent but may lack the last transcripts, which are a cache and are made again on
the next upload, and no upload pays for an fsync. Human corrections cannot be made again, so their
write switches to ``synchronous=FULL``: the WAL is fsynced before the PUT is answered. Corrections
are rare, so the fsync (a few milliseconds) costs nothing that matters.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio

from .config import StoreConfig
from .errors import StoreError, collapse_groups
from .events import Transcript
from .store_base import (
    CORRECT_SQL,
    SAVE_SQL,
    Store,
    StoredTranscript,
    check_times,
    content_uuid,
    save_params,
)

__all__ = [
    "SCHEMA_VERSION",
    "SqliteStore",
    "Store",
    "StoredTranscript",
    "check_times",
    "content_uuid",
    "migrate_store",
    "open_store",
]

T = TypeVar("T")

_MIGRATIONS = [
    # 1: transcripts keyed by tenant and content id; human corrections kept beside them.
    """
    CREATE TABLE transcripts (
        tenant       TEXT NOT NULL DEFAULT '',
        id           TEXT NOT NULL,
        engine       TEXT NOT NULL,
        language     TEXT NOT NULL DEFAULT '',
        segments     BLOB NOT NULL,
        words        BLOB NOT NULL,
        text         TEXT NOT NULL,
        duration     REAL,
        created_at   REAL NOT NULL,
        corrected    BLOB,
        corrected_at REAL,
        PRIMARY KEY (tenant, id)
    ) WITHOUT ROWID;
    """,
    # 2: the UUID form of each id (uuid5 over the DNS namespace), which the AymurAI profile
    # exposes as its document_id.
    """
    ALTER TABLE transcripts ADD COLUMN uuid TEXT NOT NULL DEFAULT '';
    UPDATE transcripts SET uuid = content_uuid(id);
    CREATE INDEX transcripts_uuid ON transcripts (tenant, uuid);
    """,
]
SCHEMA_VERSION = len(_MIGRATIONS)


@dataclass(eq=False)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    done: anyio.Event
    result: Any = None
    error: BaseException | None = None


def _connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.create_function("content_uuid", 1, content_uuid, deterministic=True)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        conn.close()
        raise StoreError(f"database schema {version} is newer than this gateway ({SCHEMA_VERSION})")
    for number, sql in enumerate(_MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return conn


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False

    @property
    def location(self) -> str:
        return self.path

    # -- the dedicated thread ----------------------------------------------------------------
    def _serve(self, started: Callable[[], None]) -> None:
        conn = _connect(self.path)
        anyio.from_thread.run_sync(started)
        try:
            while (job := self._jobs.get()) is not None:
                try:
                    job.result = job.fn(conn)
                except BaseException as exc:
                    job.error = exc
                anyio.from_thread.run_sync(job.done.set)
        finally:
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()

    async def _run_thread(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        await anyio.to_thread.run_sync(
            self._serve, task_status.started, limiter=anyio.CapacityLimiter(1)
        )

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        job = _Job(fn, anyio.Event())
        self._jobs.put(job)
        # The job runs to completion even if this caller is cancelled: writes stay atomic.
        await job.done.wait()
        if job.error is not None:
            if isinstance(job.error, sqlite3.Error):
                raise StoreError(f"database error: {job.error}") from job.error
            raise job.error
        return job.result  # type: ignore[no-any-return]

    def _shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self._jobs.put(None)

    # -- operations ---------------------------------------------------------------------------
    async def _fetch_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._call(
            lambda conn: conn.execute(query, params).fetchone()
        )
        return row

    async def save(self, transcript: Transcript, tenant: str = "") -> None:
        """Store a complete transcript; an existing row's corrections are kept."""
        params = save_params(transcript, tenant)

        def q(conn: sqlite3.Connection) -> None:
            conn.execute(SAVE_SQL, params)

        await self._call(q)

    async def _save_corrections(self, id: str, blob: bytes, tenant: str) -> bool:
        def q(conn: sqlite3.Connection) -> bool:
            # Durable across a power loss too (see the module docstring): the setting applies to
            # the commit of this one autocommit statement.
            conn.execute("PRAGMA synchronous=FULL")
            try:
                cur = conn.execute(CORRECT_SQL, (blob, time.time(), tenant, id))
            finally:
                conn.execute("PRAGMA synchronous=NORMAL")
            return cur.rowcount > 0

        return await self._call(q)

    async def check_writable(self) -> str | None:
        """``None`` when a write transaction can be taken, otherwise the reason."""

        def q(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        try:
            with anyio.fail_after(5):
                await self._call(q)
        except (StoreError, TimeoutError) as exc:
            return f"store not writable: {exc}"
        return None


def _selected(target: StoreConfig | str) -> tuple[str, int]:
    """The database ``target`` names (a postgresql:// URL or a SQLite path) and the pool size."""
    if isinstance(target, StoreConfig):
        return target.url or target.path, target.pool_size
    return os.fspath(target), StoreConfig().pool_size


def _is_postgres(where: str) -> bool:
    return where.startswith(("postgresql://", "postgres://"))


@asynccontextmanager
async def open_store(target: StoreConfig | str) -> AsyncIterator[Store]:
    """Open the store (creating and migrating its schema) until the block exits.

    ``target`` is the ``[store]`` section (its ``url`` when set, else its ``path``) or a string:
    a ``postgresql://`` URL, or the path of a SQLite file."""
    where, pool_size = _selected(target)
    if _is_postgres(where):
        # Imported here: a SQLite gateway never loads the PostgreSQL driver.
        from .store_pg import open_postgres_store

        async with open_postgres_store(where, pool_size=pool_size) as pg:
            yield pg
        return
    async with _open_sqlite(where) as sqlite:
        yield sqlite


def migrate_store(target: StoreConfig | str) -> tuple[int, int]:
    """Apply the pending schema migrations of the store ``target`` names (as ``open_store``
    reads it) without serving it: the schema versions before and after. StoreError for a
    schema newer than this gateway, or a database that cannot be opened."""
    where, _ = _selected(target)
    if _is_postgres(where):
        from .store_pg import migrate_url

        return migrate_url(where)
    try:
        before = 0
        if Path(where).exists():
            with closing(sqlite3.connect(where)) as conn:
                before = conn.execute("PRAGMA user_version").fetchone()[0]
        _connect(where).close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot migrate database {where}: {exc}") from exc
    return before, SCHEMA_VERSION


@asynccontextmanager
async def _open_sqlite(path: str) -> AsyncIterator[SqliteStore]:
    """Open (creating and migrating) the database and run its thread until the block exits."""
    store = SqliteStore(path)
    try:
        with collapse_groups():
            async with anyio.create_task_group() as tg:
                await tg.start(store._run_thread)
                try:
                    yield store
                finally:
                    store._shutdown()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
