"""Transcripts in PostgreSQL (``store.url = "postgresql://..."``): several gateway replicas share
one database, so a transcript written through one is read, cached and corrected through any.

psycopg 3's async API runs on asyncio only, so the store runs as the SQLite one does: sync
connections, from a ``psycopg_pool.ConnectionPool`` of ``store.pool_size``, each call on an anyio
worker thread (at most one per connection). A caller that is cancelled (its client gone) or
past its deadline (three times ``max_wait``; ``READY_TIMEOUT`` for /readyz) stops waiting, and the thread
finishes the transaction alone: a write is whole or absent, never half, and a connection whose
peer went silent cannot hold a request for ever. Migrations alone are waited for to the end. Only complete transcripts are written, each in one
transaction; rows are per tenant; writing a transcript again keeps its human corrections (the
upsert leaves ``corrected`` alone).

Failures. Every psycopg error (refused connection, a server gone mid-query, no connection within
the pool's wait) becomes StoreError at one boundary (:func:`store_errors`). A lost connection
does not wedge the pool: each connection is checked as it is taken (``check_connection``, an
empty query) and a broken one is dropped and replaced in the background; every wait is bounded
(``max_wait`` for a connection from the pool, libpq's ``connect_timeout``, TCP keepalives and
``tcp_user_timeout`` for a server that vanished without a word). Reconnection attempts back off
and give up after the same ``max_wait``, so once PostgreSQL is back the next call starts a fresh
attempt at once instead of waiting out a long backoff: after a restart the next calls work.

Durability. A machine transcript commits with ``SET LOCAL synchronous_commit = off``: COMMIT
returns before its WAL record is flushed, so a PostgreSQL crash or power loss may lose the last
fraction of a second of transcripts (the database stays consistent, never half a row). They are
a cache, made again on the next upload, and no upload pays for a flush. Human corrections cannot
be made again: their transaction sets ``synchronous_commit = on`` (whatever the server's
default), so the WAL is flushed, and sent to any synchronous standby, before the PUT is answered.

Schema. One row in ``gateway_schema(version)``; forward-only migrations run in one transaction
under ``pg_advisory_xact_lock``, so replicas starting at once migrate exactly once (the others
wait on the lock, then find the work done). A schema newer than this gateway is refused with
StoreError, at start-up and by ``gateway store migrate``. Migration 3 creates the cluster
admission's tables (replicas and tickets).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import psycopg
from psycopg.rows import TupleRow

from . import _pg
from ._pg import Pool
from .errors import StoreError, StoreUnavailable
from .events import Transcript
from .store_base import (
    CORRECT_SQL,
    SAVE_SQL,
    Store,
    content_uuid,
    save_params,
)

__all__ = [
    "DEFAULT_MAX_WAIT",
    "PG_SCHEMA_VERSION",
    "Pool",
    "PostgresStore",
    "connection_pool",
    "migrate",
    "migrate_url",
    "open_pool",
    "open_postgres_store",
    "redacted",
    "schema_version",
    "store_errors",
]

T = TypeVar("T")

# Seconds any one wait may take: a connection from the pool, a connection attempt, the retries.
DEFAULT_MAX_WAIT = 5.0
# Seconds after which a connection whose server went silent is given up (its caller left at
# its deadline long before: this frees the connection).
DEAD_AFTER = 30.0
# Retry-After (seconds) of a 503 STORE_UNAVAILABLE: about one PostgreSQL restart.
UNAVAILABLE_RETRY_AFTER = 5.0
# Seconds /readyz waits for the store's answer.
READY_TIMEOUT = 1.0
# Any other call may take this many times the pool's max_wait: a connection from the pool,
# then its statements.
CALL_TIMEOUT_WAITS = 3

# pg_advisory_xact_lock key serialising migrations across replicas ("gateway" in ASCII, then 1).
_MIGRATION_LOCK = 0x67617465776179_01


def _create_transcripts(conn: psycopg.Connection[Any]) -> None:
    # The SQLite schema 1, in PostgreSQL's types.
    conn.execute(
        """
        CREATE TABLE transcripts (
            tenant       TEXT NOT NULL DEFAULT '',
            id           TEXT NOT NULL,
            engine       TEXT NOT NULL,
            language     TEXT NOT NULL DEFAULT '',
            segments     BYTEA NOT NULL,
            words        BYTEA NOT NULL,
            text         TEXT NOT NULL,
            duration     DOUBLE PRECISION,
            created_at   DOUBLE PRECISION NOT NULL,
            corrected    BYTEA,
            corrected_at DOUBLE PRECISION,
            PRIMARY KEY (tenant, id)
        )
        """
    )


def _add_uuids(conn: psycopg.Connection[Any]) -> None:
    # The UUID form of each id (the AymurAI profile's document_id), computed here in Python:
    # PostgreSQL's uuid_generate_v5 needs an extension the gateway's role may not create.
    conn.execute("ALTER TABLE transcripts ADD COLUMN uuid TEXT NOT NULL DEFAULT ''")
    rows = conn.execute("SELECT tenant, id FROM transcripts").fetchall()
    with conn.cursor() as cur:
        cur.executemany(
            "UPDATE transcripts SET uuid = %s WHERE tenant = %s AND id = %s",
            [(content_uuid(id), tenant, id) for tenant, id in rows],
        )
    conn.execute("CREATE INDEX transcripts_uuid ON transcripts (tenant, uuid)")


def _create_cluster_tables(conn: psycopg.Connection[Any]) -> None:
    # Cluster-wide admission (gateway.cluster): live replicas, and one ticket per queued or
    # running session, FIFO by seq within an upstream pool.
    conn.execute(
        """
        CREATE TABLE gateway_replicas (
            id           BIGSERIAL PRIMARY KEY,
            name         TEXT NOT NULL,
            started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )
        """
    )
    conn.execute(
        """
        CREATE TABLE gateway_tickets (
            seq         BIGSERIAL PRIMARY KEY,
            pool        TEXT NOT NULL,
            replica     BIGINT NOT NULL REFERENCES gateway_replicas (id) ON DELETE CASCADE,
            upstream    TEXT,
            enqueued_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            granted_at  TIMESTAMPTZ
        )
        """
    )
    conn.execute("CREATE INDEX gateway_tickets_pool ON gateway_tickets (pool, seq)")


def _add_ticket_tokens(conn: psycopg.Connection[Any]) -> None:
    # The token a reservation chose, so that one whose answer was lost (a timeout, a cut
    # connection, a caller that left) can still be found and given back by its replica.
    conn.execute("ALTER TABLE gateway_tickets ADD COLUMN token TEXT")


def _placeholders(query: str) -> str:
    """A shared query (store_base) with psycopg's placeholders: its "?" become "%s". The shared
    queries hold no literal "?" or "%"."""
    return query.replace("?", "%s")


_SAVE = _placeholders(SAVE_SQL)
_CORRECT = _placeholders(CORRECT_SQL)

_MIGRATIONS: list[Callable[[psycopg.Connection[Any]], None]] = [
    _create_transcripts,  # 1
    _add_uuids,  # 2
    _create_cluster_tables,  # 3
    _add_ticket_tokens,  # 4
]
PG_SCHEMA_VERSION = len(_MIGRATIONS)


@contextmanager
def store_errors(what: str) -> Iterator[None]:
    """The one boundary where psycopg's errors (the pool's included) become StoreError."""
    try:
        yield
    except psycopg.OperationalError as exc:
        # The connection failed or none could be had in time (PoolTimeout is one): a 503 the
        # client may retry, not a fault of its request or of the data.
        raise StoreUnavailable(f"{what}: {exc}", retry_after=UNAVAILABLE_RETRY_AFTER) from exc
    except psycopg.Error as exc:
        raise StoreError(f"{what}: {exc}") from exc


def redacted(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def schema_version(conn: psycopg.Connection[Any]) -> int:
    """The database's schema version; 0 for a database the gateway never migrated."""
    with store_errors("cannot read the schema version"):
        row = conn.execute("SELECT to_regclass('gateway_schema') IS NOT NULL").fetchone()
        if row is None or not row[0]:
            return 0
        row = conn.execute("SELECT version FROM gateway_schema").fetchone()
        return 0 if row is None else int(row[0])


