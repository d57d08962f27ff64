"""A live body on the native stream route (issue 14, section 4): ``POST
/v1/transcriptions/stream?live=true`` transcribes the body while it is still arriving, over h2c
and over a chunked HTTP/1.1 body; a real gateway under hypercorn on loopback.

httpx sends a whole request body before it reads the response, so it cannot show a duplex
exchange: the clients here are the h2 and h11 state machines over a trio socket, sending and
reading at once. Each duplex test proves the overlap with an event: the sender stops halfway
and waits for a ``transcription`` event before it sends the rest of the body, which would
deadlock (and trip the fail_after guard) if the gateway only answered after the body.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.events
import h11
import httpx
import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX, encoded, pcm_of
from conftest import Gateway, make_config, run_gateway

from gateway.engines.scripted import ScriptedEngine

pytestmark = pytest.mark.anyio

PIECE = 3200  # 100 ms of 16 kHz s16le PCM
SCRIPTED = {"s": {"kind": "scripted", "words": ["one", "two", "three"], "seconds_per_word": 0.5}}
LIVE = "/v1/transcriptions/stream?live=true"


class Exchange(Protocol):
    """One duplex request: body pieces out, SSE events in, both at once."""

    status: int
    events: list[tuple[str, Any]]
    seen: dict[str, trio.Event]
    finished: trio.Event

    async def send(self, data: bytes) -> None: ...

    async def end(self) -> None: ...


class _Events:
    def __init__(self) -> None:
        self.status = 0
        self.events: list[tuple[str, Any]] = []
        self.seen = {name: trio.Event() for name in ("transcription", "done", "error")}
        self.finished = trio.Event()
        self._buffer = b""

    def take(self, data: bytes) -> None:
        """Parse SSE frames out of the response body as it arrives."""
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            frame, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            fields = dict(
                line.split(": ", 1) for line in frame.decode().split("\r\n") if ": " in line
            )
            if "event" in fields:
                self.events.append((fields["event"], json.loads(fields["data"])))
                if fields["event"] in self.seen:
                    self.seen[fields["event"]].set()


class _H2(_Events):
    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__()
        self.stream = stream
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.lock = trio.Lock()
        self.window = trio.Event()

    async def flush(self) -> None:
        async with self.lock:
            if data := self.conn.data_to_send():
                await self.stream.send_all(data)

    async def send(self, data: bytes) -> None:
        while data:
            room = min(self.conn.local_flow_control_window(1), self.conn.max_outbound_frame_size)
            if room <= 0:
                # Wait for the server's WINDOW_UPDATE: it reads the body only as it needs it.
                self.window = trio.Event()
                await self.window.wait()
                continue
            self.conn.send_data(1, data[:room])
            data = data[room:]
            await self.flush()

    async def end(self) -> None:
        self.conn.end_stream(1)
        await self.flush()

    async def read(self) -> None:
        while not self.finished.is_set():
            data = await self.stream.receive_some()
            if not data:
                break
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    self.conn.acknowledge_received_data(event.flow_controlled_length, 1)
                    self.take(event.data)
                elif isinstance(event, h2.events.WindowUpdated):
                    self.window.set()
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    self.finished.set()
            await self.flush()
        self.finished.set()


class _H11(_Events):
    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__()
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(self.conn.send(h11.Data(data=data)) or b"")

    async def end(self) -> None:
        await self.stream.send_all(self.conn.send(h11.EndOfMessage()) or b"")

    async def read(self) -> None:
        while not self.finished.is_set():
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some())
            elif isinstance(event, h11.Response):
                self.status = event.status_code
            elif isinstance(event, h11.Data):
                self.take(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                self.finished.set()


@asynccontextmanager
async def duplex(gw: Gateway, path: str, *, http2: bool) -> AsyncIterator[Exchange]:
    """A POST of ``path`` whose body the test sends piece by piece while events arrive."""
    port = int(gw.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:
        exchange: _H2 | _H11
        if http2:
            exchange = _H2(stream)
            exchange.conn.initiate_connection()
            headers = [(":method", "POST"), (":path", path), (":scheme", "http")]
            headers += [(":authority", "gateway"), ("content-type", "application/octet-stream")]
            exchange.conn.send_headers(1, headers)
            await exchange.flush()
        else:
            exchange = _H11(stream)
            request = h11.Request(
                method="POST",
                target=path,
                headers=[
                    ("Host", "gateway"),
                    ("Transfer-Encoding", "chunked"),
                    ("Content-Type", "application/octet-stream"),
                ],
            )
            await stream.send_all(exchange.conn.send(request) or b"")
        nursery.start_soon(exchange.read)
        yield exchange
        nursery.cancel_scope.cancel()


def scripted(tmp_path: Path, **server: Any) -> Any:
    return make_config(tmp_path, engines=SCRIPTED, server={"default_engine": "s", **server})


async def send_pieces(exchange: Exchange, audio: bytes, pace: float = 0) -> None:
    for i in range(0, len(audio), PIECE):
        await exchange.send(audio[i : i + PIECE])
        if pace:
            await trio.sleep(pace)


def final(exchange: Exchange) -> tuple[str, Any]:
    """Exactly one final event, the last one."""
    finals = [e for e in exchange.events if e[0] in ("done", "error")]
    assert finals == [exchange.events[-1]], exchange.events
    return exchange.events[-1]


@pytest.mark.parametrize("http2", [True, False], ids=["h2c", "http1.1-chunked"])
async def test_events_flow_while_the_body_is_still_arriving_and_the_transcript_is_stored(
    tmp_path: Path, http2: bool
) -> None:
    pcm = pcm_of(GOFORWARD)
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            async with duplex(gw, LIVE, http2=http2) as exchange:
                await send_pieces(exchange, pcm[: len(pcm) // 2])
                # Halfway through the body: the gateway has already answered with text.
                await exchange.seen["transcription"].wait()
                assert not exchange.seen["done"].is_set()
                await send_pieces(exchange, pcm[len(pcm) // 2 :])
                await exchange.end()
                await exchange.finished.wait()
            assert exchange.status == 200
            name, done = final(exchange)
            assert name == "done", done
            partials = [data for name, data in exchange.events if name == "transcription"]
            # A random id, not the content hash an upload gets; the length is the body's.
            assert {p["id"] for p in partials} == {done["id"]} and len(done["id"]) == 32
            assert partials[0]["total_time"] is None
            assert done["total_time"] == pytest.approx(len(pcm) / 32000, abs=0.001)
            assert done["text"].startswith("one two three")
            async with httpx.AsyncClient(base_url=gw.url) as client:
                stored = await client.get(f"/v1/transcriptions/{done['id']}")
                again = await client.get(f"/v1/transcriptions/{done['id']}?format=txt")
            assert stored.status_code == 200 and stored.json()["text"] == done["text"]
            assert again.text.strip() == done["text"]


async def test_a_recording_through_whisper_over_h2c(tmp_path: Path) -> None:
    config = make_config(tmp_path, engines={"embedded": {"kind": "whisper", "workers": 1}})
    pcm = pcm_of(LIBRIVOX)
    with trio.fail_after(90):
        async with run_gateway(config) as gw:
            async with duplex(gw, LIVE + "&language=en", http2=True) as exchange:
                # 100 ms pieces at twice real time: a microphone pipe, a little ahead.
                await send_pieces(exchange, pcm[: len(pcm) // 2], pace=0.05)
                await exchange.seen["transcription"].wait()
                await send_pieces(exchange, pcm[len(pcm) // 2 :], pace=0.05)
                await exchange.end()
                await exchange.finished.wait()
    name, done = final(exchange)
    assert name == "done", done
    text = done["text"].lower()
    for word in ("dashwood", "prudently", "selfish", "respectable", "amiable"):
        assert word in text, text


async def test_format_auto_takes_an_ogg_opus_stream_from_a_chunked_body(tmp_path: Path) -> None:
    opus = encoded(GOFORWARD, "ogg", "libopus", 48000, "mono")
    with trio.fail_after(30):
        async with run_gateway(make_config(tmp_path)) as gw:
            async with duplex(gw, LIVE + "&format=auto", http2=False) as exchange:
                for i in range(0, len(opus), 700):
                    await exchange.send(opus[i : i + 700])
                await exchange.end()
                await exchange.finished.wait()
    name, done = final(exchange)
    assert name == "done", done
    assert "forward" in done["text"] and "ten" in done["text"], done
    assert done["total_time"] == pytest.approx(2.79, abs=0.05)


async def test_a_multipart_form_bad_options_or_the_blocking_route_with_live_are_refused(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            files = {"file": ("a.wav", GOFORWARD.read_bytes())}
            refused = await c.post(LIVE, files=files)
            bad_format = await c.post(LIVE + "&format=mp3", content=b"\0" * 3200)
            blocking = await c.post("/v1/transcriptions?live=true", content=b"\0" * 3200)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "INVALID_BODY"
    assert "multipart" in refused.json()["error"]["detail"]
    assert bad_format.status_code == 400
    assert bad_format.json()["error"]["code"] == "INVALID_OPTION"
    assert blocking.status_code == 400
    assert blocking.json()["error"]["code"] == "INVALID_OPTION"


async def test_a_declared_length_over_the_limit_is_refused_before_the_stream(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path, max_upload_bytes=6400)) as gw:
            async with httpx.AsyncClient(base_url=gw.url) as client:
                response = await client.post(LIVE, content=b"\0" * 9600)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_a_body_past_the_limit_is_an_error_event(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path, max_upload_bytes=16000 * 2)) as gw:
            async with duplex(gw, LIVE, http2=False) as exchange:
                await send_pieces(exchange, pcm_of(GOFORWARD))
                await exchange.finished.wait()
    name, error = final(exchange)
    assert (name, error["code"]) == ("error", "PAYLOAD_TOO_LARGE")


@pytest.mark.parametrize("http2", [True, False], ids=["h2c", "http1.1-chunked"])
async def test_a_client_that_leaves_mid_body_closes_the_session_and_nothing_is_stored(
    tmp_path: Path, http2: bool
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            engine = gw.state.engines["s"]
            assert isinstance(engine, ScriptedEngine)
            async with duplex(gw, LIVE, http2=http2) as exchange:
                await send_pieces(exchange, pcm_of(GOFORWARD)[:32000])
                await exchange.seen["transcription"].wait()
                assert engine.closed == 0
                first = next(data for name, data in exchange.events if name == "transcription")
            # The connection is gone without the body's end: the session is cancelled at once.
            with trio.fail_after(1):
                await engine.wait_closed(1)
            await gw.assert_not_stored(first["id"])


async def test_a_stalled_body_is_a_timeout_error_event(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path, body_timeout=0.3)) as gw:
            async with duplex(gw, LIVE, http2=True) as exchange:
                await send_pieces(exchange, pcm_of(GOFORWARD)[:16000])
                # ... and then nothing, without ending the body.
                await exchange.finished.wait()
            engine = gw.state.engines["s"]
            assert isinstance(engine, ScriptedEngine)
            await engine.wait_closed(1)
    name, error = final(exchange)
    assert (name, error["code"]) == ("error", "TIMEOUT")
    assert "0.3 s" in error["detail"]
    assert exchange.status == 200


async def test_body_data_after_the_answer_is_dropped_and_the_gateway_keeps_serving(
    tmp_path: Path,
) -> None:
    """On h2 a client may go on sending after the answer ended (the stream is half-closed for
    the server only): hypercorn 0.18 looked such DATA up among its open streams and the KeyError
    ended the whole server. A live body cut short by an error event is exactly that case."""
    pcm = pcm_of(GOFORWARD)
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path, max_upload_bytes=6400)) as gw:
            async with duplex(gw, LIVE, http2=True) as exchange:
                await send_pieces(exchange, pcm[:9600])
                await exchange.finished.wait()
                await exchange.send(pcm[9600:16000])
                await exchange.end()
            # The gateway still serves (it would refuse connections had it ended).
            async with httpx.AsyncClient(base_url=gw.url, http1=False, http2=True) as client:
                models = await client.get("/v1/models")
                assert models.status_code == 200
    name, error = final(exchange)
    assert (name, error["code"]) == ("error", "PAYLOAD_TOO_LARGE")
