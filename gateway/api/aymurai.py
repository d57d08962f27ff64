"""The AymurAI compatibility profile: ``/asr/transcribe[/stream]`` and ``/asr/validation``.

It serves the client-visible contract of AymurAI's SSE endpoint (backend PR #78) on the gateway's
one pipeline, without that endpoint's defects: a cache hit returns the human validation when there
is one, re-transcribing keeps it, an empty transcript is never served from cache, every failure
after the 200 is an ``error`` event, and a client that leaves cancels the engine session.

Error codes: AymurAI clients know ``UPSTREAM_SERVICE_ERROR`` and ``INTERNAL_ERROR``. Every gateway
failure with status 502/503/504 (engine, capacity, timeout, shutting down) becomes the first, any
other 5xx the second; client errors (4xx: ``DECODE_ERROR``, ``TOO_MANY_STREAMS``, ...) keep the
gateway's code, because retrying the same request can never help and the client must tell why.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections.abc import Iterable
from datetime import timedelta

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..audio import Upload
from ..errors import GatewayError, InvalidBody, NotFound, status_of
from ..events import MAX_SECONDS, Done, Failed, Progress, Segment, StreamEvent, join_text
from ..jobs import GatewayState, JobOptions
from ..store import content_uuid
from .common import (
    Transcribe,
    gateway_state,
    option,
    parse_bool,
    read_json_body,
    tenant_of,
)

__all__ = [
    "INTERNAL_ERROR",
    "UPSTREAM_SERVICE_ERROR",
    "AymurAITranslator",
    "Document",
    "Paragraph",
    "aymurai_code",
    "error_frame",
    "error_response",
    "iso_duration",
    "paragraph_id",
    "parse_duration",
    "routes",
]

UPSTREAM_SERVICE_ERROR = "UPSTREAM_SERVICE_ERROR"
INTERNAL_ERROR = "INTERNAL_ERROR"


class Paragraph(msgspec.Struct, frozen=True):
    speaker_no: int
    speaker_name: str | None
    start: str
    end: str
    text: str
    paragraph_id: str


class Document(msgspec.Struct, frozen=True, omit_defaults=True):
    document: tuple[Paragraph, ...]
    document_id: str
    current_time: float | None
    total_time: float | None
    # Not AymurAI's: only in ``done`` when some of the audio could not be decoded and was skipped.
    audio_errors: int = 0


class _ErrorBody(msgspec.Struct, frozen=True):
    detail: str
    code: str


class _ParagraphIn(msgspec.Struct, frozen=True):
    """A validated paragraph as clients send it; ``paragraph_id`` and other extras are ignored."""

    speaker_no: int
    start: float | str
    end: float | str
    text: str
    speaker_name: str | None = None


_encoder = msgspec.json.Encoder()
_validation = msgspec.json.Decoder(list[_ParagraphIn])


def iso_duration(seconds: float) -> str:
    """Seconds as the ISO-8601 duration pydantic writes for a timedelta: "PT0S", "PT2.5S",
    "PT1H2M5S", "P1DT1H" (microsecond precision, years of 365 days)."""
    # Clamped: a row stored before times were bounded must still render (timedelta overflows).
    delta = timedelta(seconds=min(seconds, MAX_SECONDS) if seconds >= 0 else 0.0)
    years, days = divmod(delta.days, 365)
    out = "P" + (f"{years}Y" if years else "") + (f"{days}D" if days else "")
    if delta.seconds or delta.microseconds:
        hours, rest = divmod(delta.seconds, 3600)
        minutes, secs = divmod(rest, 60)
        out += "T" + (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
        if secs or delta.microseconds:
            fraction = f".{delta.microseconds:06d}".rstrip("0") if delta.microseconds else ""
            out += f"{secs}{fraction}S"
    return out if out != "P" else "PT0S"


_NUMBER = r"\d+(?:\.\d+)?"
_ISO = re.compile(
    rf"P(?:(?P<Y>{_NUMBER})Y)?(?:(?P<D>{_NUMBER})D)?"
    rf"(?:T(?:(?P<H>{_NUMBER})H)?(?:(?P<M>{_NUMBER})M)?(?:(?P<S>{_NUMBER})S)?)?"
)
_CLOCK = re.compile(rf"(?:(?P<H>\d+):)?(?P<M>\d+):(?P<S>{_NUMBER})")
_UNITS = {"Y": 365 * 86400.0, "D": 86400.0, "H": 3600.0, "M": 60.0, "S": 1.0}


def parse_duration(value: float | str) -> float:
    """Seconds from a number, an ISO-8601 duration ("PT2.5S", "P1DT2H") or a clock time
    ("H:MM:SS", "MM:SS.ff"); ValueError when it is none of these, negative or not finite. The
    store bounds the times it keeps (:func:`gateway.store.check_times`)."""
    if isinstance(value, str):
        text = value.strip()
        match = _ISO.fullmatch(text) or _CLOCK.fullmatch(text)
        if match is not None and not text.endswith("T"):
            parts = {k: float(v) for k, v in match.groupdict().items() if v is not None}
            seconds = sum(_UNITS[k] * v for k, v in parts.items()) if parts else math.nan
        else:
            try:
                seconds = float(text)
            except ValueError:
                raise ValueError(f"not a duration: {value!r}") from None
    else:
        seconds = float(value)
    if not 0 <= seconds < math.inf:
        raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def paragraph_id(text: str) -> str:
    """AymurAI's ``text_to_uuid``: uuid5(DNS, blake2b-128 hex of the UTF-8 text)."""
    return content_uuid(hashlib.blake2b(text.encode(), digest_size=16).hexdigest())


