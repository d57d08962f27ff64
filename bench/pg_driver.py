"""The store's PostgreSQL driver (issue 17): psycopg's sync connections on worker threads, as
``gateway.store_pg`` runs them, against a trio-native driver of libpq's non-blocking calls.

psycopg 3's async API runs on asyncio only, so the gateway's ``PostgresStore`` takes sync
connections from a ``psycopg_pool.ConnectionPool`` and runs each call on an anyio worker thread.
The alternative measured here drives libpq itself from the trio loop, through ``psycopg.pq``
(psycopg's documented libpq wrapper, not its private generators): a non-blocking ``PGconn``
(``connect_start`` / ``connect_poll``, ``nonblocking = 1``), statements sent with
``send_prepare`` / ``send_query_prepared`` / ``send_query``, ``flush`` until sent, and
``is_busy`` / ``consume_input`` / ``get_result`` between waits on its socket with anyio's
``wait_readable`` / ``wait_writable``. No thread, no queue between threads.

Setup, all in one run on this machine, on loopback: a throwaway PostgreSQL (tests/pg.py:
initdb in a temp folder, ``fsync=off``), one database migrated with ``gateway.store_pg.migrate``,
``--rows`` transcripts of ``--segments`` segments (10 timed words each: about 24 KB a row at
60, five minutes of speech) saved through ``PostgresStore``. Then, for 1 and for
``--concurrency`` callers (caller i takes calls i, i + callers, ...), each driver in turn:

- **reads**: ``--reads`` calls of the store's ``get`` (``SELECT`` of its nine columns by tenant
  and id), each result fully decoded into a ``StoredTranscript`` (``decode_row``: the msgspec
  segments and words), cycling over the stored rows;
- **writes**: ``--writes`` calls of the store's ``save``: its upsert (``ON CONFLICT DO UPDATE``,
  every row already there) in a transaction with ``SET LOCAL synchronous_commit = off``.

Drivers, each with a pool of ``--pool-size`` connections (4, the gateway's default), warmed up
with 50 calls of each kind before their figures:

- **threads**: ``PostgresStore`` as the gateway uses it (``open_postgres_store``): one worker
  thread per call, a deadline per call; psycopg prepares a statement after its fifth run on a
  connection, reads BYTEA in text form (hex, decoded by psycopg), and the pool checks each
  connection as it is taken (an empty query: one more round trip per call). A read is two round
  trips, a write five (check, BEGIN, SET LOCAL, upsert, COMMIT).
- **trio-native**: the minimal driver below (:class:`NativeConn`, :class:`NativePool`): the same
  statements, prepared on each connection at first use, parameters bound (text for strings,
  binary for BYTEA and double precision), results in binary form (BYTEA as raw bytes), every
  value read. No check as a connection is taken: a read is one round trip, a write four.
- **trio-native, checked**: the same with the pool's empty-query check on every take, so it
  makes exactly the round trips the threads make: the difference to **threads** is the driver
  (threads, psycopg's adaptation, text BYTEA), not the pool's policy.

Figures per row: p50 and p99 latency per call (ms), calls per second, and CPU seconds of this
process (``resource.getrusage``: all its threads; not PostgreSQL's) per 1,000 calls. The machine
line and the load average at start and end say how quiet the machine was.

What the trio-native driver lacks before the gateway could use it (it is a measurement, not a
store): type adaptation beyond text, BYTEA and float8 (it refuses other result types); COPY;
LISTEN/NOTIFY (cluster admission needs notifications); pipeline mode; a check and replacement of
a connection taken from the pool (it only runs the empty query and fails if that fails), and
background reconnection with backoff (a connection that failed or was cancelled is closed and the
next taker connects afresh, with no retry); deadlines and ``connect_timeout`` (libpq does not
time out a non-blocking connection attempt: the caller must); cancelling a running query on the
server with ``PQcancel`` when its caller leaves (it closes the connection, and the backend runs
the statement on until it notices); TLS and authentication beyond what libpq does alone (a
``connect_poll`` loop covers both, untested here); notices, encodings other than UTF-8, and
psycopg's error classes (every failure is :class:`NativeError`).

Run from the repository root on an otherwise idle machine: ``python bench/pg_driver.py`` (about
15 to 30 seconds on 2 cores). A quick check that it works: ``python bench/pg_driver.py --reads 100
--writes 50``. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import psycopg
import trio
from psycopg import pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine, markdown_table, percentile  # noqa: E402
from cluster import load_average, own_cpu, postgres, timed_calls, transcript  # noqa: E402

from gateway.events import Transcript  # noqa: E402
from gateway.store_base import (  # noqa: E402
    SAVE_SQL,
    SELECT_COLUMNS,
    StoredTranscript,
    decode_row,
    save_params,
)
from gateway.store_pg import PostgresStore, migrate, open_postgres_store  # noqa: E402

# The store's read (Store.get) and write (PostgresStore.save), with libpq's $n placeholders.
GET_SQL = f"SELECT {SELECT_COLUMNS} FROM transcripts WHERE tenant = ? AND id = ?"
WARM_UP = 50  # calls of each kind before a driver's figures (psycopg prepares after 5)

# PostgreSQL type OIDs of the store's columns and parameters.
_TEXT, _BYTEA, _FLOAT8 = 25, 17, 701
_FLOAT8_BIN = struct.Struct(">d")  # float8's binary form: big-endian IEEE 754


def numbered(query: str) -> bytes:
    """``query`` (sqlite3's ``?`` placeholders, as store_base writes them) with libpq's ``$1``,
    ``$2``, ...; the store's queries hold no literal ``?``."""
    first, *rest = query.split("?")
    return (first + "".join(f"${n}{part}" for n, part in enumerate(rest, 1))).encode()


# --- the trio-native driver ---------------------------------------------------------------------


class NativeError(Exception):
    """A failed connection or statement of the trio-native driver."""


def _decode_text(value: bytes) -> str:
    return value.decode()  # the database is UTF-8 and libpq's client encoding follows it


def _decode_float8(value: bytes) -> float:
    number: float = _FLOAT8_BIN.unpack(value)[0]
    return number


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    _TEXT: _decode_text,
    _BYTEA: bytes,
    _FLOAT8: _decode_float8,
}


