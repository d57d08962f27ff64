"""The OpenAI Realtime-compatible endpoint, GET /v1/realtime?intent=transcription (issue 14,
section 2): a real gateway under hypercorn on loopback, the real openai SDK's realtime client and
a raw WebSocket client (trio-websocket); and the wire adapters fed with frames and numbers.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import openai
import pytest
import trio
from audio_util import GOFORWARD, SHORT, pcm_of
from conftest import Gateway, make_config, run_gateway
from test_live import SCRIPTED, open_websocket_url, refusal
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway.api import _realtime_wire as wire
from gateway.auth import add_key
from gateway.engines.scripted import ScriptedEngine

pytestmark = pytest.mark.anyio

Event = dict[str, Any]


def ws_url(gw: Gateway, query: str = "intent=transcription") -> str:
    return gw.url.replace("http://", "ws://", 1) + "/v1/realtime" + (f"?{query}" if query else "")


def pcm24(path: Path) -> bytes:
    """A 16 kHz recording as the 24 kHz s16le PCM Realtime clients send (linear interpolation)."""
    x = np.frombuffer(pcm_of(path), dtype="<i2").astype(np.float64)
    t = np.arange(0, len(x) - 1, 2 / 3)
    return np.round(np.interp(t, np.arange(len(x)), x)).astype("<i2").tobytes()


def append(audio: bytes) -> str:
    return json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()}
    )


def manual_session(model: str = "s", **audio: Any) -> str:
    return json.dumps(
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": model},
                        "turn_detection": None,
                        **audio,
                    }
                },
            },
        }
    )


async def next_event(ws: WebSocketConnection, *types: str) -> Event:
    """The next event of one of ``types`` (others, such as deltas, are skipped)."""
    while True:
        event: Event = json.loads(await ws.get_message())
        if event["type"] in types:
            return event


def scripted_engine(gw: Gateway) -> ScriptedEngine:
    engine = gw.state.engines["s"]
    assert isinstance(engine, ScriptedEngine)
    return engine


def scripted(tmp_path: Path, **sections: Any) -> Any:
    return make_config(tmp_path, engines=SCRIPTED, server={"default_engine": "s"}, **sections)


# -- the openai SDK -------------------------------------------------------------------------------


def _sdk_transcribe(url: str, turns: list[bytes]) -> list[Any]:
    """The SDK's (synchronous) realtime client, manual commits: every event after the update."""
    client = openai.OpenAI(api_key="unused", base_url=url + "/v1")
    events: list[Any] = []
    with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(
            session={
                "type": "transcription",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "whisper-1", "language": "en"},
                        "turn_detection": None,
                    }
                },
            }
        )
        for audio in turns:
            for i in range(0, len(audio), 9600):  # 200 ms appends
                conn.input_audio_buffer.append(audio=base64.b64encode(audio[i : i + 9600]).decode())
            conn.input_audio_buffer.commit()
        done = 0
        while done < len(turns):
            event = conn.recv()
            events.append(event)
            if event.type == "conversation.item.done":
                done += 1
            assert event.type != "error", event
    return events


async def test_the_openai_sdk_transcribes_a_recording_with_manual_commits_through_whisper(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, engines={"embedded": {"kind": "whisper", "workers": 1}})
    turns = [pcm24(GOFORWARD), pcm24(SHORT)]
    with trio.fail_after(120):
        async with run_gateway(config) as gw:
            events = await trio.to_thread.run_sync(_sdk_transcribe, gw.url, turns)
            kinds = [e.type for e in events]
            assert kinds[0] == "session.updated"
            committed = [e for e in events if e.type == "input_audio_buffer.committed"]
            assert len(committed) == 2
            first, second = committed
            assert first.previous_item_id is None and second.previous_item_id == first.item_id
            completed = [
                e
                for e in events
                if e.type == "conversation.item.input_audio_transcription.completed"
            ]
            # Items complete in the order they were committed.
            assert [e.item_id for e in completed] == [first.item_id, second.item_id]
            for c in completed:
                deltas = [
                    e.delta
                    for e in events
                    if e.type.endswith("transcription.delta") and e.item_id == c.item_id
                ]
                assert "".join(deltas) == c.transcript
                assert c.usage.type == "duration" and c.usage.seconds > 2
                assert kinds.index("input_audio_buffer.committed") < kinds.index(c.type)
            one, two = (c.transcript.lower() for c in completed)
            assert "forward" in one and "meters" in one, one
            assert "he was not" in two and "young man" in two, two
            done = [e for e in events if e.type == "conversation.item.done"]
            assert [e.item.id for e in done] == [first.item_id, second.item_id]
            # Each turn is a live session of its own, stored.
            assert gw.state.active_jobs == 0


