"""The native live endpoint: ``GET /v1/transcriptions/live``, a WebSocket.

Query: ``engine``, ``language``, ``format`` (``pcm_s16le``, the default, or ``auto`` for a
container stream such as WebM/Opus from a browser's MediaRecorder, or Ogg) and ``sample_rate``
(``pcm_s16le`` only, 8000 to 192000, default 16000). The client sends binary frames of audio and
then the text frame ``{"type": "end"}``; the server sends text frames, one JSON object each: the
native SSE events' fields plus ``type`` (``queued``, ``transcription``, then exactly one
``done`` or ``error``), then closes. ``total_time`` is null while the client is still sending;
the partials that follow its ``end`` and the ``done`` carry the length it turned out to have.

Refusals before the stream (a bad option, an unknown engine, a missing key, the tenant's stream
limit, a full queue, a draining gateway) are answered before the upgrade: the handshake gets the
HTTP status and the native JSON error body ``{"error": {"code", "detail"}}`` (the ASGI
``websocket.http.response`` extension, which hypercorn implements). A server without it would
accept, send the ``error`` frame and close with the code below.

Close codes, after the last frame:

====  =====================================================================================
1000  ``done``: the transcript is complete and stored (``GET /v1/transcriptions/{id}``)
1001  SHUTTING_DOWN: the gateway is stopping
1003  DECODE_ERROR: the audio cannot be decoded
1008  INVALID_MESSAGE (a malformed or unknown text frame, audio after ``end``) and the other
      4xx refusals of the client's own making
1011  UPSTREAM_ERROR, UPSTREAM_UNAVAILABLE, STORE_ERROR, STORE_UNAVAILABLE, INTERNAL_ERROR
1013  CAPACITY_TIMEOUT, CAPACITY_EXHAUSTED, TOO_MANY_STREAMS: try again later
4408  TIMEOUT: the client sent nothing for ``server.live_idle_timeout`` seconds, or the stream
      ran past ``server.max_session_seconds``
====  =====================================================================================

A client that leaves (or whose connection drops) before the end cancels the engine session, and
nothing is stored. The session id is random; it comes with every ``transcription`` frame.
"""

from __future__ import annotations

import anyio
import msgspec
from starlette.routing import WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from ..errors import (
    CapacityExhausted,
    CapacityTimeout,
    DecodeError,
    GatewayError,
    InvalidMessage,
    ShuttingDown,
    Timeout,
    TooManyStreams,
    status_of,
)
from ..events import Done, Failed, StreamEvent
from ..jobs import GatewayState, JobOptions, prepare_job
from ..live_audio import live_decoder
from ..pipeline import KEEPALIVE, Job, Outbox, attend
from ..sources import LiveSource
from .native import NativeTranslator, error_response

__all__ = ["SUBPROTOCOL", "close_code", "routes"]

#: The subprotocol the gateway speaks (and the only one it ever echoes back).
SUBPROTOCOL = "asr-gateway"

_SPECIAL_CLOSE_CODES = {
    ShuttingDown.code: 1001,
    DecodeError.code: 1003,
    CapacityTimeout.code: 1013,
    CapacityExhausted.code: 1013,
    TooManyStreams.code: 1013,
    Timeout.code: 4408,
}


def close_code(error: str) -> int:
    """The close code after an ``error`` frame with this code (see the module docstring)."""
    if error in _SPECIAL_CLOSE_CODES:
        return _SPECIAL_CLOSE_CODES[error]
    return 1008 if 400 <= status_of(error) < 500 else 1011


class _Control(msgspec.Struct):
    type: str


_control = msgspec.json.Decoder(_Control)


