"""The OpenAI-compatible front API: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

It speaks the wire shapes the ``openai`` SDK sends and parses (multipart with bracketed repeated
fields, ``stream`` as the string ``true``, SSE frames with the event type inside the JSON, the
``{"error": {message, type, param, code}}`` body). Engines are exposed as models; configured
aliases (``openai.aliases``) map OpenAI model names such as ``whisper-1`` onto engines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .. import exports
from ..audio import Upload
from ..engines import Engine
from ..errors import GatewayError, InvalidOption, UnknownEngine, status_of
from ..events import Done, Failed, Progress, Segment, StreamEvent, Transcript
from ..jobs import GatewayState, JobOptions
from .common import Transcribe, gateway_state, option, parse_bool

__all__ = ["RESPONSE_FORMATS", "InvalidParam", "OpenAITranslator", "error_response", "routes"]

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
INCLUDES = ("logprobs",)
OWNER = "asr-gateway"

# Errors no retry can fix, whatever the status class says: a bug, an engine that already spent its
# own reconnect attempts, a transcription that ran out of time.
_PERMANENT = {"INTERNAL_ERROR", "UPSTREAM_ERROR", "TIMEOUT"}
# OpenAI answers 400 for a file it cannot read, so the SDK raises BadRequestError.
_STATUS_OVERRIDES = {"DECODE_ERROR": 400, "UNSUPPORTED_MEDIA_TYPE": 400}


class InvalidParam(InvalidOption):
    """An invalid request field; ``param`` names it in the OpenAI error body."""

    def __init__(self, param: str, detail: str) -> None:
        super().__init__(detail)
        self.param = param


class _Usage(msgspec.Struct, tag_field="type", tag="duration"):
    seconds: float


class _Delta(msgspec.Struct, tag_field="type", tag="transcript.text.delta"):
    delta: str


class _TextDone(msgspec.Struct, tag_field="type", tag="transcript.text.done", omit_defaults=True):
    text: str
    usage: _Usage
    # Not OpenAI's: only when some of the audio could not be decoded and was skipped.
    audio_errors: int = 0


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorEvent(msgspec.Struct, tag_field="type", tag="error"):
    error: _ErrorDetail


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


class _Json(msgspec.Struct, omit_defaults=True):
    text: str
    usage: _Usage
    audio_errors: int = 0


class _VerboseSegment(msgspec.Struct):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class _VerboseWord(msgspec.Struct):
    word: str
    start: float
    end: float


class _Verbose(msgspec.Struct, omit_defaults=True):
    task: str
    language: str
    duration: float
    text: str
    segments: list[_VerboseSegment]
    usage: _Usage
    words: list[_VerboseWord] | None = None
    audio_errors: int = 0


class _Model(msgspec.Struct):
    id: str
    # The engine this model runs on: its own name for an engine, the target of an alias (the
    # name the native API's ``engine`` option takes). vLLM's model objects use the same field.
    root: str
    object: str = "model"
    created: int = 0
    owned_by: str = OWNER


class _ModelList(msgspec.Struct):
    data: list[_Model]
    object: str = "list"


_encoder = msgspec.json.Encoder()


def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def _should_retry(status: int, code: str) -> bool:
    if status in (408, 409, 429):
        return True
    return status >= 500 and code not in _PERMANENT


def _detail(code: str, message: str, status: int, param: str | None = None) -> _ErrorDetail:
    openai_code = "model_not_found" if code == UnknownEngine.code else code.lower()
    return _ErrorDetail(message, _error_type(status), param, openai_code)


def error_response(exc: GatewayError) -> Response:
    """A GatewayError as OpenAI's error body, status and retry headers (also for auth middleware)."""
    status = _STATUS_OVERRIDES.get(exc.code, exc.status)
    param = None
    if isinstance(exc, InvalidParam):
        param = exc.param
    elif isinstance(exc, UnknownEngine):
        param = "model"
    headers = {"x-should-retry": "true" if _should_retry(status, exc.code) else "false"}
    if exc.retry_after is not None and status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return Response(
        _encoder.encode(_ErrorBody(_detail(exc.code, exc.detail, status, param))),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _usage(t: Transcript) -> _Usage:
    return _Usage(round(t.total_time if t.total_time is not None else t.current_time, 3))


def _frame(payload: object) -> bytes:
    return b"data: " + _encoder.encode(payload) + b"\n\n"


class OpenAITranslator:
    """Typed events to OpenAI transcription stream frames, for one request.

    Deltas are append-only, so only committed segments (which never change) go into them; the
    translator remembers how many it has sent. ``Done`` sends the rest as a last delta, then one
    ``transcript.text.done`` whose text is exactly the concatenation of all deltas. Queue positions
    have no OpenAI event type: they go out as SSE comments, which every client ignores.
    """

    keepalive_frame = b": keepalive\n\n"

    def __init__(self, *, done_sentinel: bool = False) -> None:
        self.done_sentinel = done_sentinel
        self._sent = 0
        self._text = ""

    def _take(self, segments: Sequence[Segment]) -> str:
        pieces: list[str] = []
        for s in segments[self._sent :]:
            if text := s.text.strip():
                pieces.append(" " + text if self._text or pieces else text)
        self._sent = max(self._sent, len(segments))
        delta = "".join(pieces)
        self._text += delta
        return delta

    def encode(self, event: StreamEvent) -> bytes | None:
        if isinstance(event, Progress):
            delta = self._take(event.transcript.committed_segments)
            return _frame(_Delta(delta)) if delta else None
        if isinstance(event, Done):
            t = event.transcript
            delta = self._take(t.segments)
            frames = _frame(_Delta(delta)) if delta else b""
            frames += _frame(_TextDone(self._text, _usage(t), event.audio_errors))
            return frames + b"data: [DONE]\n\n" if self.done_sentinel else frames
        if isinstance(event, Failed):
            status = _STATUS_OVERRIDES.get(event.code, status_of(event.code, 502))
            error = _detail(event.code, event.detail, status)
            return _frame(_ErrorEvent(error))
        return b": queued " + str(event.position).encode() + b"\n\n"


def _verbose(t: Transcript, language: str, words: bool) -> _Verbose:
    # Whisper's decoder statistics are unknowable here: neutral values that trip none of the usual
    # heuristics (avg_logprob < -1, compression_ratio > 2.4, no_speech_prob > 0.6).
    segments = [
        _VerboseSegment(
            id=i,
            seek=round(s.start * 100),
            start=s.start,
            end=s.end,
            text=s.text.strip(),
            tokens=[],
            temperature=0.0,
            avg_logprob=0.0,
            compression_ratio=1.0,
            no_speech_prob=0.0,
        )
        for i, s in enumerate(s for s in t.segments if s.text.strip())
    ]
    usage = _usage(t)
    return _Verbose(
        task="transcribe",
        language=t.language or language,
        duration=usage.seconds,
        text=t.text,
        segments=segments,
        usage=usage,
        words=[_VerboseWord(w.word, w.start, w.end) for w in t.words]
        if words and t.words
        else None,
    )


def _result(done: Done, options: _Options) -> Response:
    t = done.transcript
    fmt = options.response_format
    if fmt == "text":
        return Response(exports.txt(t.segments), media_type="text/plain; charset=utf-8")
    if fmt == "srt":
        return Response(exports.srt(t.segments), media_type="text/plain; charset=utf-8")
    if fmt == "vtt":
        return Response(exports.vtt(t.segments), media_type="text/vtt; charset=utf-8")
    body: msgspec.Struct
    if fmt == "verbose_json":
        body = _verbose(t, options.language, "word" in options.granularities)
        body.audio_errors = done.audio_errors
    else:
        body = _Json(t.text, _usage(t), done.audio_errors)
    return Response(_encoder.encode(body), media_type="application/json")


@dataclass(frozen=True, kw_only=True)
class _Options(JobOptions):
    response_format: str
    stream: bool
    granularities: tuple[str, ...]


def _engine_for(state: GatewayState, model: str) -> Engine:
    """The engine a model name stands for: an engine itself, or an alias of one."""
    if model in state.engines:
        return state.engine(model)
    aliases = state.config.openai.aliases
    if model not in aliases:
        raise UnknownEngine(f"The model {model!r} does not exist")
    return state.engine(aliases[model])  # an alias of "" is the default engine


def _list(request: Request, upload: Upload, name: str, allowed: Sequence[str]) -> tuple[str, ...]:
    values = [
        *upload.fields.get(name + "[]", ()),
        *upload.fields.get(name, ()),
        *request.query_params.getlist(name + "[]"),
    ]
    for value in values:
        if value not in allowed:
            raise InvalidParam(name, f"{name}: {value!r} is not one of {', '.join(allowed)}")
    return tuple(values)


def _options(request: Request, state: GatewayState, upload: Upload) -> _Options:
    model = option(request, upload, "model")
    if not model:
        raise InvalidParam("model", "you must provide a model parameter")
    engine = _engine_for(state, model)
    response_format = option(request, upload, "response_format") or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidParam(
            "response_format",
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {response_format!r}",
        )
    try:
        stream = parse_bool("stream", option(request, upload, "stream"), False)
    except InvalidOption as exc:
        raise InvalidParam("stream", exc.detail) from exc
    if temperature := option(request, upload, "temperature"):
        try:
            float(temperature)
        except ValueError as exc:
            raise InvalidParam("temperature", f"temperature must be a number: {exc}") from exc
    _list(request, upload, "include", INCLUDES)
    return _Options(
        engine=engine,
        language=option(request, upload, "language"),
        response_format=response_format,
        stream=stream,
        granularities=_list(request, upload, "timestamp_granularities", GRANULARITIES),
    )


def _translator(state: GatewayState, options: _Options) -> OpenAITranslator | None:
    if not options.stream:
        return None
    return OpenAITranslator(done_sentinel=state.config.openai.done_sentinel)


# ``POST /v1/audio/transcriptions``: it streams when the request says ``stream=true``.
_transcriptions = Transcribe(
    parse=_options, translator=_translator, answer=_result, error_response=error_response
)


def _models(state: GatewayState) -> list[_Model]:
    aliases = state.config.openai.aliases
    engines = [_Model(name, name) for name in state.engines]
    aliased = [
        _Model(a, state.engine(e).name) for a, e in aliases.items() if a not in state.engines
    ]
    return [*engines, *aliased]


async def list_models(request: Request) -> Response:
    return Response(
        _encoder.encode(_ModelList(_models(gateway_state(request)))), media_type="application/json"
    )


async def get_model(request: Request) -> Response:
    name = request.path_params["model"]
    model = next((m for m in _models(gateway_state(request)) if m.id == name), None)
    if model is None:
        return error_response(UnknownEngine(f"The model {name!r} does not exist"))
    return Response(_encoder.encode(model), media_type="application/json")


def routes() -> list[Route]:
    return [
        Route("/v1/audio/transcriptions", _transcriptions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model}", get_model, methods=["GET"]),
    ]