def migrate(conn: psycopg.Connection[Any], target: int | None = None) -> int:
    """Apply the pending migrations up to ``target`` (default: all) in one transaction, under
    the migration advisory lock; return the schema version now. Forward only: a ``target``
    below the current version changes nothing. StoreError for a schema newer than this code."""
    goal = PG_SCHEMA_VERSION if target is None else target
    if not 0 <= goal <= PG_SCHEMA_VERSION:
        raise ValueError(f"schema target {goal}: this gateway knows 0..{PG_SCHEMA_VERSION}")
    with store_errors("cannot migrate the database"), conn.transaction():
        version = schema_version(conn)
        if version < goal:
            # Serialise with other replicas, then read again: one may have migrated meanwhile.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS gateway_schema (version integer NOT NULL)")
            if conn.execute("SELECT count(*) FROM gateway_schema").fetchone() == (0,):
                conn.execute("INSERT INTO gateway_schema (version) VALUES (0)")
            version = schema_version(conn)
        if version > PG_SCHEMA_VERSION:
            raise StoreError(
                f"database schema {version} is newer than this gateway ({PG_SCHEMA_VERSION})"
            )
        for number in range(version + 1, goal + 1):
            _MIGRATIONS[number - 1](conn)
        if goal > version:
            conn.execute("UPDATE gateway_schema SET version = %s", (goal,))
        return max(version, goal)


def migrate_url(url: str, *, max_wait: float = DEFAULT_MAX_WAIT) -> tuple[int, int]:
    """:func:`migrate` the database at ``url`` on a connection of its own (``gateway store
    migrate``): the schema versions before and after."""
    with store_errors(f"cannot connect to {redacted(url)}"):
        conn = psycopg.connect(url, autocommit=True, connect_timeout=max(2, math.ceil(max_wait)))
    with conn:
        before = schema_version(conn)
        return before, migrate(conn)


