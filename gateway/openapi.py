"""One OpenAPI 3.1 document for the whole gateway, served at ``GET /openapi.json``.

It describes every route the app serves (the native API, the OpenAI-compatible API, the AymurAI
profile, health, readiness, metrics and this document): their query parameters and request bodies,
and every response with the error shape of the API the route belongs to. Option values come from
the code that checks them (response formats, export formats, granularities) and from the
configuration (engines and model aliases), so the document cannot drift from what is accepted;
tests/test_openapi.py pins it to the app's routes, and tests/test_fuzz.py runs schemathesis on it.

Hand-built: Starlette has no schema generator, and three wire shapes with their own error bodies
are clearer spelled out than inferred.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import exports, live_audio, web
from .api import openai_compat
from .config import Config
from .events import MAX_SECONDS

__all__ = ["ERROR_SCHEMAS", "document", "routes"]

Schema = dict[str, Any]

_encoder = msgspec.json.Encoder()

# The error body of each front API, by the path prefixes it owns (see auth.error_response_for).
ERROR_SCHEMAS = {"native": "NativeError", "openai": "OpenAIError", "aymurai": "AymurAIError"}

# Why a status can happen, whatever the route (the detail is in the body's code).
_REASONS = {
    400: "invalid request (the code says which part)",
    401: "an API key is required (when auth is on)",
    404: "no such resource or engine",
    408: "the request body stalled (server.body_timeout)",
    413: "the body is larger than the route accepts",
    415: "not a supported media type, or not decodable audio",
    422: "the audio failed to decode after it started",
    429: "the tenant has too many streams open",
    500: "the transcription failed inside the gateway",
    502: "the engine failed",
    503: "at capacity, the engine is unavailable, or the gateway is shutting down",
    504: "the transcription ran out of time",
}
# A body that is read (uploads, corrections, validations) can also stall, be too large, or be
# refused for its tenant's stream count; a transcription can also fail on capacity or the engine.
_BODY = (400, 401, 408, 413)
_UPLOAD = (*_BODY, 415, 429, 503)
_BLOCKING = (*_UPLOAD, 422, 500, 502, 504)


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(api: str, statuses: tuple[int, ...]) -> dict[str, Schema]:
    error = _ref(ERROR_SCHEMAS[api])
    return {str(s): _json(error, _REASONS[s]) for s in sorted(set(statuses))}


def _text(*media_types: str, description: str) -> Schema:
    return {
        "description": description,
        "content": {m: {"schema": {"type": "string"}} for m in media_types},
    }


def _query(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


_BOOLEAN = {"type": "boolean"}
_FILE = {"type": "string", "contentMediaType": "application/octet-stream"}
_SSE = "text/event-stream"


def _sse_event(events: dict[str, Schema]) -> Schema:
    """One event of a ``text/event-stream`` as OpenAPI 3.2 models it (``event``, ``data``), its
    ``data`` the JSON that ``events`` gives for its event type ("message" when unnamed)."""
    by_type = [
        {
            "if": {"properties": {"event": {"const": name}}},
            "then": {
                "properties": {
                    "data": {"contentMediaType": "application/json", "contentSchema": schema}
                }
            },
        }
        for name, schema in events.items()
    ]
    return {
        "type": "object",
        "required": ["event", "data"],
        "properties": {"event": {"enum": list(events)}, "data": {"type": "string"}},
        "allOf": by_type,
    }


def _sse(description: str, events: dict[str, Schema]) -> Schema:
    return {"description": description, "content": {_SSE: {"schema": _sse_event(events)}}}


def _multipart(properties: Schema, required: tuple[str, ...] = ("file",)) -> Schema:
    return {"type": "object", "required": list(required), "properties": properties}


# --- the native API ------------------------------------------------------------------------------


def _native(config: Config) -> dict[str, Schema]:
    engines = {"type": "string", "enum": list(config.engines)}
    options: dict[str, tuple[Schema, str]] = {
        "engine": (engines, "the engine; default server.default_engine"),
        "language": ({"type": "string"}, "a language code; '' lets the engine decide"),
        "use_cache": (_BOOLEAN, "serve a stored transcript of the same bytes (default true)"),
    }
    parameters = [_query(name, schema, text) for name, (schema, text) in options.items()]
    upload = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": _multipart(
                    {"file": _FILE, **{name: schema for name, (schema, _) in options.items()}}
                )
            },
            "application/octet-stream": {"schema": _FILE},
        },
    }
    live = [
        _query(
            "live",
            _BOOLEAN,
            "true: the body is the audio itself (not a form), transcribed while it is still"
            " arriving (HTTP/2, or a chunked HTTP/1.1 body); its end is the audio's end, the id"
            " is random, nothing is cached; past the stream's start, a gap over"
            " server.body_timeout is a TIMEOUT event and a body over server.max_upload_bytes a"
            " PAYLOAD_TOO_LARGE event",
        ),
        _query(
            "format",
            {"type": "string", "enum": list(live_audio.FORMATS), "default": "pcm_s16le"},
            "live=true only: raw s16le mono PCM, or auto for a container stream (WebM, Ogg)",
        ),
        _query(
            "sample_rate",
            {
                "type": "integer",
                "minimum": live_audio.MIN_RATE,
                "maximum": live_audio.MAX_RATE,
                "default": 16000,
            },
            "live=true with format=pcm_s16le only: the PCM's rate",
        ),
    ]
    stored = _errors("native", (400, 401, 404))
    return {
        "/v1/transcriptions/stream": {
            "post": {
                "operationId": "native_transcribe_stream",
                "summary": "Transcribe an upload, streaming cumulative snapshots as SSE",
                "parameters": [*parameters, *live],
                "requestBody": upload,
                "responses": {
                    "200": _sse(
                        "Events `queued`, `transcription` (a snapshot), then exactly one `done`"
                        " or `error`; `: keepalive` comments while nothing else is sent",
                        {
                            "queued": _ref("NativeQueued"),
                            "transcription": _ref("NativeSnapshot"),
                            "done": _ref("NativeFinal"),
                            "error": _ref("NativeErrorDetail"),
                        },
                    ),
                    **_errors("native", (*_UPLOAD, 404)),
                },
            }
        },
        "/v1/transcriptions": {
            "post": {
                "operationId": "native_transcribe",
                "summary": "Transcribe an upload and answer once it is done",
                "parameters": parameters,
                "requestBody": upload,
                "responses": {
                    "200": _json(_ref("NativeFinal"), "the transcript"),
                    **_errors("native", (*_BLOCKING, 404)),
                },
            }
        },
        "/v1/transcriptions/{id}": {
            "parameters": [_path("id", {"type": "string"})],
            "get": {
                "operationId": "native_get_transcript",
                "summary": "A stored transcript (its corrections when there are any)",
                "parameters": [
                    _query("format", {"type": "string", "enum": list(exports.FORMATS)}, "export")
                ],
                "responses": {
                    "200": {
                        "description": "the transcript, as JSON or as an export",
                        "content": {
                            "application/json": {"schema": _ref("NativeStored")},
                            "text/plain": {"schema": {"type": "string"}},
                            "application/x-subrip": {"schema": {"type": "string"}},
                            "text/vtt": {"schema": {"type": "string"}},
                        },
                    },
                    **stored,
                },
            },
        },
        "/v1/transcriptions/{id}/corrections": {
            "parameters": [_path("id", {"type": "string"})],
            "put": {
                "operationId": "native_put_corrections",
                "summary": "Store human corrections; later reads and cache hits return them",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("NativeCorrections")}},
                },
                "responses": {
                    "200": _json(_ref("NativeStored"), "the corrected transcript"),
                    **_errors("native", (*_BODY, 404)),
                },
            },
        },
    }


_SECONDS = {"type": "number", "minimum": 0, "maximum": MAX_SECONDS}
# The fields every native transcript view starts with (a live snapshot, the final one, a stored one).
_SNAPSHOT: Schema = {
    "id": {"type": "string"},
    "segments": {"type": "array", "items": _ref("Segment")},
    "text": {"type": "string"},
    "current_time": {"type": "number"},
    "total_time": {"type": ["number", "null"]},
}
_NATIVE_SCHEMAS: dict[str, Schema] = {
    "NativeError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _ref("NativeErrorDetail")},
    },
    "NativeErrorDetail": {
        "type": "object",
        "required": ["code", "detail"],
        "properties": {"code": {"type": "string", "minLength": 1}, "detail": {"type": "string"}},
    },
    "Segment": {
        "type": "object",
        "required": ["start", "end", "text"],
        "properties": {
            "start": {"type": "number"},
            "end": {"type": "number"},
            "text": {"type": "string"},
            "speaker": {"type": "integer"},
            "speaker_name": {"type": "string"},
        },
    },
    "SegmentIn": {
        "type": "object",
        "required": ["start", "end", "text"],
        "properties": {
            "start": _SECONDS,
            "end": _SECONDS,
            "text": {"type": "string"},
            "speaker": {"type": ["integer", "null"]},
            "speaker_name": {"type": ["string", "null"]},
        },
    },
    "NativeCorrections": {
        "type": "object",
        "required": ["segments"],
        "additionalProperties": False,
        "properties": {"segments": {"type": "array", "items": _ref("SegmentIn")}},
    },
    "NativeSnapshot": {
        "type": "object",
        "required": [*_SNAPSHOT, "committed"],
        "properties": {
            **_SNAPSHOT,
            "committed": {
                "type": "integer",
                "minimum": 0,
                "description": "how many segments are final; the rest may still be revised",
            },
        },
    },
    "NativeQueued": {
        "type": "object",
        "required": ["position"],
        "properties": {"position": {"type": "integer", "minimum": 1}},
    },
    "NativeFinal": {
        "type": "object",
        "required": [*_SNAPSHOT, "cached", "corrected"],
        "properties": {
            **_SNAPSHOT,
            "cached": {"type": "boolean"},
            "corrected": {"type": "boolean"},
            "language": {"type": "string"},
            "audio_errors": {"type": "integer", "minimum": 1},
        },
    },
    "NativeStored": {
        "type": "object",
        "required": [*_SNAPSHOT, "engine", "language", "created_at", "corrected"],
        "properties": {
            **_SNAPSHOT,
            "engine": {"type": "string"},
            "language": {"type": "string"},
            "created_at": {"type": "number"},
            "corrected": {"type": "boolean"},
        },
    },
}


# --- the OpenAI-compatible API -------------------------------------------------------------------


def _openai(config: Config) -> dict[str, Schema]:
    models = [*config.engines, *(a for a in config.openai.aliases if a not in config.engines)]
    form = _multipart(
        {
            "file": _FILE,
            "model": {"type": "string", "enum": models},
            "language": {"type": "string"},
            "prompt": {"type": "string"},
            "response_format": {"type": "string", "enum": list(openai_compat.RESPONSE_FORMATS)},
            "temperature": {"type": "number"},
            "stream": _BOOLEAN,
            "timestamp_granularities[]": {
                "type": "array",
                "items": {"type": "string", "enum": list(openai_compat.GRANULARITIES)},
            },
            "include[]": {
                "type": "array",
                "items": {"type": "string", "enum": list(openai_compat.INCLUDES)},
            },
        },
        required=("file", "model"),
    )
    return {
        "/v1/audio/transcriptions": {
            "post": {
                "operationId": "openai_create_transcription",
                "summary": "OpenAI's transcription endpoint; engines and aliases are models",
                "requestBody": {
                    "required": True,
                    "content": {"multipart/form-data": {"schema": form}},
                },
                "responses": {
                    "200": {
                        "description": (
                            "json/verbose_json as JSON, text/srt as text/plain, vtt as text/vtt;"
                            " with stream=true, SSE frames `transcript.text.delta`, then"
                            " `transcript.text.done` or `error`"
                        ),
                        "content": {
                            "application/json": {
                                "schema": {"anyOf": [_ref("OpenAIJson"), _ref("OpenAIVerbose")]}
                            },
                            "text/plain": {"schema": {"type": "string"}},
                            "text/vtt": {"schema": {"type": "string"}},
                            _SSE: {"schema": _sse_event({"message": _ref("OpenAIStreamEvent")})},
                        },
                    },
                    # A file that cannot be read is a 400 here, as at OpenAI: never 415 or 422.
                    **_errors("openai", (*(s for s in _BLOCKING if s not in (415, 422)), 404)),
                },
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "openai_list_models",
                "summary": "The engines and aliases, as OpenAI models",
                "responses": {
                    "200": _json(_ref("OpenAIModelList"), "the models"),
                    **_errors("openai", (401,)),
                },
            }
        },
        "/v1/models/{model}": {
            "parameters": [_path("model", {"type": "string"})],
            "get": {
                "operationId": "openai_get_model",
                "summary": "One model",
                "responses": {
                    "200": _json(_ref("OpenAIModel"), "the model"),
                    **_errors("openai", (401, 404)),
                },
            },
        },
    }


_USAGE = {
    "type": "object",
    "required": ["type", "seconds"],
    "properties": {"type": {"const": "duration"}, "seconds": {"type": "number"}},
}
_OPENAI_SCHEMAS: dict[str, Schema] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": _ref("OpenAIErrorDetail")},
    },
    "OpenAIErrorDetail": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            # Always set by the gateway (its error code, lower-case).
            "code": {"type": "string", "minLength": 1},
        },
    },
    "OpenAIStreamEvent": {
        "oneOf": [
            {
                "type": "object",
                "required": ["type", "delta"],
                "properties": {
                    "type": {"const": "transcript.text.delta"},
                    "delta": {"type": "string"},
                },
            },
            {
                "type": "object",
                "required": ["type", "text", "usage"],
                "properties": {
                    "type": {"const": "transcript.text.done"},
                    "text": {"type": "string"},
                    "usage": _USAGE,
                    "audio_errors": {"type": "integer"},
                },
            },
            {
                "type": "object",
                "required": ["type", "error"],
                "properties": {"type": {"const": "error"}, "error": _ref("OpenAIErrorDetail")},
            },
        ]
    },
    "OpenAIJson": {
        "type": "object",
        "required": ["text", "usage"],
        "properties": {
            "text": {"type": "string"},
            "usage": _USAGE,
            "audio_errors": {"type": "integer"},
        },
    },
    "OpenAIVerbose": {
        "type": "object",
        "required": ["task", "language", "duration", "text", "segments", "usage"],
        "properties": {
            "task": {"const": "transcribe"},
            "language": {"type": "string"},
            "duration": {"type": "number"},
            "text": {"type": "string"},
            "segments": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "seek", "start", "end", "text", "tokens"],
                    "properties": {
                        "id": {"type": "integer"},
                        "seek": {"type": "integer"},
                        "start": {"type": "number"},
                        "end": {"type": "number"},
                        "text": {"type": "string"},
                        "tokens": {"type": "array", "items": {"type": "integer"}},
                        "temperature": {"type": "number"},
                        "avg_logprob": {"type": "number"},
                        "compression_ratio": {"type": "number"},
                        "no_speech_prob": {"type": "number"},
                    },
                },
            },
            "words": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["word", "start", "end"],
                    "properties": {
                        "word": {"type": "string"},
                        "start": {"type": "number"},
                        "end": {"type": "number"},
                    },
                },
            },
            "usage": _USAGE,
            "audio_errors": {"type": "integer"},
        },
    },
    "OpenAIModel": {
        "type": "object",
        "required": ["id", "root", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "root": {"type": "string", "description": "the engine this model runs on"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "OpenAIModelList": {
        "type": "object",
        "required": ["data", "object"],
        "properties": {
            "data": {"type": "array", "items": _ref("OpenAIModel")},
            "object": {"const": "list"},
        },
    },
}


# --- the AymurAI profile -------------------------------------------------------------------------

_USE_CACHE = _query(
    "use_cache", {**_BOOLEAN, "default": True}, "serve a stored transcript of the same bytes"
)
_AYMURAI_UPLOAD = {
    "required": True,
    "content": {"multipart/form-data": {"schema": _multipart({"file": _FILE})}},
}
_DOCUMENT_OK = {"200": _json(_ref("ASRDocument"), "the document")}


def _aymurai() -> dict[str, Schema]:
    return {
        "/asr/transcribe/stream": {
            "post": {
                "operationId": "transcribe_stream",
                "summary": "Transcribe an upload, streaming cumulative snapshots as SSE",
                "parameters": [_USE_CACHE],
                "requestBody": _AYMURAI_UPLOAD,
                "responses": {
                    "200": _sse(
                        "Events `transcription` (a snapshot), then exactly one `done` or `error`;"
                        " `: keepalive` comments while nothing else is sent, `: queued N` while"
                        " queued. A cache hit is a single `done`.",
                        {
                            "transcription": _ref("ASRDocument"),
                            "done": _ref("ASRDocument"),
                            "error": _ref("AymurAIError"),
                        },
                    ),
                    **_errors("aymurai", _UPLOAD),
                },
            }
        },
        "/asr/transcribe": {
            "post": {
                "operationId": "transcribe",
                "summary": "Transcribe an upload and answer once it is done",
                "deprecated": True,
                "parameters": [_USE_CACHE],
                "requestBody": _AYMURAI_UPLOAD,
                "responses": {**_DOCUMENT_OK, **_errors("aymurai", _BLOCKING)},
            }
        },
        "/asr/validation/document/{document_id}": {
            "parameters": [_path("document_id", {"type": "string", "format": "uuid"})],
            "get": {
                "operationId": "get_validation",
                "summary": "The validated paragraphs, or the machine transcript",
                "responses": {**_DOCUMENT_OK, **_errors("aymurai", (401, 404))},
            },
            "post": {
                "operationId": "post_validation",
                "summary": "Store validated paragraphs (kept when the audio is transcribed again)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"type": "array", "items": _ref("ASRParagraphIn")}
                        }
                    },
                },
                "responses": {**_DOCUMENT_OK, **_errors("aymurai", (*_BODY, 404))},
            },
        },
    }


_DURATION = {
    "oneOf": [
        {"type": "string", "description": "PT2.5S or H:MM:SS"},
        {"type": "number", "minimum": 0, "maximum": MAX_SECONDS},
    ]
}
# pydantic's timedelta: ISO 8601 with a fractional second ("PT0.1S"), which JSON Schema's
# "duration" format (RFC 3339, whole seconds only) does not allow.
_ISO_DURATION = {
    "type": "string",
    "pattern": r"^P(\d+Y)?(\d+D)?(T(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?$",
}
_AYMURAI_SCHEMAS: dict[str, Schema] = {
    "ASRParagraph": {
        "type": "object",
        "required": ["speaker_no", "speaker_name", "start", "end", "text", "paragraph_id"],
        "properties": {
            "speaker_no": {"type": "integer"},
            "speaker_name": {"type": ["string", "null"]},
            "start": _ISO_DURATION,
            "end": _ISO_DURATION,
            "text": {"type": "string"},
            "paragraph_id": {"type": "string", "format": "uuid"},
        },
    },
    "ASRParagraphIn": {
        "type": "object",
        "required": ["speaker_no", "start", "end", "text"],
        "properties": {
            "speaker_no": {"type": "integer"},
            "speaker_name": {"type": ["string", "null"]},
            "start": _DURATION,
            "end": _DURATION,
            "text": {"type": "string"},
        },
    },
    "ASRDocument": {
        "type": "object",
        "required": ["document", "document_id", "current_time", "total_time"],
        "properties": {
            "document": {"type": "array", "items": _ref("ASRParagraph")},
            "document_id": {"type": "string", "format": "uuid"},
            "current_time": {"type": ["number", "null"]},
            "total_time": {"type": ["number", "null"]},
            "audio_errors": {"type": "integer"},
        },
    },
    "AymurAIError": {
        "type": "object",
        "required": ["detail", "code"],
        "properties": {"detail": {"type": "string"}, "code": {"type": "string", "minLength": 1}},
    },
}


# --- health, readiness, metrics, this document ---------------------------------------------------


def _operations(config: Config) -> dict[str, Schema]:
    status = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string"}},
    }
    metrics_errors = _errors("native", (401,)) if config.auth.protect_metrics else {}
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is up",
                "responses": {"200": _json(status, "up")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "The store is writable and the default engine can take sessions",
                "responses": {
                    "200": _json(_ref("Readiness"), "ready"),
                    "503": _json(_ref("Readiness"), "not ready; reasons say why"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": _text("text/plain", description="Prometheus text format"),
                    **metrics_errors,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": _json({"type": "object"}, "OpenAPI 3.1"),
                    **_errors("native", (401,)),
                },
            }
        },
    }


def _web() -> dict[str, Schema]:
    """The web page and its assets (public even with auth on: they hold no data)."""

    def asset(name: str, media_type: str) -> Schema:
        return {
            "get": {
                "operationId": f"web_{name.replace('.', '_')}",
                "summary": f"The web page's {name}",
                "responses": {"200": _text(media_type.split(";")[0], description=name)},
            }
        }

    page = {
        "operationId": "web_page",
        "summary": "The web page: upload a recording, watch, correct and export its transcript",
        "parameters": [
            _query("id", {"type": "string"}, "a stored transcript to reopen (a permalink)")
        ],
        "responses": {"200": _text("text/html", description="the page")},
    }
    return {
        "/": {"get": page},
        **{f"/web/{name}": asset(name, media) for name, media in web.ASSETS.items()},
    }


_READINESS = {
    "type": "object",
    "required": ["status", "reasons", "engines"],
    "properties": {
        "status": {"enum": ["ready", "unready"]},
        "reasons": {"type": "array", "items": {"type": "string"}},
        "engines": {"type": "object"},
    },
}


def document(config: Config, version: str = "") -> Schema:
    """The OpenAPI 3.1 document of a gateway running ``config``."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "asr-gateway",
            "version": version,
            "description": (
                "Native API (/v1/transcriptions), OpenAI-compatible API (/v1/audio, /v1/models)"
                " and the AymurAI profile (/asr). Each answers errors in its own shape: "
                + ", ".join(f"{api}: {name}" for api, name in ERROR_SCHEMAS.items())
                + ". Unknown paths and methods are coded 404/405 in the shape of the path's API;"
                " bytes that do not frame an HTTP request get 400 MALFORMED_REQUEST (431"
                " HEADERS_TOO_LARGE) in all three shapes at once. GET / serves a web page"
                " that uses the native API."
            ),
        },
        "paths": {
            **_native(config),
            **_openai(config),
            **_aymurai(),
            **_operations(config),
            **_web(),
        },
        "components": {
            "schemas": {
                **_NATIVE_SCHEMAS,
                **_OPENAI_SCHEMAS,
                **_AYMURAI_SCHEMAS,
                "Readiness": _READINESS,
            }
        },
    }


def routes(config: Config) -> list[Route]:
    """``GET /openapi.json``: the document, encoded once."""
    from . import __version__  # the package defines it after importing its modules

    body = _encoder.encode(document(config, __version__))

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return [Route("/openapi.json", openapi, methods=["GET"])]
