"""The audio-source seam: a job runs the same pipeline whatever feeds its audio.

A source written here, PCM held in memory with a random id (as a live stream will have), goes
through the same job preparation and pipeline as an upload: admission and its queue, the engine
session, the store, the final ``done``.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio
from audio_util import GOFORWARD, pcm_of
from conftest import make_config

from gateway.config import ScriptedConfig
from gateway.engines.scripted import ScriptedEngine
from gateway.errors import DecodeError
from gateway.events import Done, Queued, StreamEvent
from gateway.jobs import GatewayState, JobOptions, prepare_job
from gateway.pipeline import KEEPALIVE, Outbox, attend
from gateway.sources import AudioSource, Send
from gateway.store import Store, open_store

pytestmark = pytest.mark.anyio

# What the scripted engine hears in the recording: one word per half second.
WORDS = ["go", "forward", "ten", "meters", "now", "please"]


class MemorySource:
    """PCM already in memory, fed in pieces of ``piece`` bytes; records what the pipeline asks."""

    def __init__(self, pcm: bytes, *, piece: int = 3000, readable: bool = True) -> None:
        self.pcm = pcm
        self.piece = piece
        self.readable = readable
        self.calls: list[str] = []
        self._id = secrets.token_hex(16)

    @property
    def id(self) -> str:
        return self._id

    @property
    def content_type(self) -> str:
        return "audio/L16"

    @property
    def filename(self) -> str:
        return ""

    @property
    def duration(self) -> float | None:
        return None

    @property
    def errors(self) -> int:
        return 2

    async def open(self) -> None:
        self.calls.append("open")
        if not self.readable:
            raise DecodeError("nothing to decode")

    def suspend(self) -> None:
        self.calls.append("suspend")

    async def feed(self, send: Send, *, encoded: bool) -> float | None:
        assert not encoded
        self.calls.append("feed")
        for i in range(0, len(self.pcm), self.piece):
            await send(self.pcm[i : i + self.piece])
        return round(len(self.pcm) / 32_000, 3)

    async def aclose(self) -> None:
        self.calls.append("aclose")


def _state(tmp_path: Path, store: Store, engine: ScriptedEngine) -> GatewayState:
    config = make_config(
        tmp_path, engines={"s": {"kind": "scripted"}}, server={"default_engine": "s"}
    )
    state = GatewayState(config, store)
    state.engines["s"] = engine
    return state


async def _events(outbox: Outbox, into: list[StreamEvent]) -> None:
    while not outbox.finished:
        event = await outbox.get()
        assert event is not KEEPALIVE
        into.append(event)  # type: ignore[arg-type]


async def _forever(outbox: Outbox) -> None:
    await trio.sleep_forever()


async def test_a_new_source_runs_through_the_one_pipeline_queue_and_store(tmp_path: Path) -> None:
    engine = ScriptedEngine("s", ScriptedConfig(words=WORDS, seconds_per_word=0.5, max_sessions=1))
    pcm = pcm_of(GOFORWARD)
    # Any object with the protocol's members is a source: no base class, no registration.
    sources: list[AudioSource] = [MemorySource(pcm), MemorySource(pcm, piece=7001)]
    events: list[list[StreamEvent]] = [[], []]
    with trio.fail_after(30):
        async with open_store(str(tmp_path / "db.sqlite3")) as store:
            state = _state(tmp_path, store, engine)
            jobs = [
                await prepare_job(state, source, JobOptions(engine=engine, use_cache=False))
                for source in sources
            ]
            assert state.active_jobs == 2
            results: list[Done | object] = [None, None]

            async def run(i: int) -> None:
                results[i] = await attend(jobs[i], lambda outbox: _events(outbox, events[i]))

            async with trio.open_nursery() as nursery:
                for i in range(2):
                    nursery.start_soon(run, i)
            for i, source in enumerate(sources):
                done = results[i]
                assert isinstance(done, Done), done
                t = done.transcript
                assert t.id == source.id
                assert t.text == " ".join(WORDS)
                # The length the source reported after feeding, and its damaged parts.
                assert t.total_time == t.current_time == round(len(pcm) / 32_000, 3)
                assert done.audio_errors == 2
                assert events[i][-1] is done
                stored = await store.get(source.id, "")
                assert stored is not None and stored.transcript().text == t.text
            # One engine place: the second job waited in the queue, its source suspended.
            assert [s.calls for s in sources] == [  # type: ignore[attr-defined]
                ["open", "feed", "aclose"],
                ["open", "suspend", "feed", "aclose"],
            ]
            assert Queued(1) in events[1]
            assert state.active_jobs == 0
            assert engine.opened == engine.closed == 2


async def test_a_source_that_cannot_be_read_is_refused_before_the_stream(tmp_path: Path) -> None:
    engine = ScriptedEngine("s", ScriptedConfig(words=WORDS, max_sessions=1, max_queue=0))
    with trio.fail_after(30):
        async with open_store(str(tmp_path / "db.sqlite3")) as store:
            state = _state(tmp_path, store, engine)
            bad = MemorySource(b"", readable=False)
            with pytest.raises(DecodeError):
                await prepare_job(state, bad, JobOptions(engine=engine))
            assert bad.calls == ["open", "aclose"]
            # Its tenant slot and its admission place (the only one: no queue) were given back.
            assert state.tenant_streams.active == {}
            assert state.active_jobs == 0
            good = MemorySource(pcm_of(GOFORWARD))
            job = await prepare_job(state, good, JobOptions(engine=engine))
            done = await attend(job, _forever, ends_with_job=True)
            assert isinstance(done, Done) and done.transcript.id == good.id
            assert good.calls == ["open", "feed", "aclose"]
