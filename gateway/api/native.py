"""The native API, v1: ``/v1/transcriptions`` (SSE stream, blocking JSON, stored transcripts).

``POST /v1/transcriptions/stream?live=true`` takes the audio itself as the body (raw, not a
multipart form: ``format`` and ``sample_rate`` as on the live WebSocket) and starts transcribing
while it is still arriving, over HTTP/2 or a chunked HTTP/1.1 body: ``curl -T -
--http2-prior-knowledge`` from a microphone pipe. The body's end is the audio's; the id is
random, as for the WebSocket.
"""

from __future__ import annotations

from dataclasses import replace

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import exports
from ..audio import Upload
from ..errors import GatewayError, InvalidBody, InvalidOption, NotFound
from ..events import Done, Failed, Progress, Segment, StreamEvent, Transcript, join_text
from ..jobs import GatewayState, JobOptions
from ..live_audio import live_decoder
from ..sources import LiveSource
from .common import (
    Transcribe,
    gateway_state,
    option,
    parse_bool,
    read_json_body,
    tenant_of,
)

__all__ = ["NativeTranslator", "error_response", "routes"]


class _Snapshot(msgspec.Struct):
    id: str
    segments: tuple[Segment, ...]
    text: str
    current_time: float
    total_time: float | None


class _LiveSnapshot(msgspec.Struct):
    """A :class:`_Snapshot` with its segments already encoded, and how many of them are
    committed: the rest are the engine's tentative tail, which later snapshots may revise."""

    id: str
    segments: msgspec.Raw
    text: str
    current_time: float
    total_time: float | None
    committed: int


class _Final(_Snapshot, omit_defaults=True):
    cached: bool
    corrected: bool
    # The language transcribed in, when the engine reports it (the whisper engine does).
    language: str = ""
    # Only when some of the audio could not be decoded and was skipped.
    audio_errors: int = 0


class _StoredView(_Snapshot):
    engine: str
    language: str
    created_at: float
    corrected: bool


class _Error(msgspec.Struct):
    code: str
    detail: str


class _ErrorBody(msgspec.Struct):
    error: _Error


_encoder = msgspec.json.Encoder()


def _final(done: Done) -> _Final:
    t = done.transcript
    return _Final(
        t.id,
        t.segments,
        t.text,
        t.current_time,
        t.total_time,
        done.cached,
        done.corrected,
        t.language,
        done.audio_errors,
    )


def _join(a: str, b: str) -> str:
    return f"{a} {b}" if a and b else a or b


_EVENT = b"event: "
_DATA = b"\r\ndata: "
_END = b"\r\n\r\n"


class NativeTranslator:
    """Typed events to ``event: <type>`` / ``data: <json>`` frames; one translator per stream.

    Snapshots are cumulative: encoding every segment of each one costs O(transcript) per event,
    O(n^2) per stream. Engines only ever append to the committed segments, so the translator keeps
    the JSON and the text of the committed segments it has already encoded and encodes only the
    new and the tentative ones. The kept prefix is compared with each snapshot's (a C-level tuple
    comparison, by identity when the engine reuses its segment objects) and rebuilt if it differs,
    so the bytes are always those of a full encoding.
    """

    keepalive_frame = b": keepalive\r\n\r\n"

    def __init__(self) -> None:
        self._kept: tuple[Segment, ...] = ()
        self._kept_json = bytearray()  # the kept segments' JSON objects, comma-separated
        self._kept_text = ""

    def _snapshot(self, t: Transcript) -> _LiveSnapshot:
        committed = t.segments[: t.committed]
        if committed[: len(self._kept)] != self._kept:
            self._kept, self._kept_json, self._kept_text = (), bytearray(), ""
        if new := committed[len(self._kept) :]:
            if self._kept_json:
                self._kept_json += b","
            self._kept_json += _encoder.encode(new)[1:-1]
            self._kept_text = _join(self._kept_text, join_text(new))
            self._kept = committed
        tentative = t.segments[t.committed :]
        if not tentative:
            segments = b"".join((b"[", self._kept_json, b"]"))
            text = self._kept_text
        else:
            tail = _encoder.encode(tentative)
            comma = b"," if self._kept_json else b""
            segments = b"".join((b"[", self._kept_json, comma, memoryview(tail)[1:]))
            text = _join(self._kept_text, join_text(tentative))
        return _LiveSnapshot(
            t.id, msgspec.Raw(segments), text, t.current_time, t.total_time, t.committed
        )

    def event(self, event: StreamEvent) -> tuple[bytes, bytes]:
        """The event's type (``transcription``, ``done``, ``error``, ``queued``) and its JSON
        object: the one encoding of the native events, for SSE and for the live WebSocket."""
        if isinstance(event, Progress):
            return b"transcription", _encoder.encode(self._snapshot(event.transcript))
        if isinstance(event, Done):
            return b"done", _encoder.encode(_final(event))
        if isinstance(event, Failed):
            return b"error", _encoder.encode(_Error(event.code, event.detail))
        return b"queued", _encoder.encode({"position": event.position})

    def encode(self, event: StreamEvent) -> bytes | None:
        name, payload = self.event(event)
        return b"".join((_EVENT, name, _DATA, payload, _END))


