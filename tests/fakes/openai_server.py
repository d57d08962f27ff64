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

from gateway.errors import collapse_groups

__all__ = [
    "FakeConnection",
    "FakeOpenAIServer",
    "Frame",
    "Handshake",
    "VadScript",
    "chunk",
    "open_fake_server",
    "seqs_of",
    "transcriber",
    "vad_transcriber",
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
        # The ``session`` of the client's session.update, once the handshake has read it.
        self.session: dict[str, Any] = {}
        # serve_vad: the types of the events that answered each client commit, in order.
        self.answers: list[list[str]] = []

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

    async def commit_empty(self, commit_event_id: str | None) -> None:
        """The answer to a commit of under 100 ms, naming the commit (or not: ``None``)."""
        await self.send(_commit_empty(commit_event_id))

    def new_item(self) -> str:
        self._items += 1
        return f"item_{self.index}_{self._items}"

    async def committed(self, item_id: str, previous: str | None) -> None:
        await self.send(_committed(item_id, previous))

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

    async def speech_started(self, item_id: str, ms: int) -> None:
        await self.send(
            {
                "type": "input_audio_buffer.speech_started",
                "event_id": f"ev_{item_id}_start",
                "item_id": item_id,
                "audio_start_ms": ms,
            }
        )

    async def speech_stopped(self, item_id: str, ms: int) -> None:
        await self.send(_stopped(item_id, ms))

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
        self.session = (await self.expect("session.update"))["session"]
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

    async def serve_vad(self, script: VadScript | None = None) -> None:
        """Serve like OpenAI with server VAD, answering client commits as ``script`` says."""
        await _VadSession(self, script or VadScript()).run()

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


@dataclass(frozen=True)
class VadScript:
    """How the server-VAD fake orders its answer to a client ``input_audio_buffer.commit``.

    From the GA protocol (reference §1.2-1.3): with ``server_vad`` the server starts an item
    at ``speech_started``, and once ``silence_duration_ms`` of silence follow the speech it
    sends ``speech_stopped`` then ``committed`` on its own (the buffer is committed up to
    that decision point; OpenAI's API reference says its ``audio_end_ms`` "includes the
    min_silence_duration_ms", others report the end of the speech). A client commit commits what is left in the buffer: under
    100 ms it is answered by an ``error`` ``input_audio_buffer_commit_empty`` (naming the
    commit's ``event_id`` in ``error.event_id``); otherwise by ``committed`` for a new item,
    or, when the commit closes a speech run still open, for that run's item, with or without
    a ``speech_stopped`` before or after it. Which of those a server does is what varies.

    A millisecond of audio is speech when a sample in it reaches ``level``; test audio from
    :func:`chunk` is speech for every sequence number >= 1 and silence for 0.
    """

    # The audio_end_ms of the VAD's own speech_stopped: its "decision" point (OpenAI) or the
    # end of the "speech".
    vad_end: Literal["decision", "speech"] = "decision"
    # When a client commit closes an open speech run: speech_stopped "before" the
    # committed ack, "after" it, or "none" at all.
    stop: Literal["before", "after", "none"] = "before"
    # The audio_end_ms of that speech_stopped: the end of the "buffer" (the commit point) or
    # the end of the last "speech" millisecond.
    stop_end: Literal["buffer", "speech"] = "buffer"
    # The ack of a client commit (committed or commit_empty): sent "once", "twice" (the same
    # event again), "missing" (not sent; the item is still transcribed), or the whole commit
    # "ignored" (no ack, no item, no transcription).
    ack: Literal["once", "twice", "missing", "ignored"] = "once"
    # Hold the transcripts of VAD-committed items and interleave them with the answer to the
    # next client commit: their deltas before its first event, completions after it.
    interleave: bool = False
    # commit_empty names the commit in error.event_id (True) or leaves it null.
    echo_event_id: bool = True
    level: int = 1
    # Send the VAD's own committed (and transcript) not with its speech_stopped but only
    # when the next client event is read.
    defer_vad_commit: bool = False
    # Item transcripts: the sequence numbers heard ("s1 s2"), or the speech span in ms.
    text: Literal["seqs", "span"] = "seqs"


class _VadSession:
    """One upstream session's input buffer and VAD, as :class:`VadScript` describes."""

    def __init__(self, conn: FakeConnection, script: VadScript) -> None:
        self.conn = conn
        self.script = script
        vad = conn.session.get("audio", {}).get("input", {}).get("turn_detection") or {}
        self.silence_ms: int | None = vad.get("silence_duration_ms")
        self.padding_ms: int = vad.get("prefix_padding_ms", 0)
        self.total = 0  # bytes written to this session
        self.pos = 0  # whole milliseconds of them processed by the VAD
        self.partial = b""  # bytes of the next millisecond
        self.buffer_start = 0  # bytes; where the uncommitted buffer begins
        self.heard: list[int] = []  # sequence numbers (or speech ms) in the buffer
        self.open_item: str | None = None  # the open speech run's item
        self.speech_end = 0  # ms
        self.quiet = 0  # ms of silence since the last speech
        self.held: list[tuple[str, str]] = []
        self.deferred: list[tuple[str, str | None, str]] = []

    async def run(self) -> None:
        while (event := await self.conn.receive()) is not None:
            deferred, self.deferred = self.deferred, []
            for item, previous, text in deferred:
                await self.finish_turn(item, previous, text)
            kind = event.get("type")
            if kind == "input_audio_buffer.append":
                await self.audio(base64.b64decode(event["audio"]))
            elif kind == "input_audio_buffer.commit":
                await self.commit(event.get("event_id"))

    def _text(self) -> str:
        if self.script.text == "span":
            return f"speech {self.heard[0]}-{self.heard[-1] + 1}" if self.heard else ""
        return " ".join(f"s{n}" for n in self.heard)

    async def audio(self, data: bytes) -> None:
        self.total += len(data)
        data = self.partial + data
        whole = len(data) - len(data) % BYTES_PER_MS
        self.partial = data[whole:]
        for i in range(0, whole, BYTES_PER_MS):
            samples = struct.unpack(f"<{BYTES_PER_MS // 2}h", data[i : i + BYTES_PER_MS])
            if max(map(abs, samples)) >= self.script.level:
                await self.speech(data[i : i + BYTES_PER_MS])
            elif self.open_item is not None:
                self.quiet += 1
                if self.silence_ms is not None and self.quiet >= self.silence_ms:
                    await self.vad_commit()
            self.pos += 1

    async def speech(self, ms: bytes) -> None:
        if self.open_item is None:
            self.open_item = self.conn.new_item()
            start = max(self.buffer_start // BYTES_PER_MS, self.pos - self.padding_ms)
            await self.conn.speech_started(self.open_item, start)
        if self.script.text == "span":
            self.heard.append(self.pos)
        else:
            for n in seqs_of(ms):
                if not self.heard or self.heard[-1] != n:
                    self.heard.append(n)
        self.speech_end = self.pos + 1
        self.quiet = 0

    async def vad_commit(self) -> None:
        """The VAD's own turn end: speech_stopped, committed, transcription (always in order)."""
        assert self.open_item is not None
        item, text = self.open_item, self._text()
        end = self.pos + 1 if self.script.vad_end == "decision" else self.speech_end
        await self.conn.speech_stopped(item, end)
        previous = self.conn.last_item
        self._reset(item, (self.pos + 1) * BYTES_PER_MS)
        if self.script.defer_vad_commit:
            self.deferred.append((item, previous, text))
        else:
            await self.finish_turn(item, previous, text)

    async def finish_turn(self, item: str, previous: str | None, text: str) -> None:
        await self.conn.committed(item, previous)
        if self.script.interleave:
            self.held.append((item, text))
        else:
            await self.transcribe(item, text)

    def _reset(self, item: str, upto: int) -> None:
        self.conn.last_item = item
        self.buffer_start = upto
        self.heard = []
        self.open_item = None
        self.quiet = 0

    async def transcribe(self, item: str, text: str) -> None:
        await self.conn.delta(item, text[: len(text) // 2])
        await self.conn.completed(item, text)

    async def commit(self, event_id: str | None) -> None:
        script = self.script
        held, self.held = self.held, []
        answer: list[dict[str, Any]] = []
        item: str | None = None
        if script.ack == "ignored":
            pass
        elif self.total - self.buffer_start < MIN_COMMIT_BYTES:
            if script.ack != "missing":
                answer.append(_commit_empty(event_id if script.echo_event_id else None))
        else:
            item, text = self.open_item or self.conn.new_item(), self._text()
            end = self.pos if script.stop_end == "buffer" else self.speech_end
            stop = self.open_item is not None and script.stop != "none"
            if stop and script.stop == "before":
                answer.append(_stopped(item, end))
            if script.ack != "missing":
                answer.append(_committed(item, self.conn.last_item))
            if stop and script.stop == "after":
                answer.append(_stopped(item, end))
            self._reset(item, self.total)
        if script.ack == "twice":
            answer = [e for event in answer for e in [event] * (1 + _is_ack(event))]
        self.conn.answers.append([e["type"] for e in answer])
        for held_item, held_text in held:
            await self.conn.delta(held_item, held_text[: len(held_text) // 2])
        for n, event in enumerate(answer):
            await self.conn.send(event)
            if n == 0:
                for held_item, held_text in held:
                    await self.conn.completed(held_item, held_text)
        if not answer:
            for held_item, held_text in held:
                await self.conn.completed(held_item, held_text)
        if item is not None:
            await self.transcribe(item, text)


def _is_ack(event: dict[str, Any]) -> bool:
    return event["type"] in ("input_audio_buffer.committed", "error")


def _commit_empty(event_id: str | None) -> dict[str, Any]:
    return {
        "type": "error",
        "event_id": f"ev_err_{event_id}",
        "error": {
            "type": "invalid_request_error",
            "code": "input_audio_buffer_commit_empty",
            "message": "Error committing input audio buffer: buffer too small. Expected at "
            "least 100ms of audio.",
            "param": None,
            "event_id": event_id,
        },
    }


def _stopped(item_id: str, ms: int) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.speech_stopped",
        "event_id": f"ev_{item_id}_stop",
        "item_id": item_id,
        "audio_end_ms": ms,
    }


def _committed(item_id: str, previous: str | None) -> dict[str, Any]:
    return {
        "type": "input_audio_buffer.committed",
        "event_id": f"ev_{item_id}_c",
        "item_id": item_id,
        "previous_item_id": previous,
    }


def vad_transcriber(
    script: VadScript | None = None, *, created_delay: float = 0.0, updated_delay: float = 0.0
) -> Behaviour:
    """OpenAI with server VAD (the session.update's turn_detection), answering as ``script``."""

    async def behave(conn: FakeConnection) -> None:
        await conn.handshake(created_delay=created_delay, updated_delay=updated_delay)
        await conn.serve_vad(script)

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
        self, url: str, *, extra_headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[WebSocketConnection]:
        """An in-memory stand-in for ``open_websocket_url`` (a ``Connector``)."""
        assert self._listener is not None, "serve('memory') first"
        parts = urlsplit(url)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
        # Behave like open_websocket_url: no exception groups out of here.
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(connect_timeout):
                        await self._listener._send.send(server_stream)
                        ws = await wrap_client_stream(
                            nursery,
                            client_stream,  # type: ignore[arg-type]
                            parts.hostname or "fake",
                            resource,
                            extra_headers=extra_headers,
                        )
                except trio.TooSlowError:
                    raise ConnectionTimeout from None
                try:
                    yield ws
                finally:
                    await ws.aclose()


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
