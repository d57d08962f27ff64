"""The Realtime-compatible endpoint's wire, as pure adapters: frames <-> structs, no I/O.

What the client sends (``session.update``, ``input_audio_buffer.append`` / ``.commit`` /
``.clear``) is decoded into frozen structs, and a session update is merged into the
:class:`Settings` it changes; what the server sends is encoded from the GA event structs the
OpenAI Realtime engine already decodes (:mod:`gateway.engines._openai_protocol`), so the two
sides of the protocol cannot drift apart. Also here, because they are pure algorithms fed with
numbers: G.711 decoding (:func:`g711_to_pcm`) and server VAD turn detection
(:class:`TurnDetector`, fed with Silero's per-window speech probabilities).

Client errors are :class:`WireError` values in OpenAI's shape (``type``, ``code``, ``message``,
``param``, ``event_id``); the endpoint sends them as ``error`` events and keeps the socket open.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, replace
from typing import Any, Final

import msgspec
import numpy as np
from msgspec import UNSET, Struct, UnsetType

from ..engines._openai_protocol import (
    COMMIT_EMPTY,
    INVALID_REQUEST,
    Cleared,
    Committed,
    ErrorEvent,
    ErrorInfo,
    SpeechStarted,
    SpeechStopped,
    TranscriptionDelta,
    TranscriptionFailed,
)

__all__ = [
    "BETA_CODE",
    "BETA_MESSAGE",
    "FORMATS",
    "MIN_COMMIT_MS",
    "QUEUED_EVENT",
    "Append",
    "Clear",
    "ClientEvent",
    "Commit",
    "SessionUpdateIn",
    "Settings",
    "TurnDetector",
    "Vad",
    "WireError",
    "beta_error",
    "cleared",
    "commit_empty",
    "committed",
    "decode_audio",
    "decode_client_event",
    "encode",
    "error_event",
    "g711_to_pcm",
    "item_added",
    "item_done",
    "merge_update",
    "next_delta",
    "queued",
    "session_event",
    "speech_started",
    "speech_stopped",
    "transcription_completed",
    "transcription_delta",
    "transcription_failed",
]

#: The client formats, with the rate of the s16le PCM each becomes before resampling.
FORMATS: Final = {"audio/pcm": 24_000, "audio/pcmu": 8_000, "audio/pcma": 8_000}
MIN_COMMIT_MS: Final = 100
BETA_CODE: Final = "beta_api_shape_disabled"
BETA_MESSAGE: Final = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
#: The gateway's own server event while a turn waits for an engine (clients ignore unknown types).
QUEUED_EVENT: Final = "gateway.queued"

_encoder = msgspec.json.Encoder()


class WireError(Exception):
    """A client event the server refuses: an ``error`` event, the socket stays open."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        kind: str = INVALID_REQUEST,
    ) -> None:
        super().__init__(message)
        self.info = ErrorInfo(type=kind, code=code, message=message, param=param, event_id=event_id)


# -- client events ------------------------------------------------------------------------------


class _FormatIn(Struct, frozen=True):
    type: str
    rate: int | UnsetType = UNSET


class _TranscriptionIn(Struct, frozen=True):
    model: str | UnsetType = UNSET
    language: str | UnsetType | None = UNSET
    prompt: str | UnsetType | None = UNSET


class _TurnDetectionIn(Struct, frozen=True):
    type: str
    threshold: float | UnsetType = UNSET
    prefix_padding_ms: int | UnsetType = UNSET
    silence_duration_ms: int | UnsetType = UNSET


class _InputIn(Struct, frozen=True):
    format: _FormatIn | UnsetType = UNSET
    transcription: _TranscriptionIn | UnsetType = UNSET
    turn_detection: _TurnDetectionIn | UnsetType | None = UNSET
    noise_reduction: Any = UNSET


class _AudioIn(Struct, frozen=True):
    input: _InputIn | UnsetType = UNSET


class _SessionIn(Struct, frozen=True):
    type: str | UnsetType = UNSET
    audio: _AudioIn | UnsetType = UNSET
    include: Any = UNSET


class SessionUpdateIn(Struct, frozen=True):
    session: _SessionIn
    event_id: str | None = None


