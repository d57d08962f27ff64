"""The live endpoints under harder conditions (issue 14, "Tests and bench"): a WhisperLiveKit
upstream that drops mid-stream, a slow reader, an idle Realtime turn, and the WebSocket pings a
silent client gets. A real gateway under hypercorn on loopback, real WebSocket clients.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from audio_util import GOFORWARD, pcm_of
from conftest import Gateway, make_config, run_gateway
from fakes.wlk_server import Drop, FakeWlkServer, expected_text, pcm_words
from test_live import (
    assert_one_ending,
    open_websocket_url,
    receive_all,
    transcribe_live,
)
from test_live import (
    ws_url as live_url,
)
from test_realtime import append, manual_session, next_event, pcm24, scripted_engine
from test_realtime import ws_url as realtime_url
from trio_websocket import ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request

from gateway.engines.scripted import ScriptedEngine

pytestmark = pytest.mark.anyio


# -- a WhisperLiveKit upstream that drops mid-stream -------------------------------------------


@asynccontextmanager
async def wlk_gateway(tmp_path: Path, fake: FakeWlkServer) -> AsyncIterator[Gateway]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve_tcp)
        wlk = {"kind": "whisperlivekit", "urls": [url], "backoff_initial": 0.05}
        config = make_config(tmp_path, engines={"wlk": wlk}, server={"default_engine": "wlk"})
        async with run_gateway(config) as gw:
            yield gw
        nursery.cancel_scope.cancel()


async def test_a_live_session_on_whisperlivekit_resumes_after_a_1011_drop_without_lost_or_repeated_words(
    tmp_path: Path,
) -> None:
    values = list(range(1, 41))  # 20 s of audio: "w1 ... w40"
    # 20 audio-seconds per second: the first connection is dropped 0.4 s in, mid-stream.
    fake = FakeWlkServer(speed=20.0, tick=0.01, drops={1: Drop(at=0.4, code=1011)})
    with trio.fail_after(30):
        async with wlk_gateway(tmp_path, fake) as gw:
            frames, code = await transcribe_live(live_url(gw), pcm_words(values), piece=6400)
    done = assert_one_ending(frames, "done")
    assert code == 1000
    first, second = fake.connections[:2]
    assert first.closed_by_server == 1011
    assert len(fake.accepted) == 2, "one resume"
    # The second connection started past the first word: it resumed, not restarted.
    assert second.first_word not in (None, 1)
    assert done["text"] == expected_text(values)
    words = Counter(done["text"].split())
    assert set(words) == {f"w{v}" for v in values} and set(words.values()) == {1}


# -- a slow reader ---------------------------------------------------------------------------------


class SendGate:
    """ASGI middleware holding the live socket's outgoing frames while closed, as a client that
    stops reading does once the socket's buffers are full (hypercorn's send blocks there)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.open = trio.Event()
        self.held = trio.Event()
        self.frames = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return

        async def gated(message: Any) -> None:
            if message["type"] == "websocket.send":
                self.held.set()
                await self.open.wait()
                self.frames += 1
            await send(message)

        await self.app(scope, receive, gated)


async def test_a_slow_reader_gets_conflated_snapshots_and_the_engine_is_still_read(
    tmp_path: Path,
) -> None:
    words = [f"w{i}" for i in range(1, 61)]
    # 100 ms per word and 100 ms pieces: every piece is one engine update, 61 with the final one,
    # more than the engine's result buffer (16) and the source's channel together hold.
    engines = {"s": {"kind": "scripted", "words": words, "seconds_per_word": 0.1}}
    config = make_config(tmp_path, engines=engines, server={"default_engine": "s"})
    gate: SendGate | None = None

    def wrap(app: Any) -> Any:
        nonlocal gate
        gate = SendGate(app)
        return gate

    pcm = (pcm_of(GOFORWARD) * 3)[: 3200 * len(words)]
    with trio.fail_after(30):
        async with run_gateway(config, wrap=wrap) as gw:
            assert gate is not None
            engine = gw.state.engines["s"]
            assert isinstance(engine, ScriptedEngine)
            async with open_websocket_url(live_url(gw)) as ws:
                for i in range(0, len(pcm), 3200):
                    await ws.send_message(pcm[i : i + 3200])
                await ws.send_message(json.dumps({"type": "end"}))
                # The writer is stuck on its first frame, yet the engine session is read to its
                # end and closed: the pipeline never waits for the reader.
                await gate.held.wait()
                await engine.wait_closed(1)
                assert gate.frames == 0
                gate.open.set()
                frames, code = await receive_all(ws)
    done = assert_one_ending(frames, "done")
    assert code == 1000
    snapshots = [f for f in frames if f["type"] == "transcription"]
    # The held frame, then only the newest state: far fewer frames than the 61 updates.
    assert 1 <= len(snapshots) <= 3, [f["text"] for f in snapshots]
    assert snapshots[-1]["text"] == done["text"] == " ".join(words)


# -- an idle Realtime turn ----------------------------------------------------------------------


async def test_a_realtime_turn_whose_client_goes_silent_gets_a_timeout_error_and_a_close(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        engines={"s": {"kind": "scripted", "words": ["one", "two"], "seconds_per_word": 0.5}},
        server={"default_engine": "s", "live_idle_timeout": 0.3, "max_session_seconds": 600},
    )
    # Without the idle timeout the turn would stay open until max_session_seconds.
    with trio.fail_after(10):
        async with run_gateway(config) as gw:
            async with open_websocket_url(realtime_url(gw)) as ws:
                await next_event(ws, "session.created")
                await ws.send_message(manual_session())
                await next_event(ws, "session.updated")
                await ws.send_message(append(pcm24(GOFORWARD)[:9600]))  # 200 ms, never committed
                error = await next_event(ws, "error")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
            engine = scripted_engine(gw)
            # The open turn's engine session is closed, not left running.
            await engine.wait_closed(1)
            assert (engine.opened, engine.active) == (1, 0)
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "timeout" and "0.3 s" in error["error"]["message"]
    assert closed.value.reason.code == 4408


# -- pings to a silent client ----------------------------------------------------------------------


async def test_a_silent_native_live_client_gets_websocket_pings(tmp_path: Path) -> None:
    engines = {"s": {"kind": "scripted"}}
    config = make_config(
        tmp_path, engines=engines, server={"default_engine": "s", "keepalive": 0.05}
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            host, port = gw.url.removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            async with stream:
                # A raw client (wsproto): it sees the pings and answers none of them.
                ws = WSConnection(ConnectionType.CLIENT)
                await stream.send_all(
                    ws.send(Request(host=f"{host}:{port}", target="/v1/transcriptions/live"))
                )
                seen: list[type[Any]] = []
                while seen.count(Ping) < 3:
                    data = await stream.receive_some()
                    assert data, "the server closed the connection"
                    ws.receive_data(data)
                    seen.extend(type(event) for event in ws.events())
                assert seen[0] is AcceptConnection
                assert CloseConnection not in seen
                await stream.send_all(ws.send(CloseConnection(code=1000)))
