"""What every front API shares: turning a request into a :class:`~gateway.pipeline.Job`, and
serving a job (:func:`serve_job`) as an SSE stream or as one final result.

A front API supplies a :class:`Translator` (typed events to wire frames) and its own error shape;
the pipeline, the store and the engines are the same for all of them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import anyio
from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from ..admission import Ticket
from ..audio import MULTIPART_OVERHEAD, PcmDecoder, Upload, open_decoder, receive_upload
from ..errors import (
    ClientDisconnected,
    DecodeError,
    GatewayError,
    InvalidOption,
    PayloadTooLarge,
    RequestTimeout,
    ShuttingDown,
    UnknownEngine,
    UpstreamUnavailable,
    status_of,
)
from ..events import Done, Failed, StreamEvent
from ..logs import current_request
from ..pipeline import KEEPALIVE, Job, Outbox, cached_result, keepalive, run_job

if TYPE_CHECKING:
    from ..app import GatewayState

__all__ = [
    "MAX_JSON_BYTES",
    "SSE_HEADERS",
    "JobOptions",
    "Translator",
    "body_chunks",
    "failure_error",
    "gateway_state",
    "parse_bool",
    "prepare_job",
    "read_body",
    "receive_job",
    "serve_job",
    "tenant_of",
]

log = logging.getLogger("gateway.api")

# A JSON body (corrections, a validation) is a list of segments: 1 MiB holds hours of text.
MAX_JSON_BYTES = 1024 * 1024
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class Translator(Protocol):
    keepalive_frame: bytes

    def encode(self, event: StreamEvent) -> bytes | None:
        """The wire frame(s) for one event, or None to send nothing for it."""


def gateway_state(request: Request) -> GatewayState:
    state: GatewayState = request.app.state.gateway
    return state


@dataclass(frozen=True)
class JobOptions:
    """What a front API reads from a request to set up a job."""

    engine: str
    language: str = ""
    use_cache: bool = True


OptionsT = TypeVar("OptionsT", bound=JobOptions)


async def receive_job(
    request: Request, parse: Callable[[GatewayState, Upload], OptionsT]
) -> tuple[GatewayState, Job, OptionsT]:
    """Receive the upload, read the API's options from it (``parse``), and prepare the job; any
    failure closes the upload and is a GatewayError before the stream starts."""
    state = gateway_state(request)
    upload = await receive(request, state)
    try:
        options = parse(state, upload)
    except BaseException:
        await upload.aclose()
        raise
    job = await prepare_job(
        state,
        upload,
        engine_name=options.engine,
        language=options.language,
        use_cache=options.use_cache,
        tenant=tenant_of(request),
    )
    return state, job, options


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


async def body_chunks(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The one reader of every request body, for every route that takes one.

    - A declared Content-Length over ``limit`` is PayloadTooLarge before a byte is read; a body
      that turns out longer (chunked, or a lying length) is cut once it passes ``limit``.
    - RequestTimeout when no chunk arrives for ``server.body_timeout`` seconds (slow loris).
    - A client that leaves mid-body is :class:`ClientDisconnected` (logged 499, not answered).
    """
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"a body of {length} bytes exceeds this route's {limit}")
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


async def read_body(request: Request, limit: int) -> bytes:
    """A whole (small) body through :func:`body_chunks`."""
    body = bytearray()
    async with aclosing(body_chunks(request, limit)) as chunks:
        async for chunk in chunks:
            body += chunk
    return bytes(body)


async def receive(request: Request, state: GatewayState) -> Upload:
    length = request.headers.get("content-length")
    max_bytes = state.config.server.max_upload_bytes
    return await receive_upload(
        request.headers.get("content-type", ""),
        int(length) if length and length.isdigit() else None,
        body_chunks(request, max_bytes + MULTIPART_OVERHEAD),
        max_bytes=max_bytes,
        spool_dir=state.config.server.spool_dir or None,
    )


def option(request: Request, upload: Upload | None, name: str, default: str = "") -> str:
    if upload is not None and name in upload.fields:
        return upload.field(name)
    return request.query_params.get(name, default)


