"""WhisperLiveKit's ``/asr`` protocol as pure translation: wire frames in, typed events out.

Nothing here touches a socket. :func:`decode_message` turns one server text frame into a frozen
:data:`WlkEvent`; :class:`Stitcher` turns a session's stream of :class:`Transcription` events,
possibly spread over several connections after drops, into the gateway's cumulative
:class:`~gateway.events.EngineUpdate`. The I/O loop in :mod:`gateway.engines.whisperlivekit`
only moves bytes between the two.

Protocol facts relied on (WhisperLiveKit 0.2.26, full mode):

- the first frame is ``{"type": "config", "useAudioWorklet": bool, "mode": str}``;
- transcription updates carry no ``type``; ``lines`` is the whole transcript so far, resent every
  time; line times are ``H:MM:SS.cc`` strings on the audio-sample clock of *this* connection;
  speaker ``-2`` marks a silence line; ``buffer_transcription`` is the uncommitted tail;
  ``remaining_time_transcription_processing`` is audio received minus audio processed;
- ``{"type": "ready_to_stop"}`` follows the final update once the server has flushed;
- failures are ``{"type": "error", "error": str}`` or an update with ``status: "error"`` (whose
  ``lines`` is empty, so it must never replace the transcript).
"""

from __future__ import annotations

import math

import msgspec

from ..errors import UpstreamError
from ..events import EngineUpdate, Segment

__all__ = [
    "SILENCE_SPEAKER",
    "Line",
    "ReadyToStop",
    "ServerConfig",
    "ServerError",
    "Stitcher",
    "Transcription",
    "Unknown",
    "WlkEvent",
    "decode_message",
    "format_timestamp",
    "parse_timestamp",
]

# WhisperLiveKit's speaker id for a silence line; such lines carry no text and are dropped.
SILENCE_SPEAKER = -2


# -- typed events -----------------------------------------------------------------------------


class Line(msgspec.Struct, frozen=True):
    """One transcript line, times in seconds on the connection's own clock."""

    start: float
    end: float
    text: str
    silence: bool = False


class ServerConfig(msgspec.Struct, frozen=True, tag="config"):
    #: ``useAudioWorklet``: the server expects raw s16le 16 kHz mono, else one encoded stream.
    pcm: bool
    mode: str


class Transcription(msgspec.Struct, frozen=True, tag="transcription"):
    status: str
    lines: tuple[Line, ...]
    #: ``buffer_transcription``: text heard but not yet committed into ``lines``.
    buffer: str
    #: ``remaining_time_transcription_processing``: seconds received but not yet processed.
    backlog: float


class ReadyToStop(msgspec.Struct, frozen=True, tag="ready_to_stop"):
    pass


class ServerError(msgspec.Struct, frozen=True, tag="error"):
    detail: str


class Unknown(msgspec.Struct, frozen=True, tag="unknown"):
    """A message this client does not use (e.g. a future type); it is ignored."""

    kind: str


WlkEvent = ServerConfig | Transcription | ReadyToStop | ServerError | Unknown


# -- wire shapes ------------------------------------------------------------------------------


class _WireLine(msgspec.Struct):
    speaker: int = 1
    text: str | None = None
    start: str | float = 0.0
    end: str | float = 0.0


class _WireMessage(msgspec.Struct):
    type: str | None = None
    use_audio_worklet: bool | None = msgspec.field(default=None, name="useAudioWorklet")
    mode: str = "full"
    status: str = ""
    lines: list[_WireLine] = msgspec.field(default_factory=list)
    buffer_transcription: str = ""
    remaining_time_transcription_processing: float = 0.0
    error: str | None = None


_decoder = msgspec.json.Decoder(_WireMessage)


def parse_timestamp(value: str | float) -> float:
    """``"H:MM:SS.cc"`` (or ``MM:SS``, ``SS.s``, or a number) to seconds."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        seconds = 0.0
        for part in value.strip().split(":"):
            seconds = seconds * 60 + float(part)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"bad timestamp {value!r}")
    return seconds


def format_timestamp(seconds: float) -> str:
    """Seconds to WhisperLiveKit's ``H:MM:SS.cc``."""
    centis = round(seconds * 100)
    hours, centis = divmod(centis, 360_000)
    minutes, centis = divmod(centis, 6_000)
    return f"{hours}:{minutes:02d}:{centis // 100:02d}.{centis % 100:02d}"


