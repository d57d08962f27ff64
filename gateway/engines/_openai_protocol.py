"""OpenAI Realtime transcription, GA shape: wire frames <-> frozen msgspec structs. No I/O.

Client events (``session.update``, ``input_audio_buffer.append`` / ``.commit``) are built as
structs and encoded to the text of one WebSocket frame. Server events are decoded into structs;
an event type this module does not know decodes to ``None`` and must be ignored, because OpenAI
adds event types (``conversation.item.added``, ``input_audio_buffer.timeout_triggered``, ...).

:class:`TranscriptAssembler` turns the item events into cumulative
:class:`~gateway.events.EngineUpdate` snapshots; :func:`apply_event` is the one dispatch from a
decoded event to the assembler, used by the engine and by the tests that feed it frames.

Only the GA shape is spoken: the beta one (``OpenAI-Beta`` header, ``transcription_session.*``)
was shut down and is answered with close code 4000.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from ..config import OpenAIRealtimeConfig
from ..events import EngineUpdate, Segment

__all__ = [
    "BYTES_PER_MS",
    "BYTES_PER_SECOND",
    "COMMIT_EMPTY",
    "INVALID_REQUEST",
    "MIN_COMMIT_BYTES",
    "SAMPLE_RATE",
    "SESSION_EXPIRED",
    "Cleared",
    "Committed",
    "ErrorEvent",
    "ErrorInfo",
    "InputAudioBufferAppend",
    "InputAudioBufferCommit",
    "ServerEvent",
    "SessionCreated",
    "SessionUpdate",
    "SessionUpdated",
    "SpeechStarted",
    "SpeechStopped",
    "TranscriptAssembler",
    "TranscriptionCompleted",
    "TranscriptionDelta",
    "TranscriptionFailed",
    "apply_event",
    "build_session_update",
    "decode_server_event",
    "encode_append",
    "encode_client_event",
    "encode_commit",
]

# "pcm16" on the wire: 16-bit little-endian mono at 24 kHz, the only PCM rate OpenAI accepts.
SAMPLE_RATE: Final = 24_000
BYTES_PER_SECOND: Final = SAMPLE_RATE * 2
BYTES_PER_MS: Final = BYTES_PER_SECOND // 1000
# OpenAI rejects a commit of less than 100 ms with input_audio_buffer_commit_empty.
MIN_COMMIT_BYTES: Final = 100 * BYTES_PER_MS

COMMIT_EMPTY: Final = "input_audio_buffer_commit_empty"
SESSION_EXPIRED: Final = "session_expired"
INVALID_REQUEST: Final = "invalid_request_error"


# -- client events ------------------------------------------------------------------------------


class AudioFormat(Struct, frozen=True):
    type: str = "audio/pcm"
    rate: int = SAMPLE_RATE


class TranscriptionSettings(Struct, frozen=True, omit_defaults=True):
    model: str
    language: str | UnsetType = UNSET
    prompt: str | UnsetType = UNSET


class ServerVad(Struct, frozen=True, kw_only=True):
    type: str = "server_vad"
    threshold: float
    prefix_padding_ms: int
    silence_duration_ms: int


class NoiseReduction(Struct, frozen=True):
    type: str


class AudioInput(Struct, frozen=True):
    format: AudioFormat
    transcription: TranscriptionSettings
    # Always present: null is meaningful (VAD off, noise reduction off).
    turn_detection: ServerVad | None
    noise_reduction: NoiseReduction | None


class AudioSettings(Struct, frozen=True):
    input: AudioInput


class TranscriptionSession(Struct, frozen=True, kw_only=True):
    type: Literal["transcription"] = "transcription"
    audio: AudioSettings


class SessionUpdate(Struct, frozen=True, tag="session.update", tag_field="type"):
    session: TranscriptionSession


class InputAudioBufferAppend(
    Struct, frozen=True, tag="input_audio_buffer.append", tag_field="type"
):
    # Raw PCM16; msgspec encodes bytes as base64, which is what the field carries on the wire.
    audio: bytes


class InputAudioBufferCommit(
    Struct, frozen=True, omit_defaults=True, tag="input_audio_buffer.commit", tag_field="type"
):
    # Optional; an ``error`` this commit causes (commit_empty) names it in ``error.event_id``.
    event_id: str | UnsetType = UNSET


ClientEvent = SessionUpdate | InputAudioBufferAppend | InputAudioBufferCommit

_encoder = msgspec.json.Encoder()


def build_session_update(config: OpenAIRealtimeConfig, *, language: str = "") -> SessionUpdate:
    """The GA ``session.update`` for a transcription session; ``language`` overrides the config's."""
    language = language or config.language
    vad = (
        ServerVad(
            threshold=config.vad_threshold,
            prefix_padding_ms=config.vad_prefix_padding_ms,
            silence_duration_ms=config.vad_silence_duration_ms,
        )
        if config.turn_detection == "server_vad"
        else None
    )
    noise = None if config.noise_reduction == "none" else NoiseReduction(config.noise_reduction)
    return SessionUpdate(
        TranscriptionSession(
            audio=AudioSettings(
                AudioInput(
                    format=AudioFormat(),
                    transcription=TranscriptionSettings(
                        model=config.model,
                        language=language or UNSET,
                        prompt=config.prompt or UNSET,
                    ),
                    turn_detection=vad,
                    noise_reduction=noise,
                )
            )
        )
    )