def encode_params(values: Sequence[Any]) -> tuple[list[bytes | None], list[int]]:
    """Each value in the form the server reads for its (prepared, so inferred) type: strings and
    integers as text, bytes as binary BYTEA, floats as binary float8."""
    out: list[bytes | None] = []
    formats: list[int] = []
    for value in values:
        if value is None:
            out.append(None)
            formats.append(pq.Format.TEXT)
        elif isinstance(value, str):
            out.append(value.encode())
            formats.append(pq.Format.TEXT)
        elif isinstance(value, bytes):
            out.append(value)
            formats.append(pq.Format.BINARY)
        elif isinstance(value, float):
            out.append(_FLOAT8_BIN.pack(value))
            formats.append(pq.Format.BINARY)
        elif isinstance(value, int):
            out.append(str(value).encode())
            formats.append(pq.Format.TEXT)
        else:
            raise NativeError(f"no adapter for a {type(value).__name__} parameter")
    return out, formats


def row_values(result: pq.abc.PGresult, row: int) -> tuple[Any, ...]:
    """Row ``row`` of a binary-format result, every column decoded by its type."""
    values: list[Any] = []
    for col in range(result.nfields):
        raw = result.get_value(row, col)
        if raw is None:
            values.append(None)
            continue
        decoder = _DECODERS.get(result.ftype(col))
        if decoder is None:
            raise NativeError(f"no decoder for type oid {result.ftype(col)}")
        values.append(decoder(raw))
    return tuple(values)


async def _readable_or_writable(fd: int) -> None:
    """Return once ``fd`` can be read or written, whichever comes first."""
    async with anyio.create_task_group() as tg:

        async def wait(until: Callable[[int], Awaitable[None]]) -> None:
            await until(fd)
            tg.cancel_scope.cancel()

        tg.start_soon(wait, anyio.wait_readable)
        tg.start_soon(wait, anyio.wait_writable)


