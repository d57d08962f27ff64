"""The native live endpoint, GET /v1/transcriptions/live (issue 14, sections 1 and 3): a real
gateway under hypercorn on loopback and a real WebSocket client (trio-websocket).

A live stream runs through the same job pipeline as an upload (admission with queue positions,
engine, store), fed by a live source instead of a spooled file.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX, encoded, pcm_of
from conftest import Gateway, make_config, run_gateway
from trio_websocket import ConnectionClosed, WebSocketConnection
from trio_websocket import open_websocket_url as _open_websocket_url

from gateway.api.live import close_code
from gateway.auth import add_key
from gateway.engines.scripted import ScriptedEngine
from gateway.live_audio import PcmStream

pytestmark = pytest.mark.anyio

PIECE = 3200  # 100 ms of 16 kHz s16le PCM
SCRIPTED = {"s": {"kind": "scripted", "words": ["one", "two", "three"], "seconds_per_word": 0.5}}


@asynccontextmanager
async def open_websocket_url(url: str, **kw: Any) -> AsyncIterator[WebSocketConnection]:
    """trio-websocket's client, closing its TCP stream on the way out: 0.12 leaves it open after
    a clean close by the server (its reader stops at the server's EOF without closing it)."""
    async with _open_websocket_url(url, **kw) as ws:
        try:
            yield ws
        finally:
            await trio.aclose_forcefully(ws._stream)


async def refusal(
    url: str, *, subprotocols: list[str] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """The HTTP answer to a WebSocket handshake the gateway refuses: status and error code.

    (A plain upgrade request: trio-websocket 0.12 leaks its socket when it is refused.)"""
    handshake = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        **({"Sec-WebSocket-Protocol": ", ".join(subprotocols)} if subprotocols else {}),
        **(headers or {}),
    }
    async with httpx.AsyncClient() as client:
        response = await client.get(url.replace("ws://", "http://", 1), headers=handshake)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.json()["error"]["code"]


def ws_url(gw: Gateway, query: str = "") -> str:
    return (
        gw.url.replace("http://", "ws://", 1)
        + "/v1/transcriptions/live"
        + (f"?{query}" if query else "")
    )


def scripted(tmp_path: Path, **server: Any) -> Any:
    return make_config(tmp_path, engines=SCRIPTED, server={"default_engine": "s", **server})


async def send_audio(
    ws: WebSocketConnection, audio: bytes, *, piece: int = PIECE, pace: float = 0, end: bool = True
) -> None:
    """Send ``audio`` in binary frames (``pace`` seconds apart when set), then ``end``."""
    for i in range(0, len(audio), piece):
        await ws.send_message(audio[i : i + piece])
        if pace:
            await trio.sleep(pace)
    if end:
        await ws.send_message(json.dumps({"type": "end"}))


async def receive_all(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int]:
    """Every frame until the server closes, and its close code."""
    frames = []
    try:
        while True:
            message = await ws.get_message()
            assert isinstance(message, str), "the server sends text frames only"
            frames.append(json.loads(message))
    except ConnectionClosed as exc:
        return frames, exc.reason.code


async def transcribe_live(
    url: str, audio: bytes, *, piece: int = PIECE, pace: float = 0, **kw: Any
) -> tuple[list[dict[str, Any]], int]:
    async with open_websocket_url(url, **kw) as ws, trio.open_nursery() as nursery:
        nursery.start_soon(lambda: send_audio(ws, audio, piece=piece, pace=pace))
        return await receive_all(ws)


def assert_one_ending(frames: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Exactly one final frame, the last one, of ``kind``."""
    finals = [f for f in frames if f["type"] in ("done", "error")]
    assert finals == [frames[-1]] and frames[-1]["type"] == kind, frames
    return frames[-1]


async def test_a_recording_streamed_at_real_time_pace_through_whisper_is_transcribed_and_stored(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, engines={"embedded": {"kind": "whisper", "workers": 1}})
    pcm = pcm_of(LIBRIVOX)
    with trio.fail_after(90):
        async with run_gateway(config) as gw:
            # 100 ms pieces, 100 ms apart: a microphone.
            frames, code = await transcribe_live(ws_url(gw, "language=en"), pcm, pace=0.1)
            done = assert_one_ending(frames, "done")
            assert code == 1000
            partials = [f for f in frames if f["type"] == "transcription"]
            assert len(partials) >= 3, "partials arrive while the speaker speaks"
            # The length is unknown until the client says end; partials after it know it.
            assert partials[0]["total_time"] is None
            assert {f["total_time"] for f in partials} <= {None, done["total_time"]}
            assert {f["id"] for f in partials} == {done["id"]}
            text = done["text"].lower()
            for word in ("dashwood", "prudently", "selfish", "respectable", "amiable"):
                assert word in text, text
            assert done["total_time"] == pytest.approx(len(pcm) / 32_000, abs=0.01)
            assert done["cached"] is False
            async with httpx.AsyncClient(base_url=gw.url) as client:
                stored = (await client.get(f"/v1/transcriptions/{done['id']}")).json()
                srt = await client.get(f"/v1/transcriptions/{done['id']}?format=srt")
            assert stored["text"] == done["text"]
            assert srt.status_code == 200 and "dashwood" in srt.text.lower()


@pytest.mark.parametrize("container", ["ogg", "webm"])
async def test_format_auto_decodes_an_opus_stream_as_it_arrives(
    tmp_path: Path, container: str
) -> None:
    # Made with PyAV now, as a browser's MediaRecorder (WebM) or an Ogg recorder would send it.
    opus = encoded(GOFORWARD, container, "libopus", 48000, "mono")
    with trio.fail_after(30):
        async with run_gateway(make_config(tmp_path)) as gw:
            frames, code = await transcribe_live(ws_url(gw, "format=auto"), opus, piece=700)
    done = assert_one_ending(frames, "done")
    assert code == 1000
    assert "forward" in done["text"] and "ten" in done["text"], done
    assert done["total_time"] == pytest.approx(2.79, abs=0.05)


async def test_pcm_at_48_khz_is_resampled_to_what_the_engine_needs(tmp_path: Path) -> None:
    samples = np.frombuffer(pcm_of(GOFORWARD), dtype=np.int16).astype(np.float64)
    times = np.arange(len(samples) * 3) / 3
    pcm48 = np.interp(times, np.arange(len(samples)), samples).astype(np.int16).tobytes()
    with trio.fail_after(30):
        async with run_gateway(make_config(tmp_path)) as gw:
            url = ws_url(gw, "sample_rate=48000")
            # 1001-byte frames: samples split across frames are put back together.
            frames, code = await transcribe_live(url, pcm48, piece=1001)
    done = assert_one_ending(frames, "done")
    assert code == 1000
    assert "forward" in done["text"] and "ten" in done["text"], done
    assert done["total_time"] == pytest.approx(len(samples) / 16_000, abs=0.01)


def test_pcm_for_an_engine_that_decodes_for_itself_is_a_streaming_wav() -> None:
    stream = PcmStream(8000)
    pcm = pcm_of(GOFORWARD)[:16000]
    with av.open(io.BytesIO(stream.container_header() + pcm)) as container:
        audio = container.streams.audio[0]
        assert (audio.rate, audio.channels, audio.codec_context.name) == (8000, 1, "pcm_s16le")
        decoded = b"".join(bytes(f.planes[0])[: f.samples * 2] for f in container.decode(audio))
    assert decoded == pcm


async def test_a_client_that_leaves_mid_stream_closes_the_engine_session_and_nothing_is_stored(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            engine = gw.state.engines["s"]
            assert isinstance(engine, ScriptedEngine)
            async with open_websocket_url(ws_url(gw)) as ws:
                await send_audio(ws, pcm_of(GOFORWARD)[:32000], end=False)
                first = json.loads(await ws.get_message())
                assert first["type"] == "transcription"
                assert engine.closed == 0
            # Left without "end": the session is cancelled at once.
            with trio.fail_after(1):
                await engine.wait_closed(1)
            await gw.assert_not_stored(first["id"])


async def test_a_silent_client_gets_a_timeout_error_and_a_close(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path, live_idle_timeout=0.3)) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await send_audio(ws, pcm_of(GOFORWARD)[:16000], end=False)
                frames, code = await receive_all(ws)
            engine = gw.state.engines["s"]
            assert isinstance(engine, ScriptedEngine)
            await engine.wait_closed(1)
    error = assert_one_ending(frames, "error")
    assert error["code"] == "TIMEOUT" and "0.3 s" in error["detail"]
    assert code == 4408


@pytest.mark.parametrize("text", ["end", '{"type": "stop"}', "[1, 2]", '{"kind": "end"}'], ids=str)
async def test_a_malformed_control_frame_is_an_invalid_message_error(
    tmp_path: Path, text: str
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await ws.send_message(pcm_of(GOFORWARD)[:6400])
                await ws.send_message(text)
                frames, code = await receive_all(ws)
    error = assert_one_ending(frames, "error")
    assert error["code"] == "INVALID_MESSAGE"
    assert code == 1008


async def test_audio_after_end_is_an_invalid_message_error(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        engines={"s": {"kind": "scripted", "delay": 0.5}},
        server={"default_engine": "s"},
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await send_audio(ws, pcm_of(GOFORWARD)[:6400])
                await ws.send_message(b"\0\0")
                frames, code = await receive_all(ws)
    error = assert_one_ending(frames, "error")
    assert error["code"] == "INVALID_MESSAGE" and "after" in error["detail"]
    assert code == 1008


async def test_undecodable_audio_is_a_decode_error(tmp_path: Path) -> None:
    garbage = np.random.default_rng(14).integers(0, 256, 64 * 1024, dtype=np.uint8).tobytes()
    with trio.fail_after(30):
        async with run_gateway(make_config(tmp_path)) as gw:
            frames, code = await transcribe_live(ws_url(gw, "format=auto"), garbage, piece=4096)
    error = assert_one_ending(frames, "error")
    assert error["code"] == "DECODE_ERROR"
    assert code == 1003


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("format=mp3", 400, "INVALID_OPTION"),
        ("sample_rate=fast", 400, "INVALID_OPTION"),
        ("sample_rate=4000", 400, "INVALID_OPTION"),
        ("format=auto&sample_rate=48000", 400, "INVALID_OPTION"),
        ("engine=nope", 404, "UNKNOWN_ENGINE"),
    ],
)
async def test_bad_query_options_are_refused_before_the_upgrade(
    tmp_path: Path, query: str, status: int, code: str
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            assert await refusal(ws_url(gw, query)) == (status, code)
            assert gw.state.active_jobs == 0


async def test_a_session_waiting_for_the_engine_gets_its_queue_positions(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        engines={"s": {**SCRIPTED["s"], "max_sessions": 1}},
        server={"default_engine": "s"},
    )
    pcm = pcm_of(GOFORWARD)[:32000]
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            async with open_websocket_url(ws_url(gw)) as first:
                await send_audio(first, pcm, end=False)
                assert json.loads(await first.get_message())["type"] == "transcription"
                async with open_websocket_url(ws_url(gw)) as second:
                    assert json.loads(await second.get_message()) == {
                        "type": "queued",
                        "position": 1,
                    }
                    await first.send_message(json.dumps({"type": "end"}))
                    frames, code = await receive_all(first)
                    assert_one_ending(frames, "done") and code == 1000
                    # The second goes on once the first is done.
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(lambda: send_audio(second, pcm))
                        frames, code = await receive_all(second)
    done = assert_one_ending(frames, "done")
    assert done["text"] == "one two" and code == 1000


def _auth_config(tmp_path: Path) -> Any:
    return make_config(
        tmp_path,
        engines=SCRIPTED,
        server={"default_engine": "s"},
        auth={"keys_file": str(tmp_path / "keys.jsonl"), "max_streams_per_tenant": 1},
    )


async def test_auth_by_subprotocol_or_header_and_refused_without_a_valid_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _auth_config(tmp_path)
    _, key = add_key(config.auth.keys_file, "alpha")
    pcm = pcm_of(GOFORWARD)[:32000]
    caplog.set_level(logging.INFO, logger="gateway.access")
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            url = ws_url(gw)
            # A browser: the key as a subprotocol; only "asr-gateway" comes back.
            async with open_websocket_url(url, subprotocols=["asr-gateway", f"bearer.{key}"]) as ws:
                assert ws.subprotocol == "asr-gateway"
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: send_audio(ws, pcm))
                    frames, code = await receive_all(ws)
            by_subprotocol = assert_one_ending(frames, "done")
            # A program: Authorization: Bearer.
            headers = [(b"authorization", f"Bearer {key}".encode())]
            frames, code = await transcribe_live(url, pcm, extra_headers=headers)
            assert assert_one_ending(frames, "done")["text"] == by_subprotocol["text"] == "one two"
            assert code == 1000
            # The tenant's transcript, and only the tenant's.
            async with httpx.AsyncClient(base_url=gw.url) as client:
                path = f"/v1/transcriptions/{by_subprotocol['id']}"
                mine = await client.get(path, headers={"Authorization": f"Bearer {key}"})
                assert mine.status_code == 200
            for offered, extra in (
                ([], {}),
                (["asr-gateway"], {}),
                (["asr-gateway", "bearer.gw_0000000000000000_" + "x" * 43], {}),
                ([], {"Authorization": "Bearer nope"}),
                # Never a key in the URL.
                ([], {"X-Key-In-Query": "1"}),
            ):
                where = url + (f"?key={key}" if extra.pop("X-Key-In-Query", "") else "")
                refused = await refusal(where, subprotocols=offered, headers=extra)
                assert refused == (401, "UNAUTHORIZED")
            # The tenant's stream limit (1) holds for live streams too.
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message(pcm[:3200])
                bearer = {"Authorization": f"Bearer {key}"}
                assert await refusal(url, headers=bearer) == (429, "TOO_MANY_STREAMS")
    lines = [r.request for r in caplog.records if r.name == "gateway.access"]  # type: ignore[attr-defined]
    live = [line for line in lines if line["path"] == "/v1/transcriptions/live"]
    assert [(line["status"], line["outcome"]) for line in live[:2]] == [(101, "OK"), (101, "OK")]
    assert live[0]["tenant"] == "alpha" and live[0]["bytes_in"] == len(pcm)
    assert (401, "UNAUTHORIZED") in [(line["status"], line["outcome"]) for line in live]
    assert key not in caplog.text


async def test_a_live_session_ends_with_shutting_down_when_the_gateway_stops(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await send_audio(ws, pcm_of(GOFORWARD)[:32000], end=False)
                assert json.loads(await ws.get_message())["type"] == "transcription"
                gw.state.drain()
                # New sessions are refused before the upgrade while draining.
                assert await refusal(ws_url(gw)) == (503, "SHUTTING_DOWN")
                gw.state.stop_jobs()
                frames, code = await receive_all(ws)
    error = assert_one_ending(frames, "error")
    assert error["code"] == "SHUTTING_DOWN" and code == 1001


def test_close_codes() -> None:
    assert [
        close_code(c)
        for c in (
            "INVALID_MESSAGE",
            "UNAUTHORIZED",
            "UPSTREAM_ERROR",
            "INTERNAL_ERROR",
            "CAPACITY_TIMEOUT",
            "TIMEOUT",
            "SHUTTING_DOWN",
            "DECODE_ERROR",
        )
    ] == [1008, 1008, 1011, 1011, 1013, 4408, 1001, 1003]