# -- a raw WebSocket client -----------------------------------------------------------------------


async def test_server_vad_commits_each_spoken_turn_by_itself(tmp_path: Path) -> None:
    silence = bytes(48000)  # 1 s at 24 kHz
    audio = pcm24(GOFORWARD) + silence + pcm24(SHORT) + silence
    with trio.fail_after(60):
        async with run_gateway(scripted(tmp_path)) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                created = await next_event(ws, "session.created")
                vad = created["session"]["audio"]["input"]["turn_detection"]
                assert vad["type"] == "server_vad", "server VAD is the default, as OpenAI's"
                update = json.loads(manual_session())
                update["session"]["audio"]["input"]["turn_detection"] = {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 500,
                }
                await ws.send_message(json.dumps(update))
                await next_event(ws, "session.updated")
                for i in range(0, len(audio), 4800):
                    await ws.send_message(append(audio[i : i + 4800]))
                events: list[Event] = []
                while sum(e["type"].endswith(".completed") for e in events) < 2:
                    events.append(json.loads(await ws.get_message()))
            kinds = [e["type"] for e in events]
            assert kinds.count("input_audio_buffer.speech_started") == 2, kinds
            assert kinds.count("input_audio_buffer.speech_stopped") == 2, kinds
            started = [e for e in events if e["type"].endswith("speech_started")]
            stopped = [e for e in events if e["type"].endswith("speech_stopped")]
            committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
            assert [e["item_id"] for e in started] == [e["item_id"] for e in committed]
            # The second turn starts after the first one's speech and the second of silence.
            assert stopped[0]["audio_end_ms"] < started[1]["audio_start_ms"]
            # "go forward ten meters" ends inside the 2.79 s recording.
            assert started[0]["audio_start_ms"] < 1000 < stopped[0]["audio_end_ms"] < 2790
            assert committed[1]["previous_item_id"] == committed[0]["item_id"]
            # A commit comes after its speech stopped.
            for s, c in zip(stopped, committed, strict=True):
                assert events.index(c) == events.index(s) + 1
            completed = [e for e in events if e["type"].endswith(".completed")]
            assert [e["item_id"] for e in completed] == [e["item_id"] for e in committed]
            # The scripted engine: a word per 0.5 s of each turn's audio, from its start.
            assert completed[0]["transcript"].startswith("one two three")


async def test_g711_audio_and_a_queued_turn(tmp_path: Path) -> None:
    """mu-law at 8 kHz reaches the engine as PCM; a turn waiting for the engine says so."""
    config = make_config(
        tmp_path,
        engines={"s": {**SCRIPTED["s"], "max_sessions": 1}},
        server={"default_engine": "s"},
    )
    # 1.2 s of mu-law silence-ish bytes (0xFF is 0): the scripted engine counts the seconds.
    ulaw = b"\xff" * 9600
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            engine = scripted_engine(gw)
            async with (
                open_websocket_url(ws_url(gw)) as holder,
                open_websocket_url(ws_url(gw)) as ws,
            ):
                await holder.send_message(manual_session())
                await holder.send_message(append(bytes(9600)))
                await next_event(holder, "session.updated")
                await ws.send_message("")
                error = await next_event(ws, "error")
                assert error["error"]["code"] == "invalid_json"
                update = json.loads(manual_session())
                update["session"]["audio"]["input"]["format"] = {"type": "audio/pcmu"}
                await ws.send_message(json.dumps(update))
                updated = await next_event(ws, "session.updated")
                assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
                await ws.send_message(append(ulaw))
                queued = await next_event(ws, wire.QUEUED_EVENT)
                assert queued["position"] == 1
                assert engine.opened == 1, "the holder's turn has the engine's one session"
                await holder.send_message(json.dumps({"type": "input_audio_buffer.commit"}))
                await next_event(holder, "conversation.item.done")
                await ws.send_message(json.dumps({"type": "input_audio_buffer.commit"}))
                completed = await next_event(
                    ws, "conversation.item.input_audio_transcription.completed"
                )
                # 1.2 s: "one" and "two" whole, "three" partly heard, counted at the end.
                assert completed["transcript"] == "one two three"
                assert completed["usage"] == {"type": "duration", "seconds": 1.2}
                assert completed["item_id"] == queued["item_id"]