async def _prepare(websocket: WebSocket, state: GatewayState) -> tuple[Job, LiveSource]:
    query = websocket.query_params
    decoder = live_decoder(query.get("format", "pcm_s16le"), query.get("sample_rate", ""))
    engine = state.engine(query.get("engine", ""))
    source = LiveSource(decoder())
    tenant: str = websocket.scope.get("state", {}).get("tenant", "")
    options = JobOptions(engine=engine, language=query.get("language", ""), use_cache=False)
    return await prepare_job(state, source, options, tenant=tenant), source


def _frame(translator: NativeTranslator, event: StreamEvent) -> str:
    name, payload = translator.event(event)
    # Every payload is a non-empty JSON object: the type goes in as its first member.
    return b"".join((b'{"type":"', name, b'",', payload[1:])).decode()


async def _write(websocket: WebSocket, outbox: Outbox) -> None:
    """Send each event as one text frame; a slow reader holds this up, and the outbox keeps
    only the newest snapshot meanwhile."""
    translator = NativeTranslator()
    while not outbox.finished:
        event = await outbox.get()
        if event is not KEEPALIVE:
            await websocket.send_text(_frame(translator, event))  # type: ignore[arg-type]
            outbox.mark_sent()


async def _read(
    websocket: WebSocket, source: LiveSource, job: Job, idle: float, left: anyio.CancelScope
) -> None:
    """Pass the client's audio to the source until it says ``end``; a client that leaves
    cancels ``left``. While the source is full this does not read, so hypercorn stops reading
    the socket too: that is the backpressure on a client faster than real time."""
    ended = False
    while True:
        message: Message | None = None
        # Only time spent waiting for the client counts as idle, never a wait for the engine.
        with anyio.move_on_after(idle if not ended else float("inf")):
            message = await websocket.receive()
        if message is None:
            job.fail(Timeout(f"no audio or end from the client for {idle:g} s"))
            return
        if message["type"] == "websocket.disconnect":
            left.cancel()
            return
        audio, text = message.get("bytes"), message.get("text")
        if audio is not None and not ended:
            await source.push(audio)
            continue
        error = _control_error(text) if not ended else 'audio or a message after {"type": "end"}'
        if error is not None:
            job.fail(InvalidMessage(error))
            return
        ended = True
        source.end()


def _control_error(text: str | None) -> str | None:
    """What is wrong with a text frame, or None for ``{"type": "end"}``."""
    try:
        control = _control.decode(text or "")
    except msgspec.DecodeError:
        return 'text frames must be JSON objects such as {"type": "end"}'
    if control.type != "end":
        return f"unknown message type {control.type!r}; the only one is 'end'"
    return None


async def _close_after(websocket: WebSocket, final: Done | Failed | None) -> None:
    if isinstance(final, Failed):
        await websocket.close(close_code(final.code), final.code)
    elif final is not None:
        await websocket.close(1000)


async def _refuse(websocket: WebSocket, exc: GatewayError) -> None:
    """A refusal before the stream: an HTTP answer to the handshake where the server can send
    one, else an ``error`` frame right after the upgrade, then the close."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(exc))
        return
    await websocket.accept()
    await websocket.send_text(_frame(NativeTranslator(), Failed(exc.code, exc.detail)))
    await websocket.close(close_code(exc.code), exc.code)


async def live(websocket: WebSocket) -> None:
    state: GatewayState = websocket.app.state.gateway
    try:
        job, source = await _prepare(websocket, state)
    except GatewayError as exc:
        await _refuse(websocket, exc)
        return
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(SUBPROTOCOL if SUBPROTOCOL in offered else None)
    idle = state.config.server.live_idle_timeout
    client_left = False

    async def converse(outbox: Outbox) -> None:
        nonlocal client_left
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read, websocket, source, job, idle, tg.cancel_scope)
            await _write(websocket, outbox)
            tg.cancel_scope.cancel()
        client_left = not outbox.finished

    final = await attend(job, converse)
    if not client_left:
        await _close_after(websocket, final)


def routes() -> list[WebSocketRoute]:
    return [WebSocketRoute("/v1/transcriptions/live", live)]
