"""A fake OpenAI Realtime transcription server on trio-websocket, for tests.

It runs either in memory (``transport="memory"``: lockstep streams, so a server that stops
reading really does block the client's writes, and everything runs in virtual time) or on a
real loopback socket (``transport="tcp"``, 127.0.0.1 port 0).

Every byte the client writes passes through a :class:`TapStream`, which parses the WebSocket
frames independently of trio-websocket and records each one (text events, pings, the close
code) with the virtual time at which the server read it; events the server sends are
recorded too. That record is what tests assert on. Each connection is driven by a
*behaviour*, an async function of a :class:`FakeConnection`, which can delay
``session.created``/``updated``, stall reads, read slowly, close with any code (1006 = drop
the transport), reject the handshake, and emit any event in any order.

Test audio carries sequence numbers: :func:`chunk` fills every sample with the chunk's number,
so any sample-aligned slice of it still says which chunk it came from (:func:`seqs_of`).
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionTimeout,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    wrap_client_stream,
)
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

__all__ = [
    "FakeConnection",
    "FakeOpenAIServer",
    "Frame",
    "Handshake",
    "chunk",
    "open_fake_server",
    "seqs_of",
    "transcriber",
]

Behaviour = Callable[["FakeConnection"], Awaitable[None]]

# 24 kHz PCM16: 48 bytes per millisecond.
BYTES_PER_MS = 48
MIN_COMMIT_BYTES = 100 * BYTES_PER_MS


def chunk(seq: int, ms: int = 100) -> bytes:
    """``ms`` of 24 kHz PCM16 whose every sample is ``seq`` (0..65535)."""
    return struct.pack("<H", seq) * (ms * BYTES_PER_MS // 2)


def seqs_of(pcm: bytes) -> list[int]:
    """Distinct sequence numbers in ``pcm``, in order of appearance."""
    out: list[int] = []
    for (value,) in struct.iter_unpack("<H", pcm[: len(pcm) - len(pcm) % 2]):
        if not out or out[-1] != value:
            out.append(value)
    return out


@dataclass(frozen=True)
class Frame:
    conn: int
    time: float
    # "in": read by the server from the client; "out": sent by the server.
    direction: Literal["in", "out"]
    kind: Literal["text", "binary", "ping", "close", "garbage"]
    data: Any = None
    code: int | None = None

    @property
    def type(self) -> str | None:
        return self.data.get("type") if isinstance(self.data, dict) else None

    @property
    def audio(self) -> bytes:
        return base64.b64decode(self.data["audio"])


@dataclass(frozen=True)
class Handshake:
    path: str
    headers: dict[str, str]


class _FrameTap:
    """Parses the client->server byte stream: the HTTP upgrade request, then WebSocket frames."""

    def __init__(self, record: Callable[[str, Any, int | None], None]) -> None:
        self._record = record
        self._head = bytearray()
        self._protocol: FrameProtocol | None = None
        self._parts: list[Any] = []
        self._broken = False

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        if self._protocol is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = bytes(self._head[end + 4 :])
            self._protocol = FrameProtocol(client=False, extensions=[])
        self._protocol.receive_bytes(data)
        try:
            for frame in self._protocol.received_frames():
                if frame.opcode is Opcode.PING:
                    self._record("ping", frame.payload, None)
                elif frame.opcode is Opcode.CLOSE:
                    assert isinstance(frame.payload, tuple)
                    code, reason = frame.payload
                    self._record("close", reason, int(code))
                elif frame.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION):
                    self._parts.append(frame.payload)
                    if frame.message_finished:
                        if isinstance(self._parts[0], str):
                            text = "".join(self._parts)
                            self._record("text", json.loads(text), None)
                        else:
                            self._record("binary", b"".join(self._parts), None)
                        self._parts = []
        except ParseFailed as exc:
            # A frame cut short by a cancelled write, followed by something else.
            self._broken = True
            self._record("garbage", str(exc), None)


class TapStream(trio.abc.Stream):
    """The server's end of a connection: records what it reads, can stall, can be cut."""

    def __init__(self, inner: trio.abc.Stream, server: FakeOpenAIServer, index: int) -> None:
        self._inner = inner
        self._server = server
        self.index = index
        self.conn = -1
        self._tap = _FrameTap(self._record)
        self._resume = trio.Event()
        self._resume.set()
        self.closed = False

    def __repr__(self) -> str:
        # trio-websocket reports a non-socket stream's repr as the peer; we use it as a key.
        return f"<TapStream {self.index}>"

    def _record(self, kind: str, data: Any, code: int | None) -> None:
        self._server.record(Frame(self.conn, trio.current_time(), "in", kind, data, code))  # type: ignore[arg-type]

    def stall(self) -> None:
        """Stop reading: the client's writes block once the pipe is full, and pings go unanswered."""
        self._resume = trio.Event()

    def resume(self) -> None:
        self._resume.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._resume.wait()
        if self.closed:
            raise trio.ClosedResourceError("aborted")
        data = await self._inner.receive_some(max_bytes)
        # Bytes that arrive while stalled stay unprocessed, like data in a socket buffer.
        await self._resume.wait()
        if self.closed:
            raise trio.ClosedResourceError("aborted")
        self._tap.feed(bytes(data))
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self.closed = True
        self._resume.set()
        await self._inner.aclose()