class NativeConn:
    """One non-blocking libpq connection driven from the event loop. One statement at a time;
    after any failure or cancellation its state is unknown, and :class:`NativePool` closes it."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self.pgconn = pgconn
        self._prepared: set[bytes] = set()

    @classmethod
    async def connect(cls, url: str) -> NativeConn:
        pgconn = pq.PGconn.connect_start(url.encode())
        try:
            if pgconn.status == pq.ConnStatus.BAD:
                raise NativeError(f"cannot connect: {pgconn.get_error_message()}")
            # libpq's connection loop: start as if the poll had asked to write, then wait for
            # what each poll asks. The socket may change between polls (another address).
            state: int = pq.PollingStatus.WRITING
            while state != pq.PollingStatus.OK:
                if state == pq.PollingStatus.READING:
                    await anyio.wait_readable(pgconn.socket)
                elif state == pq.PollingStatus.WRITING:
                    await anyio.wait_writable(pgconn.socket)
                else:
                    raise NativeError(f"cannot connect: {pgconn.get_error_message()}")
                state = pgconn.connect_poll()
            pgconn.nonblocking = 1
        except BaseException:
            pgconn.finish()
            raise
        return cls(pgconn)

    def close(self) -> None:
        if self.pgconn.status != pq.ConnStatus.BAD:
            # Wake (with an error) any task waiting on the socket before libpq closes it.
            anyio.notify_closing(self.pgconn.socket)
        self.pgconn.finish()

    async def _round_trip(self, send: Callable[[], None]) -> pq.abc.PGresult:
        """Send one statement and read all its results; the last one, or NativeError."""
        pgconn = self.pgconn
        try:
            send()
            # Non-blocking libpq keeps what the socket would not take: flush until all is
            # sent. libpq's rule: meanwhile the server may need us to read, so wait for either.
            while pgconn.flush():
                await _readable_or_writable(pgconn.socket)
                pgconn.consume_input()
            results: list[pq.abc.PGresult] = []
            while True:
                while pgconn.is_busy():
                    await anyio.wait_readable(pgconn.socket)
                    pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:  # the statement's results are all in
                    break
                results.append(result)
        except psycopg.Error as exc:  # psycopg.pq reports libpq's failures as OperationalError
            raise NativeError(str(exc)) from exc
        ok = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK, pq.ExecStatus.EMPTY_QUERY)
        for result in results:
            if result.status not in ok:
                raise NativeError(result.get_error_message())
        if not results:
            raise NativeError("no result")
        return results[-1]

    async def command(self, sql: bytes) -> pq.abc.PGresult:
        """A statement without parameters (simple query protocol)."""
        return await self._round_trip(lambda: self.pgconn.send_query(sql))

    async def execute(self, name: bytes, sql: bytes, params: Sequence[Any]) -> pq.abc.PGresult:
        """Prepared statement ``name`` (prepared on this connection at first use) with bound
        ``params``; results in binary form."""
        if name not in self._prepared:
            await self._round_trip(lambda: self.pgconn.send_prepare(name, sql))
            self._prepared.add(name)
        values, formats = encode_params(params)
        return await self._round_trip(
            lambda: self.pgconn.send_query_prepared(
                name, values, formats, result_format=pq.Format.BINARY
            )
        )


class NativePool:
    """``size`` connections handed out in FIFO order of the takers. With ``check``, each is
    checked (an empty query) as it is taken, as the store's psycopg pool does. A connection
    whose user failed or was cancelled is closed; the next taker connects afresh."""

    def __init__(self, url: str, size: int, *, check: bool) -> None:
        self.url = url
        self.check = check
        self._send, self._receive = trio.open_memory_channel[NativeConn | None](size)
        for _ in range(size):
            self._send.send_nowait(None)  # None: connect at first take

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[NativeConn]:
        conn = await self._receive.receive()
        try:
            if conn is None:
                conn = await NativeConn.connect(self.url)
            elif self.check:
                await conn.command(b"")
            yield conn
        except BaseException:
            if conn is not None:
                conn.close()
                conn = None
            raise
        finally:
            self._send.send_nowait(conn)

    async def open(self) -> None:
        """Make every connection now, so that no figure includes a connection's cost."""
        async with trio.open_nursery() as nursery:
            for _ in range(self._receive.statistics().current_buffer_used):
                nursery.start_soon(self._warm)

    async def _warm(self) -> None:
        conn = await self._receive.receive()
        if conn is None:
            try:
                conn = await NativeConn.connect(self.url)
            finally:
                self._send.send_nowait(conn)
        else:
            self._send.send_nowait(conn)

    def close(self) -> None:
        while True:
            try:
                conn = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            if conn is not None:
                conn.close()


@contextlib.asynccontextmanager
async def open_native_pool(url: str, size: int, *, check: bool) -> AsyncIterator[NativePool]:
    pool = NativePool(url, size, check=check)
    try:
        await pool.open()
        yield pool
    finally:
        pool.close()


_GET = numbered(GET_SQL)
_SAVE = numbered(SAVE_SQL)


async def native_get(pool: NativePool, id: str, tenant: str = "") -> StoredTranscript | None:
    """``Store.get`` on the trio-native driver."""
    async with pool.connection() as conn:
        result = await conn.execute(b"get", _GET, (tenant, id))
    return None if result.ntuples == 0 else decode_row(id, row_values(result, 0))


async def native_save(pool: NativePool, transcript: Transcript, tenant: str = "") -> None:
    """``PostgresStore.save`` on the trio-native driver: the same statements. On a failure the
    pool closes the connection, which ends the open transaction with it."""
    params = save_params(transcript, tenant)
    async with pool.connection() as conn:
        await conn.command(b"BEGIN")
        await conn.command(b"SET LOCAL synchronous_commit = off")
        await conn.execute(b"save", _SAVE, params)
        await conn.command(b"COMMIT")


# --- measuring ----------------------------------------------------------------------------------


Reader = Callable[[str], Awaitable[StoredTranscript | None]]
Writer = Callable[[Transcript], Awaitable[None]]