class Append(Struct, frozen=True):
    audio: str
    event_id: str | None = None


class Commit(Struct, frozen=True):
    event_id: str | None = None


class Clear(Struct, frozen=True):
    event_id: str | None = None


ClientEvent = SessionUpdateIn | Append | Commit | Clear


class _Envelope(Struct):
    type: str
    event_id: str | None = None


_envelope = msgspec.json.Decoder(_Envelope)
_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    "session.update": msgspec.json.Decoder(SessionUpdateIn),
    "input_audio_buffer.append": msgspec.json.Decoder(Append),
    "input_audio_buffer.commit": msgspec.json.Decoder(Commit),
    "input_audio_buffer.clear": msgspec.json.Decoder(Clear),
}
_BETA_EVENTS: Final = frozenset({"transcription_session.update"})


def decode_client_event(frame: str | bytes) -> ClientEvent:
    """One client frame as a struct; :class:`WireError` for anything else. A beta-shaped event
    raises the beta error (the endpoint then closes with 4000)."""
    try:
        envelope = _envelope.decode(frame)
    except msgspec.DecodeError as exc:
        raise WireError("invalid_json", f"each frame must be a JSON event object: {exc}") from exc
    if envelope.type in _BETA_EVENTS:
        raise beta_error(envelope.event_id)
    decoder = _decoders.get(envelope.type)
    if decoder is None:
        raise WireError(
            "invalid_event",
            f"unknown or unsupported event type {envelope.type!r}",
            param="type",
            event_id=envelope.event_id,
        )
    try:
        event: ClientEvent = decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise WireError("invalid_value", str(exc), event_id=envelope.event_id) from exc
    return event


def beta_error(event_id: str | None = None) -> WireError:
    return WireError(BETA_CODE, BETA_MESSAGE, event_id=event_id)


