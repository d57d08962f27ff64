"""The WhisperLiveKit engine against the fake server, driving Session objects directly.

Most tests run the fake in memory (``MemoryNetwork``) under trio's MockClock with autojump, so
minutes of virtual time take milliseconds and no real I/O races the clock. ``TestLoopback`` runs
the same engine over real 127.0.0.1 sockets on port 0, on the real clock. Every test is guarded by
``fail_after``; nothing sleeps to wait (tests wait on the fake's ``changed`` event instead).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import pytest
import trio
import trio.testing
from fakes.wlk_server import Drop, FakeWlkServer, MemoryNetwork, expected_text, pcm_words, wav_bytes

from gateway.admission import RENUMBER_DELAY
from gateway.config import WhisperLiveKitConfig
from gateway.engines.base import Session, SessionOptions
from gateway.engines.whisperlivekit import FRAME_BYTES, WhisperLiveKitEngine
from gateway.errors import (
    CapacityExhausted,
    CapacityTimeout,
    Timeout,
    UpstreamError,
    UpstreamUnavailable,
)
from gateway.events import EngineUpdate
from gateway.metrics import REGISTRY

pytestmark = pytest.mark.anyio

# 40 words of 0.5 s: 20 s of audio whose transcript is "w1 w2 ... w40".
VALUES = list(range(1, 41))
AUDIO = pcm_words(VALUES)
TEXT = expected_text(VALUES)
# The pipeline sends PCM in 200 ms chunks and encoded uploads in 16 KiB pieces.
CHUNK = 6_400
RAW_CHUNK = 16 * 1024
FRAME_SECONDS = FRAME_BYTES / 32_000


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@asynccontextmanager
async def running(
    *fakes: FakeWlkServer, loopback: bool = False, **settings: Any
) -> AsyncIterator[WhisperLiveKitEngine]:
    """Serve the fakes (in memory, or on 127.0.0.1) and build an engine over all of them."""
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        urls = []
        for i, fake in enumerate(fakes):
            if loopback:
                urls.append(await nursery.start(fake.serve_tcp))
            else:
                urls.append(await nursery.start(fake.serve_memory, network, f"wlk{i}"))
        config = WhisperLiveKitConfig(urls=urls, **settings)
        connector = None if loopback else network.connect
        yield WhisperLiveKitEngine("wlk", config, connector=connector, rng=random.Random(7))
        nursery.cancel_scope.cancel()


async def feed(session: Session, audio: bytes, chunk: int) -> None:
    for i in range(0, len(audio), chunk):
        await session.send_audio(audio[i : i + chunk])
    await session.end_audio()


async def drive(
    session: Session,
    audio: bytes = AUDIO,
    *,
    chunk: int = CHUNK,
    updates: list[EngineUpdate] | None = None,
) -> EngineUpdate:
    """What the pipeline does with a session: a sender task and a receiver; the final update."""
    last: EngineUpdate | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed, session, audio, chunk)
            async for update in session.results():
                last = update
                if updates is not None:
                    updates.append(update)
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(errors) == 1:
            raise errors[0] from None
        raise
    assert last is not None
    return last


async def transcribe(
    engine: WhisperLiveKitEngine, audio: bytes = AUDIO, **kwargs: Any
) -> EngineUpdate:
    async with engine.session(SessionOptions()) as session:
        return await drive(session, audio, **kwargs)


def text_of(update: EngineUpdate) -> str:
    return " ".join(s.text for s in update.committed + update.tentative)


def assert_clean_transcript(update: EngineUpdate, text: str = TEXT) -> None:
    assert update.tentative == ()
    assert text_of(update) == text
    for a, b in pairwise(update.committed):
        assert a.start < a.end <= b.start + 1e-6


def reconnects(reason: str, url: str = "ws://wlk0/asr") -> float:
    value = REGISTRY.get_sample_value(
        "gateway_wlk_reconnects_total", {"engine": "wlk", "upstream": url, "reason": reason}
    )
    return value or 0.0


# -- protocol hygiene ----------------------------------------------------------------------------


async def test_a_session_speaks_the_protocol() -> None:
    fake = FakeWlkServer(speed=2.0)
    with trio.fail_after(120):
        async with running(fake) as engine:
            options = SessionOptions(language="en")
            updates: list[EngineUpdate] = []
            async with engine.session(options) as session:
                assert session.audio_format == "pcm"
                final = await drive(session, updates=updates)
            assert_clean_transcript(final)
            assert final.processed == pytest.approx(20.0)
            # Committed segments only ever grow; partial results arrived before the end.
            for a, b in pairwise(updates):
                assert b.committed[: len(a.committed)] == a.committed
            assert len(updates) > 5
            (conn,) = fake.connections
            assert conn.query == {"mode": "full", "language": "en"}
            assert conn.text_frames == 0
            assert conn.eof
            # 100-500 ms frames; only the last one may be shorter.
            assert all(3_200 <= n <= 16_000 for n in conn.frames[:-1])
            assert conn.client_close_code == 1000
            assert engine.admission.active == 0


async def test_results_are_read_even_when_the_consumer_is_slow() -> None:
    """The reader keeps draining the upstream although nobody reads results() for a while."""
    fake = FakeWlkServer(speed=1.0)
    with trio.fail_after(120):
        async with running(fake, lead_seconds=4.0) as engine:
            async with engine.session(SessionOptions()) as session:
                await feed(session, AUDIO, CHUNK)
                await fake.wait_for(lambda: fake.connections[0].ready_sent)
                updates = [u async for u in session.results()]
            assert len(updates) == 1
            assert_clean_transcript(updates[0])


# -- admission -------------------------------------------------------------------------------------


async def test_cancel_while_queued_frees_the_place() -> None:
    fake = FakeWlkServer(speed=4.0)
    with trio.fail_after(120):
        async with running(fake, max_sessions=1) as engine:
            holder_open = trio.Event()
            release = trio.Event()
            positions: dict[str, list[int]] = {"b": [], "c": []}

            async def holder() -> None:
                async with engine.session(SessionOptions()) as session:
                    holder_open.set()
                    await release.wait()
                    assert_clean_transcript(await drive(session))

            async def waiter(name: str, scope: trio.CancelScope) -> None:
                with scope:
                    options = SessionOptions()
                    async with engine.session(options, positions[name].append) as session:
                        assert_clean_transcript(await drive(session))

            b_scope, c_scope = trio.CancelScope(), trio.CancelScope()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(holder)
                await holder_open.wait()
                nursery.start_soon(waiter, "b", b_scope)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(waiter, "c", c_scope)
                await trio.testing.wait_all_tasks_blocked()
                assert engine.admission.queue_length == 2
                b_scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                # B left the queue at once; C moves up within RENUMBER_DELAY; nobody connected
                # for B.
                assert engine.admission.queue_length == 1
                await trio.sleep(RENUMBER_DELAY)
                await trio.testing.wait_all_tasks_blocked()
                assert positions == {"b": [1], "c": [2, 1]}
                assert len(fake.connections) == 1
                release.set()
            assert len(fake.connections) == 2
            assert engine.admission.active == 0
            assert engine.admission.queue_length == 0


async def test_queue_timeout_is_capacity_timeout() -> None:
    fake = FakeWlkServer(speed=1.0)
    with trio.fail_after(120):
        async with running(fake, max_sessions=1, queue_timeout=5.0) as engine:
            async with engine.session(SessionOptions()):
                start = trio.current_time()
                with pytest.raises(CapacityTimeout):
                    async with engine.session(SessionOptions()):
                        pass
                assert trio.current_time() - start == pytest.approx(5.0)
            assert engine.admission.queue_length == 0


async def test_pool_avoids_a_failing_url_and_probes_it_later() -> None:
    down, up = FakeWlkServer(refuse_all=True), FakeWlkServer(speed=4.0)
    with trio.fail_after(120):
        async with running(down, up, max_sessions=1, backoff_initial=1.0) as engine:
            # The first session is routed to wlk0 (both empty), is refused, and moves to wlk1.
            final = await transcribe(engine)
            assert_clean_transcript(final)
            assert [c.refused for c in down.connections] == [503]
            assert len(up.accepted) == 1
            assert engine.stats()["healthy"] == {"ws://wlk0/asr": 0, "ws://wlk1/asr": 1}
            assert await engine.readiness() is None
            # While wlk0 backs off, new sessions go straight to wlk1.
            await transcribe(engine)
            assert len(down.connections) == 1
            # Later, with wlk1 busy, one session probes wlk0 again, which has recovered.
            down.refuse_all = False
            await trio.sleep(5)
            async with engine.session(SessionOptions()) as busy:
                assert engine.admission.sessions() == {"ws://wlk0/asr": 0, "ws://wlk1/asr": 1}
                assert_clean_transcript(await transcribe(engine))
                assert_clean_transcript(await drive(busy))
            assert len(down.accepted) == 1
            assert engine.stats()["healthy"] == {"ws://wlk0/asr": 1, "ws://wlk1/asr": 1}


async def test_no_reachable_upstream_is_upstream_unavailable() -> None:
    fake = FakeWlkServer(refuse_all=True)
    with trio.fail_after(120):
        async with running(fake, max_attempts=3) as engine:
            with pytest.raises(UpstreamUnavailable, match="gave up after 3"):
                await transcribe(engine)
            assert len(fake.connections) == 3
            assert engine.admission.active == 0
            assert await engine.readiness() is not None


# -- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [1011, 1006, 1012, 1013])
async def test_abnormal_close_mid_stream_resumes_without_loss_or_duplicates(code: int) -> None:
    fake = FakeWlkServer(speed=1.0, drops={1: Drop(at=6.3, code=code)})
    with trio.fail_after(120):
        async with running(fake) as engine:
            before = reconnects(str(code))
            final = await transcribe(engine)
            assert_clean_transcript(final)
            first, second = fake.connections
            assert first.closed_by_server == code
            # Resumed at the end of the last committed line: word 13 (6.0 s) came first.
            committed_words = int(6.0 / 0.5)
            assert second.first_word == committed_words + 1
            assert second.received == pytest.approx(20.0 + 1.0 - committed_words * 0.5)
            assert reconnects(str(code)) == before + 1


async def test_missed_pongs_reconnect() -> None:
    """A server whose event loop hangs (no reads, no pongs) is left and the stream resumes."""
    fake = FakeWlkServer(speed=1.0, stalls={1: 4.0})
    with trio.fail_after(120):
        async with running(fake, ping_interval=2.0, ping_timeout=3.0) as engine:
            final = await transcribe(engine)
            assert_clean_transcript(final)
            assert fake.connections[0].stalled
            assert len(fake.connections) == 2
            assert reconnects("ping_timeout") >= 1


async def test_refused_reconnects_back_off_then_succeed() -> None:
    fake = FakeWlkServer(speed=1.0, drops={1: Drop(at=5.0)}, refuse=[2, 3])
    with trio.fail_after(120):
        async with running(fake, backoff_initial=0.5, backoff_max=10.0) as engine:
            final = await transcribe(engine)
            assert_clean_transcript(final)
            attempts = [c.accepted_at for c in fake.connections[1:]]
            gaps = [b - a for a, b in pairwise(attempts)]
            assert [c.refused for c in fake.connections] == [0, 503, 503, 0]
            # Exponential backoff with jitter: each wait is longer than the one before.
            assert gaps[0] < gaps[1]
            assert 0.5 <= gaps[0] <= 1.0
            assert 1.0 <= gaps[1] <= 2.0


async def test_resume_gives_up_after_max_attempts() -> None:
    fake = FakeWlkServer(speed=1.0, drops={1: Drop(at=5.0)}, refuse=range(2, 10))
    with trio.fail_after(120):
        async with running(fake, max_attempts=3) as engine:
            with pytest.raises(UpstreamError, match="gave up after 3"):
                await transcribe(engine)
            assert len(fake.connections) == 4
            assert engine.admission.active == 0


async def test_repeated_drops_without_progress_give_up() -> None:
    """A server that accepts and drops at once is not retried forever."""
    fake = FakeWlkServer(speed=1.0, drops={i: Drop(at=0.0) for i in range(1, 20)})
    with trio.fail_after(120):
        async with running(fake, max_attempts=4) as engine:
            with pytest.raises((UpstreamError, UpstreamUnavailable)):
                await transcribe(engine)
            assert len(fake.connections) == 4


# -- failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["status", "type"])
async def test_server_error_is_upstream_error_and_not_retried(kind: str) -> None:
    fake = FakeWlkServer(speed=1.0, error_at=5.0, error_kind=kind)
    with trio.fail_after(120):
        async with running(fake) as engine:
            with pytest.raises(UpstreamError, match=r"FFmpeg error|invalid session parameters"):
                await transcribe(engine)
            assert len(fake.connections) == 1
            assert engine.admission.active == 0


async def test_no_ready_to_stop_is_a_timeout() -> None:
    fake = FakeWlkServer(speed=4.0, never_ready=True)
    with trio.fail_after(200):
        async with running(fake, session_timeout=60.0) as engine:
            start = trio.current_time()
            with pytest.raises(Timeout, match="ready_to_stop"):
                await transcribe(engine)
            assert trio.current_time() - start == pytest.approx(60.0, abs=0.06)
            assert fake.connections[0].client_close_code == 1001


async def test_wrong_token_is_refused_once() -> None:
    fake = FakeWlkServer(token="s3cret")
    with trio.fail_after(120):
        async with running(fake, token="wrong") as engine:
            with pytest.raises(UpstreamUnavailable, match="token"):
                await transcribe(engine)
            assert [c.refused for c in fake.connections] == [403]


async def test_token_is_sent_as_a_bearer_header() -> None:
    fake = FakeWlkServer(token="s3cret", speed=4.0)
    with trio.fail_after(120):
        async with running(fake, token="s3cret") as engine:
            assert_clean_transcript(await transcribe(engine))
            assert fake.connections[0].headers["authorization"] == "Bearer s3cret"
            assert "token" not in fake.connections[0].query


# -- pacing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("speed", [1.0, 0.25, 3.0])
async def test_pacing_keeps_the_lead_within_lead_seconds(speed: float) -> None:
    fake = FakeWlkServer(speed=speed)
    lead = 3.0
    with trio.fail_after(600):
        async with running(fake, lead_seconds=lead) as engine:
            start = trio.current_time()
            assert_clean_transcript(await transcribe(engine))
            elapsed = trio.current_time() - start
            assert fake.max_lead <= lead + FRAME_SECONDS + 1e-9
            # ... without starving the server: it worked at its own speed the whole time.
            assert elapsed <= 21.0 / speed + 1.0


async def test_no_wall_clock_floor_for_a_server_that_makes_no_progress() -> None:
    fake = FakeWlkServer(speed=0.0)
    with trio.fail_after(600):
        async with running(fake, lead_seconds=5.0, session_timeout=300.0) as engine:
            with pytest.raises(Timeout):
                await transcribe(engine)
            assert fake.connections[0].received <= 5.0 + FRAME_SECONDS


# -- encoded mode ----------------------------------------------------------------------------------


async def test_encoded_mode_sends_the_upload_as_one_stream() -> None:
    fake = FakeWlkServer(pcm=False, speed=2.0)
    upload = wav_bytes(AUDIO)
    with trio.fail_after(300):
        async with running(fake) as engine:
            async with engine.session(SessionOptions(total_time=20.0)) as session:
                assert session.audio_format == "encoded"
                final = await drive(session, upload, chunk=RAW_CHUNK)
            assert_clean_transcript(final)
            (conn,) = fake.connections
            assert conn.raw_bytes == len(upload)
            assert not conn.undecodable


async def test_encoded_mode_resumes_by_resending_from_the_start() -> None:
    fake = FakeWlkServer(pcm=False, speed=2.0, drops={1: Drop(at=4.0)})
    upload = wav_bytes(AUDIO)
    with trio.fail_after(300):
        async with running(fake) as engine:
            async with engine.session(SessionOptions()) as session:
                final = await drive(session, upload, chunk=RAW_CHUNK)
            assert_clean_transcript(final)
            first, second = fake.connections
            assert first.first_word == second.first_word == 1
            assert second.raw_bytes == len(upload)


# -- real sockets --------------------------------------------------------------------------------------


class TestLoopback:
    """The engine over real 127.0.0.1 sockets, on the real clock."""

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "trio"

    async def test_six_clients_share_two_sessions(self) -> None:
        fake = FakeWlkServer(speed=40.0, tick=0.01)
        values = list(range(1, 9))
        audio, text = pcm_words(values), expected_text(values)
        with trio.fail_after(30):
            async with running(fake, loopback=True, max_sessions=2, max_queue=4) as engine:
                positions: list[list[int]] = [[] for _ in range(6)]
                opened = 0
                ready = trio.Event()
                go = trio.Event()
                texts: list[str] = []

                def check() -> None:
                    if opened == 2 and engine.admission.queue_length == 4:
                        ready.set()

                def queued(i: int, position: int) -> None:
                    positions[i].append(position)
                    check()

                async def client(i: int) -> None:
                    nonlocal opened
                    options = SessionOptions()
                    async with engine.session(options, lambda p: queued(i, p)) as session:
                        opened += 1
                        check()
                        await go.wait()
                        final = await drive(session, audio)
                    texts.append(text_of(final))

                async with trio.open_nursery() as nursery:
                    for i in range(6):
                        nursery.start_soon(client, i)
                    await ready.wait()
                    # The queue is full: a seventh request is refused before anything starts.
                    with pytest.raises(CapacityExhausted):
                        engine.admission.reserve()
                    with pytest.raises(CapacityExhausted) as refused:
                        async with engine.session(SessionOptions()):
                            pass
                    assert refused.value.retry_after is not None
                    go.set()
                assert texts == [text] * 6
                assert fake.peak_active <= 2
                assert engine.admission.peak_sessions == 2
                assert len(fake.accepted) == 6
                waited = [p for p in positions if p]
                assert len(waited) == 4
                for p in waited:
                    assert p == sorted(p, reverse=True)
                    assert p[-1] == 1
                assert engine.admission.active == 0

    async def test_cancel_while_running_closes_the_upstream_within_a_second(self) -> None:
        fake = FakeWlkServer(speed=10.0, tick=0.01)
        with trio.fail_after(10):
            async with running(fake, loopback=True, max_sessions=1) as engine:
                scope = trio.CancelScope()

                async def client() -> None:
                    with scope:
                        async with engine.session(SessionOptions()) as session:
                            await drive(session)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(client)
                    await fake.wait_for(
                        lambda: bool(fake.connections and fake.connections[0].frames)
                    )
                    cancelled_at = trio.current_time()
                    scope.cancel()
                    await fake.wait_for(lambda: fake.connections[0].ended_at is not None)
                    closed_in = trio.current_time() - cancelled_at
                assert closed_in < 1.0
                assert engine.admission.active == 0
                assert fake.connections[0].client_close_code == 1001
                # The slot is free: the next session starts at once.
                values = [5, 6, 7]
                assert text_of(await transcribe(engine, pcm_words(values))) == expected_text(values)

    async def test_resume_over_real_sockets(self) -> None:
        fake = FakeWlkServer(speed=20.0, tick=0.01, drops={1: Drop(at=0.4, code=1006)})
        with trio.fail_after(20):
            async with running(fake, loopback=True, backoff_initial=0.05) as engine:
                final = await transcribe(engine)
                assert_clean_transcript(final)
                assert len(fake.accepted) == 2
                assert fake.connections[1].first_word not in (None, 1)
