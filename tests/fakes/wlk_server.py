"""A fake WhisperLiveKit server: the real ``/asr`` protocol over trio-websocket, with faults.

It speaks what WhisperLiveKit 0.2.26 speaks (see ``whisperlivekit.md``): a config message right
after accept, full-mode transcription updates pushed on state change (polled every ``tick``),
``H:MM:SS.cc`` line times, silence lines with speaker -2, ``remaining_time_transcription_
processing`` rounded to 0.1 s, an empty binary frame as end of audio, ``ready_to_stop`` after the
final update, and no close after it. A text frame from the client kills the connection without a
close frame (1006), as the real server does.

Transcription model, deterministic so tests can check for lost or duplicated words: audio is cut
into words of ``word_seconds``; a word's text is ``w<v>`` where ``v`` is the int16 value of its
first sample (``pcm_words`` builds such audio); a word whose first sample is 0 is silence. Words
become committed line text once processed, ``words_per_line`` per line; the word being processed
shows in ``buffer_transcription``. Processing advances ``speed`` audio-seconds per second per
session (None: instantly), sharing ``capacity * speed`` among sessions when ``capacity`` is set.

Faults, keyed by 1-based connection index where per connection: ``drops`` (close with a code at
a time after accept; 1006 aborts the TCP stream), ``refuse`` / ``refuse_all`` (HTTP rejection),
``stalls`` (stop reading and writing at a time: pongs stop too), ``never_ready``, ``error_at``
(an error message once that much audio arrived), ``fail_backlog`` (close 1011 "keepalive ping
timeout" when a session's backlog exceeds it, like an overloaded server), ``token``, and
``pcm=False`` (encoded mode: a WAV stream whose 44-byte header is parsed like ffmpeg would).
"""

from __future__ import annotations

import errno
import io
import json
import math
import wave
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    WebSocketServer,
    wrap_client_stream,
)

from gateway.engines._wlk_protocol import format_timestamp
from gateway.errors import collapse_groups

__all__ = [
    "Drop",
    "FakeConnection",
    "FakeWlkServer",
    "MemoryNetwork",
    "expected_text",
    "pcm_words",
    "wav_bytes",
]

PCM_BYTES_PER_SECOND = 32_000
WAV_HEADER_BYTES = 44


def pcm_words(values: Sequence[int], word_seconds: float = 0.5) -> bytes:
    """s16le 16 kHz mono audio: one word of ``word_seconds`` per value, every sample = value."""
    samples = round(word_seconds * 16_000)
    return b"".join(int(v).to_bytes(2, "little", signed=True) * samples for v in values)


def expected_text(values: Sequence[int]) -> str:
    return " ".join(f"w{v}" for v in values if v != 0)


def wav_bytes(pcm: bytes) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm)
    return out.getvalue()


@dataclass
class Drop:
    """Close connection ``n`` ``at`` seconds after accept with ``code`` (1006: no close frame)."""

    at: float
    code: int = 1011
    reason: str = "keepalive ping timeout"


@dataclass(eq=False)
class FakeConnection:
    """What the server saw of one connection."""

    index: int
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    #: When the handshake arrived and when the session ended (the handler returned: the client
    #: closed, aborted, or the server dropped it), on the trio clock of the serving run.
    accepted_at: float = 0.0
    refused: int = 0
    received_bytes: int = 0
    raw_bytes: int = 0
    frames: list[int] = field(default_factory=list)
    text_frames: int = 0
    eof: bool = False
    processed: float = 0.0
    words: list[int] = field(default_factory=list)
    max_lead: float = 0.0
    ready_sent: bool = False
    #: The code the client closed with; None if it never sent a close frame.
    client_close_code: int | None = None
    closed_by_server: int | None = None
    ended_at: float | None = None
    stalled: bool = False
    undecodable: bool = False
    stream: _FaultyStream | None = None
    _carry: bytes = b""
    _header: bytes = b""

    @property
    def received(self) -> float:
        return self.received_bytes / PCM_BYTES_PER_SECOND

    @property
    def backlog(self) -> float:
        return max(0.0, self.received - self.processed)

    @property
    def first_word(self) -> int | None:
        return self.words[0] if self.words else None

    def feed(self, data: bytes, *, pcm: bool, word_bytes: int) -> None:
        self.raw_bytes += len(data)
        if not pcm:
            if len(self._header) < WAV_HEADER_BYTES:
                need = WAV_HEADER_BYTES - len(self._header)
                self._header += data[:need]
                data = data[need:]
                if len(self._header) == WAV_HEADER_BYTES and not self._header.startswith(b"RIFF"):
                    self.undecodable = True
            if self.undecodable or not data:
                return
        # Record each word's first sample as it arrives (a sample may straddle two frames).
        base = self.received_bytes - len(self._carry)
        buf = self._carry + data
        boundary = len(self.words) * word_bytes
        while boundary + 2 <= base + len(buf):
            i = boundary - base
            self.words.append(int.from_bytes(buf[i : i + 2], "little", signed=True))
            boundary += word_bytes
        self._carry = buf[boundary - base :] if boundary - base < len(buf) else b""
        self.received_bytes += len(data)


