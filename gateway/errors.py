"""The gateway's exception tree and its stable, machine-readable error codes.

Every failure a client can see is a :class:`GatewayError`. Before a stream starts it becomes a
4xx/5xx JSON body ``{"error": {"code", "detail"}}``; after, exactly one ``error`` event. Foreign
exceptions (PyAV, sqlite3, trio-websocket, ...) are mapped into this tree at one boundary per
module with ``raise ... from exc``.

::

    GatewayError                      code                   HTTP
    ├── BadRequest                    BAD_REQUEST            400
    │   ├── MissingFile               MISSING_FILE           400
    │   ├── EmptyFile                 EMPTY_FILE             400
    │   ├── InvalidOption             INVALID_OPTION         400
    │   ├── InvalidBody               INVALID_BODY           400
    │   ├── InvalidMessage            INVALID_MESSAGE        400 (a live stream's control frame)
    │   └── MalformedRequest          MALFORMED_REQUEST      400 (HTTP framing, see server)
    ├── Unauthorized                  UNAUTHORIZED           401
    ├── RequestTimeout                REQUEST_TIMEOUT        408
    ├── HeadersTooLarge               HEADERS_TOO_LARGE      431
    ├── PayloadTooLarge               PAYLOAD_TOO_LARGE      413
    ├── UnsupportedMediaType          UNSUPPORTED_MEDIA_TYPE 415
    ├── DecodeError                   DECODE_ERROR           415
    ├── NotFound                      NOT_FOUND              404
    │   └── UnknownEngine             UNKNOWN_ENGINE         404
    ├── MethodNotAllowed              METHOD_NOT_ALLOWED     405 (+ Allow)
    ├── TooManyStreams                TOO_MANY_STREAMS       429 (+ Retry-After)
    ├── CapacityExhausted             CAPACITY_EXHAUSTED     503 (+ Retry-After)
    ├── CapacityTimeout               CAPACITY_TIMEOUT       503
    ├── EngineError
    │   ├── UpstreamUnavailable       UPSTREAM_UNAVAILABLE   503
    │   └── UpstreamError             UPSTREAM_ERROR         502
    ├── Timeout                       TIMEOUT                504
    ├── ShuttingDown                  SHUTTING_DOWN          503
    ├── StoreError                    STORE_ERROR            500
    │   └── StoreUnavailable          STORE_UNAVAILABLE      503 (+ Retry-After)
    └── InternalError                 INTERNAL_ERROR         500

``ConfigError`` stands apart: it is raised at start-up, never shown to an HTTP client. So does
``ClientDisconnected``: the client left while sending its body, so there is nobody to answer; it
is logged as 499 DISCONNECTED.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import anyio

__all__ = [
    "BadRequest",
    "CapacityExhausted",
    "CapacityTimeout",
    "ClientDisconnected",
    "ConfigError",
    "DecodeError",
    "EmptyFile",
    "EngineError",
    "GatewayError",
    "HeadersTooLarge",
    "InternalError",
    "InvalidBody",
    "InvalidMessage",
    "InvalidOption",
    "MalformedRequest",
    "MethodNotAllowed",
    "MissingFile",
    "NotFound",
    "PayloadTooLarge",
    "RequestTimeout",
    "ShuttingDown",
    "StoreError",
    "StoreUnavailable",
    "Timeout",
    "TooManyStreams",
    "Unauthorized",
    "UnknownEngine",
    "UnsupportedMediaType",
    "UpstreamError",
    "UpstreamUnavailable",
    "collapse_groups",
    "status_of",
]


class GatewayError(Exception):
    """Base of every client-visible failure; ``code`` is stable, ``detail`` is for humans."""

    code = "INTERNAL_ERROR"
    status = 500

    def __init__(self, detail: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(detail or self.code)
        self.detail = detail or self.code
        self.retry_after = retry_after


def status_of(code: str, default: int = 500) -> int:
    """The HTTP status of an error code, from the tree (in-band failures carry only their code)."""

    def walk(cls: type[GatewayError]) -> Iterator[type[GatewayError]]:
        yield cls
        for sub in cls.__subclasses__():
            yield from walk(sub)

    return next((cls.status for cls in walk(GatewayError) if cls.code == code), default)


class BadRequest(GatewayError):
    code, status = "BAD_REQUEST", 400


class MissingFile(BadRequest):
    code = "MISSING_FILE"


class EmptyFile(BadRequest):
    code = "EMPTY_FILE"


class InvalidOption(BadRequest):
    code = "INVALID_OPTION"


class InvalidBody(BadRequest):
    code = "INVALID_BODY"


class InvalidMessage(BadRequest):
    """A message on a live stream that the protocol does not allow (after the upgrade)."""

    code = "INVALID_MESSAGE"


class MalformedRequest(BadRequest):
    """The bytes do not frame an HTTP request (answered by the server, before any route)."""

    code = "MALFORMED_REQUEST"


class HeadersTooLarge(GatewayError):
    code, status = "HEADERS_TOO_LARGE", 431


class Unauthorized(GatewayError):
    code, status = "UNAUTHORIZED", 401


class RequestTimeout(GatewayError):
    code, status = "REQUEST_TIMEOUT", 408


class TooManyStreams(GatewayError):
    code, status = "TOO_MANY_STREAMS", 429


class PayloadTooLarge(GatewayError):
    code, status = "PAYLOAD_TOO_LARGE", 413


class UnsupportedMediaType(GatewayError):
    code, status = "UNSUPPORTED_MEDIA_TYPE", 415


class DecodeError(GatewayError):
    code, status = "DECODE_ERROR", 415


class NotFound(GatewayError):
    code, status = "NOT_FOUND", 404


class UnknownEngine(NotFound):
    code = "UNKNOWN_ENGINE"


class MethodNotAllowed(GatewayError):
    code, status = "METHOD_NOT_ALLOWED", 405


class CapacityExhausted(GatewayError):
    code, status = "CAPACITY_EXHAUSTED", 503


class CapacityTimeout(GatewayError):
    code, status = "CAPACITY_TIMEOUT", 503


class EngineError(GatewayError):
    """A failure of the recogniser behind the gateway."""

    code, status = "UPSTREAM_ERROR", 502


class UpstreamUnavailable(EngineError):
    code, status = "UPSTREAM_UNAVAILABLE", 503


class UpstreamError(EngineError):
    code, status = "UPSTREAM_ERROR", 502


class Timeout(GatewayError):
    code, status = "TIMEOUT", 504


class ShuttingDown(GatewayError):
    code, status = "SHUTTING_DOWN", 503


class StoreError(GatewayError):
    code, status = "STORE_ERROR", 500


class StoreUnavailable(StoreError):
    """The database cannot be reached now (PostgreSQL down or restarting): try again later."""

    code, status = "STORE_UNAVAILABLE", 503


class InternalError(GatewayError):
    code, status = "INTERNAL_ERROR", 500


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""


class ClientDisconnected(Exception):
    """The client closed the connection before its request body was complete."""

    code = "DISCONNECTED"


@contextmanager
def collapse_groups() -> Iterator[None]:
    """Re-raise the most useful single exception out of a task group's ExceptionGroup.

    A task group that fails wraps the failure (and the other tasks' cancellations) in an
    ExceptionGroup. Callers care about the one real error: a GatewayError first, then any other
    non-cancellation error. A group of cancellations only is re-raised untouched.

    This is the gateway's one unwrap (the pipeline, the store, the upstream engines and their
    socket all use it). The chosen exception is raised as itself, with the cause it was raised
    from (``raise ... from exc`` at a boundary), and without the group as its context.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        cancelled = anyio.get_cancelled_exc_class()
        real = [e for e in leaves if not isinstance(e, cancelled)]
        chosen = next((e for e in real if isinstance(e, GatewayError)), real[0] if real else None)
        if chosen is None:
            raise
        _reraise(chosen)


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _reraise(exc: BaseException) -> NoReturn:
    """Raise ``exc`` out of an ``except`` block without making that block's error its context."""
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, context
