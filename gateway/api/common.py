"""What every front API shares: reading requests (bodies, options, JSON), and the one endpoint
type for their transcription routes, :class:`Transcribe`, which serves a prepared job as an SSE
stream or as one final answer.

A route may also take a live body (``?live=true`` on the native stream): the body is then the
audio itself, fed to a :class:`~gateway.sources.LiveSource` while it is still arriving, and the
events stream back at the same time (hypercorn lets an ASGI app answer before the request body
ends, on HTTP/2 and on a chunked HTTP/1.1 body alike): see :func:`feed_live_body`.

A front API supplies what differs: its option parser, a :class:`Translator` (typed events to
wire frames), its final answer and its error responder. Preparing the job is
:func:`gateway.jobs.prepare_job`'s, running it :func:`gateway.pipeline.attend`'s.

Front modules import this one, never each other; this module must never import a front, the
app or the auth middleware.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace
from functools import partial
from typing import Generic, Protocol, TypeVar

import anyio
import msgspec
from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..audio import MULTIPART_OVERHEAD, Upload, receive_upload
from ..errors import (
    ClientDisconnected,
    DecodeError,
    GatewayError,
    InvalidBody,
    InvalidOption,
    PayloadTooLarge,
    RequestTimeout,
    Timeout,
    status_of,
)
from ..events import Done, Failed, StreamEvent
from ..jobs import GatewayState, JobOptions, prepare_job
from ..pipeline import KEEPALIVE, Job, Outbox, attend
from ..sources import LiveSource, SpooledUpload

__all__ = [
    "MAX_JSON_BYTES",
    "SSE_HEADERS",
    "ErrorResponder",
    "SSEStream",
    "Transcribe",
    "Translator",
    "body_chunks",
    "check_length",
    "failure_error",
    "feed_live_body",
    "gateway_state",
    "option",
    "parse_bool",
    "read_body",
    "read_json_body",
    "tenant_of",
]

# A JSON body (corrections, a validation) is a list of segments: 1 MiB holds hours of text.
MAX_JSON_BYTES = 1024 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

#: A front API's error shape: a GatewayError as that API's JSON response.
ErrorResponder = Callable[[GatewayError], Response]

OptionsT = TypeVar("OptionsT", bound=JobOptions)
T = TypeVar("T")


class Translator(Protocol):
    keepalive_frame: bytes

    def encode(self, event: StreamEvent) -> bytes | None:
        """The wire frame(s) for one event, or None to send nothing for it."""


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


def tenant_of(request: Request) -> str:
    """The tenant the auth middleware resolved for this request ("" when auth is off)."""
    tenant: str = request.scope.get("state", {}).get("tenant", "")
    return tenant


def parse_bool(name: str, value: str, default: bool) -> bool:
    if value == "":
        return default
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise InvalidOption(f"{name} must be true or false, got {value!r}")


def option(request: Request, upload: Upload | None, name: str, default: str = "") -> str:
    """A request option: the form field of that name when the upload has one, else the query's."""
    if upload is not None and name in upload.fields:
        return upload.field(name)
    return request.query_params.get(name, default)


def check_length(request: Request, limit: int) -> None:
    """PayloadTooLarge when the declared Content-Length is over ``limit``."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"a body of {length} bytes exceeds this route's {limit}")


async def body_chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The one reader of every request body, for every route that takes one.

    - A declared Content-Length over ``limit`` is PayloadTooLarge before a byte is read; a body
      that turns out longer (chunked, or a lying length) is cut once it passes ``limit``.
    - RequestTimeout when no chunk arrives for ``server.body_timeout`` seconds (slow loris).
    - A client that leaves mid-body is :class:`ClientDisconnected` (logged 499, not answered).
    """
    check_length(request, limit)
    max_gap = gateway_state(request).config.server.body_timeout
    received = 0
    async with aclosing(request.stream()) as chunks:
        while True:
            with anyio.move_on_after(max_gap) as scope:
                try:
                    chunk = await anext(chunks, None)
                except ClientDisconnect as exc:
                    raise ClientDisconnected("the client left while sending the body") from exc
            if scope.cancelled_caught:
                raise RequestTimeout(f"no request body data for {max_gap:g} s")
            if chunk is None:
                return
            received += len(chunk)
            if received > limit:
                raise PayloadTooLarge(f"the body is larger than this route's {limit} bytes")
            if chunk:
                yield chunk


