"""The PostgreSQL store on a real, throwaway PostgreSQL (tests/pg.py): two replicas on one
database, durability settings, cancellation, migrations, and PostgreSQL crashing mid-use. The
semantics both backends share are in tests/test_store.py, run against both."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
import trio.testing
from audio_util import GOFORWARD
from blackhole import Blackhole
from conftest import make_config, run_gateway, wait_until
from pg import PgServer, pg_server
from replicas import eventually

from gateway.config import StoreConfig
from gateway.errors import StoreError, StoreUnavailable
from gateway.events import Segment, Transcript
from gateway.store import open_store
from gateway.store_base import content_uuid
from gateway.store_pg import (
    PG_SCHEMA_VERSION,
    PostgresStore,
    migrate,
    open_postgres_store,
    redacted,
    schema_version,
)

pytestmark = pytest.mark.anyio


def transcript(id: str, text: str) -> Transcript:
    segs = (Segment(0.0, 1.0, text),)
    return Transcript(
        id=id, segments=segs, committed=1, current_time=1.0, total_time=1.0, engine="e"
    )


def sql(url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description is not None else []


async def test_open_store_picks_postgresql_by_the_url(pg_url: str) -> None:
    with trio.fail_after(10):
        async with open_store(StoreConfig(url=pg_url, pool_size=2)) as store:
            assert isinstance(store, PostgresStore)
            assert store.location == pg_url
            await store.save(transcript("a", "hello"))
    assert sql(pg_url, "SELECT text FROM transcripts") == [("hello",)]
    assert sql(pg_url, "SELECT version FROM gateway_schema") == [(PG_SCHEMA_VERSION,)]


async def test_two_replicas_share_transcripts_and_corrections(pg_url: str) -> None:
    with trio.fail_after(20):
        async with open_store(pg_url) as one, open_store(pg_url) as two:
            # Both write at once, to distinct ids and to the same ones.
            async with trio.open_nursery() as nursery:
                for i in range(10):
                    nursery.start_soon(one.save, transcript(f"one-{i}", f"by one {i}"))
                    nursery.start_soon(two.save, transcript(f"two-{i}", f"by two {i}"))
                    nursery.start_soon(one.save, transcript(f"both-{i}", "by one"))
                    nursery.start_soon(two.save, transcript(f"both-{i}", "by two"))
            for i in range(10):
                got = await two.get(f"one-{i}")
                assert got is not None and got.text == f"by one {i}"
                got = await one.get(f"two-{i}")
                assert got is not None and got.text == f"by two {i}"
                got = await one.get(f"both-{i}")
                assert got is not None and got.text in ("by one", "by two")
            # Corrected through one replica, read through the other; written again through the
            # first, the correction stays.
            fixed = (Segment(0.0, 1.0, "By one, corrected."),)
            assert await two.set_corrections("one-0", fixed)
            got = await one.get("one-0")
            assert got is not None and got.corrected == fixed and got.corrected_at is not None
            await one.save(transcript("one-0", "by one, again"))
            got = await two.get("one-0")
            assert got is not None and got.text == "by one, again" and got.corrected == fixed
            assert got.transcript(corrections=True).segments == fixed


async def test_tenants_are_separate_across_replicas(pg_url: str) -> None:
    with trio.fail_after(10):
        async with open_store(pg_url) as one, open_store(pg_url) as two:
            await one.save(transcript("a", "t1's"), tenant="t1")
            await two.save(transcript("a", "t2's"), tenant="t2")
            assert not await two.set_corrections("a", (Segment(0.0, 1.0, "x"),), tenant="t3")
            got1, got2 = await two.get("a", tenant="t1"), await one.get("a", tenant="t2")
            assert got1 is not None and got1.text == "t1's"
            assert got2 is not None and got2.text == "t2's"
            assert await one.get("a") is None and await two.get("a", tenant="t3") is None
            assert await two.find_uuid(content_uuid("a"), tenant="t1") == "a"
            assert await two.find_uuid(content_uuid("a"), tenant="t3") is None


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every statement a psycopg connection executes, in order (from any thread)."""
    seen: list[str] = []
    execute = psycopg.Connection.execute

    def spy(self: psycopg.Connection[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(str(query).strip())
        return execute(self, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", spy)
    yield seen


async def test_transcripts_skip_the_wal_flush_corrections_do_not(
    pg_url: str, statements: list[str]
) -> None:
    """A machine transcript is a cache: its transaction commits with synchronous_commit off. A
    correction is human work: its transaction sets synchronous_commit on, whatever the server's
    default, so it is flushed before the PUT is answered."""
    sql(pg_url, "ALTER DATABASE " + pg_url.rsplit("/", 1)[1] + " SET synchronous_commit = off")
    with trio.fail_after(10):
        async with open_store(pg_url) as store:
            statements.clear()
            await store.save(transcript("a", "helo"))
            assert await store.set_corrections("a", (Segment(0.0, 1.0, "Hello."),))
    insert = next(i for i, s in enumerate(statements) if s.startswith("INSERT"))
    update = next(i for i, s in enumerate(statements) if s.startswith("UPDATE"))
    assert statements[insert - 1] == "SET LOCAL synchronous_commit = off"
    assert statements[update - 1] == "SET LOCAL synchronous_commit = on"


async def test_a_cancelled_caller_does_not_tear_a_write(pg_url: str) -> None:
    """A save blocked inside its transaction (another session holds the row) is cancelled by
    its caller: the caller leaves at once, its thread finishes the transaction alone, and the
    row is written whole."""
    with trio.fail_after(20):
        async with open_store(pg_url) as store:
            await store.save(transcript("a", "old"))
            with psycopg.connect(pg_url) as holder:
                holder.execute("SELECT * FROM transcripts WHERE id = 'a' FOR UPDATE")
                returned = trio.Event()
                scope = trio.CancelScope()

                async def save() -> None:
                    with scope:
                        try:
                            await store.save(transcript("a", "new, complete"))
                        finally:
                            returned.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(save)
                    # Poll PostgreSQL (not the clock) until the save waits on the row lock.
                    await wait_until(
                        lambda: bool(
                            sql(
                                pg_url,
                                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                " AND query LIKE 'INSERT INTO transcripts%%'",
                            )
                        )
                    )
                    scope.cancel()
                    # The caller does not wait for a transaction it no longer needs...
                    await returned.wait()
                    assert sql(pg_url, "SELECT text FROM transcripts") == [("old",)]
                    holder.commit()
                # ... which its thread then commits whole.
                await wait_until(
                    lambda: sql(pg_url, "SELECT text FROM transcripts") == [("new, complete",)]
                )
            got = await store.get("a")
    assert got is not None and got.text == "new, complete"


async def test_migrations_from_an_empty_database_run_once_for_replicas_starting_together(
    pg_url: str,
) -> None:
    results: list[int] = []

    def migrate_one() -> None:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            results.append(migrate(conn))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(trio.to_thread.run_sync, migrate_one)
    assert results == [PG_SCHEMA_VERSION] * 4
    assert sql(pg_url, "SELECT version FROM gateway_schema") == [(PG_SCHEMA_VERSION,)]
    tables = {
        t for (t,) in sql(pg_url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    }
    assert tables == {"gateway_schema", "transcripts", "gateway_replicas", "gateway_tickets"}
    indexes = {
        i for (i,) in sql(pg_url, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
    }
    assert {"transcripts_uuid", "gateway_tickets_pool"} <= indexes


async def test_a_version_2_database_migrates_to_3_and_keeps_its_rows(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert schema_version(conn) == 0
        assert migrate(conn, 1) == 1
        conn.execute(
            "INSERT INTO transcripts (id, engine, segments, words, text, created_at)"
            " VALUES ('from-1', 'e', '[]', '[]', 'schema 1', 1.0)"
        )
        assert migrate(conn, 2) == 2  # the uuid column, filled in Python
        conn.execute(
            "INSERT INTO transcripts (tenant, id, uuid, engine, segments, words, text,"
            " created_at, corrected) VALUES ('t', 'from-2', %s, 'e', '[]', '[]', 'schema 2',"
            " 2.0, %s)",
            (content_uuid("from-2"), b'[{"start":0.0,"end":1.0,"text":"Fixed."}]'),
        )
        assert migrate(conn, 1) == 2  # forward only
        assert schema_version(conn) == 2
    with trio.fail_after(10):
        async with open_store(pg_url) as store:
            one, two = await store.get("from-1"), await store.get("from-2", tenant="t")
            assert one is not None and one.text == "schema 1"
            assert two is not None and two.corrected == (Segment(0.0, 1.0, "Fixed."),)
            assert await store.find_uuid(content_uuid("from-1")) == "from-1"
            assert await store.find_uuid(content_uuid("from-2"), tenant="t") == "from-2"
    assert sql(pg_url, "SELECT version FROM gateway_schema") == [(PG_SCHEMA_VERSION,)]
    assert sql(pg_url, "SELECT count(*) FROM gateway_tickets") == [(0,)]


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        migrate(conn)
        conn.execute("UPDATE gateway_schema SET version = %s", (PG_SCHEMA_VERSION + 1,))
        with pytest.raises(StoreError, match="newer"):
            migrate(conn)
    with trio.fail_after(10), pytest.raises(StoreError, match="newer"):
        async with open_store(pg_url):
            pass


async def test_check_writable_tells_a_read_only_database(pg_url: str) -> None:
    with trio.fail_after(10):
        async with open_store(pg_url) as store:
            assert await store.check_writable() is None
        database = pg_url.rsplit("/", 1)[1]
        sql(pg_url, f"ALTER DATABASE {database} SET default_transaction_read_only = on")
        async with open_store(pg_url) as store:
            reason = await store.check_writable()
            assert reason is not None and "read-only" in reason, reason
            assert await store.get("a") is None  # reads still work


async def test_unreachable_postgresql_is_a_bounded_store_error(pg_server: PgServer) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"postgresql://gateway@127.0.0.1:{s.getsockname()[1]}/postgres"
        with trio.fail_after(10), pytest.raises(StoreError, match="cannot connect"):
            async with open_postgres_store(url, max_wait=1.0):
                pass


def test_passwords_stay_out_of_logs() -> None:
    assert redacted("postgresql://gw:s3cret@db:5432/g") == "postgresql://gw:***@db:5432/g"
    assert redacted("postgresql://gw@db/g") == "postgresql://gw@db/g"


async def test_postgresql_crashing_mid_use_fails_calls_then_they_work_again() -> None:
    with pg_server() as server:
        url = server.create_database()
        with trio.fail_after(60):
            async with open_postgres_store(url, pool_size=2, max_wait=1.0) as store:
                await store.save(transcript("before", "saved before the crash"))
                # A machine transcript commits without a WAL flush, and a crash may lose it (a
                # cache); the correction's commit flushes the WAL, the transcript's with it.
                fixed = (Segment(0.0, 1.0, "Corrected before the crash."),)
                assert await store.set_corrections("before", fixed)
                server.stop("immediate")
                # Down: every call fails with a 503 STORE_UNAVAILABLE the client may retry,
                # each within the bound.
                for call in (
                    lambda: store.get("before"),
                    lambda: store.save(transcript("during", "lost")),
                    lambda: store.set_corrections("before", ()),
                ):
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailable) as down:
                        await call()
                    assert time.monotonic() - started < 3
                    assert down.value.status == 503 and down.value.retry_after
                assert (await store.check_writable() or "").startswith("store not writable")
                server.start()
                # Back: the pool reconnects by itself; the next calls work.
                started = time.monotonic()
                got = await store.get("before")
                recovered = time.monotonic() - started
                assert got is not None and got.text == "saved before the crash"
                assert got.corrected == fixed
                await store.save(transcript("after", "saved after the restart"))
                assert await store.get("during") is None
                got = await store.get("after")
                assert got is not None and got.text == "saved after the restart"
                assert await store.check_writable() is None
    print(f"first call after the restart took {recovered:.2f} s")


async def test_a_gateway_with_store_url_keeps_its_transcripts_in_postgresql(
    tmp_path: Path, pg_url: str
) -> None:
    """``store.url`` selects PostgreSQL in ``gateway serve``: a transcript made through the API
    is a row there (no SQLite file is made), and a second gateway on it answers from cache."""
    config = make_config(tmp_path, store={"url": pg_url, "path": str(tmp_path / "unused.db")})
    audio = {"file": (GOFORWARD.name, GOFORWARD.read_bytes(), "audio/wav")}
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            first = (await c.post("/v1/transcriptions", files=audio)).json()
            assert first["cached"] is False and "forward" in first["text"]
        assert sql(pg_url, "SELECT id, text FROM transcripts") == [(first["id"], first["text"])]
        assert not (tmp_path / "unused.db").exists()
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            again = (await c.post("/v1/transcriptions", files=audio)).json()
            assert again["cached"] is True and again["text"] == first["text"]


async def test_a_gateway_without_its_postgresql_answers_503_with_retry_after(
    tmp_path: Path,
) -> None:
    """PostgreSQL down: stored transcripts and new streams get 503 (STORE_UNAVAILABLE or, once
    admission has noticed, UPSTREAM_UNAVAILABLE) with Retry-After, never a 500; once it is back,
    the same requests work."""
    audio = {"file": (GOFORWARD.name, GOFORWARD.read_bytes(), "audio/wav")}
    with pg_server() as server, trio.fail_after(90):
        url = server.create_database()
        config = make_config(
            tmp_path, store={"url": url}, cluster={"heartbeat": 0.2, "lease_ttl": 2.0}
        )
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            made = (await c.post("/v1/transcriptions", files=audio)).json()
            # A clean stop: a crash may lose the last machine transcript (committed without a
            # WAL flush, see store_pg), and this test is about answers, not durability.
            server.stop("fast")
            for request in (
                c.build_request("GET", f"/v1/transcriptions/{made['id']}"),
                c.build_request("POST", "/v1/transcriptions/stream", files=audio),
            ):
                answer = await c.send(request)
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["code"] in (
                    "STORE_UNAVAILABLE",
                    "UPSTREAM_UNAVAILABLE",
                )
                assert int(answer.headers["retry-after"]) >= 1
            server.start()

            async def ready() -> bool:
                return (await c.get("/readyz")).status_code == 200

            await eventually(ready, within=30)
            again = await c.get(f"/v1/transcriptions/{made['id']}")
            assert again.status_code == 200 and again.json()["text"] == made["text"]
            fresh = await c.post("/v1/transcriptions", params={"use_cache": "false"}, files=audio)
            assert fresh.status_code == 200 and fresh.json()["cached"] is False


async def test_a_silent_connection_holds_no_call_past_its_deadline(pg_url: str) -> None:
    """PostgreSQL's path goes silent (a proxy that forwards nothing and closes nothing, so no
    socket timeout fires): every call ends with STORE_UNAVAILABLE at its deadline, three times
    the pool's max_wait, and the store closes."""
    proxy = Blackhole(int(str(psycopg.conninfo.conninfo_to_dict(pg_url)["port"])))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(proxy.serve)
            via_proxy = psycopg.conninfo.make_conninfo(pg_url, port=port)
            async with open_postgres_store(via_proxy, pool_size=1, max_wait=0.5) as store:
                await store.save(transcript("a", "before the cut"))
                proxy.cut()
                for call in (
                    lambda: store.get("a"),
                    lambda: store.save(transcript("b", "after the cut")),
                ):
                    with pytest.raises(StoreUnavailable, match=r"no answer|connection"):
                        await call()
                assert (await store.check_writable() or "").startswith("store not writable")
            nursery.cancel_scope.cancel()