def read_calls(get: Reader, ids: Sequence[str], n: int) -> list[Callable[[], Awaitable[None]]]:
    def call(id: str) -> Callable[[], Awaitable[None]]:
        async def read() -> None:
            stored = await get(id)
            if stored is None or stored.id != id or not stored.segments:
                raise RuntimeError(f"{id} was not read back")

        return read

    return [call(ids[i % len(ids)]) for i in range(n)]


def write_calls(
    save: Writer, rows: Sequence[Transcript], n: int
) -> list[Callable[[], Awaitable[None]]]:
    # Call k writes row k mod len(rows): with no more callers than rows, calls made at once
    # write distinct rows (no waits on row locks).
    return [partial(save, rows[i % len(rows)]) for i in range(n)]


async def measure(
    calls: Sequence[Callable[[], Awaitable[None]]], callers: int
) -> tuple[list[float], float, float]:
    """Latencies, wall seconds and CPU seconds (``getrusage`` of this process: all its threads,
    the store's worker threads included) of ``calls`` made by ``callers`` tasks."""
    cpu = own_cpu()
    result = await timed_calls(calls, callers)
    return result.latency, result.wall, own_cpu() - cpu


def figure_row(
    driver: str, callers: int, latency: list[float], wall: float, cpu: float
) -> list[str]:
    n = len(latency)
    return [
        driver,
        str(callers),
        f"{percentile(latency, 50) * 1000:,.3f}",
        f"{percentile(latency, 99) * 1000:,.3f}",
        f"{n / wall:,.0f}" if wall > 0 else "nan",
        f"{cpu / n * 1000:,.3f}" if n else "nan",
    ]


async def run(url: str, args: argparse.Namespace) -> str:
    rows = [transcript(f"pg-driver {i}", args.segments) for i in range(args.rows)]
    ids = [t.id for t in rows]
    async with contextlib.AsyncExitStack() as stack:
        store: PostgresStore = await stack.enter_async_context(
            open_postgres_store(url, pool_size=args.pool_size)
        )
        for t in rows:
            await store.save(t)
        native = await stack.enter_async_context(open_native_pool(url, args.pool_size, check=False))
        checked = await stack.enter_async_context(open_native_pool(url, args.pool_size, check=True))
        drivers: list[tuple[str, Reader, Writer]] = [
            ("threads (PostgresStore)", store.get, store.save),
            ("trio-native", lambda id: native_get(native, id), lambda t: native_save(native, t)),
            (
                "trio-native, checked",
                lambda id: native_get(checked, id),
                lambda t: native_save(checked, t),
            ),
        ]
        for _, get, save in drivers:  # warm-up: caches, prepared statements, worker threads
            await measure(read_calls(get, ids, WARM_UP), args.concurrency)
            await measure(write_calls(save, rows, WARM_UP), args.concurrency)

        tables = []
        for kind, n in (("read", args.reads), ("write", args.writes)):
            table: list[list[str]] = []
            for callers in (1, args.concurrency):
                for name, get, save in drivers:
                    calls = (
                        read_calls(get, ids, n) if kind == "read" else write_calls(save, rows, n)
                    )
                    table.append(figure_row(name, callers, *await measure(calls, callers)))
            what = (
                "Store.get: SELECT by tenant and id, the row decoded"
                if kind == "read"
                else "PostgresStore.save: upsert in a transaction, synchronous_commit off"
            )
            tables.append(
                markdown_table(
                    f"{kind.capitalize()}s: {n} calls per row, {what}; rows of {args.segments}"
                    f" segments; pools of {args.pool_size} connections",
                    ["driver", "callers", "p50 ms", "p99 ms", "calls/s", "CPU s / 1,000 calls"],
                    table,
                )
            )
        return "\n".join(tables)


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reads", type=int, default=2000, help="read calls per row")
    parser.add_argument("--writes", type=int, default=500, help="write calls per row")
    parser.add_argument("--rows", type=int, default=100, help="transcripts stored and cycled")
    parser.add_argument("--segments", type=int, default=60, help="segments per transcript")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent callers")
    parser.add_argument("--pool-size", type=int, default=4, help="connections per driver")
    args = parser.parse_args()
    if min(args.reads, args.writes, args.rows, args.segments, args.concurrency) < 1:
        parser.error("every count must be at least 1")

    print("# PostgreSQL driver: worker threads vs trio-native libpq (bench/pg_driver.py)\n")
    print(machine(("trio", "anyio", "psycopg", "psycopg-binary", "psycopg-pool")))
    print(f"psycopg.pq: {pq.__impl__} implementation, libpq {pq.version()}")
    print(f"load average at start: {load_average()}")
    started = time.perf_counter()
    with postgres() as pg:
        print(f"PostgreSQL: {pg.bin_dir.parent.name} ({pg.bin_dir}), fsync=off, on loopback")
        url = pg.create_database()
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn)
        print(trio.run(run, url, args))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
