"""The AymurAI profile (``/asr``) end to end: real hypercorn on loopback, real SQLite, WAV uploads.

Each ``test_t1_NN_*`` / ``test_t2_NN_*`` replays case NN of AymurAI's own test files
(``test_transcribe.py`` / ``test_asr_client_stream.py``, see the reference); ``test_fix_*`` prove
the defects of their endpoint are fixed. Scripted engines give deterministic snapshots; a fake
WhisperLiveKit server stands in where the upstream's behaviour matters.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import socket
import struct
import uuid
import wave
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from conftest import SSE, Gateway, make_config, run_gateway, sse_events
from fakes.wlk_server import FakeWlkServer, pcm_words, wav_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.aymurai import (
    AymurAITranslator,
    aymurai_code,
    error_frame,
    iso_duration,
    parse_duration,
)
from gateway.auth import add_key
from gateway.config import AuthConfig, Config
from gateway.engines.scripted import ScriptedEngine
from gateway.events import MAX_SECONDS, Done, Failed, Progress, Queued, Segment, Transcript
from gateway.store import StoredTranscript, content_uuid

pytestmark = pytest.mark.anyio

STREAM = "/asr/transcribe/stream"
TRANSCRIBE = "/asr/transcribe"
HOLA_ID = "bf852ac1-969c-5fb0-8949-bb1d485ae360"  # text_to_uuid("hola"), from the reference


# -- helpers -----------------------------------------------------------------------------------


def sine_wav(freq_hz: int, duration: float = 1.0, sr: int = 16_000) -> bytes:
    """AymurAI's ``make_wav_bytes``: mono s16 sine at amplitude 0.2; a distinct file per freq."""
    samples = (
        round(0.2 * 32767 * math.sin(2 * math.pi * freq_hz * n / sr))
        for n in range(round(duration * sr))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return out.getvalue()


def data_to_uuid(data: bytes) -> str:
    """AymurAI's cache key, computed with the standard library only."""
    return str(uuid.uuid5(uuid.NAMESPACE_DNS, hashlib.blake2b(data, digest_size=16).hexdigest()))


def content_id(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def files(data: bytes, name: str = "sample.wav") -> dict[str, tuple[str, bytes, str]]:
    return {"file": (name, data, "audio/wav")}


def validation(document_id: str) -> str:
    return f"/asr/validation/document/{document_id}"


def scripted(**kw: Any) -> dict[str, Any]:
    # "hola" covers [0, 0.4) s and "mundo" [0.4, 0.8): with 200 ms chunks each update lands on a
    # word boundary, so a 1 s file gives exactly three snapshots: "hola", "hola mundo" and the
    # final one. The delay lets the reader take each before the next (no conflation).
    return {
        "kind": "scripted",
        "words": ["hola", "mundo"],
        "seconds_per_word": 0.4,
        "delay": 0.1,
        **kw,
    }


def config(tmp_path: Path, keepalive: float = 15.0, **engine: Any) -> Config:
    # The profile's engine ("asr") is not the default one: aymurai.engine must route to it.
    return make_config(
        tmp_path,
        server={"default_engine": "other", "keepalive": keepalive},
        engines={"other": {"kind": "scripted", "words": ["other"]}, "asr": scripted(**engine)},
        aymurai={"engine": "asr"},
    )


@asynccontextmanager
async def gateway(cfg: Config) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    async with run_gateway(cfg) as gw, httpx.AsyncClient(base_url=gw.url) as client:
        yield gw, client


@asynccontextmanager
async def wlk_gateway(
    tmp_path: Path, fake: FakeWlkServer, **engine: Any
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(fake.serve_tcp)
        async with gateway(wlk_config(tmp_path, url, **engine)) as pair:
            yield pair
        nursery.cancel_scope.cancel()


def wlk_config(tmp_path: Path, url: str, **engine: Any) -> Config:
    wlk = {"kind": "whisperlivekit", "urls": [url], **engine}
    return make_config(
        tmp_path, server={"default_engine": "wlk"}, engines={"wlk": wlk}, aymurai={"engine": ""}
    )


async def stream(
    client: httpx.AsyncClient, data: bytes, **params: str
) -> tuple[httpx.Response, bytes]:
    async with client.stream("POST", STREAM, params=params, files=files(data)) as r:
        body = await r.aread()
    return r, body


def parse_sse_events(body: bytes) -> list[SSE]:
    """AymurAI's ``_parse_sse_events``: frames split on a blank line, comments skipped, the event
    name "message" by default, ``data:`` lines joined."""
    events = []
    for chunk in body.decode().split("\n\n"):
        if not chunk or chunk.startswith(":"):
            continue
        name, data = "message", []
        for line in chunk.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append(SSE(name, json.loads("\n".join(data))))
    return events


def labels(body: bytes) -> list[str]:
    """Every frame in order: the event name, or the comment text."""
    out = []
    for chunk in body.decode().split("\n\n")[:-1]:
        out.append(chunk[1:].strip() if chunk.startswith(":") else chunk.split("\n")[0][7:])
    return out


def texts(event: SSE) -> list[str]:
    return [p["text"] for p in event.data["document"]]


def paragraph(
    text: str, start: str, end: str, speaker_no: int = 0, speaker_name: str | None = None
) -> dict[str, Any]:
    return {
        "speaker_no": speaker_no,
        "speaker_name": speaker_name,
        "start": start,
        "end": end,
        "text": text,
        "paragraph_id": data_to_uuid(text.encode()),
    }


def stored_transcript(data: bytes, *segments: Segment, engine: str = "asr") -> Transcript:
    return Transcript(
        id=content_id(data),
        segments=segments,
        committed=len(segments),
        current_time=1.0,
        total_time=1.0,
        engine=engine,
    )


async def break_the_store(gw: Gateway) -> None:
    """Make every new transcript fail to save (a real SQLite error, raised by a trigger)."""

    def install(conn: Any) -> None:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON transcripts"
            " BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )

    await gw.state.store._call(install)


async def validate(
    tmp_path: Path, data: bytes, body: list[dict[str, Any]]
) -> tuple[httpx.Response, StoredTranscript | None, httpx.Response]:
    """Transcribe ``data``, POST ``body`` as its validation: the answer, the row, a later GET."""
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            await c.post(TRANSCRIBE, files=files(data))
            posted = await c.post(validation(data_to_uuid(data)), json=body)
            stored = await gw.state.store.get(content_id(data))
            again = await c.get(validation(data_to_uuid(data)))
    return posted, stored, again


def engine_of(gw: Gateway, name: str = "asr") -> ScriptedEngine:
    engine = gw.state.engines[name]
    assert isinstance(engine, ScriptedEngine)
    return engine


# -- T1: test_transcribe.py ---------------------------------------------------------------------


async def test_t1_01_transcribe_returns_and_persists_the_document(tmp_path: Path) -> None:
    data = sine_wav(440)
    with trio.fail_after(30):
        cfg = config(tmp_path, words=["Hola mundo"], seconds_per_word=1.0)
        async with gateway(cfg) as (gw, c):
            r = await c.post(TRANSCRIBE, params={"use_cache": "false"}, files=files(data))
            stored = await gw.state.store.get(content_id(data))
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["document_id"] == data_to_uuid(data)
    assert body["document"] == [paragraph("Hola mundo", "PT0S", "PT1S")]
    assert (body["current_time"], body["total_time"]) == (1.0, 1.0)
    assert stored is not None and stored.segments[0].text == "Hola mundo"
    assert stored.engine == "asr"


async def test_t1_02_transcribe_leaves_out_blank_paragraphs(tmp_path: Path) -> None:
    data = sine_wav(450)
    with trio.fail_after(30):
        cfg = config(tmp_path, words=["Hola", "   ", ""], seconds_per_word=0.3)
        async with gateway(cfg) as (_, c):
            r = await c.post(TRANSCRIBE, params={"use_cache": "false"}, files=files(data))
    assert r.status_code == 200
    assert texts(SSE("done", r.json())) == ["Hola"]


async def test_t1_02_stream_skips_snapshots_with_only_blank_paragraphs(tmp_path: Path) -> None:
    # Updates at 0.4 s ("  ") and 0.8 s ("  ", "") have nothing left once blanks are dropped.
    data = sine_wav(455)
    with trio.fail_after(30):
        async with gateway(config(tmp_path, words=["  ", "", "hola"])) as (_, c):
            _, body = await stream(c, data)
    events = parse_sse_events(body)
    assert [e.event for e in events] == ["transcription", "done"]
    assert texts(events[0]) == texts(events[1]) == ["hola"]


async def test_t1_03_get_validation_prefers_the_validation(tmp_path: Path) -> None:
    data = sine_wav(460)
    document_id = data_to_uuid(data)
    validated = [{"speaker_no": 1, "start": 0, "end": 1, "text": "Hola, mundo."}]
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (_, c):
            await c.post(TRANSCRIBE, files=files(data))
            machine = await c.get(validation(document_id))
            assert (await c.post(validation(document_id), json=validated)).status_code == 200
            human = await c.get(validation(document_id))
    assert machine.status_code == human.status_code == 200
    assert texts(SSE("doc", machine.json())) == ["hola", "mundo"]
    assert human.json() == {
        "document": [paragraph("Hola, mundo.", "PT0S", "PT1S", speaker_no=1)],
        "document_id": document_id,
        "current_time": None,
        "total_time": None,
    }


async def test_t1_04_post_validation_persists_it(tmp_path: Path) -> None:
    body = [{"speaker_no": 1, "start": 0, "end": 1, "text": "Texto validado"}]
    r, stored, _ = await validate(tmp_path, sine_wav(470), body)
    assert r.status_code == 200
    assert r.json()["document"] == [paragraph("Texto validado", "PT0S", "PT1S", speaker_no=1)]
    assert stored is not None and stored.corrected == (Segment(0.0, 1.0, "Texto validado", 1),)
    assert stored.segments[0].text == "hola"  # the machine transcript is kept beside it


def _transcript(*segments: Segment, current: float = 1.0, total: float | None = 2.0) -> Transcript:
    return Transcript(
        id=content_id(b"x"),
        segments=segments,
        committed=len(segments),
        current_time=current,
        total_time=total,
    )


def test_t1_05_transcription_frame_carries_the_document_json() -> None:
    frame = AymurAITranslator().encode(Progress(_transcript(Segment(0.0, 1.0, "hola"))))
    assert frame is not None
    assert frame.startswith(b"event: transcription\n") and frame.endswith(b"\n\n")
    assert b'"document_id"' in frame and b'"hola"' in frame
    # The reference's example frame, with the C-era speaker_name after speaker_no.
    assert frame == (
        b'event: transcription\ndata: {"document":[{"speaker_no":0,"speaker_name":null,'
        b'"start":"PT0S","end":"PT1S","text":"hola","paragraph_id":"' + HOLA_ID.encode() + b'"}],'
        b'"document_id":"' + data_to_uuid(b"x").encode() + b'","current_time":1.0,'
        b'"total_time":2.0}\n\n'
    )


def test_t1_06_done_frame_with_an_empty_document() -> None:
    frame = AymurAITranslator().encode(Done(_transcript(current=0.0, total=None), cached=False))
    assert frame == (
        b'event: done\ndata: {"document":[],"document_id":"'
        + data_to_uuid(b"x").encode()
        + b'","current_time":0.0,"total_time":null}\n\n'
    )


def test_t1_07_error_frame_has_code_and_detail_with_json_dumps_spacing() -> None:
    frame = AymurAITranslator().encode(Failed("UPSTREAM_ERROR", "boom"))
    assert frame == b'event: error\ndata: {"detail": "boom", "code": "UPSTREAM_SERVICE_ERROR"}\n\n'
    assert b'"code": "UPSTREAM_SERVICE_ERROR"' in frame and b'"detail": "boom"' in frame
    assert error_frame("STORE_ERROR", "x") == (
        b'event: error\ndata: {"detail": "x", "code": "INTERNAL_ERROR"}\n\n'
    )


async def test_t1_08_stream_snapshots_then_done_and_persists_the_result(tmp_path: Path) -> None:
    data = sine_wav(480)
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            r, body = await stream(c, data)
            stored = await gw.state.store.get(content_id(data))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-accel-buffering"] == "no"
    events = parse_sse_events(body)
    # The engine's third update is its final one (same words, all audio processed).
    assert [e.event for e in events] == ["transcription"] * 3 + ["done"]
    assert [texts(e) for e in events] == [["hola"]] + [["hola", "mundo"]] * 3
    assert all(e.data["document_id"] == data_to_uuid(data) for e in events)
    assert stored is not None and stored.text == "hola mundo"


async def test_t1_09_cache_hit_is_a_single_done_and_no_session(tmp_path: Path) -> None:
    data = sine_wav(490)
    with trio.fail_after(30):
        async with gateway(config(tmp_path, keepalive=0.01)) as (gw, c):
            await gw.state.store.save(stored_transcript(data, Segment(0.0, 1.0, "cached text")))
            r, body = await stream(c, data)
            opened = engine_of(gw).opened
    assert r.status_code == 200 and opened == 0
    assert body == (
        b'event: done\ndata: {"document":['
        + json.dumps(paragraph("cached text", "PT0S", "PT1S"), separators=(",", ":")).encode()
        + b'],"document_id":"'
        + data_to_uuid(data).encode()
        + b'","current_time":null,"total_time":null}\n\n'
    )


async def test_t1_10_openapi_marks_only_the_blocking_endpoint_deprecated(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (_, c):
            r = await c.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    spec = r.json()
    assert spec["openapi"].startswith("3.1")
    assert spec["paths"]["/asr/transcribe"]["post"]["deprecated"] is True
    stream_op = spec["paths"]["/asr/transcribe/stream"]["post"]
    assert "deprecated" not in stream_op
    assert "text/event-stream" in stream_op["responses"]["200"]["content"]
    assert set(spec["paths"]["/asr/validation/document/{document_id}"]) >= {"get", "post"}
    # Every $ref resolves.
    refs = {v for v in _walk(spec) if isinstance(v, str) and v.startswith("#/components/")}
    assert refs and all(ref.rsplit("/", 1)[1] in spec["components"]["schemas"] for ref in refs)


def _walk(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)
    else:
        yield node


async def test_t1_11_upstream_failure_mid_stream_is_an_error_event_and_nothing_stored(
    tmp_path: Path,
) -> None:
    # 4 words of 0.5 s; the fake fails once 1.5 s of audio arrived. Pacing keeps the gateway at
    # most 0.5 s ahead of the server, so the first word's snapshot always comes first.
    data = wav_bytes(pcm_words([100, 200, 300, 400]))
    fake = FakeWlkServer(speed=2.0, words_per_line=1, error_at=1.5)
    with trio.fail_after(60):
        async with wlk_gateway(tmp_path, fake, lead_seconds=0.5) as (gw, c):
            r, body = await stream(c, data, use_cache="false")
            stored = await gw.state.store.get(content_id(data))
            missing = await c.get(validation(data_to_uuid(data)))
    assert r.status_code == 200
    events = parse_sse_events(body)
    assert events[0].event == "transcription" and texts(events[0])[0] == "w100"
    assert {e.event for e in events[:-1]} == {"transcription"}
    assert events[-1].event == "error"
    assert events[-1].data["code"] == "UPSTREAM_SERVICE_ERROR"
    assert "FFmpeg error" in events[-1].data["detail"]
    assert stored is None and missing.status_code == 404


async def test_t1_12_unexpected_failure_mid_stream_is_internal_error(tmp_path: Path) -> None:
    data = sine_wav(500)
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            await break_the_store(gw)
            r, body = await stream(c, data)
    assert r.status_code == 200
    events = parse_sse_events(body)
    assert [e.event for e in events] == ["transcription"] * 3 + ["error"]
    assert events[-1].data["code"] == "INTERNAL_ERROR"
    assert "disk on fire" in events[-1].data["detail"]


async def test_t1_13_progress_fields_in_snapshots_and_done(tmp_path: Path) -> None:
    data = sine_wav(510)
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (_, c):
            _, body = await stream(c, data)
    events = parse_sse_events(body)
    assert [e.data["current_time"] for e in events] == [0.4, 0.8, 1.0, 1.0]
    assert {e.data["total_time"] for e in events} == {1.0}
    assert events[-1].event == "done"


async def test_t1_14_keepalive_comments_between_snapshots(tmp_path: Path) -> None:
    # Their version disabled the keepalive and asserted nothing; here a 50 ms keepalive must fill
    # the 300 ms gaps of a slow engine.
    data = sine_wav(520)
    with trio.fail_after(30):
        async with gateway(config(tmp_path, keepalive=0.05, delay=0.3)) as (_, c):
            _, body = await stream(c, data)
    frames = labels(body)
    first = frames.index("transcription")
    second = frames.index("transcription", first + 1)
    assert "keepalive" in frames[first + 1 : second]
    assert b": keepalive\n\n" in body
    assert frames[-1] == "done" and set(frames) == {"transcription", "keepalive", "done"}


async def test_t1_15_transcribe_upstream_failure_is_502(tmp_path: Path) -> None:
    data = sine_wav(530)
    with trio.fail_after(30):
        async with gateway(config(tmp_path, fail_after=1)) as (gw, c):
            r = await c.post(TRANSCRIBE, files=files(data))
            stored = await gw.state.store.get(content_id(data))
    assert r.status_code == 502 and r.headers["content-type"] == "application/json"
    assert r.json() == {"detail": "scripted failure", "code": "UPSTREAM_SERVICE_ERROR"}
    assert stored is None


async def test_t1_16_transcribe_internal_failure_is_500(tmp_path: Path) -> None:
    data = sine_wav(540)
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            await break_the_store(gw)
            r = await c.post(TRANSCRIBE, files=files(data))
    assert r.status_code == 500
    assert r.json()["code"] == "INTERNAL_ERROR" and "disk on fire" in r.json()["detail"]


async def test_t1_17_post_validation_persists_the_speaker_name(tmp_path: Path) -> None:
    body = [{"speaker_no": 2, "speaker_name": "Jueza", "start": 0, "end": 1, "text": "Orden."}]
    r, stored, again = await validate(tmp_path, sine_wav(550), body)
    assert r.status_code == 200
    assert r.json()["document"][0]["speaker_name"] == "Jueza"
    assert stored is not None and stored.corrected is not None
    assert stored.corrected[0].speaker_name == "Jueza" and stored.corrected[0].speaker == 2
    assert again.json() == r.json()


async def test_t1_18_post_validation_without_speaker_name_stores_null(tmp_path: Path) -> None:
    body = [{"speaker_no": 1, "start": 0, "end": 1, "text": "Orden."}]
    r, stored, again = await validate(tmp_path, sine_wav(560), body)
    assert r.status_code == 200
    assert stored is not None and stored.corrected is not None
    assert stored.corrected[0].speaker_name is None
    assert again.json()["document"][0]["speaker_name"] is None


async def test_t1_19_get_validation_includes_the_stored_speaker_name(tmp_path: Path) -> None:
    data = sine_wav(570)
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            await gw.state.store.save(
                stored_transcript(data, Segment(0.0, 2.5, "Se abre la audiencia", 2, "Jueza"))
            )
            r = await c.get(validation(data_to_uuid(data)))
    assert r.status_code == 200
    assert r.json()["document"] == [
        paragraph("Se abre la audiencia", "PT0S", "PT2.5S", speaker_no=2, speaker_name="Jueza")
    ]


async def test_t1_20_get_validation_null_speaker_name_when_none_stored(tmp_path: Path) -> None:
    data = sine_wav(580)
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            await gw.state.store.save(stored_transcript(data, Segment(0.0, 1.0, "Buenos días")))
            r = await c.get(validation(data_to_uuid(data)))
    [p] = r.json()["document"]
    assert p["speaker_name"] is None and p["speaker_no"] == 0


# -- T2: test_asr_client_stream.py ---------------------------------------------------------------


async def test_t2_01_segments_map_to_paragraphs_in_order(tmp_path: Path) -> None:
    data = sine_wav(590)
    body = [
        {"speaker_no": 0, "start": "PT0S", "end": "PT1.5S", "text": "uno"},
        {"speaker_no": 3, "start": "0:00:01.5", "end": 3725, "text": "dos"},
        {"speaker_no": 0, "start": "3725", "end": "PT1H2M6.25S", "text": "tres"},
    ]
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (_, c):
            await c.post(TRANSCRIBE, files=files(data))
            posted = await c.post(validation(data_to_uuid(data)), json=body)
            r = await c.get(validation(data_to_uuid(data)))
    assert posted.json() == r.json()
    assert r.json()["document"] == [
        paragraph("uno", "PT0S", "PT1.5S"),
        paragraph("dos", "PT1.5S", "PT1H2M5S", speaker_no=3),
        paragraph("tres", "PT1H2M5S", "PT1H2M6.25S"),
    ]


async def test_t2_02_silence_is_an_empty_done_never_served_from_cache(tmp_path: Path) -> None:
    # The fake WhisperLiveKit hears a word's first sample; the sine's are all 0: silence lines
    # only. AymurAI stored [] and served it from cache forever; the gateway transcribes again.
    data = sine_wav(440)
    fake = FakeWlkServer()
    with trio.fail_after(60):
        async with wlk_gateway(tmp_path, fake) as (_, c):
            first = parse_sse_events((await stream(c, data))[1])
            second = parse_sse_events((await stream(c, data))[1])
    for events in (first, second):
        assert [e.event for e in events] == ["done"]
        assert events[0].data["document"] == []
        assert events[0].data["current_time"] == events[0].data["total_time"] == 1.0
    assert len(fake.accepted) == 2


async def test_t2_03_cumulative_snapshots_with_progress(tmp_path: Path) -> None:
    data = wav_bytes(pcm_words([100, 200], word_seconds=1.0))
    fake = FakeWlkServer(speed=4.0, word_seconds=1.0, words_per_line=1)
    with trio.fail_after(60):
        async with wlk_gateway(tmp_path, fake, lead_seconds=0.5) as (_, c):
            _, body = await stream(c, data)
    events = parse_sse_events(body)
    assert events[-1].event == "done" and events[-1].data["document"] == [
        paragraph("w100", "PT0S", "PT1S"),
        paragraph("w200", "PT1S", "PT2S"),
    ]
    snapshots = [e for e in events if e.event == "transcription"]
    assert {e.data["total_time"] for e in events} == {2.0}
    progress = [e.data["current_time"] for e in snapshots]
    assert progress == sorted(progress)
    # Cumulative: every snapshot starts the final transcript; pacing (0.5 s ahead of the server)
    # makes the first one hold the first word only. No frame repeats the one before it.
    final = texts(events[-1])
    assert all(texts(e) == final[: len(texts(e))] for e in snapshots)
    assert texts(snapshots[0]) == ["w100"]
    frames = [json.dumps(e.data) for e in snapshots]
    assert all(a != b for a, b in pairwise(frames))


async def test_t2_04_unreachable_upstream_is_upstream_service_error(tmp_path: Path) -> None:
    # AymurAI's unconfigured URI was a RuntimeError; here, an upstream nobody listens on: the
    # first stream learns it in band, the next request is refused before the stream with 503.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # After its second failed connect the URL is avoided for backoff(2) = 2-4 s (jittered): the
    # next request, sent at once, falls inside that window whatever the machine's speed.
    cfg = wlk_config(
        tmp_path,
        f"ws://127.0.0.1:{port}/asr",
        max_attempts=2,
        backoff_initial=1.0,
        backoff_max=10.0,
    )
    data = sine_wav(600)
    with trio.fail_after(60):
        async with gateway(cfg) as (_, c):
            r, body = await stream(c, data)
            refused = await c.post(STREAM, files=files(data))
    assert r.status_code == 200
    [event] = parse_sse_events(body)
    assert event.event == "error" and event.data["code"] == "UPSTREAM_SERVICE_ERROR"
    assert "cannot connect" in event.data["detail"]
    assert refused.status_code == 503
    assert refused.json()["code"] == "UPSTREAM_SERVICE_ERROR" and refused.json()["detail"]


async def test_t2_05_disconnect_cancels_the_engine_session(tmp_path: Path) -> None:
    data = sine_wav(610)
    with trio.fail_after(30):
        async with gateway(config(tmp_path, delay=0.3)) as (gw, c):
            engine = engine_of(gw)
            async with (
                c.stream("POST", STREAM, files=files(data)) as r,
                aclosing(sse_events(r)) as events,
            ):
                first = await anext(events)
                assert first.event == "transcription" and engine.active == 1
            await engine.wait_closed(1)
            missing = await c.get(validation(data_to_uuid(data)))
    assert engine.active == 0
    assert missing.status_code == 404


async def test_t2_05_disconnect_closes_the_upstream_websocket(tmp_path: Path) -> None:
    data = wav_bytes(pcm_words(list(range(1, 21))))  # 10 s, at the fake's real-time speed
    fake = FakeWlkServer(speed=1.0)
    with trio.fail_after(60):
        async with wlk_gateway(tmp_path, fake, lead_seconds=1.0) as (_, c):
            async with (
                c.stream("POST", STREAM, files=files(data)) as r,
                aclosing(sse_events(r)) as events,
            ):
                first = await anext(events)
                assert first.event == "transcription" and fake.active == 1
            await fake.wait_for(lambda: fake.active == 0)
    [conn] = fake.accepted
    assert not conn.eof and conn.received < 10.0


# -- the defects of their endpoint, fixed -------------------------------------------------------------


async def test_fix_cache_hit_serves_the_validation_and_use_cache_false_keeps_it(
    tmp_path: Path,
) -> None:
    data = sine_wav(620)
    document_id = data_to_uuid(data)
    validated = [{"speaker_no": 1, "start": "PT0S", "end": "PT1S", "text": "Hola, mundo."}]
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            await stream(c, data)
            await c.post(validation(document_id), json=validated)
            hit = parse_sse_events((await stream(c, data))[1])
            again = parse_sse_events((await stream(c, data, use_cache="false"))[1])
            after = await c.get(validation(document_id))
            hit_again = parse_sse_events((await stream(c, data))[1])
            opened = engine_of(gw).opened
    expected = [paragraph("Hola, mundo.", "PT0S", "PT1S", speaker_no=1)]
    assert [e.event for e in hit] == ["done"] and hit[0].data["document"] == expected
    # Transcribing again answers with the machine's words and leaves the validation alone.
    assert again[-1].event == "done" and texts(again[-1]) == ["hola", "mundo"]
    assert after.json()["document"] == expected
    assert [e.event for e in hit_again] == ["done"] and hit_again[0].data["document"] == expected
    assert opened == 2


async def test_fix_empty_transcript_is_stored_but_never_served(tmp_path: Path) -> None:
    data = sine_wav(630)
    with trio.fail_after(30):
        async with gateway(config(tmp_path, words=["   "], seconds_per_word=1.0)) as (gw, c):
            first = await c.post(TRANSCRIBE, files=files(data))
            second = await c.post(TRANSCRIBE, files=files(data))
            opened = engine_of(gw).opened
    assert first.json()["document"] == second.json()["document"] == []
    assert opened == 2


def test_fix_document_id_test_vectors() -> None:
    vectors = {
        b"": "8505addd-fa2d-58c3-a1f2-de15119c1824",
        b"hello": "6270dbbc-5c59-513c-99ad-d9a25ffdcf0b",
    }
    for data, expected in vectors.items():
        assert data_to_uuid(data) == expected
        assert content_uuid(content_id(data)) == expected


async def test_fix_exact_frame_bytes_on_the_wire(tmp_path: Path) -> None:
    data = sine_wav(640)
    document_id = data_to_uuid(data).encode()

    def frame(event: bytes, paragraphs: list[dict[str, Any]], current: bytes) -> bytes:
        document = json.dumps(paragraphs, separators=(",", ":")).encode()
        return (
            b"event: " + event + b'\ndata: {"document":' + document + b',"document_id":"'
            + document_id + b'","current_time":' + current + b',"total_time":1.0}\n\n'
        )  # fmt: skip

    hola = paragraph("hola", "PT0S", "PT0.4S")
    mundo = paragraph("mundo", "PT0.4S", "PT0.8S")
    assert hola["paragraph_id"] == HOLA_ID
    with trio.fail_after(30):
        async with gateway(config(tmp_path, keepalive=0)) as (_, c):
            _, ok = await stream(c, data)
        async with gateway(config(tmp_path / "b", keepalive=0, fail_after=1)) as (_, c):
            _, failed = await stream(c, data)
    assert ok == (
        frame(b"transcription", [hola], b"0.4")
        + frame(b"transcription", [hola, mundo], b"0.8")
        + frame(b"transcription", [hola, mundo], b"1.0")
        + frame(b"done", [hola, mundo], b"1.0")
    )
    assert failed == frame(b"transcription", [hola], b"0.4") + (
        b'event: error\ndata: {"detail": "scripted failure", "code": "UPSTREAM_SERVICE_ERROR"}\n\n'
    )


# -- errors, validation input, durations ------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("UPSTREAM_ERROR", "UPSTREAM_SERVICE_ERROR"),
        ("UPSTREAM_UNAVAILABLE", "UPSTREAM_SERVICE_ERROR"),
        ("CAPACITY_EXHAUSTED", "UPSTREAM_SERVICE_ERROR"),
        ("CAPACITY_TIMEOUT", "UPSTREAM_SERVICE_ERROR"),
        ("TIMEOUT", "UPSTREAM_SERVICE_ERROR"),
        ("SHUTTING_DOWN", "UPSTREAM_SERVICE_ERROR"),
        ("INTERNAL_ERROR", "INTERNAL_ERROR"),
        ("STORE_ERROR", "INTERNAL_ERROR"),
        ("SOMETHING_NEW", "INTERNAL_ERROR"),
        ("DECODE_ERROR", "DECODE_ERROR"),
        ("TOO_MANY_STREAMS", "TOO_MANY_STREAMS"),
        ("UNAUTHORIZED", "UNAUTHORIZED"),
        ("EMPTY_FILE", "EMPTY_FILE"),
    ],
)
def test_error_codes_map_to_aymurai_codes(code: str, expected: str) -> None:
    assert aymurai_code(code) == expected


def test_queue_positions_are_comments_their_clients_skip() -> None:
    frame = AymurAITranslator().encode(Queued(2))
    assert frame == b": queued 2\n\n" and parse_sse_events(frame) == []


def test_a_snapshot_repeating_the_previous_frame_is_not_sent() -> None:
    translator = AymurAITranslator()
    snapshot = Progress(_transcript(Segment(0.0, 1.0, "hola")))
    assert translator.encode(snapshot) is not None
    assert translator.encode(snapshot) is None
    assert translator.encode(Progress(_transcript(Segment(0.0, 1.0, "hola"), current=1.5)))


async def test_errors_before_the_stream_are_json_detail_and_code(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with gateway(config(tmp_path, max_sessions=1, max_queue=0, delay=0.3)) as (gw, c):
            empty = await c.post(STREAM, files=files(b""))
            garbage = await c.post(STREAM, files=files(os.urandom(20_000)))
            no_file = await c.post(STREAM, files={"other": ("a.wav", sine_wav(440), "audio/wav")})
            bad_flag = await c.post(STREAM, params={"use_cache": "perhaps"}, files=files(b"x"))
            async with (
                c.stream("POST", STREAM, files=files(sine_wav(650))) as busy,
                aclosing(sse_events(busy)) as events,
            ):
                assert (await anext(events)).event == "transcription"
                full = await c.post(TRANSCRIBE, files=files(sine_wav(660)))
            gw.state.drain()
            draining = await c.post(STREAM, files=files(sine_wav(670)))
    for r, status, code in [
        (empty, 400, "EMPTY_FILE"),
        (garbage, 415, "DECODE_ERROR"),
        (no_file, 400, "MISSING_FILE"),
        (bad_flag, 400, "INVALID_OPTION"),
        (full, 503, "UPSTREAM_SERVICE_ERROR"),
        (draining, 503, "UPSTREAM_SERVICE_ERROR"),
    ]:
        assert r.status_code == status, r.text
        assert r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"detail", "code"} and r.json()["code"] == code
        assert r.json()["detail"]
    assert int(full.headers["retry-after"]) >= 1


async def test_validation_rejects_bad_input_and_unknown_documents(tmp_path: Path) -> None:
    data = sine_wav(680)
    good = {"speaker_no": 0, "start": 0, "end": 1, "text": "x"}
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (gw, c):
            unknown = data_to_uuid(b"never uploaded")
            missing = [
                await c.get(validation(unknown)),
                await c.post(validation(unknown), json=[good]),
                await c.get(validation("not-a-uuid")),
            ]
            await c.post(TRANSCRIBE, files=files(data))
            url = validation(data_to_uuid(data).upper())
            bad = [
                await c.post(url, content=b"not json"),
                await c.post(url, json={"document": [good]}),
                await c.post(url, json=[{**good, "start": "soon"}]),
                await c.post(url, json=[{**good, "start": "P1M"}]),
                await c.post(url, json=[{**good, "start": 2, "end": 1}]),
                await c.post(url, json=[{**good, "end": -1}]),
                await c.post(url, json=[{**good, "end": 1e300}]),
                await c.post(url, json=[{**good, "speaker_no": "uno"}]),
                await c.post(url, json=[]),
                await c.post(url, json=[{**good, "text": "  "}]),
            ]
            stored = await gw.state.store.get(content_id(data))
            extra = await c.post(url, json=[{**good, "paragraph_id": "ignored", "other": 1}])
    for r in missing:
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
    for r in bad:
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "INVALID_BODY" and r.json()["detail"]
    assert stored is not None and stored.corrected is None
    assert extra.status_code == 200 and texts(SSE("doc", extra.json())) == ["x"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("PT0S", 0.0),
        ("PT2.5S", 2.5),
        ("PT1H2M5S", 3725.0),
        ("P1DT1H", 90000.0),
        ("P1YT1S", 365 * 86400 + 1.0),
        ("1:02:05", 3725.0),
        ("0:00:01.50", 1.5),
        ("02:05", 125.0),
        ("2.5", 2.5),
        (2.5, 2.5),
        (3, 3.0),
    ],
)
def test_parse_duration_accepts_their_forms(value: float | str, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "P", "PT", "P1DT", "P1M", "soon", "-PT1S", "1:2:3:4", -1.0])
def test_parse_duration_rejects_the_rest(value: float | str) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_iso_duration_examples() -> None:
    assert [iso_duration(s) for s in (0, 2.5, 3725, 60, 86400, 0.000001)] == [
        "PT0S",
        "PT2.5S",
        "PT1H2M5S",
        "PT1M",
        "P1D",
        "PT0.000001S",
    ]