def decode_message(message: str | bytes) -> WlkEvent:
    """Translate one server frame.

    Raises:
        UpstreamError: the frame is not a message of this protocol.
    """
    try:
        wire = _decoder.decode(message)
        if wire.type == "config":
            return ServerConfig(pcm=bool(wire.use_audio_worklet), mode=wire.mode)
        if wire.type == "ready_to_stop":
            return ReadyToStop()
        if wire.type == "error":
            return ServerError(wire.error or "unspecified error")
        if wire.type is not None:
            return Unknown(wire.type)
        if wire.status == "error":
            return ServerError(wire.error or "status: error")
        lines = tuple(
            Line(
                start=parse_timestamp(line.start),
                end=parse_timestamp(line.end),
                text=(line.text or "").strip(),
                silence=line.speaker == SILENCE_SPEAKER,
            )
            for line in wire.lines
        )
        return Transcription(
            status=wire.status,
            lines=lines,
            buffer=wire.buffer_transcription.strip(),
            backlog=max(0.0, wire.remaining_time_transcription_processing),
        )
    except (msgspec.DecodeError, ValueError) as exc:
        raise UpstreamError(f"unreadable WhisperLiveKit message: {exc}") from exc


# -- stitching --------------------------------------------------------------------------------


class Stitcher:
    """Builds one append-only transcript from the connections of a session.

    Within a connection, WhisperLiveKit's last line keeps growing until punctuation or a pause
    splits it, so only lines that are no longer last are committed; the last one and
    ``buffer_transcription`` are tentative. A committed segment is frozen as first seen: if the
    server later rewrites an earlier line, the gateway keeps its committed version, because the
    gateway's own contract is that committed segments never change.

    After a drop, :meth:`end_connection` commits every line the lost connection showed (nothing
    more will come from it) and records the resume point: the end of its last line, silence
    included, on the session's clock. The next connection starts at ``offset`` (its lines are
    shifted by it), and, when the audio had to be re-sent from an earlier point (encoded mode
    re-sends the whole upload), its lines whose midpoint lies before ``skip_before`` are
    transcribed again and dropped.
    """

    def __init__(self) -> None:
        self._committed: list[Segment] = []
        self._committed_tuple: tuple[Segment, ...] = ()
        self._offset = 0.0
        self._skip_before = 0.0
        self._lines: tuple[Line, ...] = ()
        self._buffer = ""
        # How many of the current connection's lines are committed.
        self._frozen = 0
        self._resume_point = 0.0

    @property
    def offset(self) -> float:
        """Where the current connection's clock starts, in session seconds."""
        return self._offset

    @property
    def connection_end(self) -> float:
        """End of the current connection's last line (silence included), on its own clock."""
        return max((line.end for line in self._lines), default=0.0)

    @property
    def resume_point(self) -> float:
        """Session seconds from which a new connection would have to resume now."""
        if not self._lines:
            return max(self._resume_point, self._offset)
        return max(self._resume_point, self._offset + self.connection_end)

    def update(self, event: Transcription) -> None:
        self._lines = event.lines
        self._buffer = event.buffer
        while self._frozen < len(self._lines) - 1:
            self._freeze(self._lines[self._frozen])
            self._frozen += 1

    def _freeze(self, line: Line) -> None:
        if line.silence or not line.text:
            return
        start, end = line.start + self._offset, line.end + self._offset
        if (start + end) / 2 < self._skip_before:
            return
        self._committed.append(Segment(start, end, line.text))
        self._committed_tuple = ()

    def _committed_segments(self) -> tuple[Segment, ...]:
        if len(self._committed_tuple) != len(self._committed):
            self._committed_tuple = tuple(self._committed)
        return self._committed_tuple

    def end_connection(self) -> bool:
        """Commit what the current connection showed; True when the resume point advanced."""
        before = self._resume_point
        point = self.resume_point
        for line in self._lines[self._frozen :]:
            self._freeze(line)
        self._lines, self._buffer, self._frozen = (), "", 0
        self._resume_point = point
        return point > before

    def begin_connection(self, offset: float, skip_before: float = 0.0) -> None:
        self._offset = offset
        self._skip_before = skip_before
        self._lines, self._buffer, self._frozen = (), "", 0

    def snapshot(self, processed: float) -> EngineUpdate:
        tentative: list[Segment] = []
        end = self._committed[-1].end if self._committed else 0.0
        for line in self._lines[self._frozen :]:
            if line.silence or not line.text:
                continue
            start = line.start + self._offset
            if (start + line.end + self._offset) / 2 < self._skip_before:
                continue
            end = line.end + self._offset
            tentative.append(Segment(start, end, line.text))
        if self._buffer:
            tentative.append(Segment(end, max(end, processed), self._buffer))
        return EngineUpdate(
            committed=self._committed_segments(), tentative=tuple(tentative), processed=processed
        )

    def finalize(self, processed: float) -> EngineUpdate:
        """The final update, after ``ready_to_stop``: everything shown is committed."""
        buffer = self._buffer
        self.end_connection()
        if buffer:
            # The server flushes its buffer into lines before ready_to_stop; keep any leftover.
            end = self._committed[-1].end if self._committed else 0.0
            self._committed.append(Segment(end, max(end, processed), buffer))
        return EngineUpdate(committed=self._committed_segments(), processed=processed)
