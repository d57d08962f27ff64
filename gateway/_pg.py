"""PostgreSQL plumbing shared by the store (:mod:`gateway.store_pg`) and cluster admission
(:mod:`gateway.cluster`): connection options, a checked pool, and one call on a worker thread
with a deadline.

It imports psycopg and anyio, never another gateway module, so both users import it without an
arrow between them. Errors stay psycopg's (and TimeoutError at a deadline): each user maps them
at its own boundary, to StoreError or UpstreamUnavailable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

__all__ = ["Pool", "call", "connect_options", "connection_pool"]

T = TypeVar("T")

Pool = ConnectionPool[psycopg.Connection[TupleRow]]


def connect_options(
    *, max_wait: float, dead_after: float, statement_timeout: float | None = None, name: str = ""
) -> dict[str, Any]:
    """libpq options of an autocommit connection: connect within ``max_wait`` (whole seconds,
    2 at least); give a silent peer up after about ``dead_after`` seconds (keepalives on an idle
    connection, ``tcp_user_timeout`` on unacknowledged data); with ``statement_timeout``, the
    server cancels a statement, or a wait for a lock, after that many seconds."""
    options: dict[str, Any] = {
        "autocommit": True,
        "connect_timeout": max(2, math.ceil(max_wait)),
        "keepalives": 1,
        "keepalives_idle": max(1, round(dead_after / 3)),
        "keepalives_interval": max(1, round(dead_after / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": round(dead_after * 1000),
    }
    if statement_timeout is not None:
        ms = round(statement_timeout * 1000)
        options["options"] = f"-c statement_timeout={ms} -c lock_timeout={ms}"
    if name:
        options["application_name"] = name
    return options


def connection_pool(
    url: str,
    *,
    min_size: int,
    max_size: int,
    max_wait: float,
    dead_after: float,
    name: str,
    statement_timeout: float | None = None,
) -> Pool:
    """A pool of autocommit connections to ``url`` (see :func:`connect_options`), not yet open.
    Each connection is checked as it is taken (an empty query) and a broken one replaced; a
    caller waits ``max_wait`` at most for one, and reconnection attempts give up after the same
    ``max_wait``, so once PostgreSQL is back the next call starts a fresh attempt at once."""
    return ConnectionPool(
        url,
        kwargs=connect_options(
            max_wait=max_wait, dead_after=dead_after, statement_timeout=statement_timeout, name=name
        ),
        min_size=min_size,
        max_size=max_size,
        open=False,
        check=ConnectionPool.check_connection,
        timeout=max_wait,
        reconnect_timeout=max_wait,
        name=name,
    )


async def call(
    pool: Pool,
    fn: Callable[[psycopg.Connection[TupleRow]], T],
    *,
    deadline: float | None,
    limiter: anyio.CapacityLimiter | None = None,
) -> T:
    """``fn`` with a pooled connection, on a worker thread.

    With a ``deadline`` the caller stops waiting after it (TimeoutError) or when it is
    cancelled, and the thread finishes alone: a transaction still commits or rolls back whole,
    and a connection whose peer went silent cannot hold the caller for ever. Without one the
    caller waits for the end, cancelled or not.
    """

    def run() -> T:
        with pool.connection() as conn:
            return fn(conn)

    if deadline is None:
        return await anyio.to_thread.run_sync(run, limiter=limiter)
    with anyio.fail_after(deadline):
        return await anyio.to_thread.run_sync(run, limiter=limiter, abandon_on_cancel=True)