async def prepare_job(
    state: GatewayState,
    upload: Upload,
    *,
    engine_name: str,
    language: str,
    use_cache: bool,
    tenant: str = "",
) -> Job:
    """Check the engine, look the upload up in the cache and, on a miss, reserve the job's place
    at the engine's admission and probe the audio; every failure here is a 4xx/5xx before the
    stream.

    The reservation is one synchronous step (see :meth:`~gateway.admission.Admission.reserve`):
    a job either holds a place (running or queued) before its 200, or is refused with 503
    CAPACITY_EXHAUSTED and Retry-After, whatever the engine. A cache hit needs no engine
    session, so it is served even when the engine is at capacity or unreachable, and without
    opening the audio.
    """
    entry = current_request()
    release: Callable[[], None] | None = None
    ticket: Ticket | None = None
    decoder: PcmDecoder | None = None
    cached: Done | None = None
    try:
        if state.draining:
            raise ShuttingDown("the gateway is shutting down", retry_after=1)
        release = state.tenant_streams.acquire(tenant)
        engine = state.engine(engine_name)
        language = engine.resolve_language(language)
        if use_cache:
            stored = await state.store.get(upload.id, tenant)
            cached = cached_result(stored, engine.name, language)
        if cached is None:
            ticket = engine.admission.reserve()
            reason = await engine.readiness()
            if reason is not None:
                raise UpstreamUnavailable(reason)
            decoder = await anyio.to_thread.run_sync(open_decoder, upload.path)
    except BaseException as exc:
        if release is not None:
            release()
        if entry is not None and isinstance(exc, GatewayError):
            entry.outcome = exc.code
        if ticket is not None:
            await ticket.release()
        await upload.aclose()
        raise
    total_time = decoder.duration if decoder is not None else None
    if cached is not None:
        total_time = cached.transcript.total_time
    state.job_started()
    if entry is not None:
        entry.engine, entry.audio_seconds = engine.name, total_time
    return Job(
        upload=upload,
        decoder=decoder,
        cached=cached,
        ticket=ticket,
        engine=engine,
        store=state.store,
        language=language,
        tenant=tenant,
        total_time=total_time,
        max_seconds=state.config.server.max_session_seconds,
        stop=state.stop,
        on_close=[state.job_ended, release],
        on_outcome=entry.set_outcome if entry is not None else None,
    )


def check_engine(state: GatewayState, name: str) -> None:
    if name and name not in state.engines:
        raise UnknownEngine(f"unknown engine {name!r}; configured: {', '.join(state.engines)}")


class SSEStream:
    """An ASGI response that runs a job and streams its events through a translator.

    The pipeline, the keepalive and sse-starlette's writer share one task group that lives exactly
    as long as the response: when the client leaves, sse-starlette returns and the group is
    cancelled, which closes the engine session.
    """

    def __init__(
        self,
        job: Job,
        translator: Translator,
        *,
        keepalive: float,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.job = job
        self.translator = translator
        self.keepalive = keepalive
        self.headers = {**SSE_HEADERS, **(headers or {})}

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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        outbox = Outbox()
        response = EventSourceResponse(self._frames(outbox), ping=0, headers=self.headers)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_job, self.job, outbox)
                if self.keepalive > 0:
                    tg.start_soon(keepalive, outbox, self.keepalive)
                await response(scope, receive, send)
                tg.cancel_scope.cancel()
        finally:
            await self.job.aclose()


async def run_to_end(job: Job, receive: Receive) -> Done | Failed | None:
    """Run a job to its final event; ``None`` if the client left first (the job is cancelled)."""
    outbox = Outbox()
    result: Done | Failed | None = None
    try:
        async with anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    message: Message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            await run_job(job, outbox)
            result = outbox.final
            tg.cancel_scope.cancel()
    finally:
        await job.aclose()
    return result


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


async def serve_job(
    scope: Scope,
    receive: Receive,
    send: Send,
    job: Job,
    *,
    translator: Translator | None,
    keepalive: float,
    answer: Callable[[Done | Failed], Response],
) -> None:
    """Serve a prepared job: as an SSE stream through ``translator``, or (None) as the one
    response ``answer`` makes of its final event; nothing when the client left first."""
    if translator is not None:
        await SSEStream(job, translator, keepalive=keepalive)(scope, receive, send)
        return
    result = await run_to_end(job, receive)
    if result is not None:
        await answer(result)(scope, receive, send)