def _document(
    id: str, segments: Iterable[Segment], current: float | None, total: float | None
) -> Document:
    paragraphs = tuple(
        Paragraph(
            speaker_no=s.speaker if s.speaker is not None else 0,
            speaker_name=s.speaker_name,
            start=iso_duration(s.start),
            end=iso_duration(s.end),
            text=s.text,
            paragraph_id=paragraph_id(s.text),
        )
        for s in segments
        if s.text.strip()
    )
    return Document(paragraphs, content_uuid(id), current, total)


def _done_document(done: Done) -> Document:
    t = done.transcript
    # AymurAI's cached reply carries no progress: both times are null.
    if done.cached:
        return _document(t.id, t.segments, None, None)
    document = _document(t.id, t.segments, t.current_time, t.total_time)
    return msgspec.structs.replace(document, audio_errors=done.audio_errors)


def aymurai_code(code: str, status: int | None = None) -> str:
    """The code an AymurAI client sees for a gateway error code (see the module docstring)."""
    status = status_of(code) if status is None else status
    if status in (502, 503, 504):
        return UPSTREAM_SERVICE_ERROR
    if status >= 500:
        return INTERNAL_ERROR
    return code


def _frame(name: bytes, document: Document) -> bytes:
    return b"event: " + name + b"\ndata: " + _encoder.encode(document) + b"\n\n"


def error_frame(code: str, detail: str) -> bytes:
    # AymurAI builds this one with json.dumps: spaces after ':' and ',', and clients match on them.
    payload = json.dumps({"detail": detail, "code": aymurai_code(code)})
    return b"event: error\ndata: " + payload.encode() + b"\n\n"


class AymurAITranslator:
    """Typed events to AymurAI's frames: LF line endings, compact JSON, blank paragraphs left out.

    A snapshot with no paragraph left after that is not sent, nor one that repeats the previous
    frame byte for byte. Queue positions, which AymurAI has no event for, go out as SSE comments
    (``: queued 2``) that its clients skip. One translator serves one stream."""

    keepalive_frame = b": keepalive\n\n"

    def __init__(self) -> None:
        self._last = b""

    def encode(self, event: StreamEvent) -> bytes | None:
        if isinstance(event, Progress):
            t = event.transcript
            document = _document(t.id, t.segments, t.current_time, t.total_time)
            frame = _frame(b"transcription", document)
            if not document.document or frame == self._last:
                return None
            self._last = frame
            return frame
        if isinstance(event, Done):
            return _frame(b"done", _done_document(event))
        if isinstance(event, Failed):
            return error_frame(event.code, event.detail)
        return b": queued %d\n\n" % event.position