async def feed_live_body(request: Request, source: LiveSource, job: Job, limit: int) -> bool:
    """Pass a body that is still arriving to a live source, piece by piece, and end the source
    with it; False when the client left first.

    Like a live WebSocket's reader, this stops reading while the source is full, which is the
    backpressure on a client faster than real time. The body's limits hold after the stream
    started, as error events: a gap longer than ``server.body_timeout`` is TIMEOUT (the live
    endpoints' code for a silent client), a body past ``limit`` PAYLOAD_TOO_LARGE.
    """
    try:
        async with aclosing(body_chunks(request, limit)) as chunks:
            async for chunk in chunks:
                await source.push(chunk)
    except ClientDisconnected:
        return False
    except RequestTimeout as exc:
        job.fail(Timeout(exc.detail))
    except GatewayError as exc:
        job.fail(exc)
    else:
        source.end()
    return True


async def read_body(request: Request, limit: int) -> bytes:
    """A whole (small) body through :func:`body_chunks`."""
    body = bytearray()
    async with aclosing(body_chunks(request, limit)) as chunks:
        async for chunk in chunks:
            body += chunk
    return bytes(body)


async def read_json_body(request: Request, decoder: msgspec.json.Decoder[T], what: str) -> T:
    """A JSON body of at most :data:`MAX_JSON_BYTES`, decoded and validated by ``decoder``;
    InvalidBody (saying it is not JSON, or what about ``what`` is invalid) otherwise."""
    try:
        return decoder.decode(await read_body(request, MAX_JSON_BYTES))
    except msgspec.ValidationError as exc:
        raise InvalidBody(f"invalid {what}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidBody(f"the body is not JSON: {exc}") from exc


async def _receive_upload(request: Request, state: GatewayState) -> Upload:
    length = request.headers.get("content-length")
    max_bytes = state.config.server.max_upload_bytes
    return await receive_upload(
        request.headers.get("content-type", ""),
        int(length) if length and length.isdigit() else None,
        body_chunks(request, max_bytes + MULTIPART_OVERHEAD),
        max_bytes=max_bytes,
        spool_dir=state.config.server.spool_dir or None,
    )


def failure_error(failed: Failed, default_status: int = 500) -> GatewayError:
    """A failure after the job started, as the error a blocking endpoint answers with.

    The probe passed before the job started, so audio that fails to decode later is bad content
    (422), not a bad type (415)."""
    error = GatewayError(failed.detail)
    error.code = failed.code
    error.status = (
        422 if failed.code == DecodeError.code else status_of(failed.code, default_status)
    )
    return error


class SSEStream:
    """An ASGI response that runs a job and streams its events through a translator.

    The job, the keepalive and sse-starlette's writer share the request's one task group
    (:func:`~gateway.pipeline.attend`): when the client leaves, sse-starlette returns and the
    group is cancelled, which closes the engine session.
    """

    def __init__(
        self,
        job: Job,
        translator: Translator,
        *,
        keepalive: float,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.job = job
        self.translator = translator
        self.keepalive = keepalive
        self.headers = {**SSE_HEADERS, **(headers or {})}
        # A live body still arriving (feed_live_body): read beside the writer.
        self.body = body

    async def _frames(self, outbox: Outbox) -> AsyncIterator[bytes]:
        # Not `async for event in outbox`: sse-starlette acloses this generator when the client
        # leaves, which would leave the outbox's own generator suspended for the GC to finalise.
        # Every event ready when the writer comes back goes out in one write: under load that
        # saves a trip through the ASGI send path (middleware, sse-starlette, hypercorn) per event.
        while not outbox.finished:
            frames: list[bytes] = []
            event: object | None = await outbox.get()
            while event is not None:
                frame = (
                    self.translator.keepalive_frame
                    if event is KEEPALIVE
                    else self.translator.encode(event)  # type: ignore[arg-type]
                )
                if frame:
                    frames.append(frame)
                event = None if outbox.finished else outbox.get_nowait()
            if frames:
                yield frames[0] if len(frames) == 1 else b"".join(frames)
                outbox.mark_sent()

    async def _read_body(self, receive: Receive, left: anyio.CancelScope) -> None:
        assert self.body is not None
        if await self.body():
            await _until_disconnect(receive, None)
        left.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def write(outbox: Outbox) -> None:
            response = EventSourceResponse(self._frames(outbox), ping=0, headers=self.headers)
            if self.body is None:
                await response(scope, receive, send)
                return
            # The request's messages are the body's here: sse-starlette must not take them while
            # it watches for a disconnect, so the reader below watches for it instead and ends
            # the writer (and so the job) when the client leaves.
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read_body, receive, tg.cancel_scope)
                await response(scope, _no_messages, send)
                tg.cancel_scope.cancel()

        await attend(self.job, write, keepalive_interval=self.keepalive)


def _no_stream(state: GatewayState, options: JobOptions) -> None:
    return None


async def _no_messages() -> Message:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def _until_disconnect(receive: Receive, outbox: Outbox | None) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


@dataclass(frozen=True, kw_only=True, eq=False)
class Transcribe(Generic[OptionsT]):
    """A front API's transcription route, as a plain ASGI endpoint.

    Receives the upload, reads the front's options from it (``parse``, after ``check_query``, which
    may refuse a bad query before the body is read), prepares the job and serves it: as an SSE
    stream when ``translator`` gives one for these options, else as the one response ``answer``
    makes of ``done``. Every failure before the stream, and a blocking job's failure (with
    ``failure_status`` for codes of no fixed status), is answered by ``error_response``; a client
    that left first gets nothing.
    """

    parse: Callable[[Request, GatewayState, Upload], OptionsT]
    translator: Callable[[GatewayState, OptionsT], Translator | None]
    answer: Callable[[Done, OptionsT], Response]
    error_response: ErrorResponder
    check_query: Callable[[Request, GatewayState], object] | None = None
    failure_status: int = 502
    #: A live body for this request: its source and options, or None for an upload (see
    #: :func:`feed_live_body`). Streaming routes only.
    live: Callable[[Request, GatewayState], tuple[LiveSource, OptionsT] | None] | None = None

    def blocking(self) -> Transcribe[OptionsT]:
        """The same route answering once, at the end, instead of streaming."""
        return replace(self, translator=_no_stream, live=None)

    async def _prepare_live(
        self, request: Request, state: GatewayState
    ) -> tuple[Job, OptionsT, Callable[[], Awaitable[bool]]] | None:
        if self.live is None:
            return None
        limit = state.config.server.max_upload_bytes
        live = self.live(request, state)
        if live is None:
            return None
        source, options = live
        try:
            check_length(request, limit)
        except BaseException:
            await source.aclose()
            raise
        job = await prepare_job(state, source, options, tenant=tenant_of(request))
        return job, options, partial(feed_live_body, request, source, job, limit)

    async def _prepare(
        self, request: Request, state: GatewayState
    ) -> tuple[Job, OptionsT, Callable[[], Awaitable[bool]] | None]:
        if self.check_query is not None:
            self.check_query(request, state)
        if (live := await self._prepare_live(request, state)) is not None:
            return live
        upload = await _receive_upload(request, state)
        try:
            options = self.parse(request, state, upload)
        except BaseException:
            await upload.aclose()
            raise
        job = await prepare_job(state, SpooledUpload(upload), options, tenant=tenant_of(request))
        return job, options, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        state = gateway_state(request)
        try:
            job, options, body = await self._prepare(request, state)
        except GatewayError as exc:
            await self.error_response(exc)(scope, receive, send)
            return
        keepalive = state.config.server.keepalive
        translator = self.translator(state, options)
        if translator is not None:
            stream = SSEStream(job, translator, keepalive=keepalive, body=body)
            await stream(scope, receive, send)
            return
        result = await attend(job, partial(_until_disconnect, receive), ends_with_job=True)
        if isinstance(result, Failed):
            response = self.error_response(failure_error(result, self.failure_status))
        elif result is not None:
            response = self.answer(result, options)
        else:
            return
        await response(scope, receive, send)
