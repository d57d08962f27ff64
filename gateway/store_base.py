"""The store's seam: the abstract :class:`Store` the rest of the gateway uses, and what its two
backends share (the stored record, content UUIDs, the corrections' time check, the column
codecs). The SQLite backend lives in :mod:`gateway.store` (with ``open_store``, which picks the
backend), the PostgreSQL one in :mod:`gateway.store_pg`.

Every backend keeps the same promises: only complete transcripts are written, each in one
transaction; rows are per tenant; writing a transcript again keeps its human corrections; a
schema newer than the code is refused at start-up (StoreError); a caller cancelled mid-write
never leaves half a row.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from typing import Any

import msgspec

from .errors import InvalidBody
from .events import MAX_SECONDS, Segment, Transcript, Word

__all__ = [
    "CORRECT_SQL",
    "SAVE_SQL",
    "SELECT_COLUMNS",
    "Store",
    "StoredTranscript",
    "check_times",
    "content_uuid",
    "decode_row",
    "encode_segments",
    "save_params",
]

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


# The columns every backend reads for ``get``, in this order (see decode_row).
SELECT_COLUMNS = (
    "engine, language, segments, words, text, duration, created_at, corrected, corrected_at"
)


# The writes both backends run, with sqlite3's "?" placeholders (store_pg turns them into "%s").
# A transcript written again keeps its corrections: the upsert leaves ``corrected`` alone.
SAVE_SQL = (
    "INSERT INTO transcripts (tenant, id, uuid, engine, language, segments, words, text,"
    " duration, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (tenant, id) DO UPDATE SET engine = excluded.engine,"
    " language = excluded.language, segments = excluded.segments, words = excluded.words,"
    " text = excluded.text, duration = excluded.duration, created_at = excluded.created_at"
)
CORRECT_SQL = "UPDATE transcripts SET corrected = ?, corrected_at = ? WHERE tenant = ? AND id = ?"


def decode_row(id: str, row: tuple[Any, ...]) -> StoredTranscript:
    """A StoredTranscript from a row of ``SELECT_COLUMNS``."""
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


def encode_segments(segments: tuple[Segment, ...] | tuple[Word, ...]) -> bytes:
    return _segments_enc.encode(segments)


def save_params(transcript: Transcript, tenant: str) -> tuple[Any, ...]:
    """The values of a saved row: tenant, id, uuid, engine, language, segments, words, text,
    duration, created_at."""
    return (
        tenant,
        transcript.id,
        content_uuid(transcript.id),
        transcript.engine,
        transcript.language,
        encode_segments(transcript.segments),
        encode_segments(transcript.words),
        transcript.text,
        transcript.total_time if transcript.total_time is not None else transcript.current_time,
        time.time(),
    )


class Store(ABC):
    """Transcripts by (tenant, content id). Database failures raise StoreError."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where the data is, for logs: a file path or a URL without its password."""

    @abstractmethod
    async def _fetch_one(self, query: str, params: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """The first row of a read-only ``query`` written with ``?`` placeholders."""

    async def get(self, id: str, tenant: str = "") -> StoredTranscript | None:
        """The stored transcript, or None."""
        row = await self._fetch_one(
            f"SELECT {SELECT_COLUMNS} FROM transcripts WHERE tenant = ? AND id = ?", (tenant, id)
        )
        return None if row is None else decode_row(id, row)

    @abstractmethod
    async def save(self, transcript: Transcript, tenant: str = "") -> None:
        """Store a complete transcript; an existing row's corrections are kept."""

    async def find_uuid(self, uuid: str, tenant: str = "") -> str | None:
        """The id whose UUID form is ``uuid``, if that transcript is stored."""
        row = await self._fetch_one(
            "SELECT id FROM transcripts WHERE tenant = ? AND uuid = ?", (tenant, uuid)
        )
        return None if row is None else str(row[0])

    async def set_corrections(
        self, id: str, segments: tuple[Segment, ...], tenant: str = ""
    ) -> bool:
        """Save human-corrected segments; False when the transcript is unknown. Times are checked
        here, for every front API and every backend (:func:`check_times`)."""
        check_times(segments)
        return await self._save_corrections(id, encode_segments(segments), tenant)

    @abstractmethod
    async def _save_corrections(self, id: str, segments: bytes, tenant: str) -> bool:
        """Write encoded corrections durably (see each backend's docstring); False when the
        transcript is unknown."""

    @abstractmethod
    async def check_writable(self) -> str | None:
        """``None`` when a write transaction can be taken, otherwise the reason."""
