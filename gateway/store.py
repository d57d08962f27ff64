"""Transcripts in SQLite, on one dedicated worker thread.

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
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
import msgspec

from .errors import InvalidBody, StoreError, collapse_groups
from .events import MAX_SECONDS, Segment, Transcript, Word

__all__ = [
    "SCHEMA_VERSION",
    "Store",
    "StoredTranscript",
    "check_times",
    "content_uuid",
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

_segments_enc = msgspec.json.Encoder()
_segments_dec = msgspec.json.Decoder(tuple[Segment, ...])
_words_dec = msgspec.json.Decoder(tuple[Word, ...])


def content_uuid(id: str) -> str:
    """The UUID form of a content id: ``uuid5(NAMESPACE_DNS, id)``."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, id))


def check_times(segments: tuple[Segment, ...]) -> None:
    """Refuse (InvalidBody) human-made segments whose times some view could not render: every
    time within 0..MAX_SECONDS, and no segment ending before it starts. NaN fails every test."""
    for i, s in enumerate(segments):
        if not (0 <= s.start <= s.end <= MAX_SECONDS):
            raise InvalidBody(
                f"segment {i}: need 0 <= start <= end <= {MAX_SECONDS:.0f},"
                f" got start {s.start!r}, end {s.end!r}"
            )


class StoredTranscript(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    engine: str
    language: str
    segments: tuple[Segment, ...]
    words: tuple[Word, ...]
    text: str
    duration: float | None
    created_at: float
    corrected: tuple[Segment, ...] | None = None
    corrected_at: float | None = None

    @property
    def uuid(self) -> str:
        return content_uuid(self.id)

    def transcript(self, *, corrections: bool = False) -> Transcript:
        """The stored transcript as a final snapshot: the machine's, or with ``corrections`` the
        human-corrected segments when there are any."""
        segments = self.segments
        if corrections and self.corrected is not None:
            segments = self.corrected
        return Transcript(
            id=self.id,
            segments=segments,
            committed=len(segments),
            current_time=self.duration or (segments[-1].end if segments else 0.0),
            total_time=self.duration,
            words=self.words if segments is self.segments else (),
            engine=self.engine,
            language=self.language,
        )


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


class Store:
    def __init__(self, path: str) -> None:
        self.path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False

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
    async def get(self, id: str, tenant: str = "") -> StoredTranscript | None:
        def q(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT engine, language, segments, words, text, duration, created_at,"
                " corrected, corrected_at FROM transcripts WHERE tenant = ? AND id = ?",
                (tenant, id),
            ).fetchone()

        row = await self._call(q)
        if row is None:
            return None
        engine, language, segs, words, text, duration, created, corrected, corrected_at = row
        return StoredTranscript(
            id=id,
            engine=engine,
            language=language,
            segments=_segments_dec.decode(segs),
            words=_words_dec.decode(words),
            text=text,
            duration=duration,
            created_at=created,
            corrected=_segments_dec.decode(corrected) if corrected is not None else None,
            corrected_at=corrected_at,
        )

    async def save(self, transcript: Transcript, tenant: str = "") -> None:
        """Store a complete transcript; an existing row's corrections are kept."""
        params = (
            tenant,
            transcript.id,
            content_uuid(transcript.id),
            transcript.engine,
            transcript.language,
            _segments_enc.encode(transcript.segments),
            _segments_enc.encode(transcript.words),
            transcript.text,
            transcript.total_time if transcript.total_time is not None else transcript.current_time,
            time.time(),
        )

        def q(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO transcripts (tenant, id, uuid, engine, language, segments, words,"
                " text, duration, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (tenant, id) DO UPDATE SET engine = excluded.engine,"
                " language = excluded.language, segments = excluded.segments,"
                " words = excluded.words, text = excluded.text, duration = excluded.duration,"
                " created_at = excluded.created_at",
                params,
            )

        await self._call(q)

    async def find_uuid(self, uuid: str, tenant: str = "") -> str | None:
        """The id whose UUID form is ``uuid``, if that transcript is stored."""

        def q(conn: sqlite3.Connection) -> Any:
            return conn.execute(
                "SELECT id FROM transcripts WHERE tenant = ? AND uuid = ?", (tenant, uuid)
            ).fetchone()

        row = await self._call(q)
        return None if row is None else str(row[0])

    async def set_corrections(
        self, id: str, segments: tuple[Segment, ...], tenant: str = ""
    ) -> bool:
        """Save human-corrected segments; False when the transcript is unknown. Times are checked
        here, for every front API (:func:`check_times`)."""
        check_times(segments)
        blob = _segments_enc.encode(segments)

        def q(conn: sqlite3.Connection) -> bool:
            # Durable across a power loss too (see the module docstring): the setting applies to
            # the commit of this one autocommit statement.
            conn.execute("PRAGMA synchronous=FULL")
            try:
                cur = conn.execute(
                    "UPDATE transcripts SET corrected = ?, corrected_at = ?"
                    " WHERE tenant = ? AND id = ?",
                    (blob, time.time(), tenant, id),
                )
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


@asynccontextmanager
async def open_store(path: str) -> AsyncIterator[Store]:
    """Open (creating and migrating) the database and run its thread until the block exits."""
    store = Store(os.fspath(path))
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