def decode_audio(append: Append) -> bytes:
    """The raw bytes of an append (base64 on the wire)."""
    try:
        return base64.b64decode(append.audio, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WireError(
            "invalid_value", "audio must be base64", param="audio", event_id=append.event_id
        ) from exc


# -- the session's settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class Vad:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class Settings:
    """A transcription session's settings; ``model`` as the client named it (engine or alias)."""

    model: str
    format: str = "audio/pcm"
    language: str = ""
    prompt: str = ""
    turn_detection: Vad | None = Vad()
    noise_reduction: Any = None

    @property
    def rate(self) -> int:
        return FORMATS[self.format]

    @property
    def bytes_per_ms(self) -> float:
        """Client bytes per millisecond of audio (s16le PCM, or one byte a sample for G.711)."""
        return self.rate * (2 if self.format == "audio/pcm" else 1) / 1000


def _bad(param: str, message: str, event_id: str | None) -> WireError:
    return WireError("invalid_value", message, param=param, event_id=event_id)


def merge_update(settings: Settings, update: SessionUpdateIn, models: frozenset[str]) -> Settings:
    """``settings`` with what ``update`` sets (what it omits is kept, as OpenAI does)."""
    eid, session = update.event_id, update.session
    if session.type is not UNSET and session.type != "transcription":
        raise _bad(
            "session.type",
            f"this endpoint opens transcription sessions: session.type must be 'transcription', "
            f"got {session.type!r}",
            eid,
        )
    audio = session.audio.input if session.audio is not UNSET else UNSET
    if audio is UNSET or audio is None:
        return settings
    changes: dict[str, Any] = {}
    if audio.format is not UNSET:
        fmt = audio.format
        if fmt.type not in FORMATS:
            raise _bad(
                "session.audio.input.format.type",
                f"format must be one of {', '.join(FORMATS)}, got {fmt.type!r}",
                eid,
            )
        if fmt.type == "audio/pcm" and fmt.rate not in (UNSET, FORMATS["audio/pcm"]):
            raise _bad("session.audio.input.format.rate", "audio/pcm is 24000 Hz only", eid)
        changes["format"] = fmt.type
    if audio.transcription is not UNSET:
        t = audio.transcription
        if t.model is not UNSET:
            if t.model not in models:
                raise _bad(
                    "session.audio.input.transcription.model",
                    f"The model {t.model!r} does not exist; models: {', '.join(sorted(models))}",
                    eid,
                )
            changes["model"] = t.model
        if t.language is not UNSET:
            changes["language"] = t.language or ""
        if t.prompt is not UNSET:
            changes["prompt"] = t.prompt or ""
    if audio.turn_detection is not UNSET:
        td = audio.turn_detection
        if td is None:
            changes["turn_detection"] = None
        elif td.type != "server_vad":
            raise _bad(
                "session.audio.input.turn_detection.type",
                f"turn_detection must be server_vad or null, got {td.type!r}",
                eid,
            )
        else:
            vad = Vad(
                threshold=Vad.threshold if td.threshold is UNSET else td.threshold,
                prefix_padding_ms=(
                    Vad.prefix_padding_ms if td.prefix_padding_ms is UNSET else td.prefix_padding_ms
                ),
                silence_duration_ms=(
                    Vad.silence_duration_ms
                    if td.silence_duration_ms is UNSET
                    else td.silence_duration_ms
                ),
            )
            if not 0.0 <= vad.threshold <= 1.0 or vad.prefix_padding_ms < 0:
                raise _bad("session.audio.input.turn_detection", "threshold is 0 to 1", eid)
            if vad.silence_duration_ms < 0:
                raise _bad("session.audio.input.turn_detection", "silence must be >= 0", eid)
            changes["turn_detection"] = vad
    if audio.noise_reduction is not UNSET:
        changes["noise_reduction"] = audio.noise_reduction
    return replace(settings, **changes)


# -- server events ------------------------------------------------------------------------------


def encode(event: Struct | dict[str, Any]) -> str:
    return _encoder.encode(event).decode()


def session_event(kind: str, event_id: str, session_id: str, settings: Settings) -> str:
    """``session.created`` or ``session.updated`` with the whole session, as OpenAI sends it."""
    fmt: dict[str, Any] = {"type": settings.format}
    if settings.format == "audio/pcm":
        fmt["rate"] = settings.rate
    vad = settings.turn_detection
    turn_detection = (
        None
        if vad is None
        else {
            "type": "server_vad",
            "threshold": vad.threshold,
            "prefix_padding_ms": vad.prefix_padding_ms,
            "silence_duration_ms": vad.silence_duration_ms,
        }
    )
    transcription: dict[str, Any] = {"model": settings.model}
    if settings.language:
        transcription["language"] = settings.language
    if settings.prompt:
        transcription["prompt"] = settings.prompt
    return encode(
        {
            "type": kind,
            "event_id": event_id,
            "session": {
                "type": "transcription",
                "id": session_id,
                "object": "realtime.transcription_session",
                "audio": {
                    "input": {
                        "format": fmt,
                        "transcription": transcription,
                        "noise_reduction": settings.noise_reduction,
                        "turn_detection": turn_detection,
                    }
                },
                "include": None,
            },
        }
    )


def error_event(event_id: str, error: WireError) -> str:
    return encode(ErrorEvent(event_id=event_id, error=error.info))


def commit_empty(buffered_ms: float, event_id: str | None) -> WireError:
    return WireError(
        COMMIT_EMPTY,
        "Error committing input audio buffer: buffer too small. Expected at least "
        f"{MIN_COMMIT_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of audio.",
        event_id=event_id,
    )


def speech_started(event_id: str, item_id: str, ms: int) -> str:
    return encode(SpeechStarted(event_id=event_id, item_id=item_id, audio_start_ms=ms))


def speech_stopped(event_id: str, item_id: str, ms: int) -> str:
    return encode(SpeechStopped(event_id=event_id, item_id=item_id, audio_end_ms=ms))


def committed(event_id: str, item_id: str, previous_item_id: str | None) -> str:
    return encode(Committed(event_id=event_id, item_id=item_id, previous_item_id=previous_item_id))


def cleared(event_id: str) -> str:
    return encode(Cleared(event_id=event_id))


def _item(item_id: str, status: str, transcript: str | None) -> dict[str, Any]:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": status,
        "role": "user",
        "content": [{"type": "input_audio", "transcript": transcript}],
    }


