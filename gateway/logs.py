"""Logging: one JSON object per line (or plain text), and the access log, one line per request.

The access line goes to the ``gateway.access`` logger when the response has ended (for SSE, when
the stream has ended) with ``record.request``: request_id, method, path, status, client, tenant,
engine, outcome, audio_seconds, bytes_in, duration_s and ttfb_s. It never holds audio, transcript
text, query strings or headers other than X-Request-ID.

Handlers fill in what they learn through :func:`current_request`: it is a context variable, so
``prepare_job`` reaches it without a request object, and every task started below the middleware
sees the same record.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import IO, Any

import anyio
import msgspec
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import LogConfig

__all__ = [
    "JsonFormatter",
    "RequestLog",
    "RequestLogMiddleware",
    "TextFormatter",
    "configure_logging",
    "current_request",
]

access_log = logging.getLogger("gateway.access")

# A client's X-Request-ID is kept when it looks like an id (nginx's $request_id, a UUID, ...);
# anything else is replaced, so the log never carries arbitrary client text.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Error bodies up to this size are read for their machine-readable code.
_ERROR_PEEK_BYTES = 4096
# The status logged when the client left before any response started (nginx's convention).
CLIENT_CLOSED = 499

_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_json = msgspec.json.Encoder(enc_hook=str)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _json.encode(out).decode()


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...``; dict extras are flattened."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        pairs: list[str] = []
        for key, value in _extras(record).items():
            items = value.items() if isinstance(value, dict) else [(key, value)]
            pairs.extend(f"{k}={_json.encode(v).decode()}" for k, v in items)
        line = super().format(record)
        return f"{line} {' '.join(pairs)}" if pairs else line


def configure_logging(config: LogConfig, stream: IO[str] | None = None) -> None:
    """Send every log record to ``stream`` (stderr) in the configured format and level."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    logging.basicConfig(handlers=[handler], level=config.level.upper(), force=True)


@dataclass(eq=False)
class RequestLog:
    """What one request's access line says; handlers fill in the fields they know."""

    request_id: str
    method: str
    path: str
    client: str
    status: int | None = None
    tenant: str = ""
    engine: str = ""
    outcome: str = ""
    audio_seconds: float | None = None
    bytes_in: int = 0
    duration_s: float | None = None
    ttfb_s: float | None = None

    def set_outcome(self, code: str) -> None:
        self.outcome = code


_current: ContextVar[RequestLog | None] = ContextVar("gateway_request_log", default=None)


def current_request() -> RequestLog | None:
    """The access-log record of the request being served, if any."""
    return _current.get()


def _request_id(scope: Scope) -> str:
    candidate = Headers(scope=scope).get("x-request-id", "").strip()
    return candidate if _REQUEST_ID_RE.fullmatch(candidate) else uuid.uuid4().hex


def _error_code(body: bytes) -> str | None:
    """The code of an error body in any front API's shape: ``{"error": {"code"}}`` (native,
    OpenAI: lower case there) or ``{"code"}`` (AymurAI)."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not isinstance(data, dict):
        return None
    error = data.get("error")
    code = error.get("code") if isinstance(error, dict) else data.get("code")
    return code.upper() if isinstance(code, str) and code else None


# A WebSocket that was accepted is logged with the handshake's status.
SWITCHING_PROTOCOLS = 101


class RequestLogMiddleware:
    """Tags each HTTP request with an X-Request-ID and writes its access line when it ends.

    A WebSocket is one request too: its line is written when the socket ends, with status 101
    once accepted (or the status of its refusal), the audio bytes received as ``bytes_in``, and
    its stream's outcome.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        started = anyio.current_time()
        client = scope.get("client")
        entry = RequestLog(
            request_id=_request_id(scope),
            method=scope.get("method", "GET"),
            path=scope["path"],
            client=client[0] if client else "",
        )
        state = scope.setdefault("state", {})
        state["request_log"] = entry
        token = _current.set(entry)
        peek: bytearray | None = None

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                entry.bytes_in += len(message.get("body", b""))
            elif message["type"] == "websocket.receive":
                entry.bytes_in += len(message.get("bytes") or b"")
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal peek
            # A WebSocket refused before its upgrade is answered with the same HTTP messages,
            # named "websocket.http.response.*".
            kind = message["type"].removeprefix("websocket.")
            if kind == "accept":
                entry.status = SWITCHING_PROTOCOLS
                headers = [*message.get("headers", [])]
                headers.append((b"x-request-id", entry.request_id.encode()))
                message = {**message, "headers": headers}
            elif kind == "send" and entry.ttfb_s is None:
                entry.ttfb_s = round(anyio.current_time() - started, 6)
            elif kind == "http.response.start":
                entry.status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = entry.request_id
                content_type = MutableHeaders(scope=message).get("content-type", "")
                if entry.status >= 400 and content_type.startswith("application/json"):
                    peek = bytearray()
            elif kind == "http.response.body":
                body = message.get("body", b"")
                if body and entry.ttfb_s is None:
                    entry.ttfb_s = round(anyio.current_time() - started, 6)
                if peek is not None and len(peek) < _ERROR_PEEK_BYTES:
                    peek += body[: _ERROR_PEEK_BYTES - len(peek)]
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except BaseException:
            entry.outcome = entry.outcome or "INTERNAL_ERROR"
            entry.status = entry.status or 500
            raise
        finally:
            _current.reset(token)
            entry.duration_s = round(anyio.current_time() - started, 6)
            entry.tenant = state.get("tenant", "")
            if entry.status is None:
                entry.status = CLIENT_CLOSED if entry.outcome == "DISCONNECTED" else 500
            if not entry.outcome:
                code = _error_code(bytes(peek)) if peek else None
                entry.outcome = code or ("OK" if entry.status < 400 else f"HTTP_{entry.status}")
            access_log.info(
                "%s %s %s %s %.3fs",
                entry.method,
                entry.path,
                entry.status,
                entry.outcome,
                entry.duration_s,
                extra={"request": asdict(entry)},
            )