class _FaultyStream(trio.abc.Stream):
    """A server-side stream that can freeze (a hung event loop) or abort (TCP gone)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._frozen = False
        self._scopes: set[trio.CancelScope] = set()

    def freeze(self) -> None:
        self._frozen = True
        for scope in self._scopes:
            scope.cancel()

    async def abort(self) -> None:
        await trio.aclose_forcefully(self.inner)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._frozen:
            with trio.CancelScope() as scope:
                self._scopes.add(scope)
                try:
                    return await self.inner.receive_some(max_bytes)
                finally:
                    self._scopes.discard(scope)
        await trio.sleep_forever()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._frozen:
            await trio.sleep_forever()
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _FaultyListener(trio.abc.Listener[trio.abc.Stream]):
    def __init__(self, inner: trio.abc.Listener[Any]) -> None:
        self.inner = inner

    async def accept(self) -> trio.abc.Stream:
        return _FaultyStream(await self.inner.accept())

    async def aclose(self) -> None:
        await self.inner.aclose()


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Connections over in-memory streams, so MockClock's autojump never races real I/O."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](math.inf)

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self._send.send_nowait(server)
        await trio.lowlevel.checkpoint()
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        self._send.close()
        await trio.lowlevel.checkpoint()


class MemoryNetwork:
    """Named in-memory hosts, and a connector (the engine's ``Connector``) that reaches them."""

    def __init__(self) -> None:
        self.listeners: dict[str, MemoryListener] = {}

    def listen(self, host: str) -> MemoryListener:
        listener = self.listeners[host] = MemoryListener()
        return listener

    @asynccontextmanager
    async def connect(
        self, url: str, *, extra_headers: list[tuple[bytes, bytes]], connect_timeout: float
    ) -> AsyncIterator[WebSocketConnection]:
        parts = urlsplit(url)
        resource = parts.path + (f"?{parts.query}" if parts.query else "")
        with collapse_groups():
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(connect_timeout) as scope:
                    listener = self.listeners.get(parts.hostname or "")
                    if listener is None:
                        raise HandshakeError from OSError(errno.ECONNREFUSED, "connection refused")
                    stream = await listener.connect()
                    ws = await wrap_client_stream(
                        nursery,
                        stream,  # type: ignore[arg-type]  # any trio Stream works
                        parts.netloc,
                        resource,
                        extra_headers=extra_headers,
                        max_message_size=4 * 1024 * 1024,
                    )
                if scope.cancelled_caught:
                    raise ConnectionTimeout
                try:
                    yield ws
                finally:
                    with trio.move_on_after(1):
                        await ws.aclose()


class FakeWlkServer:
    def __init__(
        self,
        *,
        pcm: bool = True,
        speed: float | None = None,
        capacity: int | None = None,
        word_seconds: float = 0.5,
        words_per_line: int = 4,
        tick: float = 0.05,
        token: str = "",
        drops: dict[int, Drop] | None = None,
        refuse: Sequence[int] = (),
        refuse_all: bool = False,
        refuse_status: int = 503,
        stalls: dict[int, float] | None = None,
        never_ready: bool = False,
        error_at: float | None = None,
        error_kind: str = "status",
        fail_backlog: float | None = None,
    ) -> None:
        self.pcm = pcm
        self.speed = speed
        self.capacity = capacity
        self.word_seconds = word_seconds
        self.words_per_line = words_per_line
        self.tick = tick
        self.token = token
        self.drops = drops or {}
        self.refuse = set(refuse)
        self.refuse_all = refuse_all
        self.refuse_status = refuse_status
        self.stalls = stalls or {}
        self.never_ready = never_ready
        self.error_at = error_at
        self.error_kind = error_kind
        self.fail_backlog = fail_backlog
        self.connections: list[FakeConnection] = []
        self.active = 0
        self.peak_active = 0
        self.peak_backlog = 0.0
        self._live: list[FakeConnection] = []
        self._ticked = trio.Event()
        # Set (and replaced) on every connection, frame, end of audio and disconnection.
        self.changed = trio.Event()

    # -- figures ------------------------------------------------------------------------------
    @property
    def accepted(self) -> list[FakeConnection]:
        return [c for c in self.connections if not c.refused]

    @property
    def max_lead(self) -> float:
        return max((c.max_lead for c in self.connections), default=0.0)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds; it is re-checked on every change."""
        while not predicate():
            event = self.changed
            await event.wait()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # -- serving ------------------------------------------------------------------------------
    async def serve_tcp(
        self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve on 127.0.0.1, port 0; reports the ``ws://`` URL of ``/asr``."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await self._serve(
            [_FaultyListener(listener) for listener in listeners],
            f"ws://127.0.0.1:{port}/asr",
            task_status,
        )

    async def serve_memory(
        self,
        network: MemoryNetwork,
        host: str = "wlk",
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on an in-memory host of ``network``; reports the URL the connector reaches."""
        listener = _FaultyListener(network.listen(host))
        await self._serve([listener], f"ws://{host}/asr", task_status)

    async def _serve(
        self, listeners: list[_FaultyListener], url: str, task_status: trio.TaskStatus[str]
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._processor)
            server = WebSocketServer(
                self._handle,
                listeners,  # type: ignore[arg-type]
                max_message_size=16 * 1024 * 1024,
            )
            await nursery.start(server.run)
            task_status.started(url)

    # -- processing -----------------------------------------------------------------------------
    async def _processor(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(self.tick)
            # Advance by the time that really passed: a late wake-up must not slow the server.
            now = trio.current_time()
            self._advance(now - last)
            last = now
            self._ticked.set()
            self._ticked = trio.Event()

    def _advance(self, dt: float) -> None:
        live = [c for c in self._live if not c.stalled and c.backlog > 0]
        if self.speed is None:
            for c in live:
                c.processed = c.received
        else:
            per_session = self.speed * dt
            budget = math.inf if self.capacity is None else self.capacity * per_session
            # Fair shares, each capped at one session's speed: the smallest backlogs first.
            live.sort(key=lambda c: c.backlog)
            for i, c in enumerate(live):
                share = min(per_session, c.backlog, budget / (len(live) - i))
                c.processed += share
                budget -= share
        self.peak_backlog = max(self.peak_backlog, sum(c.backlog for c in self._live))

    def _lines(self, conn: FakeConnection) -> tuple[list[dict[str, Any]], str]:
        w = self.word_seconds
        words = conn.words
        done = min(len(words), int(conn.processed / w + 1e-9))
        if conn.eof and conn.backlog <= 1e-9:
            done = len(words)
        lines: list[dict[str, Any]] = []
        count = 0
        for i in range(done):
            silent = words[i] == 0
            start, end = i * w, min((i + 1) * w, conn.received)
            last = lines[-1] if lines else None
            if (
                last is not None
                and (last["speaker"] == -2) == silent
                and (silent or count < self.words_per_line)
            ):
                last["end"] = end
                if not silent:
                    last["text"] += f" w{words[i]}"
                    count += 1
            else:
                lines.append(
                    {
                        "speaker": -2 if silent else 1,
                        "text": "" if silent else f"w{words[i]}",
                        "start": start,
                        "end": end,
                    }
                )
                count = 1
        for line in lines:
            line["start"] = format_timestamp(line["start"])
            line["end"] = format_timestamp(line["end"])
        buffer = ""
        if done < len(words) and conn.processed > done * w + 1e-9 and words[done] != 0:
            buffer = f"w{words[done]}"
        return lines, buffer

    def _state(self, conn: FakeConnection) -> dict[str, Any]:
        lines, buffer = self._lines(conn)
        return {
            "status": "active_transcription" if lines or buffer else "no_audio_detected",
            "lines": lines,
            "buffer_transcription": buffer,
            "buffer_diarization": "",
            "buffer_translation": "",
            "remaining_time_transcription": 0,
            "remaining_time_transcription_processing": round(conn.backlog, 1),
            "remaining_time_transcription_policy": 0.0,
            "remaining_time_diarization": 0,
        }

    # -- one connection ------------------------------------------------------------------------
    async def _handle(self, request: WebSocketRequest) -> None:
        parts = urlsplit(request.path)
        conn = FakeConnection(
            index=len(self.connections) + 1,
            path=parts.path,
            query=dict(parse_qsl(parts.query)),
            headers={k.decode().lower(): v.decode() for k, v in request.headers},
            accepted_at=trio.current_time(),
        )
        self.connections.append(conn)
        self._changed()
        if self.refuse_all or conn.index in self.refuse:
            conn.refused = self.refuse_status
            await request.reject(self.refuse_status)
            return
        if parts.path != "/asr":
            conn.refused = 404
            await request.reject(404)
            return
        if (
            self.token
            and conn.headers.get("authorization") != f"Bearer {self.token}"
            and conn.query.get("token") != self.token
        ):
            # WhisperLiveKit closes before accept, which the client sees as an HTTP 403.
            conn.refused = 403
            await request.reject(403)
            return
        ws = await request.accept()
        stream = getattr(ws, "_stream", None)
        conn.stream = stream if isinstance(stream, _FaultyStream) else None
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        self._live.append(conn)
        try:
            await ws.send_message(
                json.dumps(
                    {
                        "type": "config",
                        "useAudioWorklet": self.pcm,
                        "mode": conn.query.get("mode", "full"),
                    }
                )
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._formatter, ws, conn, nursery.cancel_scope)
                await self._receiver(ws, conn)
                nursery.cancel_scope.cancel()
        except ConnectionClosed:
            pass
        finally:
            self.active -= 1
            self._live.remove(conn)
            conn.ended_at = trio.current_time()
            self._changed()

    async def _receiver(self, ws: WebSocketConnection, conn: FakeConnection) -> None:
        word_bytes = round(self.word_seconds * 16_000) * 2
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as exc:
                if exc.reason is not None and conn.closed_by_server is None:
                    conn.client_close_code = exc.reason.code
                return
            if isinstance(message, str):
                # receive_bytes() raises on a text frame; the server drops the socket: 1006.
                conn.text_frames += 1
                if conn.stream is not None:
                    await conn.stream.abort()
                return
            if not message:
                conn.eof = True
                self._changed()
                continue
            if conn.eof:
                continue
            conn.frames.append(len(message))
            conn.feed(message, pcm=self.pcm, word_bytes=word_bytes)
            conn.max_lead = max(conn.max_lead, conn.backlog)
            self._changed()

    async def _formatter(
        self, ws: WebSocketConnection, conn: FakeConnection, scope: trio.CancelScope
    ) -> None:
        last: dict[str, Any] | None = None
        error_sent = False
        try:
            while True:
                event = self._ticked
                await event.wait()
                age = trio.current_time() - conn.accepted_at
                drop = self.drops.get(conn.index)
                if drop is not None and age >= drop.at:
                    conn.closed_by_server = drop.code
                    if drop.code == 1006 and conn.stream is not None:
                        await conn.stream.abort()
                    else:
                        await ws.aclose(drop.code, drop.reason)
                    return
                stall = self.stalls.get(conn.index)
                if stall is not None and age >= stall and conn.stream is not None:
                    conn.stalled = True
                    conn.stream.freeze()
                    await trio.sleep_forever()
                if self.fail_backlog is not None and conn.backlog > self.fail_backlog:
                    conn.closed_by_server = 1011
                    await ws.aclose(1011, "keepalive ping timeout")
                    return
                if self.error_at is not None and not error_sent and conn.received >= self.error_at:
                    error_sent = True
                    if self.error_kind == "type":
                        await ws.send_message(
                            json.dumps({"type": "error", "error": "invalid session parameters"})
                        )
                        conn.closed_by_server = 4400
                        await ws.aclose(4400, "invalid session parameters")
                        return
                    await ws.send_message(
                        json.dumps(
                            {
                                **self._state(conn),
                                "status": "error",
                                "lines": [],
                                "error": "FFmpeg error: write_error",
                            }
                        )
                    )
                state = self._state(conn)
                if state != last:
                    await ws.send_message(json.dumps(state))
                    last = state
                if (
                    conn.eof
                    and conn.backlog <= 1e-9
                    and not conn.ready_sent
                    and not self.never_ready
                ):
                    await ws.send_message(json.dumps({"type": "ready_to_stop"}))
                    conn.ready_sent = True
        except ConnectionClosed:
            scope.cancel()
