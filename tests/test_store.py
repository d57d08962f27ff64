"""The store: the SQLite backend on its dedicated thread (persistence, atomic saves, schema), and
the semantics both backends share, run against SQLite and a real PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
import trio

from gateway.errors import InvalidBody, StoreError
from gateway.events import MAX_SECONDS, Segment, Transcript
from gateway.store import SCHEMA_VERSION, open_store

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a backend-neutral test opens its store: a SQLite file, or a fresh PostgreSQL
    database on the session's throwaway cluster."""
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "g.sqlite3")


def transcript(id: str, text: str) -> Transcript:
    segs = (Segment(0.0, 1.0, text),)
    return Transcript(
        id=id, segments=segs, committed=1, current_time=1.0, total_time=1.0, engine="e"
    )


async def test_survives_a_reopen_in_wal_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "db" / "g.sqlite3")
    with trio.fail_after(10):
        async with open_store(path) as store:
            await store.save(transcript("a", "hello"))
        async with open_store(path) as store:
            got = await store.get("a")
            assert got is not None and got.text == "hello" and got.segments[0].text == "hello"
            assert await store.get("b") is None
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


async def test_resaving_keeps_human_corrections(target: str) -> None:
    with trio.fail_after(10):
        async with open_store(target) as store:
            await store.save(transcript("a", "helo"))
            assert await store.set_corrections("a", (Segment(0.0, 1.0, "Hello."),))
            assert not await store.set_corrections("zzz", ())
            await store.save(transcript("a", "hello again"))
            got = await store.get("a")
    assert got is not None and got.text == "hello again"
    assert got.corrected == (Segment(0.0, 1.0, "Hello."),)


async def test_tenants_are_separate(target: str) -> None:
    with trio.fail_after(10):
        async with open_store(target) as store:
            await store.save(transcript("a", "mine"), tenant="t1")
            assert await store.get("a", tenant="t2") is None
            assert (await store.get("a", tenant="t1")) is not None


async def test_a_cancelled_caller_does_not_tear_a_write(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with open_store(str(tmp_path / "g.sqlite3")) as store:
            with trio.move_on_after(0):
                await store.save(transcript("a", "complete"))
            # The job was queued before the cancel: it completes, whole.
            got = await store.get("a")
    assert got is not None and got.text == "complete"


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with trio.fail_after(10), pytest.raises(StoreError, match="newer"):
        async with open_store(str(path)):
            pass


async def test_closed_store_refuses_work(target: str) -> None:
    with trio.fail_after(10):
        async with open_store(target) as store:
            pass
        with pytest.raises(StoreError):
            await store.get("a")


async def test_uuid_form_finds_the_id_per_tenant(target: str) -> None:
    # The AymurAI test vector: uuid5(DNS, blake2b(b"hello", digest_size=16).hexdigest()).
    import hashlib

    from gateway.store import content_uuid

    id = hashlib.blake2b(b"hello", digest_size=16).hexdigest()
    assert content_uuid(id) == "6270dbbc-5c59-513c-99ad-d9a25ffdcf0b"
    with trio.fail_after(10):
        async with open_store(target) as store:
            await store.save(transcript(id, "hi"), tenant="t1")
            assert await store.find_uuid(content_uuid(id), tenant="t1") == id
            assert await store.find_uuid(content_uuid(id), tenant="t2") is None


async def test_version_1_database_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    from gateway.store import content_uuid

    path = tmp_path / "g.sqlite3"
    conn = sqlite3.connect(path)
    # Schema 1 as gateways before schema 2 wrote it: a fact the migrations must keep reading.
    conn.execute(
        "CREATE TABLE transcripts (tenant TEXT NOT NULL DEFAULT '', id TEXT NOT NULL,"
        " engine TEXT NOT NULL, language TEXT NOT NULL DEFAULT '', segments BLOB NOT NULL,"
        " words BLOB NOT NULL, text TEXT NOT NULL, duration REAL, created_at REAL NOT NULL,"
        " corrected BLOB, corrected_at REAL, PRIMARY KEY (tenant, id)) WITHOUT ROWID"
    )
    conn.execute(
        "INSERT INTO transcripts (tenant, id, engine, segments, words, text, created_at)"
        " VALUES ('', 'abc', 'e', '[]', '[]', 'old', 1.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    with trio.fail_after(10):
        async with open_store(str(path)) as store:
            got = await store.get("abc")
            assert got is not None and got.text == "old"
            assert await store.find_uuid(content_uuid("abc")) == "abc"


async def test_corrections_view_replaces_segments_and_flags_nothing_else(target: str) -> None:
    with trio.fail_after(10):
        async with open_store(target) as store:
            await store.save(transcript("a", "helo"))
            got = await store.get("a")
            assert got is not None and got.transcript(corrections=True).text == "helo"
            fixed = (Segment(0.0, 1.0, "Hello.", speaker=1, speaker_name="Jueza"),)
            await store.set_corrections("a", fixed)
            got = await store.get("a")
    assert got is not None
    assert got.transcript().text == "helo"
    assert got.transcript(corrections=True).segments == fixed


@pytest.mark.parametrize(
    "segment",
    [
        Segment(0.0, 1e15, "too late"),
        Segment(0.0, math.inf, "never ends"),
        Segment(math.nan, 1.0, "no start"),
        Segment(-0.5, 1.0, "before the start"),
        Segment(2.0, 1.0, "ends before it starts"),
    ],
)
async def test_corrections_with_times_no_view_can_render_are_refused(
    target: str, segment: Segment
) -> None:
    with trio.fail_after(10):
        async with open_store(target) as store:
            await store.save(transcript("a", "helo"))
            with pytest.raises(InvalidBody, match="segment 1"):
                await store.set_corrections("a", (Segment(0.0, 1.0, "fine"), segment))
            # The bound itself is allowed, and so is a zero-length segment.
            assert await store.set_corrections("a", (Segment(MAX_SECONDS, MAX_SECONDS, "last"),))
            got = await store.get("a")
    assert got is not None and got.corrected == (Segment(MAX_SECONDS, MAX_SECONDS, "last"),)


async def test_corrections_commit_with_an_fsync_transcripts_without(tmp_path: Path) -> None:
    """A correction is human work that cannot be made again: its commit runs with
    synchronous=FULL (the WAL is fsynced before the PUT is answered, so it survives a power
    loss); a machine transcript, a cache, commits with NORMAL (no fsync per upload)."""
    statements: list[str] = []
    with trio.fail_after(10):
        async with open_store(str(tmp_path / "g.sqlite3")) as store:
            await store._call(lambda conn: conn.set_trace_callback(statements.append))
            await store.save(transcript("a", "helo"))
            assert await store.set_corrections("a", (Segment(0.0, 1.0, "Hello."),))
            await store.save(transcript("b", "next"))
            level = await store._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
    writes = [i for i, s in enumerate(statements) if s.startswith(("INSERT", "UPDATE"))]
    insert_a, update, insert_b = writes
    assert statements[update - 1] == "PRAGMA synchronous=FULL"
    assert statements[update + 1] == "PRAGMA synchronous=NORMAL"
    assert not any("FULL" in s for s in statements[: update - 1] + statements[update + 1 :])
    assert statements[insert_a].startswith("INSERT") and statements[insert_b].startswith("INSERT")
    assert level == 1  # NORMAL again