def error_response(exc: GatewayError) -> Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return Response(
        _encoder.encode(_ErrorBody(_Error(exc.code, exc.detail))),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _check_query(request: Request, state: GatewayState) -> None:
    # An unknown engine in the query is refused before the upload is read.
    state.engine(request.query_params.get("engine", ""))


def _check_blocking_query(request: Request, state: GatewayState) -> None:
    _check_query(request, state)
    if parse_bool("live", request.query_params.get("live", ""), False):
        raise InvalidOption("live=true is for POST /v1/transcriptions/stream")


def _options(request: Request, state: GatewayState, upload: Upload) -> JobOptions:
    return JobOptions(
        engine=state.engine(option(request, upload, "engine")),
        language=option(request, upload, "language"),
        use_cache=parse_bool("use_cache", option(request, upload, "use_cache"), True),
    )


def _live(request: Request, state: GatewayState) -> tuple[LiveSource, JobOptions] | None:
    """With ``live=true``, the body is raw audio fed to the job as it arrives."""
    query = request.query_params
    if not parse_bool("live", query.get("live", ""), False):
        return None
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        raise InvalidBody(
            "with live=true the body is the audio itself (raw PCM, or any stream with "
            "format=auto), not a multipart form"
        )
    decoder = live_decoder(query.get("format", "pcm_s16le"), query.get("sample_rate", ""))
    options = JobOptions(
        engine=state.engine(query.get("engine", "")),
        language=query.get("language", ""),
        use_cache=False,
    )
    return LiveSource(decoder()), options


def _answer(done: Done, options: JobOptions) -> Response:
    return Response(_encoder.encode(_final(done)), media_type="application/json")


_transcribe_stream = Transcribe(
    check_query=_check_query,
    parse=_options,
    translator=lambda state, options: NativeTranslator(),
    answer=_answer,
    error_response=error_response,
    live=_live,
)


async def get_transcript(request: Request) -> Response:
    state = gateway_state(request)
    fmt = request.query_params.get("format", "json")
    try:
        if fmt not in exports.FORMATS:
            raise InvalidOption(f"format must be one of {', '.join(exports.FORMATS)}")
        stored = await state.store.get(request.path_params["id"], tenant_of(request))
        if stored is None:
            raise NotFound("no transcript with this id")
    except GatewayError as exc:
        return error_response(exc)
    segments = stored.corrected if stored.corrected is not None else stored.segments
    if fmt == "txt":
        return Response(exports.txt(segments), media_type="text/plain; charset=utf-8")
    if fmt == "srt":
        return Response(exports.srt(segments), media_type="application/x-subrip; charset=utf-8")
    if fmt == "vtt":
        return Response(exports.vtt(segments), media_type="text/vtt; charset=utf-8")
    t = stored.transcript()
    view = _StoredView(
        t.id,
        segments,
        " ".join(s.text.strip() for s in segments if s.text.strip()),
        t.current_time,
        t.total_time,
        stored.engine,
        stored.language,
        stored.created_at,
        stored.corrected is not None,
    )
    return Response(_encoder.encode(view), media_type="application/json")


class _Corrections(msgspec.Struct, forbid_unknown_fields=True):
    segments: list[Segment]


_corrections = msgspec.json.Decoder(_Corrections)


async def put_corrections(request: Request) -> Response:
    """Store human corrections; later GETs and cache hits return them, flagged ``corrected``."""
    state = gateway_state(request)
    try:
        body = await read_json_body(request, _corrections, "corrections")
        if not await state.store.set_corrections(
            request.path_params["id"], tuple(body.segments), tenant_of(request)
        ):
            raise NotFound("no transcript with this id")
    except GatewayError as exc:
        return error_response(exc)
    return await get_transcript(request)


def routes() -> list[Route]:
    return [
        Route("/v1/transcriptions/stream", _transcribe_stream, methods=["POST"]),
        Route(
            "/v1/transcriptions",
            replace(_transcribe_stream.blocking(), check_query=_check_blocking_query),
            methods=["POST"],
        ),
        Route("/v1/transcriptions/{id}", get_transcript, methods=["GET"]),
        Route("/v1/transcriptions/{id}/corrections", put_corrections, methods=["PUT"]),
    ]