def item_added(event_id: str, item_id: str, previous_item_id: str | None) -> str:
    return encode(
        {
            "type": "conversation.item.added",
            "event_id": event_id,
            "previous_item_id": previous_item_id,
            "item": _item(item_id, "completed", None),
        }
    )


def item_done(event_id: str, item_id: str, previous_item_id: str | None, transcript: str) -> str:
    return encode(
        {
            "type": "conversation.item.done",
            "event_id": event_id,
            "previous_item_id": previous_item_id,
            "item": _item(item_id, "completed", transcript),
        }
    )


def transcription_delta(event_id: str, item_id: str, delta: str) -> str:
    return encode(TranscriptionDelta(event_id=event_id, item_id=item_id, delta=delta))


def transcription_completed(event_id: str, item_id: str, transcript: str, seconds: float) -> str:
    return encode(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "event_id": event_id,
            "item_id": item_id,
            "content_index": 0,
            "transcript": transcript,
            "usage": {"type": "duration", "seconds": round(seconds, 3)},
        }
    )


def transcription_failed(event_id: str, item_id: str, code: str, message: str, status: int) -> str:
    """A turn's job failed: the gateway's error code, lower-cased as the OpenAI front writes it."""
    kind = INVALID_REQUEST if 400 <= status < 500 else "server_error"
    return encode(
        TranscriptionFailed(
            event_id=event_id,
            item_id=item_id,
            error=ErrorInfo(type=kind, code=code.lower(), message=message),
        )
    )


def queued(event_id: str, item_id: str, position: int) -> str:
    """The gateway's event while a turn waits for a place at its engine (1 = next)."""
    return encode(
        {"type": QUEUED_EVENT, "event_id": event_id, "item_id": item_id, "position": position}
    )


def next_delta(sent: str, text: str) -> str:
    """What to send as a delta after ``sent`` when the text is now ``text`` ("" when it did not
    grow). The deltas add up to the text; a revised text is never retracted: the completed
    transcript is authoritative."""
    if len(text) <= len(sent) or not text.startswith(sent):
        return ""
    return text[len(sent) :]


# -- audio --------------------------------------------------------------------------------------


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype("<i2")


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype("<i2")


_G711: Final = {"audio/pcmu": _ulaw_table(), "audio/pcma": _alaw_table()}


def g711_to_pcm(fmt: str, data: bytes) -> bytes:
    """G.711 bytes (``audio/pcmu``: mu-law, ``audio/pcma``: A-law) as s16le PCM at the same rate;
    ``audio/pcm`` passes through."""
    table = _G711.get(fmt)
    if table is None:
        return data
    return table[np.frombuffer(data, dtype=np.uint8)].tobytes()


# -- server VAD ---------------------------------------------------------------------------------


class TurnDetector:
    """Speech start and stop from Silero's per-window speech probabilities (``window_ms`` each).

    Speech starts at the first window at or above ``threshold``, reported ``prefix_padding_ms``
    earlier (OpenAI's ``audio_start_ms`` includes the padding); it stops once the windows have
    stayed below ``threshold`` for ``silence_duration_ms``, reported where that silence began.
    All times are milliseconds since the session's first audio.
    """

    def __init__(self, vad: Vad, window_ms: int = 32) -> None:
        self.vad = vad
        self.window_ms = window_ms
        self.windows = 0
        self.speaking = False
        self._silence_from: int | None = None

    def push(self, probabilities: Any) -> list[tuple[str, int]]:
        """Events ``("started", ms)`` / ``("stopped", ms)`` the windows caused, in order."""
        events: list[tuple[str, int]] = []
        for p in probabilities:
            i, self.windows = self.windows, self.windows + 1
            if float(p) >= self.vad.threshold:
                self._silence_from = None
                if not self.speaking:
                    self.speaking = True
                    start = max(0, i * self.window_ms - self.vad.prefix_padding_ms)
                    events.append(("started", start))
                continue
            if not self.speaking:
                continue
            if self._silence_from is None:
                self._silence_from = i
            if (i + 1 - self._silence_from) * self.window_ms >= self.vad.silence_duration_ms:
                events.append(("stopped", self._silence_from * self.window_ms))
                self.speaking = False
                self._silence_from = None
        return events