def error_response(exc: GatewayError) -> Response:
    """A failure outside any stream, as AymurAI's JSON error ``{"detail", "code"}``."""
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return Response(
        _encoder.encode(_ErrorBody(exc.detail, aymurai_code(exc.code, exc.status))),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )


def _json(payload: object) -> Response:
    return Response(_encoder.encode(payload), media_type="application/json")


def _check_query(request: Request, state: GatewayState) -> None:
    # A bad query fails before the upload is read; a form field is checked after.
    parse_bool("use_cache", request.query_params.get("use_cache", ""), True)


def _options(request: Request, state: GatewayState, upload: Upload) -> JobOptions:
    return JobOptions(
        engine=state.engine(state.config.aymurai.engine),
        use_cache=parse_bool("use_cache", option(request, upload, "use_cache"), True),
    )


def _answer(done: Done, options: JobOptions) -> Response:
    return _json(_done_document(done))


# ``POST /asr/transcribe/stream`` (SSE); its blocking form is the deprecated ``/asr/transcribe``.
_transcribe_stream = Transcribe(
    check_query=_check_query,
    parse=_options,
    translator=lambda state, options: AymurAITranslator(),
    answer=_answer,
    error_response=error_response,
    # AymurAI's INTERNAL_ERROR, not UPSTREAM_SERVICE_ERROR, for a code of no fixed status.
    failure_status=500,
)


async def _find(request: Request) -> tuple[GatewayState, str]:
    """The content id behind the ``document_id`` in the path; NotFound when none is stored."""
    state = gateway_state(request)
    try:
        document_id = str(uuid.UUID(request.path_params["document_id"]))
    except ValueError:
        raise NotFound("document_id is not a UUID") from None
    id = await state.store.find_uuid(document_id, tenant_of(request))
    if id is None:
        raise NotFound("no document with this document_id")
    return state, id


async def get_validation(request: Request) -> Response:
    """The validated paragraphs when there are any, otherwise the machine transcript."""
    try:
        state, id = await _find(request)
        stored = await state.store.get(id, tenant_of(request))
        if stored is None:
            raise NotFound("no document with this document_id")
    except GatewayError as exc:
        return error_response(exc)
    return _json(_document(id, stored.corrected or stored.segments, None, None))


def _segments(paragraphs: list[_ParagraphIn]) -> tuple[Segment, ...]:
    segments = []
    for i, p in enumerate(paragraphs):
        try:
            start, end = parse_duration(p.start), parse_duration(p.end)
        except ValueError as exc:
            raise InvalidBody(f"paragraph {i}: {exc}") from exc
        segments.append(Segment(start, end, p.text, p.speaker_no, p.speaker_name))
    # An empty validation would mean "none" to AymurAI but hide the transcript here.
    if not join_text(segments):
        raise InvalidBody("a validation needs at least one paragraph with text")
    return tuple(segments)


async def post_validation(request: Request) -> Response:
    """Store human-validated paragraphs; cache hits and GETs return them from now on."""
    try:
        state, id = await _find(request)
        paragraphs = await read_json_body(request, _validation, "validation")
        segments = _segments(paragraphs)
        if not await state.store.set_corrections(id, segments, tenant_of(request)):
            raise NotFound("no document with this document_id")
    except GatewayError as exc:
        return error_response(exc)
    return _json(_document(id, segments, None, None))


def routes() -> list[Route]:
    return [
        Route("/asr/transcribe/stream", _transcribe_stream, methods=["POST"]),
        Route("/asr/transcribe", _transcribe_stream.blocking(), methods=["POST"]),
        Route("/asr/validation/document/{document_id}", get_validation, methods=["GET"]),
        Route("/asr/validation/document/{document_id}", post_validation, methods=["POST"]),
    ]