@settings(deadline=None)
@given(st.floats(min_value=0, max_value=4e8, allow_nan=False))
def test_iso_duration_matches_pydantic_and_parses_back(seconds: float) -> None:
    # AymurAI serialised timedelta with pydantic; the gateway must write the very same strings.
    from datetime import timedelta

    pydantic = pytest.importorskip("pydantic")
    text = iso_duration(seconds)
    assert (
        json.dumps(text)
        == pydantic.TypeAdapter(timedelta).dump_json(timedelta(seconds=seconds)).decode()
    )
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-6)


async def test_tenants_are_apart_and_auth_failures_use_this_shape(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.jsonl"
    _, acme = add_key(keys_file, "acme")
    _, other = add_key(keys_file, "other")
    cfg = msgspec.structs.replace(
        config(tmp_path, delay=0.2),
        auth=AuthConfig(keys_file=str(keys_file), max_streams_per_tenant=1),
    )
    data = sine_wav(690)
    url = validation(data_to_uuid(data))
    body = [{"speaker_no": 0, "start": 0, "end": 1, "text": "solo acme"}]
    with trio.fail_after(60):
        async with gateway(cfg) as (gw, c):
            as_acme = {"authorization": f"Bearer {acme}"}
            as_other = {"authorization": f"Bearer {other}"}
            anonymous = await c.post(STREAM, files=files(data))
            await c.post(TRANSCRIBE, files=files(data), headers=as_acme)
            assert (await c.post(url, json=body, headers=as_acme)).status_code == 200
            hidden = [
                await c.get(url, headers=as_other),
                await c.post(url, json=body, headers=as_other),
            ]
            mine = await c.get(url, headers=as_acme)
            # The other tenant's first upload of the same bytes is no cache hit: it transcribes.
            async with (
                c.stream("POST", STREAM, files=files(data), headers=as_other) as r,
                aclosing(sse_events(r)) as events,
            ):
                assert (await anext(events)).event == "transcription"
                second = await c.post(STREAM, files=files(sine_wav(700)), headers=as_other)
            opened = engine_of(gw).opened
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "UNAUTHORIZED"
    assert set(anonymous.json()) == {"detail", "code"}
    for r in hidden:
        assert r.status_code == 404 and r.json()["code"] == "NOT_FOUND"
    assert texts(SSE("doc", mine.json())) == ["solo acme"]
    assert second.status_code == 429 and second.json()["code"] == "TOO_MANY_STREAMS"
    assert int(second.headers["retry-after"]) >= 1
    assert opened == 2


async def test_unknown_paths_and_methods_are_json_detail_and_code(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with gateway(config(tmp_path)) as (_, c):
            missing = await c.get("/asr/nope")
            wrong = await c.get(TRANSCRIBE)
            put = await c.put(validation(HOLA_ID), json=[])
    assert missing.status_code == 404
    assert missing.json() == {"detail": "no route matches this path", "code": "NOT_FOUND"}
    for r in (wrong, put):
        assert r.status_code == 405 and r.headers["content-type"] == "application/json"
        assert set(r.json()) == {"detail", "code"} and r.json()["code"] == "METHOD_NOT_ALLOWED"
    assert wrong.headers["allow"] == "POST"


def test_iso_duration_of_a_time_stored_before_times_were_bounded() -> None:
    # timedelta overflows past ~86 billion seconds: clamped to the store's bound instead.
    assert iso_duration(1e15) == iso_duration(1e306) == iso_duration(MAX_SECONDS)
    assert iso_duration(MAX_SECONDS) == "P31Y259DT1H46M40S"
    assert iso_duration(-3.0) == iso_duration(math.nan) == "PT0S"
