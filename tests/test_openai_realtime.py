"""The OpenAI Realtime engine against a fake upstream: the eleven client scenarios and more.

The fake runs in memory and in virtual time (MockClock with autojump) except for the
handshake tests, which use a real loopback socket. Every test carries a ``fail_after`` guard,
and none sleeps to wait for something: they wait on recorded frames or on the client itself.
Test audio is 24 kHz PCM whose samples carry the chunk's sequence number, and the fake
transcribes an item as the list of sequence numbers it received (``"s0 s1 s2"``), so a final
transcript shows any lost, duplicated or reordered audio.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import logging
import math
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing
from audio_util import LIBRIVOX, pcm_of
from fakes.openai_server import (
    FakeConnection,
    FakeOpenAIServer,
    Frame,
    VadScript,
    chunk,
    open_fake_server,
    seqs_of,
    transcriber,
    vad_transcriber,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import OpenAIRealtimeConfig
from gateway.engines._realtime_client import (
    ACK_GRACE,
    FINISH_TIMEOUT,
    STOP_TIMEOUT,
    RealtimeClient,
    open_realtime_client,
)
from gateway.engines._realtime_replay import AudioChunk, CommitMark, DataLane, Ledger, OffsetMap
from gateway.engines._upstream import JITTER
from gateway.engines.base import SessionOptions
from gateway.engines.openai_realtime import OpenAIRealtimeEngine
from gateway.errors import Timeout, UpstreamError, UpstreamUnavailable
from gateway.events import EngineUpdate
from gateway.metrics import REGISTRY

pytestmark = pytest.mark.anyio

APPEND = "input_audio_buffer.append"
COMMIT = "input_audio_buffer.commit"
UPDATE = "session.update"
CHUNK = len(chunk(0))  # 100 ms of 24 kHz PCM16: 4800 bytes
KEY_ENV = "ASR_GATEWAY_TEST_OPENAI_KEY"
# Engine label for metrics; unique per test so counters do not leak between tests.
_labels = iter(range(1_000_000))


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


# Real sockets want the real clock: autojump could fire while loopback bytes are in flight.
real_clock = pytest.mark.parametrize("anyio_backend", [("trio", {})], ids=["realclock"])


def make_config(server: FakeOpenAIServer, **overrides: Any) -> OpenAIRealtimeConfig:
    settings: dict[str, Any] = {
        "url": server.url,
        "api_key_env": KEY_ENV,
        "turn_detection": "none",
        "ping_interval": 5.0,
        "ping_timeout": 10.0,
        "connect_timeout": 10.0,
        "backoff_initial": 0.5,
        "backoff_max": 4.0,
        "max_attempts": 5,
    }
    settings.update(overrides)
    return OpenAIRealtimeConfig(**settings)


def client_for(server: FakeOpenAIServer, config: OpenAIRealtimeConfig, **kw: Any) -> Any:
    kw.setdefault("wait_ready", False)
    kw.setdefault("engine", f"test-{next(_labels)}")
    kw.setdefault("rng", random.Random(4))
    return open_realtime_client(config, api_key="sk-test", connect=server.connect, **kw)


async def final_update(client: RealtimeClient) -> EngineUpdate:
    last = EngineUpdate()
    async for update in client.updates():
        last = update
    return last


def text_of(update: EngineUpdate) -> str:
    return " ".join(s.text for s in update.committed + update.tentative)


def seq_text(seqs: range | list[int]) -> str:
    return " ".join(f"s{n}" for n in seqs)


def metric(name: str, engine: str) -> float:
    return REGISTRY.get_sample_value(name, {"engine": engine}) or 0.0


def first_index(server: FakeOpenAIServer, conn: int, predicate: Callable[[Frame], bool]) -> int:
    return next(i for i, f in enumerate(server.frames) if f.conn == conn and predicate(f))


def in_append(f: Frame) -> bool:
    return f.direction == "in" and f.type == APPEND


def out_updated(f: Frame) -> bool:
    return f.direction == "out" and f.type == "session.updated"


# -- 1. handshake ------------------------------------------------------------------------------


@real_clock
async def test_1_handshake_ga_shape_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-loopback")
    with trio.fail_after(20):
        async with open_fake_server(transport="tcp") as server:
            config = make_config(server)
            engine = OpenAIRealtimeEngine("openai", config)
            async with engine.session(SessionOptions(language="en")) as session:
                assert session.audio_format == "pcm"
                await session.send_audio(b"\x00\x00" * 3200)  # 200 ms at 16 kHz
                await session.end_audio()
                finals = [u async for u in session.results()]
    (handshake,) = server.handshakes
    assert handshake.path == "/v1/realtime?intent=transcription"
    assert "model=" not in handshake.path
    assert handshake.headers["authorization"] == "Bearer sk-loopback"
    assert "openai-beta" not in handshake.headers
    events = server.events_of(0)
    assert events[0].type == UPDATE
    assert events[0].data["session"]["type"] == "transcription"
    assert events[0].data["session"]["audio"]["input"]["format"] == {
        "type": "audio/pcm",
        "rate": 24000,
    }
    assert first_index(server, 0, in_append) > first_index(server, 0, out_updated)
    assert [f.code for f in server.frames_of(0) if f.kind == "close"] == [1000]
    assert finals[-1].committed  # the fake transcribed the one item


async def test_1_handshake_nothing_sent_before_session_updated() -> None:
    """Audio and a commit arrive while the server delays created and updated."""
    with trio.fail_after(60):
        async with (
            open_fake_server(transcriber(created_delay=3, updated_delay=5)) as server,
            client_for(server, make_config(server)) as client,
        ):
            for n in range(5):
                await client.append(chunk(n))
            client.commit()
            assert server.types_of(0) == []  # not even session.update before created
            await server.wait_for(lambda: len(server.types_of(0)) >= 1)
            assert server.types_of(0) == [UPDATE]
            client.end()
            await final_update(client)
    first_audio = first_index(server, 0, lambda f: f.type in (APPEND, COMMIT))
    assert first_audio > first_index(server, 0, out_updated)
    assert server.frames[first_audio].time >= 8  # created at 3 s, updated 5 s later
    assert server.violations == []


@real_clock
async def test_1_handshake_rejected_with_401_is_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with trio.fail_after(20):
        async with open_fake_server(transport="tcp", reject_status=401) as server:
            engine = OpenAIRealtimeEngine("openai", make_config(server, max_attempts=5))
            with pytest.raises(UpstreamUnavailable, match="401"):
                async with engine.session(SessionOptions()):
                    pytest.fail("the session must not open")
    assert len(server.handshakes) == 1  # not retried
    assert engine.stats()["healthy"] == {server.url: 0}


# -- 2. pre-ready buffering and flush order ----------------------------------------------------


async def test_2_pre_ready_appends_then_commit_flush_exactly_in_order() -> None:
    with trio.fail_after(60):
        async with (
            open_fake_server(transcriber(updated_delay=2)) as server,
            client_for(server, make_config(server)) as client,
        ):
            for n in range(12):
                await client.append(chunk(n))
            client.commit()
            await server.wait_for(lambda: COMMIT in server.types_of(0))
            assert server.types_of(0) == [UPDATE] + [APPEND] * 12 + [COMMIT]
            assert server.appended_seqs(0) == list(range(12))
            client.end()
            final = await final_update(client)
    assert text_of(final) == seq_text(range(12))


async def test_2_concurrent_producer_during_flush_keeps_order_without_loss_or_duplicates() -> None:
    with trio.fail_after(120):
        behaviour = transcriber(updated_delay=1.0, read_delay=0.01)
        async with (
            open_fake_server(behaviour) as server,
            client_for(server, make_config(server)) as client,
        ):
            for n in range(20):
                await client.append(chunk(n))
            client.commit()

            appended_at: dict[int, float] = {}

            async def producer() -> None:
                # Starts before ready and keeps going while the backlog is flushed.
                for n in range(20, 80):
                    await client.append(chunk(n))
                    appended_at[n] = trio.current_time()
                    await trio.sleep(0.02)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer)
            client.end()
            final = await final_update(client)
    types = server.types_of(0)
    assert types[: 1 + 20 + 1] == [UPDATE] + [APPEND] * 20 + [COMMIT]
    assert server.appended_seqs(0) == list(range(80))
    assert types.count(COMMIT) == 2
    # The producer appended while the pre-ready backlog was still being flushed.
    ready_at = server.frames[first_index(server, 0, out_updated)].time
    backlog = 20 + sum(t < ready_at for t in appended_at.values())
    backlog_flushed_at = [f.time for f in server.events_of(0) if f.type == APPEND][backlog - 1]
    assert any(ready_at <= t < backlog_flushed_at for t in appended_at.values())
    assert [s.text for s in final.committed] == [seq_text(range(20)), seq_text(range(20, 80))]


# -- 3. bounded buffer, drop oldest ------------------------------------------------------------


async def test_3_bounded_buffer_drops_oldest_whole_chunks_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cap = 10 * CHUNK
    with trio.fail_after(300):
        async with open_fake_server(transcriber(updated_delay=100)) as server:
            config = make_config(server, buffer_bytes=cap, connect_timeout=200)
            async with client_for(server, config) as client:
                label = client._label
                with caplog.at_level(logging.WARNING, logger="gateway.engines.openai_realtime"):
                    for n in range(20):
                        await client.append(chunk(n))
                        assert client.state()["lane_bytes"] <= cap
                    client.commit()  # a pending commit survives the drops that follow
                    for n in range(20, 25):
                        await client.append(chunk(n))
                        assert client.state()["lane_bytes"] <= cap
                assert client.dropped_chunks == 15
                assert client.dropped_bytes == 15 * CHUNK
                await server.wait_for(lambda: COMMIT in server.types_of(0))
                client.end()
                final = await final_update(client)
    warnings = [r for r in caplog.records if "pre-ready buffer" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].dropped_chunks == 1 and warnings[0].dropped_bytes == CHUNK  # type: ignore[attr-defined]
    assert server.types_of(0) == [UPDATE] + [APPEND] * 5 + [COMMIT] + [APPEND] * 5 + [COMMIT]
    assert server.appended_seqs(0) == list(range(15, 25))
    assert metric("gateway_openai_dropped_chunks_total", label) == 15
    assert metric("gateway_openai_dropped_bytes_total", label) == 15 * CHUNK
    assert [s.text for s in final.committed] == [seq_text(range(15, 20)), seq_text(range(20, 25))]


async def test_3_single_chunk_larger_than_the_cap_keeps_its_newest_bytes() -> None:
    cap = 10 * CHUNK
    big = b"".join(chunk(n) for n in range(15))  # 1.5 s in one append
    with trio.fail_after(60):
        async with open_fake_server(transcriber(updated_delay=5)) as server:
            config = make_config(server, buffer_bytes=cap)
            async with client_for(server, config) as client:
                await client.append(big)
                assert client.state()["lane_bytes"] == cap
                client.end()
                await final_update(client)
    (append,) = [f for f in server.events_of(0) if f.type == APPEND]
    assert append.audio == big[-cap:]
    assert client.dropped_chunks == 1 and client.dropped_bytes == 5 * CHUNK


@settings(max_examples=200, deadline=None)
@given(
    cap=st.integers(1, 4000),
    sizes=st.lists(st.integers(1, 3000).map(lambda n: 2 * n), min_size=1, max_size=40),
    commits=st.sets(st.integers(0, 39)),
)
def test_3_property_lane_never_exceeds_cap_and_keeps_the_newest_audio(
    cap: int, sizes: list[int], commits: set[int]
) -> None:
    lane = DataLane(cap)
    pushed = b""
    for i, size in enumerate(sizes):
        data = struct.pack("<H", i) * (size // 2)
        pushed += data
        lane.push_audio(AudioChunk(data, len(pushed) - size), bounded=True)
        if i in commits:
            lane.push_commit(CommitMark(pre_ready=True), coalesce=True)
        kept = [e for e in lane if isinstance(e, AudioChunk)]
        held = b"".join(e.data for e in kept)
        assert lane.audio_bytes == len(held) <= cap
        # The newest audio, contiguous: a suffix of everything pushed, offsets included.
        assert pushed.endswith(held)
        assert all(
            e.offset == len(pushed) - len(b"".join(x.data for x in kept[j:]))
            for j, e in enumerate(kept)
        )
        # Whole chunks, as many as fit; only a lone chunk bigger than the cap is cut.
        if kept and len(kept[0].data) != size_of(sizes, kept[0]):
            assert len(kept) == 1 and len(held) == cap - cap % 2
        else:
            older = len(sizes[: i + 1]) - len(kept) - 1
            assert older < 0 or len(held) + sizes[older] > cap
        # Pre-ready commits coalesce into at most one, and survive drops.
        marks = [e for e in lane if isinstance(e, CommitMark)]
        assert len(marks) == (1 if commits & set(range(i + 1)) else 0)


def size_of(sizes: list[int], entry: AudioChunk) -> int:
    (index,) = struct.unpack("<H", entry.data[:2])
    return sizes[int(index)]


# The replay ledger and the offset map, fed directly (no client, no clock).


def ledger_audio(ledger: Ledger) -> bytes:
    return b"".join(e.data for e in ledger.take_replay() if isinstance(e, AudioChunk))


def test_3_ledger_cover_forgets_covered_audio_and_cuts_the_chunk_it_ends_in() -> None:
    ledger = Ledger()
    ledger.record(0, AudioChunk(b"a" * 100, 1000))
    ledger.record(100, CommitMark())
    ledger.record(100, AudioChunk(b"b" * 100, 1100))
    ledger.record(200, CommitMark(final=True))
    ledger.cover(150)
    # The first chunk and the commit behind it are gone; half of the second chunk is left.
    assert len(ledger) == 2 and ledger.audio_bytes == 50
    replay = ledger.take_replay()
    assert len(ledger) == 0 and ledger.audio_bytes == 0
    chunk_left, mark = replay
    assert isinstance(chunk_left, AudioChunk) and isinstance(mark, CommitMark)
    assert chunk_left.data == b"b" * 50 and chunk_left.offset == 1150 and chunk_left.replay
    # A replayed commit is a fresh barrier that keeps only whether it was the final one.
    assert mark.final and not mark.pre_ready


def test_3_ledger_trim_keeps_the_newest_audio_and_counts_the_rest() -> None:
    ledger = Ledger()
    for n in range(5):
        ledger.record(100 * n, AudioChunk(bytes([n]) * 100, 100 * n))
    assert ledger.trim(250) == 300
    assert ledger.audio_bytes == 200
    assert ledger_audio(ledger) == bytes([3]) * 100 + bytes([4]) * 100


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("audio"), st.integers(1, 400)),
            st.tuples(st.just("commit"), st.integers(0, 0)),
            st.tuples(st.just("cover"), st.integers(0, 600)),
        ),
        max_size=40,
    )
)
def test_3_property_the_ledger_holds_exactly_what_was_sent_and_not_covered(
    steps: list[tuple[str, int]],
) -> None:
    ledger = Ledger()
    sent = b""
    covered = 0
    for kind, n in steps:
        if kind == "audio":
            data = bytes((len(sent) + i) % 251 for i in range(n))
            ledger.record(len(sent), AudioChunk(data, len(sent)))
            sent += data
        elif kind == "commit":
            ledger.record(len(sent), CommitMark())
        else:
            covered = max(covered, min(len(sent), covered + n))
            ledger.cover(covered)
        assert ledger.audio_bytes == len(sent) - covered
    replay = [e for e in ledger.take_replay() if isinstance(e, AudioChunk)]
    assert b"".join(e.data for e in replay) == sent[covered:]
    assert all(e.replay and e.data == sent[e.offset : e.offset + len(e.data)] for e in replay)


def test_3_offset_map_follows_each_discontinuity() -> None:
    offsets = OffsetMap()
    assert offsets.stream_offset(500) == 500
    offsets.note(0, 1000)  # the first 1000 bytes were dropped before ready
    offsets.note(200, 1200)  # contiguous: no new span
    offsets.note(400, 300)  # a replay: stream bytes from 300 again
    assert [offsets.stream_offset(x) for x in (0, 150, 399, 400, 450)] == [
        1000,
        1150,
        1399,
        300,
        350,
    ]


# -- 4. commit coalescing and barriers ---------------------------------------------------------


async def test_4_pre_ready_commits_coalesce_into_one_after_the_flush() -> None:
    with trio.fail_after(60):
        async with (
            open_fake_server(transcriber(updated_delay=3)) as server,
            client_for(server, make_config(server)) as client,
        ):
            for n in range(10):
                await client.append(chunk(n))
                if n % 2:
                    client.commit()  # five commits before ready
            await server.wait_for(lambda: COMMIT in server.types_of(0))
            client.end()
            final = await final_update(client)
    assert server.types_of(0) == [UPDATE] + [APPEND] * 10 + [COMMIT]
    assert text_of(final) == seq_text(range(10))


async def test_4_pre_ready_commit_under_100ms_sends_no_commit() -> None:
    with trio.fail_after(60):
        async with (
            open_fake_server(transcriber(updated_delay=3)) as server,
            client_for(server, make_config(server)) as client,
        ):
            await client.append(chunk(1, ms=60))
            client.commit()
            client.end()
            final = await final_update(client)
    assert server.types_of(0) == [UPDATE, APPEND]
    assert final == EngineUpdate(processed=0.06)


async def test_4_post_ready_commit_is_a_fifo_barrier() -> None:
    """Appends before the commit go before it, appends after go after, though queued."""
    with trio.fail_after(60):
        async with (
            open_fake_server(transcriber(read_delay=0.05)) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            for n in range(8):
                await client.append(chunk(n))
            client.commit()
            for n in range(8, 16):
                await client.append(chunk(n))
            client.commit()
            for n in range(16, 20):
                await client.append(chunk(n))
            client.end()
            final = await final_update(client)
    assert server.types_of(0) == (
        [UPDATE] + [APPEND] * 8 + [COMMIT] + [APPEND] * 8 + [COMMIT] + [APPEND] * 4 + [COMMIT]
    )
    assert [s.text for s in final.committed] == [
        seq_text(range(8)),
        seq_text(range(8, 16)),
        seq_text(range(16, 20)),
    ]


# -- 5. stale audio on reconnect: the replay policy --------------------------------------------


async def test_5_reconnect_replays_uncommitted_audio_after_updated_never_before_or_twice() -> None:
    release = trio.Event()

    async def behave(conn: FakeConnection) -> None:
        if conn.index == 0:
            await conn.handshake()
            appends = 0
            while appends < 5:
                event = await conn.receive()
                appends += event is not None and event["type"] == APPEND
            conn.stall()  # the client fills its send path and blocks mid-frame
            await release.wait()
            await conn.close(1006)
        else:
            await conn.handshake(created_delay=1, updated_delay=2)
            await conn.serve_transcripts()

    with trio.fail_after(120):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server)) as client,
        ):
            label = client._label

            async def producer() -> None:
                for n in range(40):
                    await client.append(chunk(n))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer)
                await server.wait_for(lambda: len(server.connections) == 1)
                await trio.testing.wait_all_tasks_blocked()
                sent_on_first = client._conn.sent if client._conn else 0
                in_flight = client._conn.in_send if client._conn else False
                release.set()
            client.end()
            final = await final_update(client)
    read_on_first = server.appended_seqs(0)
    assert read_on_first == list(range(len(read_on_first)))
    assert in_flight  # a frame was being written when the connection died
    assert sent_on_first // CHUNK > len(read_on_first)
    # The new session: update first, nothing before updated, every chunk exactly once.
    assert server.types_of(1)[0] == UPDATE
    assert first_index(server, 1, in_append) > first_index(server, 1, out_updated)
    assert server.appended_seqs(1) == list(range(40))
    assert client.replayed_bytes == sent_on_first
    assert metric("gateway_openai_replayed_bytes_total", label) == sent_on_first
    assert client.reconnects == 1
    assert text_of(final) == seq_text(range(40))


async def test_5_replay_starts_after_the_last_completed_item() -> None:
    cut = trio.Event()

    async def behave(conn: FakeConnection) -> None:
        if conn.index == 0:
            await conn.handshake()
            # Transcribe the first commit, then die with 1011 after five more appends.
            seqs: list[int] = []
            while (event := await conn.receive()) is not None:
                if event["type"] == COMMIT:
                    item = conn.new_item()
                    await conn.committed(item, None)
                    await conn.completed(item, seq_text(seqs))
                    seqs = []
                elif event["type"] == APPEND:
                    seqs.append(seqs_of(base64.b64decode(event["audio"]))[0])
                    if len(seqs) == 5 and cut.is_set():
                        await conn.close(1011)
                        return
        else:
            await conn.handshake()
            await conn.serve_transcripts()

    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            for n in range(10):
                await client.append(chunk(n))
            client.commit()
            await server.wait_for(
                lambda: any(f.type and f.type.endswith("completed") for f in server.frames)
            )
            cut.set()
            for n in range(10, 30):
                await client.append(chunk(n))
            client.end()
            final = await final_update(client)
    assert server.appended_seqs(0)[:15] == list(range(15))
    assert server.appended_seqs(1) == list(range(10, 30))  # covered audio is not replayed
    assert [s.text for s in final.committed] == [seq_text(range(10)), seq_text(range(10, 30))]


# -- 6. backoff and limits ---------------------------------------------------------------------


async def test_6_backoff_is_exponential_capped_jittered_and_gives_up_after_max_attempts() -> None:
    accepted: list[float] = []

    async def accept_then_close(conn: FakeConnection) -> None:
        accepted.append(trio.current_time())
        await conn.close(1011)

    with trio.fail_after(600):
        async with open_fake_server(accept_then_close) as server:
            config = make_config(server, backoff_initial=1.0, backoff_max=4.0, max_attempts=5)
            with pytest.raises(UpstreamUnavailable, match="5 failed attempts"):
                async with client_for(server, config, wait_ready=True):
                    pytest.fail("never ready")
    assert len(accepted) == 5
    gaps = [b - a for a, b in itertools.pairwise(accepted)]
    for gap, base in zip(gaps, [1.0, 2.0, 4.0, 4.0], strict=True):
        assert base * JITTER[0] <= gap <= base * JITTER[1] + 1e-6
    assert len({round(g / b, 6) for g, b in zip(gaps, [1, 2, 4, 4], strict=True)}) > 1  # jitter


async def test_6_attempt_counter_resets_on_session_updated_not_on_connect() -> None:
    async def ready_then_drop(conn: FakeConnection) -> None:
        await conn.handshake()
        await trio.sleep(1)
        await conn.close(1012)

    with trio.fail_after(600):
        async with open_fake_server(ready_then_drop) as server:
            config = make_config(server, max_attempts=2)
            async with client_for(server, config, wait_ready=True) as client:
                await server.wait_for(lambda: len(server.connections) >= 6)
                assert client.state()["running"]
                assert client._error is None


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 1013])
async def test_6_transient_close_codes_are_retried(code: int) -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        if conn.index == 0:
            await conn.close(code)
        else:
            await conn.serve_transcripts()

    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            await server.wait_for(lambda: len(server.connections) == 2)
            await client.append(chunk(1))
            client.end()
            final = await final_update(client)
    assert text_of(final) == "s1"


async def test_6_exhausted_reconnects_mid_stream_reach_the_client_as_unavailable() -> None:
    async def behave(conn: FakeConnection) -> None:
        if conn.index == 0:
            await conn.handshake()
            await conn.expect(APPEND)
            await conn.close(1011)
        else:
            await conn.close(1013)  # accepted, then refused before ready: a failed attempt

    with trio.fail_after(600):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server, max_attempts=3), wait_ready=True) as client,
        ):
            await client.append(chunk(1))
            with pytest.raises(UpstreamUnavailable, match="3 failed attempts"):
                await final_update(client)
    assert len(server.connections) == 1 + 3


async def test_6_session_expired_error_reconnects_and_replays() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        if conn.index == 0:
            await conn.expect(APPEND)
            await conn.error("session_expired", "Your session hit the maximum duration.")
            await trio.sleep_forever()
        await conn.serve_transcripts()

    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            await client.append(chunk(1))
            await server.wait_for(lambda: len(server.connections) == 2)
            await client.append(chunk(2))
            client.end()
            final = await final_update(client)
    assert text_of(final) == "s1 s2"
    assert [f.code for f in server.frames_of(0) if f.kind == "close"] == [1000]


@pytest.mark.parametrize(("code", "reason"), [(4000, "beta_api_shape_disabled"), (1008, "")])
async def test_6_terminal_close_codes_are_not_retried(code: int, reason: str) -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        await conn.close(code, reason)

    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            with pytest.raises(UpstreamError, match=str(code)):
                await final_update(client)
            with pytest.raises(UpstreamError):
                await client.append(chunk(1))
    assert len(server.connections) == 1


# -- 7. stop clears state ----------------------------------------------------------------------


async def _stop_scenario(phase: str) -> tuple[FakeOpenAIServer, float, dict[str, Any]]:
    stalled = trio.Event()

    async def behave(conn: FakeConnection) -> None:
        if conn.index > 0 and phase != "backoff":
            await conn.handshake()
            await conn.serve_transcripts()
        elif phase == "backoff":
            if conn.index == 0:
                await conn.close(1011)
            else:
                await conn.handshake()
                await conn.serve_transcripts()
        elif phase == "pre_ready":
            await conn.handshake(updated_delay=1000)
        elif phase == "mid_flush":
            await conn.handshake(updated_delay=1)
            await conn.serve_transcripts(read_delay=0.05)
        else:  # mid_send
            await conn.handshake()
            for _ in range(3):
                await conn.receive()
            conn.stall()
            stalled.set()
            await trio.sleep_forever()

    server: FakeOpenAIServer
    with trio.fail_after(600):
        async with open_fake_server(behave) as server:
            config = make_config(server, backoff_initial=100, backoff_max=100, connect_timeout=2000)
            async with client_for(server, config) as client:
                for n in range(30):
                    if phase == "mid_send" and n == 5:
                        break
                    await client.append(chunk(n))
                client.commit()
                if phase == "backoff":
                    await server.wait_for(
                        lambda: bool(server.connections) and server.connections[0].closed
                    )
                    await trio.testing.wait_all_tasks_blocked()
                    assert client.reconnects == 1 and client._conn is None  # backing off
                elif phase == "pre_ready":
                    await server.wait_for(lambda: server.types_of(0) == [UPDATE])
                elif phase == "mid_flush":
                    await server.wait_for(lambda: server.types_of(0).count(APPEND) >= 5)
                else:
                    await stalled.wait()
                    for n in range(5, 30):
                        with trio.move_on_after(0.01):
                            await client.append(chunk(n))
                    await trio.testing.wait_all_tasks_blocked()
                    assert client._conn is not None and client._conn.in_send
                started = trio.current_time()
                await client.aclose()
                elapsed = trio.current_time() - started
                state = client.state()
                await client.aclose()  # idempotent
            # A later session on the same upstream never sees the old audio.
            async with client_for(server, config) as fresh:
                await fresh.append(chunk(1000))
                fresh.end()
                final = await final_update(fresh)
            assert text_of(final) == "s1000"
            assert server.appended_seqs(len(server.connections) - 1) == [1000]
    return server, elapsed, state


@pytest.mark.parametrize("phase", ["backoff", "pre_ready", "mid_flush", "mid_send"])
async def test_7_stop_clears_state_and_closes_within_the_deadline(phase: str) -> None:
    server, elapsed, state = await _stop_scenario(phase)  # guarded by fail_after inside
    assert elapsed <= STOP_TIMEOUT + 1e-9
    assert state == {
        "lane_entries": 0,
        "lane_bytes": 0,
        "ledger_entries": 0,
        "control": 0,
        "pending_commits": 0,
        "ready": False,
        "ended": False,
        "running": False,
    }
    closes = [f.code for f in server.frames_of(0) if f.kind == "close"]
    if phase == "backoff":
        assert len(server.connections) == 2  # stopped in backoff: no reconnect
    elif phase == "mid_send":
        assert closes == []  # the peer stopped reading: the socket is dropped instead
    else:
        assert closes == [1000]
    if phase == "pre_ready":
        assert server.types_of(0) == [UPDATE]
    if phase == "mid_flush":
        appended = server.appended_seqs(0)
        assert 5 <= len(appended) < 30 and appended == list(range(len(appended)))


async def test_7_cancelling_the_session_closes_with_1000_promptly() -> None:
    """A client disconnect cancels the session mid-flush: the frame in flight completes,
    then the socket closes with 1000, all within STOP_TIMEOUT."""
    with trio.fail_after(60):
        async with open_fake_server(transcriber(read_delay=0.1)) as server:
            with trio.move_on_after(5) as scope:
                async with client_for(server, make_config(server), wait_ready=True) as client:
                    for n in range(100):
                        await client.append(chunk(n))
                    await trio.sleep_forever()
            cancelled_at = scope.deadline
            assert scope.cancelled_caught
            assert trio.current_time() - cancelled_at <= STOP_TIMEOUT
            assert not client.state()["running"]
    appended = server.appended_seqs(0)
    assert 10 < len(appended) < 100 and appended == list(range(len(appended)))
    assert [f.code for f in server.frames_of(0) if f.kind == "close"] == [1000]


# -- 8. heartbeat ------------------------------------------------------------------------------


async def test_8_heartbeat_is_not_starved_by_a_10s_backlog_and_a_slow_reader() -> None:
    with trio.fail_after(300):
        behaviour = transcriber(updated_delay=0.5, read_delay=0.1)
        async with open_fake_server(behaviour) as server:
            config = make_config(server, ping_interval=1.0, ping_timeout=2.0)
            async with client_for(server, config) as client:
                for n in range(100):  # 10 s of audio queued before ready
                    await client.append(chunk(n))
                client.end()
                await final_update(client)
    appends = [f.time for f in server.events_of(0) if f.type == APPEND]
    pings = [f.time for f in server.frames_of(0) if f.kind == "ping"]
    assert appends[-1] - appends[0] >= 9.5  # the flush really took ten seconds
    during = [t for t in pings if appends[0] <= t <= appends[-1]]
    assert len(during) >= 8
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) <= 1.0 + 0.5  # on schedule, give or take a frame read by the slow server
    assert len(server.connections) == 1 and client.reconnects == 0


async def test_8_missing_pong_triggers_reconnect_within_interval_plus_timeout() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        if conn.index == 0:
            await trio.sleep(3.3)
            conn.stall()  # no more reads, so no pongs
            await trio.sleep_forever()
        await conn.serve_transcripts()

    with trio.fail_after(120):
        async with open_fake_server(behave) as server:
            config = make_config(server, ping_interval=2.0, ping_timeout=3.0, backoff_initial=0.1)
            async with client_for(server, config, wait_ready=True) as client:
                start = trio.current_time()
                await server.wait_for(lambda: len(server.connections) == 2)
                reconnected = trio.current_time() - start
                await client.append(chunk(7))
                client.end()
                final = await final_update(client)
    assert reconnected <= 3.3 + 2.0 + 3.0 + 0.1
    assert text_of(final) == "s7"


# -- 9. errors surfaced ------------------------------------------------------------------------


async def test_9_error_event_after_ready_reaches_the_client() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        await conn.receive()
        await conn.error("server_error", "The server had an error", type="server_error")
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            await client.append(chunk(1))
            with pytest.raises(UpstreamError, match="The server had an error"):
                await final_update(client)
    assert len(server.connections) == 1


async def test_9_invalid_request_error_before_ready_is_terminal() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.created()
        await conn.expect(UPDATE)
        await conn.error("invalid_value", "Invalid model 'gpt-nope'")
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with open_fake_server(behave) as server:
            with pytest.raises(UpstreamError, match="gpt-nope"):
                async with client_for(server, make_config(server), wait_ready=True):
                    pytest.fail("never ready")
    assert len(server.connections) == 1


async def test_9_failed_item_gives_an_empty_final_then_an_error() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        await conn.expect(APPEND)
        await conn.expect(COMMIT)
        await conn.committed("item_a", None)
        await conn.delta("item_a", "garb")
        await conn.failed("item_a")
        await trio.sleep_forever()

    updates: list[EngineUpdate] = []
    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            await client.append(chunk(1))
            client.commit()
            with pytest.raises(UpstreamError, match="item_a failed"):
                async for update in client.updates():
                    updates.append(update)
    assert updates[-1].committed == () and updates[-1].tentative == ()  # resolved, empty
    assert len(server.connections) == 1


async def test_9_commit_empty_is_benign_with_server_vad() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        # Server VAD commits the speech itself; our final commit then finds an empty buffer.
        for _ in range(10):
            await conn.expect(APPEND)
        await conn.send(
            {"type": "input_audio_buffer.speech_started", "item_id": "v1", "audio_start_ms": 100}
        )
        await conn.send(
            {"type": "input_audio_buffer.speech_stopped", "item_id": "v1", "audio_end_ms": 1000}
        )
        await conn.committed("v1", None)
        await conn.expect(COMMIT)
        await conn.error("input_audio_buffer_commit_empty", "buffer too small")
        await trio.sleep(1)
        await conn.completed("v1", "hello")
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with open_fake_server(behave) as server:
            config = make_config(server, turn_detection="server_vad")
            async with client_for(server, config, wait_ready=True) as client:
                for n in range(10):
                    await client.append(chunk(n))
                client.end()
                final = await final_update(client)
    assert text_of(final) == "hello"
    assert final.committed[0].start == pytest.approx(0.1)
    assert final.committed[0].end == pytest.approx(1.0)


# -- 10. event assembly ------------------------------------------------------------------------


async def test_10_out_of_order_completions_are_emitted_in_previous_item_id_order() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        items: list[str] = []
        for _ in range(3):
            await conn.expect(APPEND)
            await conn.expect(COMMIT)
            item = conn.new_item()
            await conn.committed(item, items[-1] if items else None)
            items.append(item)
        await conn.send({"type": "conversation.item.added", "item": {"id": items[0]}})
        await conn.delta(items[0], "on")
        await conn.delta(items[2], "thr")
        await conn.completed(items[2], "three")
        await trio.sleep(0.5)  # let the client observe this state
        await conn.send({"type": "some.future.event", "item_id": items[1]})
        await conn.delta(items[0], "e")
        await conn.completed(items[1], "two")
        await conn.completed(items[0], "one")
        await trio.sleep_forever()

    updates: list[EngineUpdate] = []
    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            for n in range(3):
                await client.append(chunk(n))
                client.commit()
            client.end()
            async for update in client.updates():
                updates.append(update)
    assert [s.text for s in updates[-1].committed] == ["one", "two", "three"]
    committed_so_far: tuple[Any, ...] = ()
    for update in updates:
        assert update.committed[: len(committed_so_far)] == committed_so_far
        committed_so_far = update.committed
    # The last item completed first: shown, but tentative until the items before it complete.
    assert any(
        u.committed == () and [s.text for s in u.tentative] == ["on", "three"] for u in updates
    )
    starts = [s.start for s in updates[-1].committed]
    assert starts == sorted(starts)


# -- 11. format --------------------------------------------------------------------------------


async def test_11_session_resamples_16k_to_24k_without_clicks_or_lost_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    tone = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 440 * i / 16000))) for i in range(16000)
    )
    sizes = [320, 3200, 17, 6400, 999]
    with trio.fail_after(60):
        async with open_fake_server(transcriber()) as server:
            engine = OpenAIRealtimeEngine("openai", make_config(server), connect=server.connect)
            async with engine.session(SessionOptions()) as session:
                i = k = 0
                while i < len(tone):
                    size = sizes[k % len(sizes)] * 2
                    await session.send_audio(tone[i : i + size])
                    i, k = i + size, k + 1
                await session.end_audio()
                async for _ in session.results():
                    pass
    sent = b"".join(f.audio for f in server.events_of(0) if f.type == APPEND)
    assert len(sent) == 48000  # exactly 1.5x the samples: none dropped, none doubled
    samples = [v for (v,) in struct.iter_unpack("<h", sent)]
    expected = [8000 * math.sin(2 * math.pi * 440 * i / 24000) for i in range(len(samples))]
    # Away from the filter's edges the output is the same sine at 24 kHz: no clicks.
    assert max(abs(a - b) for a, b in zip(samples[100:-100], expected[100:-100], strict=True)) < 200


async def test_11_buffer_cap_counts_raw_pcm_bytes_not_base64() -> None:
    cap = 10 * CHUNK  # base64 of this much audio would be 4/3 larger
    with trio.fail_after(60):
        async with (
            open_fake_server(transcriber(updated_delay=5)) as server,
            client_for(server, make_config(server, buffer_bytes=cap)) as client,
        ):
            for n in range(10):
                await client.append(chunk(n))
            assert client.dropped_bytes == 0 and client.state()["lane_bytes"] == cap
            await client.append(chunk(10))
            assert client.dropped_chunks == 1 and client.dropped_bytes == CHUNK
            client.end()
            await final_update(client)
    assert server.appended_seqs(0) == list(range(1, 11))


def test_11_resampler_chunking_is_invisible() -> None:
    from gateway.engines._resample import PcmResampler

    rng = random.Random(11)
    pcm = bytes(rng.getrandbits(8) for _ in range(32000))
    whole = PcmResampler()
    reference = whole.push(pcm) + whole.flush()
    pieces = PcmResampler()
    out = b""
    i = 0
    while i < len(pcm):
        n = rng.randrange(1, 1500)  # odd sizes too: a half sample waits for the next chunk
        out += pieces.push(pcm[i : i + n])
        i += n
    out += pieces.flush()
    assert out == reference
    assert len(out) == len(pcm) * 3 // 2


# -- the engine seam ---------------------------------------------------------------------------


async def test_engine_end_audio_with_server_vad_waits_for_outstanding_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    completed_at: list[float] = []

    async def vad(conn: FakeConnection) -> None:
        await conn.handshake()
        ms = 0
        while (event := await conn.receive()) is not None:
            if event["type"] == APPEND:
                ms += len(base64.b64decode(event["audio"])) // 48
                if ms >= 1800 and not conn.last_item:
                    await conn.send(
                        {
                            "type": "input_audio_buffer.speech_started",
                            "item_id": "v1",
                            "audio_start_ms": 200,
                        }
                    )
                    await conn.send(
                        {
                            "type": "input_audio_buffer.speech_stopped",
                            "item_id": "v1",
                            "audio_end_ms": 1700,
                        }
                    )
                    await conn.committed("v1", None)
                    conn.last_item = "v1"
            elif event["type"] == COMMIT:
                await conn.committed("v2", "v1")
                await trio.sleep(2)  # v2 completes first, v1 later: both must arrive
                await conn.completed("v2", "world")
                await trio.sleep(1)
                completed_at.append(trio.current_time())
                await conn.completed("v1", "hello")

    with trio.fail_after(60):
        async with open_fake_server(vad) as server:
            config = make_config(server, turn_detection="server_vad")
            engine = OpenAIRealtimeEngine("openai", config, connect=server.connect)
            async with engine.session(SessionOptions()) as session:
                for _ in range(30):
                    await session.send_audio(b"\x01\x00" * 1600)  # 3 s at 16 kHz
                await session.end_audio()
                updates = [u async for u in session.results()]
                ended_at = trio.current_time()
            assert engine.stats()["sessions"] == {server.url: 0}
    assert ended_at >= completed_at[0]
    final = updates[-1]
    assert [s.text for s in final.committed] == ["hello", "world"]
    assert final.committed[0].start == pytest.approx(0.2)
    assert final.committed[0].end == pytest.approx(1.7)
    assert final.committed[1].start == pytest.approx(1.7)
    assert final.committed[1].end == pytest.approx(3.0, abs=0.01)


async def test_engine_without_api_key_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    engine = OpenAIRealtimeEngine("openai", OpenAIRealtimeConfig(api_key_env=KEY_ENV))
    with trio.fail_after(10):
        assert await engine.readiness() == f"environment variable {KEY_ENV} is not set"
        with pytest.raises(UpstreamUnavailable, match=KEY_ENV):
            async with engine.session(SessionOptions()):
                pytest.fail("no key, no session")


async def test_engine_reports_queue_positions_past_max_sessions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    positions: list[int] = []
    with trio.fail_after(60):
        async with open_fake_server(transcriber()) as server:
            engine = OpenAIRealtimeEngine(
                "openai", make_config(server, max_sessions=1), connect=server.connect
            )
            async with (
                engine.session(SessionOptions()),
                trio.open_nursery() as nursery,
            ):

                async def second() -> None:
                    async with engine.session(SessionOptions(), on_queued=positions.append):
                        pass

                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()
                assert positions == [1]
                assert engine.stats()["queue_length"] == 1
                nursery.cancel_scope.cancel()


# -- 12. acknowledgements of a commit around server VAD (issue 13, part 1) ---------------------

STOPPED = "input_audio_buffer.speech_stopped"
COMMITTED = "input_audio_buffer.committed"
ERROR = "error"
# Three utterances with 700 ms pauses (the VAD ends a turn after 500 ms of silence), then a
# tail whose length decides what answers the final commit.
UTTERANCES = [range(1, 6), range(6, 13), range(13, 21)]
# order: (tail, the script, the answer to the final commit, the texts of the turns)
ORDERS: dict[str, tuple[list[bytes], VadScript, list[str], list[str]]] = {
    # The commit closes the speech run the VAD has open (200 ms of silence is shorter than
    # it waits for): speech_stopped at the commit point, then committed, as in the issue.
    "stop_before": ([chunk(0, 200)], VadScript(stop="before"), [STOPPED, COMMITTED], []),
    # ... speech_stopped at the end of the speech instead (200 ms before the commit point).
    "stop_before_at_speech_end": (
        [chunk(0, 200)],
        VadScript(stop="before", stop_end="speech"),
        [STOPPED, COMMITTED],
        [],
    ),
    "stop_after": ([chunk(0, 200)], VadScript(stop="after"), [COMMITTED, STOPPED], []),
    "no_stop": ([chunk(0, 200)], VadScript(stop="none"), [COMMITTED], []),
    # The VAD ends the last turn by itself first (speech_stopped, committed) and the commit
    # finds 50 ms left: commit_empty.
    "vad_then_empty": ([chunk(0, 550)], VadScript(), [ERROR], []),
    # ... or 300 ms of silence left: committed for a new item with an empty transcript.
    "vad_then_item": ([chunk(0, 800)], VadScript(), [COMMITTED], []),
    "vad_then_item_at_speech_end": (
        [chunk(0, 800)],
        VadScript(vad_end="speech"),
        [COMMITTED],
        [],
    ),
    # ... or a short turn began after it, which the commit closes.
    "vad_then_turn": (
        [chunk(0, 520), chunk(21, 200), chunk(0, 100)],
        VadScript(),
        [STOPPED, COMMITTED],
        ["s21"],
    ),
}


def vad_audio(tail: list[bytes]) -> list[bytes]:
    chunks: list[bytes] = []
    for k, seqs in enumerate(UTTERANCES):
        if k:
            chunks.append(chunk(0, 700))
        chunks += [chunk(n) for n in seqs]
    return chunks + tail


def expected_answer(order: str, ack: str) -> list[str]:
    answer = ORDERS[order][2]
    if ack == "missing":
        return [t for t in answer if t == STOPPED]
    if ack == "twice":
        return [u for t in answer for u in [t] * (1 + (t != STOPPED))]
    return answer


async def run_vad_session(
    order: str, *, ack: str = "once", interleave: bool = False, connection: str = "plain"
) -> tuple[FakeOpenAIServer, EngineUpdate, float]:
    """Stream the utterances to a server-VAD fake; returns the final and how long it took
    from ``end()``. ``connection``: "plain", a "1011" close or "1006" abort of the first
    connection mid-stream, or a "slow_updated" session.updated (8 s)."""
    tail, script, _, _ = ORDERS[order]
    script = dataclasses.replace(script, ack=ack, interleave=interleave)  # type: ignore[arg-type]

    async def behave(conn: FakeConnection) -> None:
        await conn.handshake(updated_delay=8 if connection == "slow_updated" else 0)
        if conn.index > 0 or connection not in ("1011", "1006"):
            await conn.serve_vad(script)
            return
        # Serve the first utterance and half of the second, then drop.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.serve_vad, script)
            await conn.server.wait_for(lambda: conn.server.types_of(0).count(APPEND) >= 18)
            await conn.close(int(connection))

    with trio.fail_after(300):
        async with open_fake_server(behave) as server:
            config = make_config(server, turn_detection="server_vad")
            async with client_for(server, config) as client:
                for data in vad_audio(tail):
                    await client.append(data)
                client.end()
                ended = trio.current_time()
                final = await final_update(client)
                elapsed = trio.current_time() - ended
    assert len(server.connections) == (2 if connection in ("1011", "1006") else 1)
    return server, final, elapsed


# Virtual seconds between end() and the final that are not the engine's waiting: the backoff
# (at most backoff_initial) of a reconnect, the session.updated delay.
OVERHEAD = {"plain": 0.0, "1011": 0.5, "1006": 0.5, "slow_updated": 8.0}


def assert_finished_at_once(order: str, connection: str, elapsed: float) -> None:
    """At once, but for the one ambiguous answer (speech_stopped at the end of the speech
    the commit cut short), which counts after ACK_GRACE without another."""
    wait = ACK_GRACE if order == "stop_before_at_speech_end" else 0.0
    assert wait <= elapsed <= OVERHEAD[connection] + wait + 0.01


def assert_whole_transcript(final: EngineUpdate, order: str) -> None:
    assert final.tentative == ()
    expected = [seq_text(u) for u in UTTERANCES] + ORDERS[order][3]
    assert [s.text for s in final.committed] == expected
    starts = [s.start for s in final.committed]
    assert starts == sorted(starts)


@pytest.mark.parametrize("interleave", [False, True], ids=["apart", "interleaved"])
@pytest.mark.parametrize("ack", ["once", "twice", "missing"])
@pytest.mark.parametrize("order", list(ORDERS))
async def test_12_final_commit_finishes_at_once_whatever_the_order_of_its_answer(
    order: str, ack: str, interleave: bool
) -> None:
    server, final, elapsed = await run_vad_session(order, ack=ack, interleave=interleave)
    assert server.connections[0].answers == [expected_answer(order, ack)]
    assert_whole_transcript(final, order)
    assert_finished_at_once(order, "plain", elapsed)


@pytest.mark.parametrize("ack", ["once", "twice", "missing"])
@pytest.mark.parametrize("connection", ["1011", "1006", "slow_updated"])
@pytest.mark.parametrize("order", list(ORDERS))
async def test_12_after_a_reconnect_or_a_slow_session_updated_too(
    order: str, connection: str, ack: str
) -> None:
    server, final, elapsed = await run_vad_session(
        order, ack=ack, interleave=True, connection=connection
    )
    assert server.connections[-1].answers == [expected_answer(order, ack)]
    assert_whole_transcript(final, order)
    assert_finished_at_once(order, connection, elapsed)


@pytest.mark.parametrize(
    "order", ["vad_then_empty", "vad_then_item", "vad_then_item_at_speech_end"]
)
async def test_12_an_ignored_final_commit_finishes_with_the_transcript(order: str) -> None:
    """Every item completed, but the commit is never answered."""
    server, final, elapsed = await run_vad_session(order, ack="ignored")
    assert server.connections[0].answers == [[]]
    assert_whole_transcript(final, order)
    if order == "vad_then_item_at_speech_end":
        # 800 ms after the speech are in no item: an answer could still add one, so it is
        # awaited until the deadline; then the transcript is complete all the same.
        assert elapsed == pytest.approx(FINISH_TIMEOUT)
    elif order == "vad_then_item":
        # The VAD's speech_stopped is 300 ms before the commit point: it may have been the
        # answer (a commit that cut speech short), so another is awaited only ACK_GRACE.
        assert elapsed == pytest.approx(ACK_GRACE)
    else:  # 50 ms left: no answer could add an item, only the acknowledgement is missing
        assert elapsed == 0
    assert [f.code for f in server.frames_of(0) if f.kind == "close"] == [1000]


async def test_12_an_item_still_incomplete_at_the_deadline_is_a_timeout() -> None:
    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        await conn.expect(APPEND)
        await conn.expect(COMMIT)
        await conn.committed("item_a", None)
        await conn.delta("item_a", "never fini")
        await trio.sleep_forever()

    with trio.fail_after(300):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            await client.append(chunk(1, ms=500))
            client.end()
            ended = trio.current_time()
            with pytest.raises(Timeout, match="1 items still incomplete"):
                await final_update(client)
            assert trio.current_time() - ended == pytest.approx(FINISH_TIMEOUT)
    assert client.reconnects == 0


@pytest.mark.parametrize("ack", ["commit_empty_named", "commit_empty_unnamed", "committed"])
async def test_12_a_duplicated_answer_to_one_commit_does_not_answer_the_next(ack: str) -> None:
    """Two commits (no VAD); the first is answered twice at once, the second 5 s later."""

    async def behave(conn: FakeConnection) -> None:
        await conn.handshake()
        await conn.expect(APPEND)
        first = await conn.expect(COMMIT)
        await conn.expect(APPEND)
        await conn.expect(COMMIT)
        for _ in range(2):
            if ack == "committed":
                await conn.committed("item_a", None)
            else:
                await conn.commit_empty(first["event_id"] if ack == "commit_empty_named" else None)
        if ack == "committed":
            await conn.completed("item_a", "early")
        await trio.sleep(5)
        await conn.committed("item_b", "item_a" if ack == "committed" else None)
        await conn.completed("item_b", "late")
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with (
            open_fake_server(behave) as server,
            client_for(server, make_config(server), wait_ready=True) as client,
        ):
            await client.append(chunk(1, ms=500))
            client.commit()
            await client.append(chunk(2, ms=500))
            client.end()
            final = await final_update(client)
    commits = [f.data for f in server.events_of(0) if f.type == COMMIT]
    assert len({c["event_id"] for c in commits}) == 2  # each commit is named
    assert text_of(final) == ("early late" if ack == "committed" else "late")


@pytest.mark.parametrize("ack", ["once", "ignored"])
async def test_12_a_speech_stopped_read_before_the_commit_was_written_is_the_vads(
    ack: str,
) -> None:
    """The VAD ends the last turn 300 ms before the end of the audio (speech_stopped at its
    decision point: by offsets, the answer to a commit could look the same), the client reads
    that speech_stopped, then writes the final commit, and only then does the VAD's committed
    arrive: it cannot be the answer, so the commit's own is awaited, until the deadline if
    it never comes."""
    tail, script, _, _ = ORDERS["vad_then_item"]
    script = dataclasses.replace(script, ack=ack, defer_vad_commit=True)  # type: ignore[arg-type]
    with trio.fail_after(300):
        async with open_fake_server(vad_transcriber(script)) as server:
            config = make_config(server, turn_detection="server_vad")
            async with client_for(server, config) as client:
                for data in vad_audio(tail):
                    await client.append(data)
                await server.wait_for(
                    lambda: [f.type for f in server.frames_of(0, "out")].count(STOPPED) == 3
                )
                await trio.testing.wait_all_tasks_blocked()
                client.end()
                ended = trio.current_time()
                final = await final_update(client)
    # The last turn's committed went out only after the final commit was read.
    acks = [i for i, f in enumerate(server.frames) if f.direction == "out" and f.type == COMMITTED]
    assert acks[2] > first_index(server, 0, lambda f: f.type == COMMIT)
    assert server.connections[0].answers == [[COMMITTED] if ack == "once" else []]
    assert_whole_transcript(final, "vad_then_item")
    assert trio.current_time() - ended == (0 if ack == "once" else pytest.approx(FINISH_TIMEOUT))


@pytest.mark.parametrize("anyio_backend", [("trio", {})], ids=["realclock"])
async def test_12_real_recording_through_the_engine_finishes_with_every_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's case: ps_librivox_concat.wav through the engine seam to a server-VAD fake
    whose VAD hears four pauses and leaves the last turn open, so the final commit is
    answered with speech_stopped then committed for that turn."""
    monkeypatch.setenv(KEY_ENV, "sk-test")
    pcm = pcm_of(LIBRIVOX)
    script = VadScript(stop="before", level=1000, text="span")
    with trio.fail_after(60):
        async with open_fake_server(vad_transcriber(script), transport="tcp") as server:
            config = make_config(server, turn_detection="server_vad")
            engine = OpenAIRealtimeEngine("openai", config)
            async with engine.session(SessionOptions()) as session:
                for i in range(0, len(pcm), 3200):
                    await session.send_audio(pcm[i : i + 3200])
                await session.end_audio()
                with trio.fail_after(10):  # far less than FINISH_TIMEOUT
                    updates = [u async for u in session.results()]
    assert server.connections[0].answers == [[STOPPED, COMMITTED]]
    final = updates[-1]
    assert final.tentative == ()
    assert len(final.committed) == 5
    assert all(s.text.startswith("speech ") for s in final.committed)
    ends = [s.end for s in final.committed]
    assert ends == sorted(ends) and ends[-1] == pytest.approx(len(pcm) / 32000, abs=0.05)