def encode_client_event(event: ClientEvent) -> str:
    """The text of the WebSocket frame that carries ``event`` (OpenAI expects text frames)."""
    return _encoder.encode(event).decode()


def encode_append(pcm: bytes) -> str:
    return encode_client_event(InputAudioBufferAppend(pcm))


_COMMIT_FRAME: Final = encode_client_event(InputAudioBufferCommit())


def encode_commit(event_id: str = "") -> str:
    """A commit frame; with ``event_id`` the server can name it in an error it causes."""
    if not event_id:
        return _COMMIT_FRAME
    return encode_client_event(InputAudioBufferCommit(event_id=event_id))


# -- server events ------------------------------------------------------------------------------


class ErrorInfo(Struct, frozen=True):
    type: str = ""
    code: str | None = None
    message: str = ""
    param: str | None = None
    event_id: str | None = None


class _ServerEvent(Struct, frozen=True, kw_only=True, tag_field="type"):
    event_id: str = ""


class SessionCreated(_ServerEvent, frozen=True, tag="session.created"):
    pass


class SessionUpdated(_ServerEvent, frozen=True, tag="session.updated"):
    pass


class SpeechStarted(_ServerEvent, frozen=True, tag="input_audio_buffer.speech_started"):
    item_id: str
    # Offset into all audio written to this upstream session, prefix padding included.
    audio_start_ms: int = 0


class SpeechStopped(_ServerEvent, frozen=True, tag="input_audio_buffer.speech_stopped"):
    item_id: str
    audio_end_ms: int = 0


