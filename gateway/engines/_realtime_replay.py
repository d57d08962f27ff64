"""The OpenAI Realtime client's audio bookkeeping: the data lane, the replay ledger, the offset map.

Pure data structures, driven by :mod:`gateway.engines._realtime_client` and tested by feeding
them: no I/O, no clock, no trio. This module never imports the client, the engine or the
network (trio, trio-websocket).

Offsets
    The *stream offset* of a byte is where it sits in the gateway session's audio (24 kHz PCM
    bytes since the stream began). The *session offset* is where it sits in what one upstream
    session was sent. They differ once audio was dropped before ready or replayed after a
    reconnect; an :class:`OffsetMap` translates the upstream's times back to ours.

Replay policy
    Every data-lane entry written to a connection moves into that connection's
    :class:`Ledger`. An entry leaves the ledger once it is covered: its audio ends at or before
    the end of the last item of the assembler's stable prefix, that is, a committed item whose
    transcript completed and all before it too. When a connection is lost, its ledger (sent but
    not covered) goes back to the head of the :class:`DataLane`, ahead of audio never sent, and
    is sent again in order, like any other data, once the *new* connection is ready: never
    before ``session.updated``. Each entry lives in exactly one place (lane or one connection's
    ledger), so nothing is sent twice to the same upstream session, and because the items of
    the lost session that had not completed are discarded with it, no audio is transcribed
    twice either. The frame being written when the connection failed is already in the ledger
    and is replayed too. A new gateway session is a new client: it never sees another
    session's audio.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

__all__ = [
    "AudioChunk",
    "CommitMark",
    "DataLane",
    "LaneEntry",
    "Ledger",
    "OffsetMap",
]


@dataclass(eq=False, slots=True)
class AudioChunk:
    data: bytes
    # Where its first byte sits on the stream clock (24 kHz PCM bytes since the stream began).
    offset: int
    # Already sent to an earlier upstream session: this is a replay.
    replay: bool = False


@dataclass(eq=False, slots=True)
class CommitMark:
    # Requested while not ready: a later pre-ready request replaces it (coalescing).
    pre_ready: bool = False
    # The commit ``end()`` asked for.
    final: bool = False


LaneEntry = AudioChunk | CommitMark


class DataLane:
    """The FIFO of appends and commit barriers, bounded to ``cap`` raw PCM bytes when asked.

    ``enforce_cap`` drops the oldest whole audio chunks until the audio fits; commit marks
    survive the drops. A single chunk larger than the whole cap keeps only its newest ``cap``
    bytes (sample-aligned). The retained audio is therefore always the newest suffix of what
    was pushed, never more than ``cap`` bytes.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._entries: deque[LaneEntry] = deque()
        self.audio_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LaneEntry]:
        return iter(self._entries)

    def push_audio(self, chunk: AudioChunk, *, bounded: bool) -> tuple[int, int]:
        """Append ``chunk``; with ``bounded`` enforce the cap. Returns (dropped chunks, bytes)."""
        self._entries.append(chunk)
        self.audio_bytes += len(chunk.data)
        return self.enforce_cap() if bounded else (0, 0)

    def push_commit(self, mark: CommitMark, *, coalesce: bool) -> None:
        if coalesce:
            for entry in [e for e in self._entries if isinstance(e, CommitMark) and e.pre_ready]:
                mark.final = mark.final or entry.final
                self._entries.remove(entry)
        self._entries.append(mark)

    def prepend(self, entries: Iterable[LaneEntry]) -> None:
        items = list(entries)
        self._entries.extendleft(reversed(items))
        self.audio_bytes += sum(len(e.data) for e in items if isinstance(e, AudioChunk))

    def popleft(self) -> LaneEntry | None:
        if not self._entries:
            return None
        entry = self._entries.popleft()
        if isinstance(entry, AudioChunk):
            self.audio_bytes -= len(entry.data)
        return entry

    @property
    def last(self) -> LaneEntry | None:
        return self._entries[-1] if self._entries else None

    def enforce_cap(self) -> tuple[int, int]:
        chunks = nbytes = 0
        while self.audio_bytes > self.cap:
            marks: list[LaneEntry] = []
            while not isinstance(self._entries[0], AudioChunk):
                marks.append(self._entries.popleft())
            oldest = self._entries[0]
            assert isinstance(oldest, AudioChunk)
            keep = self.cap - self.cap % 2
            if len(oldest.data) == self.audio_bytes and keep > 0:
                cut = len(oldest.data) - keep
                oldest.data = oldest.data[cut:]
                oldest.offset += cut
            else:
                cut = len(oldest.data)
                self._entries.popleft()
            self.audio_bytes -= cut
            chunks += 1
            nbytes += cut
            self._entries.extendleft(reversed(marks))
        return chunks, nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.audio_bytes = 0


class Ledger:
    """What one upstream session was sent and has not yet covered: the replay set.

    Entries are kept with their session offset, in the order they were written.
    """

    def __init__(self) -> None:
        self._entries: deque[tuple[int, LaneEntry]] = deque()
        #: Audio bytes held.
        self.audio_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, offset: int, entry: LaneEntry) -> None:
        """``entry`` was written to the upstream session at session offset ``offset``."""
        self._entries.append((offset, entry))
        if isinstance(entry, AudioChunk):
            self.audio_bytes += len(entry.data)

    def cover(self, upto: int) -> None:
        """Forget entries whose audio ends at or before session offset ``upto``."""
        while self._entries:
            start, entry = self._entries[0]
            if isinstance(entry, CommitMark):
                if start > upto:
                    break
                self._entries.popleft()
                continue
            end = start + len(entry.data)
            if end <= upto:
                self._entries.popleft()
                self.audio_bytes -= len(entry.data)
                continue
            if start < upto:
                cut = upto - start
                entry.data = entry.data[cut:]
                entry.offset += cut
                self._entries[0] = (upto, entry)
                self.audio_bytes -= cut
            break

    def trim(self, cap: int) -> int:
        """Keep the replay set within ``cap`` bytes; returns the bytes that can no longer replay."""
        lost = 0
        while self.audio_bytes > cap and self._entries:
            _, entry = self._entries.popleft()
            if isinstance(entry, AudioChunk):
                self.audio_bytes -= len(entry.data)
                lost += len(entry.data)
        return lost

    def take_replay(self) -> list[LaneEntry]:
        """Empty the ledger into what a new upstream session must be sent again, in order:
        its audio marked as a replay, and a fresh barrier for each commit."""
        replay: list[LaneEntry] = []
        for _, entry in self._entries:
            if isinstance(entry, AudioChunk):
                entry.replay = True
                replay.append(entry)
            else:
                replay.append(CommitMark(final=entry.final))
        self.clear()
        return replay

    def clear(self) -> None:
        self._entries.clear()
        self.audio_bytes = 0


class OffsetMap:
    """Session offsets to stream offsets for one upstream session (see Offsets above)."""

    def __init__(self) -> None:
        # (session offset, stream offset) at each discontinuity.
        self._spans: list[tuple[int, int]] = []

    def note(self, session_offset: int, stream_offset: int) -> None:
        """Audio from ``stream_offset`` was sent at ``session_offset`` (a new span if that is
        not where the current span would put it)."""
        if not self._spans or self.stream_offset(session_offset) != stream_offset:
            self._spans.append((session_offset, stream_offset))

    def stream_offset(self, session_offset: int) -> int:
        if not self._spans:
            return session_offset
        base_session, base_stream = self._spans[0]
        for s, t in self._spans:
            if s > session_offset:
                break
            base_session, base_stream = s, t
        return base_stream + session_offset - base_session
