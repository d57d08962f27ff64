"""The native API end to end: real hypercorn on loopback, real audio, HTTP/1.1 and h2c."""

from __future__ import annotations

import hashlib
import os
import socket
import sqlite3
from contextlib import aclosing
from pathlib import Path

import httpx
import pg
import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX, SHORT, pcm_of, write_wav
from conftest import collect, make_config, run_gateway, sse_events, wait_until
from prometheus_client.parser import text_string_to_metric_families

from gateway import exports
from gateway.engines.scripted import ScriptedEngine
from gateway.events import MAX_SECONDS, Segment, Transcript
from gateway.store import content_uuid

pytestmark = pytest.mark.anyio

STREAM = "/v1/transcriptions/stream"


def scripted(**kw: object) -> dict[str, object]:
    return {"kind": "scripted", **kw}


def engines(**extra: dict[str, object]) -> dict[str, object]:
    return {"embedded": {"kind": "pocketsphinx", "workers": 2}, **extra}


def upload(path: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "audio/wav")}


async def test_stream_embedded_engine_live_then_done(tmp_path: Path) -> None:
    with trio.fail_after(120):
        async with (
            run_gateway(make_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            async with c.stream("POST", STREAM, files=upload(LIBRIVOX)) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["cache-control"] == "no-cache"
                assert r.headers["x-accel-buffering"] == "no"
                events = await collect(r)
    kinds = [e.event for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "error" not in kinds
    snapshots = [e.data for e in events if e.event == "transcription"]
    # At least one partial per ~second of a 24.7 s file, with progress that only grows.
    assert len(snapshots) >= 15
    times = [s["current_time"] for s in snapshots]
    assert times == sorted(times)
    assert all(s["total_time"] == pytest.approx(24.73, abs=0.01) for s in snapshots)
    # Each snapshot says how many of its segments are final; that prefix only grows.
    committed = [s["committed"] for s in snapshots]
    assert committed == sorted(committed) and committed[-1] > 0
    assert all(0 <= s["committed"] <= len(s["segments"]) for s in snapshots)
    done = events[-1].data
    assert done["cached"] is False
    assert set(done) == {
        "id",
        "segments",
        "text",
        "current_time",
        "total_time",
        "cached",
        "corrected",
    }
    for word in ("consider", "respectable", "amiable", "selfish"):
        assert word in done["text"]
    assert done["text"] == " ".join(s["text"] for s in done["segments"])
    starts = [s["start"] for s in done["segments"]]
    assert starts == sorted(starts) and all(s["end"] > s["start"] for s in done["segments"])


async def test_cache_hit_is_a_single_done_and_restart_keeps_it(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            first = (await c.post("/v1/transcriptions", files=upload(GOFORWARD))).json()
            assert first["cached"] is False and "forward" in first["text"]
            async with c.stream("POST", STREAM, files=upload(GOFORWARD)) as r:
                events = await collect(r)
            assert [e.event for e in events] == ["done"]
            assert events[0].data["cached"] is True
            assert events[0].data["text"] == first["text"]
            # use_cache=false transcribes again.
            async with c.stream(
                "POST", STREAM, params={"use_cache": "false"}, files=upload(GOFORWARD)
            ) as r:
                again = await collect(r)
            assert again[-1].data["cached"] is False and len(again) > 1
        # A new process on the same database still has it.
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            stored = await c.get(f"/v1/transcriptions/{first['id']}")
            assert stored.status_code == 200 and stored.json()["text"] == first["text"]
            r2 = await c.post("/v1/transcriptions", files=upload(GOFORWARD))
            assert r2.json()["cached"] is True


async def test_stored_transcript_formats_and_unknown_id(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            run_gateway(make_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            done = (await c.post("/v1/transcriptions", files=upload(GOFORWARD))).json()
            base = f"/v1/transcriptions/{done['id']}"
            j = (await c.get(base)).json()
            assert j["segments"] == done["segments"] and j["corrected"] is False
            txt = await c.get(base, params={"format": "txt"})
            assert txt.text.strip() == done["text"]
            srt = (await c.get(base, params={"format": "srt"})).text
            assert srt.startswith("1\n00:00:0") and " --> " in srt
            vtt = (await c.get(base, params={"format": "vtt"})).text
            assert vtt.startswith("WEBVTT\n\n1\n00:00:0")
            bad = await c.get(base, params={"format": "doc"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_OPTION"
            missing = await c.get("/v1/transcriptions/" + "0" * 32)
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "NOT_FOUND"


async def test_raw_body_upload_and_the_same_bytes_give_the_same_id(tmp_path: Path) -> None:
    config = make_config(tmp_path, engines=engines(fake=scripted(words=["a", "b", "c"])))
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            body = GOFORWARD.read_bytes()
            raw = await c.post(
                "/v1/transcriptions",
                params={"engine": "fake"},
                content=body,
                headers={"content-type": "audio/wav"},
            )
            octet = await c.post(
                "/v1/transcriptions",
                params={"engine": "fake", "use_cache": "false"},
                content=body,
                headers={"content-type": "application/octet-stream"},
            )
            form = await c.post(
                "/v1/transcriptions", data={"engine": "fake"}, files=upload(GOFORWARD)
            )
    assert raw.status_code == octet.status_code == form.status_code == 200
    assert raw.json()["id"] == octet.json()["id"] == form.json()["id"]
    assert raw.json()["text"] == "a b c"
    assert form.json()["cached"] is True


@pytest.mark.parametrize(
    ("files", "content", "ctype", "status", "code"),
    [
        ({"file": ("empty.wav", b"", "audio/wav")}, None, None, 400, "EMPTY_FILE"),
        ({"other": ("x.wav", b"RIFF", "audio/wav")}, None, None, 400, "MISSING_FILE"),
        ({"file": ("noise.wav", os.urandom(20000), "audio/wav")}, None, None, 415, "DECODE_ERROR"),
        (
            {"file": ("t.wav", GOFORWARD.read_bytes()[:30], "audio/wav")},
            None,
            None,
            415,
            "DECODE_ERROR",
        ),
        (None, b"", "audio/wav", 400, "EMPTY_FILE"),
        (None, b"hello", "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE"),
    ],
    ids=["empty", "missing-field", "garbage", "truncated-wav", "empty-raw", "text-body"],
)
async def test_bad_input_is_a_json_error_before_the_stream(
    tmp_path: Path,
    files: dict[str, tuple[str, bytes, str]] | None,
    content: bytes | None,
    ctype: str | None,
    status: int,
    code: str,
) -> None:
    with trio.fail_after(30):
        async with (
            run_gateway(make_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            headers = {"content-type": ctype} if ctype else {}
            for path in (STREAM, "/v1/transcriptions"):
                r = await c.post(path, files=files, content=content, headers=headers)
                assert r.status_code == status, r.text
                assert r.headers["content-type"] == "application/json"
                assert r.json()["error"]["code"] == code
                assert r.json()["error"]["detail"]


async def test_unknown_engine_is_404(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            run_gateway(make_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            q = await c.post(STREAM, params={"engine": "nope"}, files=upload(GOFORWARD))
            f = await c.post(STREAM, data={"engine": "nope"}, files=upload(GOFORWARD))
    for r in (q, f):
        assert r.status_code == 404 and r.json()["error"]["code"] == "UNKNOWN_ENGINE"


# httpx's client leaves its request-body generator unfinished when the server answers early.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_oversize_upload_is_413_while_receiving(tmp_path: Path) -> None:
    limit = 50_000
    config = make_config(tmp_path, server={"max_upload_bytes": limit})
    sent = 0

    async def body() -> object:
        nonlocal sent
        for _ in range(6):
            sent += 10_000
            yield b"\0" * 10_000

    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            declared = await c.post(STREAM, files=upload(LIBRIVOX))
            assert declared.status_code == 413
            assert declared.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
            # No Content-Length: chunked, so only counting while receiving can catch it.
            chunked = await c.post(STREAM, content=body(), headers={"content-type": "audio/wav"})
            assert chunked.status_code == 413
            assert chunked.json()["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert sent == 60_000


async def test_engine_failure_mid_stream_is_one_error_event_and_nothing_stored(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        engines=engines(bad=scripted(words=["x"] * 10, seconds_per_word=0.25, fail_after=3)),
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            async with c.stream(
                "POST", STREAM, params={"engine": "bad"}, files=upload(GOFORWARD)
            ) as r:
                assert r.status_code == 200
                events = await collect(r)
            kinds = [e.event for e in events]
            assert kinds.count("error") == 1 and kinds[-1] == "error" and "done" not in kinds
            assert events[-1].data == {"code": "UPSTREAM_ERROR", "detail": "scripted failure"}
            assert [e.event for e in events[:-1]] == ["transcription"] * (len(events) - 1)
            blocking = await c.post(
                "/v1/transcriptions", params={"engine": "bad"}, files=upload(GOFORWARD)
            )
            assert blocking.status_code == 502
            assert blocking.json()["error"]["code"] == "UPSTREAM_ERROR"
            transcript_id = (await c.post("/v1/transcriptions", files=upload(GOFORWARD))).json()[
                "id"
            ]
            # Now stored under the embedded engine; the failed runs left nothing behind before it.
            assert (await c.get(f"/v1/transcriptions/{transcript_id}")).json()[
                "engine"
            ] == "embedded"


async def test_decode_error_after_the_stream_started(tmp_path: Path) -> None:
    # A valid start followed by garbage: the probe passes, decoding fails mid-stream.
    good = GOFORWARD.read_bytes()
    broken = tmp_path / "broken.mp3"
    from audio_util import transcode

    mp3 = transcode(LIBRIVOX, tmp_path / "l.mp3", "mp3").read_bytes()
    broken.write_bytes(mp3[: len(mp3) // 3] + os.urandom(len(mp3)))
    config = make_config(
        tmp_path, engines=engines(fake=scripted(words=["w"] * 100, seconds_per_word=0.5))
    )
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            async with c.stream(
                "POST", STREAM, params={"engine": "fake"}, files=upload(broken)
            ) as r:
                assert r.status_code == 200
                events = await collect(r)
    assert good
    # mp3 decoders resynchronise on garbage, so the outcome is either a clean end or DECODE_ERROR;
    # either way the stream ends with exactly one terminal event.
    terminal = [e for e in events if e.event in ("done", "error")]
    assert len(terminal) == 1 and terminal[0] is events[-1]
    if terminal[0].event == "error":
        assert terminal[0].data["code"] == "DECODE_ERROR"


async def test_disconnect_mid_stream_closes_the_session_and_stores_nothing(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, engines=engines(slow=scripted(words=["w"] * 20, seconds_per_word=0.1, delay=0.05))
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            engine = gw.state.engines["slow"]
            assert isinstance(engine, ScriptedEngine)
            async with (
                c.stream("POST", STREAM, params={"engine": "slow"}, files=upload(GOFORWARD)) as r,
                aclosing(sse_events(r)) as events,
            ):
                first = await anext(events)
                assert first.event == "transcription"
                transcript_id = first.data["id"]
                assert engine.active == 1
            # The client has gone: the engine session must close promptly.
            with trio.fail_after(1):
                await engine.wait_closed(1)
            assert engine.active == 0
            missing = await c.get(f"/v1/transcriptions/{transcript_id}")
            assert missing.status_code == 404


async def test_slow_reader_gets_conflated_snapshots(tmp_path: Path) -> None:
    words = [f"w{i}" for i in range(1500)]
    config = make_config(
        tmp_path, engines=engines(fast=scripted(words=words, seconds_per_word=24.7 / 1500))
    )
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            engine = gw.state.engines["fast"]
            assert isinstance(engine, ScriptedEngine)
            async with (
                c.stream("POST", STREAM, params={"engine": "fast"}, files=upload(LIBRIVOX)) as r,
                aclosing(sse_events(r)) as events,
            ):
                first = await anext(events)
                assert first.event == "transcription"
                # The reader stops reading; the engine must still be drained to the end.
                await engine.wait_closed(1)
                rest = [e async for e in events]
    snapshots = [e for e in rest if e.event == "transcription"]
    assert rest[-1].event == "done"
    assert rest[-1].data["text"] == " ".join(words)
    # ~1500 updates were produced; a reader that stalled saw only a fraction of them.
    assert len(snapshots) < 1000


async def test_http2_prior_knowledge(tmp_path: Path) -> None:
    config = make_config(tmp_path, engines=engines(fake=scripted(words=["one", "two", "three"])))
    with trio.fail_after(30):
        async with (
            run_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, http1=False, http2=True) as c,
        ):
            async with c.stream(
                "POST", STREAM, params={"engine": "fake"}, files=upload(GOFORWARD)
            ) as r:
                assert r.http_version == "HTTP/2"
                assert r.status_code == 200
                events = await collect(r)
            health = await c.get("/healthz")
    assert health.http_version == "HTTP/2"
    assert [e.event for e in events][-1] == "done"
    assert events[-1].data["text"] == "one two three"


async def test_health_ready_and_metrics(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with (
            run_gateway(make_config(tmp_path)) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            assert (await c.get("/healthz")).status_code == 200
            ready = await c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
            await c.post("/v1/transcriptions", files=upload(SHORT))
            text = (await c.get("/metrics")).text
    # No cluster.replica configured: the replica is named after the host and the process.
    replica = f"{socket.gethostname()}-{os.getpid()}"
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[
            name, frozenset({"engine": "embedded", "replica": replica, **labels}.items())
        ]

    # The registry is the process's: earlier tests' gateways counted into it too.
    assert value("gateway_active_streams") == 0
    assert value("gateway_stream_outcomes_total", code="OK") >= 1
    assert value("gateway_time_to_first_event_seconds_bucket", le="+Inf") >= 1
    assert value("gateway_session_duration_seconds_bucket", le="+Inf") >= 1
    assert value("gateway_audio_seconds_total") > 0
    assert value("gateway_engine_sessions", upstream="") == 0


async def test_every_metric_series_carries_the_configured_replica(tmp_path: Path) -> None:
    config = make_config(tmp_path, cluster={"replica": "east-1"})
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            await c.post("/v1/transcriptions", files=upload(SHORT))
            response = await c.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=")
    # Valid exposition: the parser reads it all back, every sample labelled with this replica.
    families = list(text_string_to_metric_families(response.text))
    samples = [s for family in families for s in family.samples]
    assert len(samples) > 20
    assert {s.labels.get("replica") for s in samples} == {"east-1"}
    # The collectors' own labels are all still there, beside it.
    outcomes = [s.labels for s in samples if s.name == "gateway_stream_outcomes_total"]
    assert {"engine": "embedded", "code": "OK", "replica": "east-1"} in outcomes
    stats = {s.name for s in samples if s.name.startswith("gateway_engine_")}
    assert "gateway_engine_capacity" in stats


async def test_readyz_is_503_when_the_store_is_not_writable(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            run_gateway(make_config(tmp_path, cluster={"replica": "east-1"})) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=60) as c,
        ):
            store = gw.state.store

            def lock(conn: object) -> None:
                conn.execute("BEGIN IMMEDIATE")  # type: ignore[attr-defined]

            await store._call(lock)
            ready = await c.get("/readyz")
            await store._call(lambda conn: conn.execute("ROLLBACK"))  # type: ignore[attr-defined]
            again = await c.get("/readyz")
    # The store's own verdict says why, and it is the reason for the 503; admission is fine.
    local = {"mode": "local", "replica": "east-1", "status": "ok"}
    assert ready.status_code == 503
    unready = ready.json()
    assert unready["status"] == "unready"
    assert unready["store"].startswith("store not writable: ")
    assert unready["reasons"] == [unready["store"]]
    assert unready["admission"] == local
    assert again.status_code == 200
    assert again.json() | {"engines": None} == {
        "status": "ready",
        "reasons": [],
        "store": "ok",
        "admission": local,
        "engines": None,
    }


async def test_readyz_reports_the_store_and_cluster_admission_apart(tmp_path: Path) -> None:
    # Its own PostgreSQL, since the test stops it.
    with pg.pg_server() as server:
        config = make_config(
            tmp_path,
            store={"url": server.create_database()},
            cluster={"replica": "west-2", "heartbeat": 0.1, "lease_ttl": 0.5},
        )
        with trio.fail_after(90):
            async with (
                run_gateway(config) as gw,
                httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
            ):
                cluster = gw.state.cluster
                assert cluster is not None
                ready = await c.get("/readyz")
                await trio.to_thread.run_sync(server.stop, "fast")
                # The cluster notices at its next heartbeat; /readyz then says why, per part.
                await wait_until(lambda: cluster.problem() is not None)
                # Answered within the store's READY_TIMEOUT (1 s), although its pool waits up
                # to max_wait (5 s) for a connection: a probe with a short timeout gets reasons.
                down = await c.get("/readyz", timeout=4)
                await trio.to_thread.run_sync(server.start)
                await wait_until(lambda: cluster.problem() is None)
                back = await c.get("/readyz")
    assert ready.status_code == 200 and back.status_code == 200
    for body in (ready.json(), back.json()):
        assert body["store"] == "ok" and body["reasons"] == []
        assert body["admission"] == {"mode": "cluster", "replica": "west-2", "status": "ok"}
    assert down.status_code == 503
    unready = down.json()
    assert unready["store"].startswith("store not writable: ")
    admission = unready["admission"]
    assert admission["mode"] == "cluster" and admission["replica"] == "west-2"
    assert admission["status"].startswith("cluster admission: ")
    assert unready["reasons"] == [unready["store"], admission["status"]]


async def test_queued_positions_when_sessions_are_busy(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        engines=engines(
            one=scripted(words=["a", "b", "c"], delay=0.05, max_sessions=1, max_queue=2)
        ),
    )
    files = [write_wav(tmp_path / f"s{i}.wav", pcm_of(GOFORWARD) + bytes(2 * i)) for i in range(4)]
    results: dict[int, list[str]] = {}
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:

            async def one(i: int, started: trio.Event) -> None:
                async with c.stream(
                    "POST", STREAM, params={"engine": "one"}, files=upload(files[i])
                ) as r:
                    kinds = []
                    async with aclosing(sse_events(r)) as events:
                        async for e in events:
                            kinds.append(
                                e.event if e.event != "queued" else f"queued:{e.data['position']}"
                            )
                            started.set()
                    results[i] = kinds

            async with trio.open_nursery() as n:
                for i in range(3):
                    started = trio.Event()
                    n.start_soon(one, i, started)
                    await started.wait()
                # One running, two queued: the queue is full, so the next is refused up front.
                full = await c.post(STREAM, params={"engine": "one"}, files=upload(files[3]))
                assert full.status_code == 503
                assert full.json()["error"]["code"] == "CAPACITY_EXHAUSTED"
                assert int(full.headers["retry-after"]) >= 1
    assert not any(k.startswith("queued") for k in results[0])
    assert results[1][0] == "queued:1"
    assert results[2][:2] == ["queued:2", "queued:1"]
    for kinds in results.values():
        assert kinds[-1] == "done"


async def test_keepalive_over_a_real_socket(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        server={"keepalive": 0.05},
        engines=engines(slow=scripted(words=["a"], seconds_per_word=5.0, delay=0.5)),
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            async with c.stream(
                "POST", STREAM, params={"engine": "slow"}, files=upload(GOFORWARD)
            ) as r:
                events = await collect(r)
    labels = [e.data if e.event == "comment" else e.event for e in events]
    assert labels[-1] == "done"
    # The first update comes 0.5 s after the start: keepalives every 50 ms fill the silence.
    first = labels.index("transcription")
    assert first >= 3 and set(labels[:first]) == {"keepalive"}


async def test_corrections_replace_the_transcript_everywhere_and_survive_retranscription(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, engines=engines(fake=scripted(words=["helo", "wrld"])))
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            params = {"engine": "fake"}
            done = (
                await c.post("/v1/transcriptions", params=params, files=upload(GOFORWARD))
            ).json()
            base = f"/v1/transcriptions/{done['id']}"
            fixed = [
                {"start": 0.0, "end": 1.0, "text": "Hello", "speaker": 1, "speaker_name": "Ana"},
                {"start": 1.0, "end": 2.0, "text": "world."},
            ]
            put = await c.put(base + "/corrections", json={"segments": fixed})
            assert put.status_code == 200
            assert put.json()["corrected"] is True and put.json()["text"] == "Hello world."
            assert put.json()["segments"] == fixed
            assert (await c.get(base, params={"format": "txt"})).text == "Hello world.\n"
            srt = (await c.get(base, params={"format": "srt"})).text
            assert (
                srt
                == "1\n00:00:00,000 --> 00:00:01,000\nHello\n\n2\n00:00:01,000 --> 00:00:02,000\nworld.\n\n"
            )
            # A cache hit serves the corrected version, flagged.
            hit = (
                await c.post("/v1/transcriptions", params=params, files=upload(GOFORWARD))
            ).json()
            assert hit["cached"] is True and hit["corrected"] is True
            assert hit["text"] == "Hello world."
            # Transcribing again returns the machine's text and keeps the corrections.
            again = await c.post(
                "/v1/transcriptions",
                params={**params, "use_cache": "false"},
                files=upload(GOFORWARD),
            )
            assert again.json()["text"] == "helo wrld" and again.json()["corrected"] is False
            assert (await c.get(base)).json()["text"] == "Hello world."
            # Bad bodies are 400 INVALID_BODY and change nothing; unknown ids are 404.
            for body in (
                b"not json",
                b'{"segments": [{"start": 2, "end": 1, "text": "x"}]}',
                b'{"segments": "x"}',
                b'{"segs": []}',
            ):
                bad = await c.put(base + "/corrections", content=body)
                assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_BODY"
            assert (await c.get(base)).json()["segments"] == fixed
            missing = await c.put(
                "/v1/transcriptions/" + "0" * 32 + "/corrections", json={"segments": []}
            )
            assert missing.status_code == 404


async def test_max_session_seconds_ends_a_stream_with_timeout_and_stores_nothing(
    tmp_path: Path,
) -> None:
    config = make_config(
        tmp_path,
        server={"max_session_seconds": 0.5},
        engines=engines(slow=scripted(delay=3600.0)),
    )
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            async with c.stream(
                "POST", STREAM, params={"engine": "slow"}, files=upload(GOFORWARD)
            ) as r:
                events = await collect(r)
            assert [e.event for e in events] == ["error"]
            assert events[0].data["code"] == "TIMEOUT"
            assert "0.5" in events[0].data["detail"]
            await gw.state.engines["slow"].wait_closed(1)  # type: ignore[attr-defined]
            await gw.state.wait_idle()
            content_id = hashlib.blake2b(GOFORWARD.read_bytes(), digest_size=16).hexdigest()
            assert await gw.state.store.get(content_id) is None
            blocking = await c.post(
                "/v1/transcriptions", params={"engine": "slow"}, files=upload(GOFORWARD)
            )
            assert blocking.status_code == 504
            assert blocking.json()["error"]["code"] == "TIMEOUT"


async def test_a_cache_hit_is_served_while_the_engine_is_full(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        engines=engines(one=scripted(delay=3600.0, max_sessions=1, max_queue=0)),
    )
    stored = GOFORWARD.read_bytes()
    other = write_wav(tmp_path / "other.wav", pcm_of(GOFORWARD) + bytes(2))
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            engine = gw.state.engines["one"]
            assert isinstance(engine, ScriptedEngine)
            seg = Segment(0.0, 2.0, "go forward")
            await gw.state.store.save(
                Transcript(
                    id=hashlib.blake2b(stored, digest_size=16).hexdigest(),
                    segments=(seg,),
                    committed=1,
                    current_time=2.786,
                    total_time=2.786,
                    engine="one",
                ),
                "",
            )
            async with trio.open_nursery() as n:

                async def hold() -> None:
                    async with c.stream(
                        "POST", STREAM, params={"engine": "one"}, files=upload(other)
                    ) as r:
                        assert r.status_code == 200
                        await trio.sleep_forever()

                n.start_soon(hold)
                await engine.wait_opened(1)
                # The one session is taken and nobody may queue: new audio is refused...
                full = await c.post(STREAM, params={"engine": "one"}, files=upload(other))
                assert full.status_code == 503
                assert full.json()["error"]["code"] == "CAPACITY_EXHAUSTED"
                # ...but a stored transcript needs no session.
                async with c.stream(
                    "POST", STREAM, params={"engine": "one"}, files=upload(GOFORWARD)
                ) as r:
                    events = await collect(r)
                assert [e.event for e in events] == ["done"]
                assert events[0].data["cached"] is True
                assert events[0].data["text"] == "go forward"
                assert engine.opened == 1
                n.cancel_scope.cancel()


async def test_corrections_times_are_bounded_once_for_every_front(tmp_path: Path) -> None:
    # Times some view cannot render are refused by the store, whichever front sends them; a row
    # written before the bound existed still renders everywhere (clamped).
    config = make_config(
        tmp_path,
        server={"default_engine": "fake"},
        engines={"fake": scripted(words=["helo", "wrld"])},
        aymurai={"engine": "fake"},
    )
    db = tmp_path / "store" / "gateway.sqlite3"
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            done = (await c.post("/v1/transcriptions", files=upload(GOFORWARD))).json()
            base = f"/v1/transcriptions/{done['id']}"
            document = f"/asr/validation/document/{content_uuid(done['id'])}"
            refused = [
                await c.put(base + "/corrections", json={"segments": [segment]})
                for segment in (
                    {"start": 0, "end": 1e15, "text": "x"},
                    {"start": 0, "end": 1e306, "text": "x"},
                    {"start": -1, "end": 1, "text": "x"},
                    {"start": 2, "end": 1, "text": "x"},
                )
            ]
            aymurai_refused = await c.post(
                document, json=[{"speaker_no": 0, "start": 0, "end": 1e15, "text": "x"}]
            )
            untouched = (await c.get(base)).json()
            at_bound = await c.put(
                base + "/corrections",
                json={"segments": [{"start": 0, "end": MAX_SECONDS, "text": "long"}]},
            )

            async def every_view() -> list[httpx.Response]:
                views = [await c.get(base, params={"format": f}) for f in exports.FORMATS]
                views += [
                    await c.post(
                        "/v1/audio/transcriptions",
                        files=upload(GOFORWARD),
                        data={"model": "fake", "response_format": f},
                    )
                    for f in ("json", "srt", "vtt", "verbose_json")
                ]
                views += [
                    await c.get(document),
                    await c.post("/asr/transcribe", files=upload(GOFORWARD)),
                ]
                return views

            bounded = await every_view()
            async with c.stream("POST", "/asr/transcribe/stream", files=upload(GOFORWARD)) as r:
                bounded_stream = [e.event for e in await collect(r)]
            # A row stored by an older gateway, before times were bounded.
            with sqlite3.connect(db) as conn:
                conn.execute(
                    "UPDATE transcripts SET corrected = ?",
                    (
                        b'[{"start":1e306,"end":1e306,"text":"old"},{"start":0,"end":1e15,"text":"x"}]',
                    ),
                )
            legacy = await every_view()
            async with c.stream("POST", "/asr/transcribe/stream", files=upload(GOFORWARD)) as r:
                legacy_stream = [e.event for e in await collect(r)]
    for r in refused:
        assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_BODY", r.text
    assert aymurai_refused.status_code == 400
    assert aymurai_refused.json()["code"] == "INVALID_BODY"
    assert untouched["corrected"] is False
    assert at_bound.status_code == 200 and at_bound.json()["segments"][0]["end"] == MAX_SECONDS
    for r in [*bounded, *legacy]:
        assert r.status_code == 200, (r.request.url, r.text)
    assert bounded_stream == legacy_stream == ["done"]
    # The bound as a clock: 277,777 hours and some.
    assert "00:00:00,000 --> 277777:46:40,000\nlong" in bounded[2].text
    assert "\nx\n" in legacy[2].text and "\nold\n" in legacy[2].text


async def test_subtitles_of_corrections_are_sorted_timed_and_unbroken(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, server={"default_engine": "fake"}, engines={"fake": scripted(words=["a"])}
    )
    segments = [
        {"start": 3.0, "end": 4.0, "text": "third"},
        {"start": 1.0, "end": 1.0, "text": "instant"},
        {"start": 0.0, "end": 1.0, "text": "first line\n\n  \nsecond line"},
        {"start": 5.0, "end": 5.0, "text": "last"},
    ]
    with trio.fail_after(60):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
            id = (await c.post("/v1/transcriptions", files=upload(GOFORWARD))).json()["id"]
            base = f"/v1/transcriptions/{id}"
            put = await c.put(base + "/corrections", json={"segments": segments})
            srt = (await c.get(base, params={"format": "srt"})).text
            vtt = (await c.get(base, params={"format": "vtt"})).text
    assert put.status_code == 200
    # By start time; a blank line inside a text is folded away (it would end the cue); a
    # zero-length cue lasts until the next one starts, at most ZERO_CUE_MS.
    assert srt == (
        "1\n00:00:00,000 --> 00:00:01,000\nfirst line\nsecond line\n\n"
        "2\n00:00:01,000 --> 00:00:01,500\ninstant\n\n"
        "3\n00:00:03,000 --> 00:00:04,000\nthird\n\n"
        "4\n00:00:05,000 --> 00:00:05,500\nlast\n\n"
    )
    assert vtt == "WEBVTT\n\n" + srt.replace(",", ".")


async def test_unknown_paths_and_methods_are_coded_native_errors(tmp_path: Path) -> None:
    config = make_config(tmp_path, engines=engines(fake=scripted(words=["a"])))
    with trio.fail_after(30):
        async with run_gateway(config) as gw, httpx.AsyncClient(base_url=gw.url) as c:
            paths = ("/web/nope.js", "/nope", "/v1/nope", "/v1/transcriptions/a/b")
            missing = [await c.get(p) for p in paths]
            wrong = [
                await c.get("/v1/transcriptions"),
                await c.delete("/v1/transcriptions/abc"),
                await c.post("/healthz"),
                await c.post("/"),  # the web page
            ]
    for r in missing:
        assert r.status_code == 404 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "NOT_FOUND" and r.json()["error"]["detail"]
    for r in wrong:
        assert r.status_code == 405 and r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert wrong[0].headers["allow"] == "POST"
    assert set(wrong[1].headers["allow"].split(", ")) == {"GET", "HEAD"}