class Committed(_ServerEvent, frozen=True, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None = None


class Cleared(_ServerEvent, frozen=True, tag="input_audio_buffer.cleared"):
    pass


class TranscriptionDelta(
    _ServerEvent, frozen=True, tag="conversation.item.input_audio_transcription.delta"
):
    item_id: str
    delta: str = ""
    content_index: int = 0


class TranscriptionCompleted(
    _ServerEvent, frozen=True, tag="conversation.item.input_audio_transcription.completed"
):
    item_id: str
    transcript: str = ""
    content_index: int = 0


class TranscriptionFailed(
    _ServerEvent, frozen=True, tag="conversation.item.input_audio_transcription.failed"
):
    item_id: str
    error: ErrorInfo = ErrorInfo()
    content_index: int = 0


class ErrorEvent(_ServerEvent, frozen=True, tag="error"):
    error: ErrorInfo = ErrorInfo()


ServerEvent = (
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | Committed
    | Cleared
    | TranscriptionDelta
    | TranscriptionCompleted
    | TranscriptionFailed
    | ErrorEvent
)


class _Envelope(Struct):
    type: str


_envelope = msgspec.json.Decoder(_Envelope)
_decoders: dict[str, msgspec.json.Decoder[ServerEvent]] = {
    cls.__struct_config__.tag: msgspec.json.Decoder(cls)  # type: ignore[misc]
    for cls in (
        SessionCreated,
        SessionUpdated,
        SpeechStarted,
        SpeechStopped,
        Committed,
        Cleared,
        TranscriptionDelta,
        TranscriptionCompleted,
        TranscriptionFailed,
        ErrorEvent,
    )
}


def decode_server_event(frame: str | bytes) -> ServerEvent | None:
    """Decode one server frame; ``None`` for an event type we do not know (ignore it).

    Raises:
        msgspec.DecodeError: the frame is not JSON, has no ``type``, or a known event is malformed.
    """
    kind = _envelope.decode(frame).type
    decoder = _decoders.get(kind)
    return None if decoder is None else decoder.decode(frame)


# -- transcript assembly ------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    item_id: str
    committed: bool = False
    partial: str = ""
    final: str | None = None
    failed: bool = False
    start: float | None = None
    end: float | None = None


class TranscriptAssembler:
    """Builds cumulative transcripts from item events, in ``previous_item_id`` order.

    Why a stable prefix: transcriptions run asynchronously, so item B may complete before the
    item A that precedes it. An :class:`EngineUpdate`'s ``committed`` tuple must only ever grow,
    so it holds the longest prefix of the item order whose items are all committed upstream and
    completed (or failed); everything after it, including items already completed out of order,
    is ``tentative`` until the prefix reaches it. Items of the stable prefix never move again.

    Order: ``input_audio_buffer.committed`` places an item right after its ``previous_item_id``;
    without one (the first item of a new upstream session) it goes after the last committed
    item. Items known only from ``speech_started`` or a delta wait at the tail.

    Times are stream seconds supplied by the caller; missing ones are filled from the neighbours
    and every segment is clamped so that times never go backwards.
    """

    def __init__(self) -> None:
        self._items: dict[str, _Item] = {}
        self._order: list[str] = []
        self._stable = 0
        self._stable_segments: list[Segment] = []
        self._stable_end = 0.0

    # -- inputs -----------------------------------------------------------------------------
    def _get(self, item_id: str) -> _Item:
        item = self._items.get(item_id)
        if item is None:
            item = self._items[item_id] = _Item(item_id)
            self._order.append(item_id)
        return item

    def speech_started(self, item_id: str, start: float) -> None:
        item = self._get(item_id)
        item.start = start

    def speech_stopped(self, item_id: str, end: float) -> None:
        self._get(item_id).end = end

    def committed(
        self,
        item_id: str,
        previous_item_id: str | None,
        *,
        start: float | None = None,
        end: float | None = None,
    ) -> None:
        item = self._get(item_id)
        if item.start is None:
            item.start = start
        if item.end is None:
            item.end = end
        position = self._order.index(item_id)
        if position < self._stable:
            return
        item.committed = True
        del self._order[position]
        if previous_item_id is not None and previous_item_id in self._items:
            where = self._order.index(previous_item_id) + 1
        else:
            where = self._stable
            for i in range(len(self._order) - 1, self._stable - 1, -1):
                if self._items[self._order[i]].committed:
                    where = i + 1
                    break
        self._order.insert(max(where, self._stable), item_id)
        self._advance()

    def delta(self, item_id: str, text: str) -> None:
        item = self._get(item_id)
        if item.final is None:
            item.partial += text

    def completed(self, item_id: str, transcript: str) -> None:
        item = self._get(item_id)
        if item.final is None:
            item.final = transcript
            item.partial = ""
        self._advance()

    def failed(self, item_id: str) -> None:
        """The item resolves to an empty final; the caller reports the error."""
        item = self._get(item_id)
        if item.final is None:
            item.final = ""
            item.partial = ""
            item.failed = True
        self._advance()

    def discard_unstable(self) -> list[str]:
        """Forget every item after the stable prefix (their upstream session is gone)."""
        dropped = self._order[self._stable :]
        for item_id in dropped:
            del self._items[item_id]
        del self._order[self._stable :]
        return dropped

    def drop_uncommitted(self) -> list[str]:
        """Forget items that were never committed upstream (e.g. speech cut by the end of audio)."""
        dropped = [
            i
            for i in self._order[self._stable :]
            if not self._items[i].committed and self._items[i].final is None
        ]
        for item_id in dropped:
            del self._items[item_id]
            self._order.remove(item_id)
        return dropped

    # -- state ------------------------------------------------------------------------------
    def _advance(self) -> None:
        while self._stable < len(self._order):
            item = self._items[self._order[self._stable]]
            if not (item.committed and item.final is not None):
                break
            segment = self._segment(item, self._stable_end, item.final, tail=0.0)
            self._stable_end = segment.end
            if segment.text.strip():
                self._stable_segments.append(segment)
            self._stable += 1

    @staticmethod
    def _segment(item: _Item, after: float, text: str, tail: float) -> Segment:
        start = after if item.start is None else max(item.start, after)
        end = item.end if item.end is not None else max(start, tail)
        return Segment(start, max(end, start), text)

    @property
    def last_stable_id(self) -> str | None:
        return self._order[self._stable - 1] if self._stable else None

    @property
    def pending(self) -> int:
        """Items after the stable prefix: not yet committed, not yet completed, or out of order."""
        return len(self._order) - self._stable

    @property
    def incomplete(self) -> int:
        """Items with no final transcript yet (committed or not)."""
        return sum(self._items[i].final is None for i in self._order[self._stable :])

    def is_stable(self, item_id: str) -> bool:
        return item_id in self._items and self._order.index(item_id) < self._stable

    def snapshot(self, processed: float, *, final: bool = False) -> EngineUpdate:
        """The transcript so far; with ``final`` every remaining item counts as committed."""
        committed = list(self._stable_segments)
        tentative: list[Segment] = []
        after = self._stable_end
        for item_id in self._order[self._stable :]:
            item = self._items[item_id]
            text = item.final if item.final is not None else item.partial
            segment = self._segment(item, after, text, tail=processed)
            after = segment.end
            if segment.text.strip():
                (committed if final else tentative).append(segment)
        return EngineUpdate(
            committed=tuple(committed), tentative=tuple(tentative), processed=processed
        )


def _ms_to_seconds(ms: int) -> float:
    return ms / 1000


def apply_event(
    assembler: TranscriptAssembler,
    event: ServerEvent,
    *,
    seconds: Callable[[int], float] = _ms_to_seconds,
    commit_start: float | None = None,
    commit_end: float | None = None,
) -> bool:
    """Feed one decoded server event to ``assembler``; ``True`` when the transcript may change.

    ``seconds`` maps an upstream audio offset in ms to stream seconds. ``commit_start`` and
    ``commit_end`` give a committed item's times when no speech events carried them (manual
    commits).
    """
    match event:
        case SpeechStarted(item_id=item_id, audio_start_ms=ms):
            assembler.speech_started(item_id, seconds(ms))
        case SpeechStopped(item_id=item_id, audio_end_ms=ms):
            assembler.speech_stopped(item_id, seconds(ms))
        case Committed(item_id=item_id, previous_item_id=previous):
            assembler.committed(item_id, previous, start=commit_start, end=commit_end)
        case TranscriptionDelta(item_id=item_id, delta=text):
            assembler.delta(item_id, text)
        case TranscriptionCompleted(item_id=item_id, transcript=text):
            assembler.completed(item_id, text)
        case TranscriptionFailed(item_id=item_id):
            assembler.failed(item_id)
        case _:
            return False
    return True