async def test_a_commit_of_an_empty_or_short_buffer_is_an_error_and_the_socket_stays_open(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await ws.send_message(manual_session())
                await next_event(ws, "session.updated")
                commit = {"type": "input_audio_buffer.commit", "event_id": "mine"}
                await ws.send_message(json.dumps(commit))
                error = (await next_event(ws, "error"))["error"]
                assert error["type"] == "invalid_request_error"
                assert error["code"] == "input_audio_buffer_commit_empty"
                assert error["event_id"] == "mine"
                await ws.send_message(append(bytes(2400)))  # 50 ms
                await ws.send_message(json.dumps(commit))
                error = (await next_event(ws, "error"))["error"]
                assert error["code"] == "input_audio_buffer_commit_empty"
                assert "50.00ms" in error["message"]
                # The 50 ms are kept: 50 more make a turn.
                await ws.send_message(append(bytes(2400)))
                await ws.send_message(json.dumps(commit))
                committed = await next_event(ws, "input_audio_buffer.committed", "error")
                assert committed["type"] == "input_audio_buffer.committed"
                completed = await next_event(
                    ws, "conversation.item.input_audio_transcription.completed"
                )
                assert completed["transcript"] == "one"
                # Clear drops an uncommitted buffer: the next commit is empty again.
                await ws.send_message(append(bytes(9600)))
                await ws.send_message(json.dumps({"type": "input_audio_buffer.clear"}))
                await next_event(ws, "input_audio_buffer.cleared")
                await ws.send_message(json.dumps(commit))
                error = (await next_event(ws, "error"))["error"]
                assert error["code"] == "input_audio_buffer_commit_empty"


async def test_a_failed_turn_is_a_failed_event_and_the_next_turn_runs_on_another_engine(
    tmp_path: Path,
) -> None:
    engines = {**SCRIPTED, "bad": {**SCRIPTED["s"], "fail_after": 0}}
    config = make_config(tmp_path, engines=engines, server={"default_engine": "s"})
    commit = json.dumps({"type": "input_audio_buffer.commit"})
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await ws.send_message(manual_session(model="bad"))
                await ws.send_message(append(bytes(48000)))
                await ws.send_message(commit)
                first = await next_event(ws, "input_audio_buffer.committed")
                failed = await next_event(
                    ws,
                    "conversation.item.input_audio_transcription.failed",
                    "conversation.item.input_audio_transcription.completed",
                )
                assert failed["type"].endswith(".failed"), failed
                assert failed["item_id"] == first["item_id"]
                assert failed["error"]["code"] == "upstream_error"
                assert failed["error"]["type"] == "server_error"
                # The socket goes on; the next turn takes the new model.
                await ws.send_message(manual_session(model="s"))
                await ws.send_message(append(bytes(48000)))
                await ws.send_message(commit)
                second = await next_event(ws, "input_audio_buffer.committed")
                assert second["previous_item_id"] == first["item_id"]
                completed = await next_event(
                    ws, "conversation.item.input_audio_transcription.completed"
                )
                assert (completed["item_id"], completed["transcript"]) == (
                    second["item_id"],
                    "one two",
                )


async def test_a_turn_in_progress_ends_with_shutting_down_when_the_gateway_stops(
    tmp_path: Path,
) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            engine = scripted_engine(gw)
            async with open_websocket_url(ws_url(gw)) as ws:
                await ws.send_message(manual_session())
                await ws.send_message(append(bytes(48000)))
                await engine.wait_opened(1)
                gw.state.drain()
                # New sessions are refused before the upgrade while draining.
                assert await refusal(ws_url(gw)) == (503, "shutting_down")
                gw.state.stop_jobs()
                error = (await next_event(ws, "error"))["error"]
                assert (error["type"], error["code"]) == ("server_error", "shutting_down")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1001


async def test_malformed_frames_are_error_events_and_the_session_goes_on(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            async with open_websocket_url(ws_url(gw)) as ws:
                await next_event(ws, "session.created")
                bad_model = manual_session(model="no-such-model")
                wrong_type = json.loads(manual_session())
                wrong_type["session"]["type"] = "realtime"
                for frame, code, param in (
                    ("not json", "invalid_json", None),
                    (b"\x00\x01", "invalid_json", None),
                    ('{"type": "response.create"}', "invalid_event", "type"),
                    ('{"type": "input_audio_buffer.append", "audio": 5}', "invalid_value", None),
                    (
                        '{"type": "input_audio_buffer.append", "audio": "@@"}',
                        "invalid_value",
                        "audio",
                    ),
                    (bad_model, "invalid_value", "session.audio.input.transcription.model"),
                    (json.dumps(wrong_type), "invalid_value", "session.type"),
                ):
                    await ws.send_message(frame)
                    error = (await next_event(ws, "error", "session.updated"))["error"]
                    assert (error["code"], error["param"]) == (code, param), (frame, error)
                # Nothing was changed by the refused updates; a good one works.
                await ws.send_message(manual_session(model="whisper-1"))
                updated = await next_event(ws, "session.updated")
                assert updated["session"]["audio"]["input"]["transcription"]["model"] == "whisper-1"
                assert updated["session"]["audio"]["input"]["turn_detection"] is None


async def test_a_beta_shaped_client_gets_openais_error_and_close_4000(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            for headers, frame in (
                ([(b"openai-beta", b"realtime=v1")], None),
                ([], json.dumps({"type": "transcription_session.update", "session": {}})),
            ):
                async with open_websocket_url(ws_url(gw), extra_headers=headers) as ws:
                    if frame is not None:
                        await next_event(ws, "session.created")
                        await ws.send_message(frame)
                    error = (await next_event(ws, "error"))["error"]
                    assert error["code"] == "beta_api_shape_disabled"
                    assert error["message"] == wire.BETA_MESSAGE
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 4000


async def test_auth_by_bearer_header_and_refusals_before_the_upgrade(tmp_path: Path) -> None:
    config = scripted(tmp_path, auth={"keys_file": str(tmp_path / "keys.jsonl")})
    _, key = add_key(config.auth.keys_file, "alpha")
    with trio.fail_after(30):
        async with run_gateway(config) as gw:
            url = ws_url(gw)
            auth = ("Authorization", f"Bearer {key}")
            headers = [(auth[0].encode(), auth[1].encode())]
            async with open_websocket_url(url, extra_headers=headers) as ws:
                assert (await next_event(ws, "session.created"))["session"]["id"]
            for extra in ({}, {"Authorization": "Bearer nope"}):
                # OpenAI's error shape: lower-case codes.
                assert await refusal(url, headers=extra) == (401, "unauthorized")
            # Only transcription sessions.
            refused = await refusal(ws_url(gw, "model=gpt-realtime"), headers=dict([auth]))
            assert refused == (400, "bad_request")


async def test_a_client_that_leaves_mid_turn_closes_the_engine_session_and_stores_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved: list[Any] = []
    with trio.fail_after(30):
        async with run_gateway(scripted(tmp_path)) as gw:
            engine = scripted_engine(gw)
            store = gw.state.store
            save = store.save

            async def spy(transcript: Any, tenant: str = "") -> None:
                saved.append(transcript)
                await save(transcript, tenant)

            monkeypatch.setattr(store, "save", spy)
            # A completed turn is stored (the spy sees saves).
            async with open_websocket_url(ws_url(gw)) as ws:
                await ws.send_message(manual_session())
                await ws.send_message(append(bytes(4800)))
                await ws.send_message(json.dumps({"type": "input_audio_buffer.commit"}))
                await next_event(ws, "conversation.item.done")
            assert len(saved) == 1
            async with open_websocket_url(ws_url(gw)) as ws:
                await ws.send_message(manual_session())
                await next_event(ws, "session.updated")
                await ws.send_message(append(pcm24(GOFORWARD)[:48000]))
                await engine.wait_opened(2)
                assert engine.closed == 1
            # Left without a commit: the turn's session is cancelled at once.
            with trio.fail_after(1):
                await engine.wait_closed(2)
                await gw.state.wait_idle()
            assert len(saved) == 1, "nothing of the unfinished turn is stored"


# -- the wire, fed directly -----------------------------------------------------------------------


def test_client_frames_decode_to_structs_or_coded_errors() -> None:
    event = wire.decode_client_event(append(b"\x01\x02"))
    assert isinstance(event, wire.Append) and wire.decode_audio(event) == b"\x01\x02"
    assert isinstance(wire.decode_client_event('{"type":"input_audio_buffer.clear"}'), wire.Clear)
    with pytest.raises(wire.WireError) as beta:
        wire.decode_client_event('{"type":"transcription_session.update","event_id":"e1"}')
    assert (beta.value.info.code, beta.value.info.event_id) == (wire.BETA_CODE, "e1")


def test_a_session_update_merges_into_the_settings() -> None:
    models = frozenset({"s", "whisper-1"})
    start = wire.Settings(model="s")
    update = msgspec.json.decode(manual_session(model="whisper-1"), type=wire.SessionUpdateIn)
    merged = wire.merge_update(start, update, models)
    assert (merged.model, merged.turn_detection, merged.format) == ("whisper-1", None, "audio/pcm")
    partial = msgspec.json.decode(
        b'{"session":{"audio":{"input":{"format":{"type":"audio/pcma"},'
        b'"turn_detection":{"type":"server_vad","silence_duration_ms":200}}}}}',
        type=wire.SessionUpdateIn,
    )
    again = wire.merge_update(merged, partial, models)
    assert again.model == "whisper-1", "what an update omits is kept"
    assert again.turn_detection == wire.Vad(silence_duration_ms=200)
    assert (again.rate, again.bytes_per_ms) == (8000, 8.0)
    bad_rate = msgspec.json.decode(
        b'{"session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":16000}}}}}',
        type=wire.SessionUpdateIn,
    )
    with pytest.raises(wire.WireError) as exc:
        wire.merge_update(start, bad_rate, models)
    assert exc.value.info.param == "session.audio.input.format.rate"


def test_g711_decodes_to_the_standard_values() -> None:
    ulaw = np.frombuffer(wire.g711_to_pcm("audio/pcmu", bytes([0xFF, 0x7F, 0x00, 0x80])), "<i2")
    assert ulaw.tolist() == [0, 0, -32124, 32124]
    alaw = np.frombuffer(wire.g711_to_pcm("audio/pcma", bytes([0xD5, 0x55, 0xAA, 0x2A])), "<i2")
    assert alaw.tolist() == [8, -8, 32256, -32256]
    assert wire.g711_to_pcm("audio/pcm", b"\x01\x02") == b"\x01\x02"


def test_turn_detection_from_speech_probabilities() -> None:
    detector = wire.TurnDetector(wire.Vad(0.5, 100, 96), window_ms=32)
    assert detector.push([0.1] * 10) == []
    assert detector.push([0.9, 0.9]) == [("started", 320 - 100)]
    # A pause shorter than the silence duration does not stop the speech.
    assert detector.push([0.2, 0.2, 0.9]) == []
    assert detector.push([0.1, 0.1, 0.1]) == [("stopped", 15 * 32)]
    assert detector.push([0.1] * 5) == []
    assert detector.push([0.6]) == [("started", 23 * 32 - 100)]


def test_deltas_add_up_to_the_text() -> None:
    assert wire.next_delta("", "go") == "go"
    assert wire.next_delta("go", "go forward") == " forward"
    assert wire.next_delta("go forward", "go forward") == ""
    assert wire.next_delta("go forward", "no forward") == ""