def connection_pool(
    url: str, size: int, *, max_wait: float = DEFAULT_MAX_WAIT, name: str = "gateway-store"
) -> Pool:
    """A sync psycopg pool of ``size`` autocommit connections to ``url``, not yet open (see
    :func:`open_pool`). Connections are checked as they are taken, and every wait is bounded by
    ``max_wait`` (see the module docstring)."""
    return _pg.connection_pool(
        url, min_size=size, max_size=size, max_wait=max_wait, dead_after=DEAD_AFTER, name=name
    )


@asynccontextmanager
async def open_pool(
    url: str, size: int, *, max_wait: float = DEFAULT_MAX_WAIT, name: str = "gateway-store"
) -> AsyncIterator[Pool]:
    """:func:`connection_pool`, opened (its first connections made, on a worker thread: a
    StoreError if PostgreSQL cannot be reached within ``max_wait``) and closed at exit."""
    pool = connection_pool(url, size, max_wait=max_wait, name=name)
    try:
        with store_errors(f"cannot connect to {redacted(url)}"):
            await anyio.to_thread.run_sync(partial(pool.open, wait=True, timeout=max_wait))
        yield pool
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(pool.close)


class PostgresStore(Store):
    """The store on an open pool (see :func:`open_postgres_store`), its schema migrated."""

    def __init__(self, pool: Pool, *, location: str = "") -> None:
        self._pool = pool
        self._location = location or pool.name
        # One worker thread per connection: more would only queue inside the pool.
        self._limiter = anyio.CapacityLimiter(pool.max_size)
        self._closed = False

    @property
    def location(self) -> str:
        return self._location

    async def _call(
        self,
        fn: Callable[[psycopg.Connection[TupleRow]], T],
        *,
        deadline: float | Literal["default"] | None = "default",
    ) -> T:
        """Run ``fn`` with a pooled connection on a worker thread.

        With a ``deadline`` (by default CALL_TIMEOUT_WAITS times the pool's ``max_wait``) the
        caller stops waiting after it (StoreUnavailable) or when it is
        cancelled, and the thread finishes alone: its transaction still commits or rolls back
        whole, and a connection whose peer went silent cannot hold a request for ever. Without
        one (migrations) the caller waits for the end.
        """
        if self._closed:
            raise StoreError("the store is closed")
        if deadline == "default":
            deadline = CALL_TIMEOUT_WAITS * self._pool.timeout
        with store_errors("database error"):
            try:
                return await _pg.call(self._pool, fn, deadline=deadline, limiter=self._limiter)
            except TimeoutError as exc:
                raise StoreUnavailable(
                    f"no answer from PostgreSQL within {deadline:g} s",
                    retry_after=UNAVAILABLE_RETRY_AFTER,
                ) from exc

    async def _fetch_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        pg_query = _placeholders(query)
        return await self._call(lambda conn: conn.execute(pg_query, params).fetchone())

    async def save(self, transcript: Transcript, tenant: str = "") -> None:
        params = save_params(transcript, tenant)

        def q(conn: psycopg.Connection[TupleRow]) -> None:
            with conn.transaction():
                # A cache: no WAL flush before COMMIT returns (see the module docstring).
                conn.execute("SET LOCAL synchronous_commit = off")
                conn.execute(_SAVE, params)

        await self._call(q)

    async def _save_corrections(self, id: str, blob: bytes, tenant: str) -> bool:
        def q(conn: psycopg.Connection[TupleRow]) -> bool:
            with conn.transaction():
                # Human work: flushed before the PUT is answered (see the module docstring).
                conn.execute("SET LOCAL synchronous_commit = on")
                cur = conn.execute(_CORRECT, (blob, time.time(), tenant, id))
                return cur.rowcount > 0

        return await self._call(q)

    async def check_writable(self) -> str | None:
        def q(conn: psycopg.Connection[TupleRow]) -> None:
            # A write of no rows, rolled back: refused like any write in a read-only
            # transaction (a hot standby, default_transaction_read_only) or without the
            # privilege; it waits (bounded) only behind a migration's table lock.
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '2s'")
                conn.execute("UPDATE transcripts SET tenant = tenant WHERE false")
                raise psycopg.Rollback()

        try:
            # Probes have short timeouts: answer within READY_TIMEOUT even while the pool
            # waits up to max_wait for a connection to a database that is gone.
            await self._call(q, deadline=READY_TIMEOUT)
        except StoreError as exc:
            return f"store not writable: {exc}"
        return None


@asynccontextmanager
async def open_postgres_store(
    url: str, *, pool_size: int = 4, max_wait: float = DEFAULT_MAX_WAIT
) -> AsyncIterator[PostgresStore]:
    """Connect to ``url``, apply pending migrations (StoreError for a newer schema), and serve
    the store until the block exits; then close its connections."""
    async with open_pool(url, pool_size, max_wait=max_wait) as pool:
        store = PostgresStore(pool, location=redacted(url))
        await store._call(migrate, deadline=None)
        try:
            yield store
        finally:
            store._closed = True