class _Listener(trio.abc.Listener[trio.abc.Stream]):
    """Wraps each accepted stream in a TapStream; ``inner`` is a socket or an in-memory queue."""

    def __init__(
        self,
        server: FakeOpenAIServer,
        inner: trio.abc.Listener[Any] | None = None,
    ) -> None:
        self._server = server
        self._inner = inner
        # Rendezvous: connect() hands its server end straight to accept().
        self._send, self._recv = trio.open_memory_channel[trio.abc.Stream](0)

    async def accept(self) -> trio.abc.Stream:
        if self._inner is not None:
            stream: trio.abc.Stream = await self._inner.accept()
        else:
            stream = await self._recv.receive()
        tap = TapStream(stream, self._server, len(self._server.taps))
        self._server.taps[repr(tap)] = tap
        return tap

    async def aclose(self) -> None:
        self._send.close()
        self._recv.close()
        if self._inner is not None:
            await self._inner.aclose()


class FakeConnection:
    """One accepted client connection, as a behaviour sees it."""

    def __init__(
        self,
        server: FakeOpenAIServer,
        index: int,
        ws: WebSocketConnection,
        tap: TapStream,
        handshake: Handshake,
    ) -> None:
        self.server = server
        self.index = index
        self.ws = ws
        self.tap = tap
        self.handshake_info = handshake
        self.closed = False
        self._items = 0
        self.last_item: str | None = None

    # -- sending ----------------------------------------------------------------------------
    async def send(self, event: dict[str, Any]) -> None:
        self.server.record(Frame(self.index, trio.current_time(), "out", "text", event))
        await self.ws.send_message(json.dumps(event))

    async def created(self) -> None:
        await self.send(
            {
                "type": "session.created",
                "event_id": f"event_c{self.index}",
                "session": {"type": "transcription", "id": f"sess_{self.index}"},
            }
        )

    async def updated(self) -> None:
        await self.send(
            {
                "type": "session.updated",
                "event_id": f"event_u{self.index}",
                "session": {"type": "transcription", "id": f"sess_{self.index}"},
            }
        )

    async def error(
        self, code: str | None, message: str = "boom", type: str = "invalid_request_error"
    ) -> None:
        await self.send(
            {
                "type": "error",
                "event_id": "event_err",
                "error": {"type": type, "code": code, "message": message, "param": None},
            }
        )

    def new_item(self) -> str:
        self._items += 1
        return f"item_{self.index}_{self._items}"

    async def committed(self, item_id: str, previous: str | None) -> None:
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "event_id": f"ev_{item_id}_c",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )

    async def delta(self, item_id: str, text: str) -> None:
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "event_id": f"ev_{item_id}_d",
                "item_id": item_id,
                "content_index": 0,
                "delta": text,
            }
        )

    async def completed(self, item_id: str, text: str) -> None:
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "event_id": f"ev_{item_id}_done",
                "item_id": item_id,
                "content_index": 0,
                "transcript": text,
                "usage": {"type": "duration", "seconds": 1},
            }
        )

    async def failed(self, item_id: str) -> None:
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.failed",
                "event_id": f"ev_{item_id}_f",
                "item_id": item_id,
                "content_index": 0,
                "error": {
                    "type": "transcription_error",
                    "code": "audio_unintelligible",
                    "message": "could not transcribe",
                    "param": None,
                },
            }
        )

    # -- receiving --------------------------------------------------------------------------
    async def receive(self) -> dict[str, Any] | None:
        """The next client event, or ``None`` once the connection is closed."""
        try:
            message = await self.ws.get_message()
        except ConnectionClosed:
            self.closed = True
            return None
        event: dict[str, Any] = json.loads(message)
        return event

    async def expect(self, kind: str) -> dict[str, Any]:
        event = await self.receive()
        if event is None or event.get("type") != kind:
            self.server.violations.append(f"conn {self.index}: expected {kind}, got {event}")
            raise AssertionError(f"expected {kind}, got {event}")
        return event

    async def handshake(self, *, created_delay: float = 0.0, updated_delay: float = 0.0) -> None:
        """``session.created`` (after a delay), expect ``session.update``, then ``updated``."""
        if created_delay:
            await trio.sleep(created_delay)
        await self.created()
        await self.expect("session.update")
        if updated_delay:
            await trio.sleep(updated_delay)
        await self.updated()

    async def serve_transcripts(self, *, read_delay: float = 0.0) -> None:
        """Answer each commit like OpenAI: committed, a delta, completed.

        The transcript of an item lists the sequence numbers of the audio it covers
        (``"s3 s4 s5"``), so a final transcript shows exactly what was lost or duplicated.
        A commit of less than 100 ms gets ``input_audio_buffer_commit_empty``.
        """
        seqs: list[int] = []
        nbytes = 0
        while (event := await self.receive()) is not None:
            if read_delay:
                await trio.sleep(read_delay)
            kind = event.get("type")
            if kind == "input_audio_buffer.append":
                audio = base64.b64decode(event["audio"])
                nbytes += len(audio)
                for s in seqs_of(audio):
                    if not seqs or seqs[-1] != s:
                        seqs.append(s)
            elif kind == "input_audio_buffer.commit":
                if nbytes < MIN_COMMIT_BYTES:
                    await self.error("input_audio_buffer_commit_empty", "buffer too small")
                    continue
                item = self.new_item()
                await self.committed(item, self.last_item)
                self.last_item = item
                text = " ".join(f"s{s}" for s in seqs)
                await self.delta(item, text[: len(text) // 2])
                await self.completed(item, text)
                seqs, nbytes = [], 0

    # -- ending -----------------------------------------------------------------------------
    async def close(self, code: int, reason: str = "") -> None:
        """Close with ``code``; 1006 means no close frame at all: the transport is cut."""
        if code == 1006:
            await self.abort()
            return
        with trio.move_on_after(2):
            await self.ws.aclose(code, reason or None)
        self.closed = True

    async def abort(self) -> None:
        self.closed = True
        await self.tap.aclose()

    def stall(self) -> None:
        self.tap.stall()

    def resume(self) -> None:
        self.tap.resume()


def transcriber(
    *, created_delay: float = 0.0, updated_delay: float = 0.0, read_delay: float = 0.0
) -> Behaviour:
    """The default behaviour: a well-behaved OpenAI with manual commits."""

    async def behave(conn: FakeConnection) -> None:
        await conn.handshake(created_delay=created_delay, updated_delay=updated_delay)
        await conn.serve_transcripts(read_delay=read_delay)

    return behave


@dataclass
class FakeOpenAIServer:
    behaviour: Behaviour = field(default_factory=transcriber)
    # Reject every handshake with this HTTP status instead of accepting it.
    reject_status: int | None = None
    frames: list[Frame] = field(default_factory=list)
    handshakes: list[Handshake] = field(default_factory=list)
    connections: list[FakeConnection] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    taps: dict[str, TapStream] = field(default_factory=dict)
    url: str = "ws://fake.invalid/v1/realtime?intent=transcription"
    _listener: _Listener | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    # -- record -----------------------------------------------------------------------------
    def record(self, frame: Frame) -> None:
        self.frames.append(frame)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever something is recorded."""
        while not predicate():
            await self._changed.wait()

    def frames_of(self, conn: int, direction: str = "in") -> list[Frame]:
        return [f for f in self.frames if f.conn == conn and f.direction == direction]

    def events_of(self, conn: int) -> list[Frame]:
        """The text events the client sent on connection ``conn``, in the order read."""
        return [f for f in self.frames_of(conn) if f.kind == "text"]

    def types_of(self, conn: int) -> list[str | None]:
        return [f.type for f in self.events_of(conn)]

    def appended_seqs(self, conn: int) -> list[int]:
        """Sequence number of every append frame on connection ``conn`` (one per frame)."""
        out: list[int] = []
        for f in self.events_of(conn):
            if f.type == "input_audio_buffer.append":
                out.extend(seqs_of(f.audio))
        return out

    # -- serving ----------------------------------------------------------------------------
    async def _handle(self, request: WebSocketRequest) -> None:
        tap = self.taps[str(request.remote)]
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        info = Handshake(request.path, headers)
        self.handshakes.append(info)
        if self.reject_status is not None:
            await request.reject(
                self.reject_status,
                body=json.dumps({"error": {"message": "Incorrect API key provided"}}).encode(),
            )
            self._notify()
            return
        ws = await request.accept()
        conn = FakeConnection(self, len(self.connections), ws, tap, info)
        tap.conn = conn.index
        self.connections.append(conn)
        self._notify()
        try:
            await self.behaviour(conn)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conn.closed = True
            self._notify()

    async def serve(
        self,
        transport: Literal["memory", "tcp"],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        inner: trio.abc.Listener[Any] | None = None
        if transport == "tcp":
            (inner,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = inner.socket.getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}/v1/realtime?intent=transcription"
        self._listener = _Listener(self, inner)
        server = WebSocketServer(self._handle, [self._listener])  # type: ignore[list-item]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            task_status.started()

    @asynccontextmanager
    async def connect(
        self, url: str, headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[WebSocketConnection]:
        """An in-memory stand-in for ``open_websocket_url`` (a ``Connector``)."""
        assert self._listener is not None, "serve('memory') first"
        parts = urlsplit(url)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(connect_timeout):
                        await self._listener._send.send(server_stream)
                        ws = await wrap_client_stream(
                            nursery,
                            client_stream,  # type: ignore[arg-type]
                            parts.hostname or "fake",
                            resource,
                            extra_headers=headers,
                        )
                except trio.TooSlowError:
                    raise ConnectionTimeout from None
                try:
                    yield ws
                finally:
                    await ws.aclose()
        except BaseExceptionGroup as group:
            # Behave like open_websocket_url: no exception groups out of here.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise


@asynccontextmanager
async def open_fake_server(
    behaviour: Behaviour | None = None,
    *,
    transport: Literal["memory", "tcp"] = "memory",
    reject_status: int | None = None,
) -> AsyncIterator[FakeOpenAIServer]:
    server = FakeOpenAIServer(reject_status=reject_status)
    if behaviour is not None:
        server.behaviour = behaviour
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
