"""Admission as one rule for every engine and every front (issue 13, 2 and 7.7).

A request either holds a place (running or queued) before its 200, or is refused before the
stream with 503 CAPACITY_EXHAUSTED and Retry-After: never a 200 followed by an error event, and
never a 503 without Retry-After. Real gateways on loopback, real WAV uploads.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from audio_util import write_wav
from conftest import SSE, make_config, run_gateway, sse_events, wait_until
from fakes.openai_server import FakeConnection, open_fake_server

from gateway.admission import Lease
from gateway.engines.base import PCM_BYTES_PER_SECOND, Engine, Session, SessionOptions
from gateway.engines.scripted import ScriptedEngine
from gateway.events import EngineUpdate, Segment

pytestmark = pytest.mark.anyio

KEY_ENV = "ASR_GATEWAY_TEST_CAPACITY_KEY"


def wav(tmp_path: Path, i: int) -> bytes:
    """Half a second of silence, a distinct file per ``i`` (no request is another's cache hit)."""
    return write_wav(tmp_path / f"{i}.wav", bytes(PCM_BYTES_PER_SECOND // 2 + 2 * i)).read_bytes()


@dataclass(frozen=True)
class Route:
    path: str
    streaming: bool
    fields: dict[str, str]
    # The error code a refusal carries in this front's error body.
    refused: str

    def code(self, response: httpx.Response) -> str:
        body = response.json()
        error = body.get("error", body)
        code: str = error["code"]
        return code


ROUTES = {
    "native-stream": Route("/v1/transcriptions/stream", True, {}, "CAPACITY_EXHAUSTED"),
    "native": Route("/v1/transcriptions", False, {}, "CAPACITY_EXHAUSTED"),
    "openai-stream": Route(
        "/v1/audio/transcriptions",
        True,
        {"model": "whisper-1", "stream": "true"},
        "capacity_exhausted",
    ),
    "openai": Route(
        "/v1/audio/transcriptions", False, {"model": "whisper-1"}, "capacity_exhausted"
    ),
    "aymurai-stream": Route("/asr/transcribe/stream", True, {}, "UPSTREAM_SERVICE_ERROR"),
    "aymurai": Route("/asr/transcribe", False, {}, "UPSTREAM_SERVICE_ERROR"),
}


def ended_well(events: list[SSE]) -> bool:
    """The stream ended with its front's done event and carried no error event."""
    frames = [e for e in events if e.event != "comment"]
    if any(
        e.event == "error" or (isinstance(e.data, dict) and e.data.get("type") == "error")
        for e in frames
    ):
        return False
    last = frames[-1] if frames else None
    return last is not None and (
        last.event == "done" or last.data.get("type") == "transcript.text.done"
    )


def positions(events: list[SSE]) -> list[int]:
    """Queue positions, as the native ``queued`` event or the other fronts' ``: queued N``."""
    out = []
    for e in events:
        if e.event == "queued":
            out.append(e.data["position"])
        elif e.event == "comment" and str(e.data).startswith("queued "):
            out.append(int(e.data.split()[1]))
    return out


class Decided:
    """Holds every admitted request before its stream until all ``total`` were decided.

    Installed as the engine's readiness check, which runs after the capacity decision and
    before the response starts: once the refused requests have their answers and the others
    wait here, no session has started yet, so none can end and make room for a latecomer. A
    check that is not atomic with the enqueue lets every request through to here instead."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.waiting = 0
        self.answered = 0
        self.go = trio.Event()

    def _check(self) -> None:
        if self.waiting + self.answered == self.total:
            self.go.set()

    async def readiness(self) -> str | None:
        self.waiting += 1
        self._check()
        await self.go.wait()
        return None

    def refused(self) -> None:
        self.answered += 1
        self._check()


class Placed:
    """Holds sessions from opening until ``total`` queued clients have read their first place."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.all = trio.Event()
        if total == 0:
            self.all.set()

    def one(self) -> None:
        self.count += 1
        if self.count == self.total:
            self.all.set()

    def gate(
        self, open_session: Callable[[SessionOptions, Lease], AbstractAsyncContextManager[Session]]
    ) -> Callable[[SessionOptions, Lease], AbstractAsyncContextManager[Session]]:
        @asynccontextmanager
        async def gated(options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
            await self.all.wait()
            async with open_session(options, lease) as session:
                yield session

        return gated


@pytest.mark.parametrize("route", list(ROUTES.values()), ids=list(ROUTES))
async def test_25_at_once_are_7_places_and_18_refusals_with_retry_after(
    tmp_path: Path, route: Route, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_config(
        tmp_path,
        server={"default_engine": "one"},
        engines={"one": {"kind": "scripted", "words": ["a"], "max_sessions": 2, "max_queue": 5}},
    )
    bodies = [wav(tmp_path, i) for i in range(25)]
    decided = Decided(25)
    statuses: list[int] = []
    refusals: list[httpx.Response] = []
    streams: list[list[SSE]] = []
    answers: list[httpx.Response] = []
    with trio.fail_after(60):
        async with (
            run_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            engine = gw.state.engines["one"]
            assert isinstance(engine, ScriptedEngine)
            monkeypatch.setattr(engine, "readiness", decided.readiness)
            # Queue events are conflated for a slow reader, so a place a client has not read
            # yet may be overwritten by the next one. The two running sessions wait until
            # each of the five queued clients has read its first place.
            placed = Placed(5 if route.streaming else 0)
            monkeypatch.setattr(engine, "open_session", placed.gate(engine.open_session))

            async def one(body: bytes) -> None:
                files = {"file": ("a.wav", body, "audio/wav")}
                async with c.stream("POST", route.path, data=route.fields, files=files) as r:
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        await r.aread()
                        refusals.append(r)
                        decided.refused()
                    elif route.streaming:
                        seen: list[SSE] = []
                        async with aclosing(sse_events(r)) as events:
                            async for e in events:
                                if positions([e]) and not positions(seen):
                                    placed.one()
                                seen.append(e)
                        streams.append(seen)
                    else:
                        await r.aread()
                        answers.append(r)

            async with trio.open_nursery() as nursery:
                for body in bodies:
                    nursery.start_soon(one, body)
            await gw.state.wait_idle()
            assert engine.admission.active == 0 and engine.admission.queue_length == 0
            assert engine.admission.peak_sessions == 2
    assert sorted(statuses) == [200] * 7 + [503] * 18
    for r in refusals:
        assert route.code(r) == route.refused
        assert int(r.headers["retry-after"]) >= 1
    if route.streaming:
        assert all(ended_well(events) for events in streams)
        # Two ran at once; the five queued ones were told their places, and they moved up.
        queued = [positions(events) for events in streams]
        assert sum(1 for p in queued if not p) == 2
        assert sorted(p[0] for p in queued if p) == [1, 2, 3, 4, 5]
        assert all(p == sorted(p, reverse=True) and p[-1] == 1 for p in queued if p)
    else:
        assert all(r.status_code == 200 and "a" in r.text for r in answers)


# -- the OpenAI Realtime engine: no per-engine hook to forget -------------------------------------


async def test_openai_realtime_full_queue_is_a_503_before_the_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    connected = trio.Event()

    async def hold(conn: FakeConnection) -> None:
        await conn.handshake()
        connected.set()
        await trio.sleep_forever()

    with trio.fail_after(60):
        async with open_fake_server(hold, transport="tcp") as server:
            config = make_config(
                tmp_path,
                server={"default_engine": "rt"},
                engines={
                    "rt": {
                        "kind": "openai-realtime",
                        "url": server.url,
                        "api_key_env": KEY_ENV,
                        "turn_detection": "none",
                        "max_sessions": 1,
                        "max_queue": 1,
                    }
                },
            )
            async with (
                run_gateway(config) as gw,
                httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
            ):
                engine = gw.state.engines["rt"]
                queued = trio.Event()
                seen: list[list[SSE]] = [[], []]

                async def stream(i: int) -> None:
                    files = {"file": ("a.wav", wav(tmp_path, i), "audio/wav")}
                    async with c.stream("POST", "/v1/transcriptions/stream", files=files) as r:
                        assert r.status_code == 200
                        async with aclosing(sse_events(r)) as events:
                            async for e in events:
                                seen[i].append(e)
                                queued.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream, 0)
                    await connected.wait()
                    nursery.start_soon(stream, 1)
                    await queued.wait()
                    assert seen == [[], [SSE("queued", {"position": 1})]]
                    for path, fields in [
                        ("/v1/transcriptions/stream", {}),
                        ("/v1/transcriptions", {}),
                        ("/v1/audio/transcriptions", {"model": "whisper-1", "stream": "true"}),
                    ]:
                        files = {"file": ("a.wav", wav(tmp_path, 2), "audio/wav")}
                        full = await c.post(path, data=fields, files=files)
                        assert full.status_code == 503, full.text
                        assert full.headers["content-type"] == "application/json"
                        assert "capacity_exhausted" in full.text.lower()
                        assert int(full.headers["retry-after"]) >= 1
                    assert engine.admission.active == 1 and engine.admission.queue_length == 1
                    nursery.cancel_scope.cancel()
                await gw.state.wait_idle()
                assert engine.admission.active == 0 and engine.admission.queue_length == 0


# -- a new engine writes no admission code ------------------------------------------------------


@dataclass(frozen=True)
class EchoConfig:
    max_queue: int = 1
    queue_timeout: float = 60.0


class _EchoSession(Session):
    def __init__(self, engine: Echo) -> None:
        self._engine = engine
        self._received = 0
        self._ended = trio.Event()

    async def send_audio(self, chunk: bytes) -> None:
        self._received += len(chunk)

    async def end_audio(self) -> None:
        self._ended.set()

    async def results(self) -> AsyncIterator[EngineUpdate]:
        await self._ended.wait()
        await self._engine.gate.wait()
        seconds = self._received / PCM_BYTES_PER_SECOND
        yield EngineUpdate(committed=(Segment(0.0, seconds, "echo"),), processed=seconds)


class Echo(Engine):
    """A new engine as its author would write it: a session, and nothing about admission."""

    kind = "echo"

    def __init__(self, name: str, config: EchoConfig | None = None, sessions: int = 0) -> None:
        super().__init__(name, config, sessions=sessions)
        self.gate = trio.Event()
        self.gate.set()
        self.leases: list[Lease] = []
        self.opened = trio.Event()

    @asynccontextmanager
    async def open_session(self, options: SessionOptions, lease: Lease) -> AsyncIterator[Session]:
        self.leases.append(lease)
        self.opened.set()
        yield _EchoSession(self)


async def test_a_new_engine_gets_admission_without_writing_any(tmp_path: Path) -> None:
    engine = Echo("echo", EchoConfig(max_queue=1), sessions=1)
    engine.gate = trio.Event()
    config = make_config(tmp_path)
    with trio.fail_after(60):
        async with (
            run_gateway(config) as gw,
            httpx.AsyncClient(base_url=gw.url, timeout=30) as c,
        ):
            gw.state.engines["echo"] = engine
            params = {"engine": "echo"}

            def files(i: int) -> dict[str, Any]:
                return {"file": ("a.wav", wav(tmp_path, i), "audio/wav")}

            # Bad audio is refused before the stream; the place it reserved is given back.
            garbage = {"file": ("a.wav", os.urandom(4096), "audio/wav")}
            bad = await c.post("/v1/transcriptions/stream", params=params, files=garbage)
            assert bad.status_code == 415
            assert engine.admission.active == 0 and engine.admission.queue_length == 0

            results: dict[int, list[SSE]] = {}

            async def stream(i: int, first: trio.Event, scope: trio.CancelScope) -> None:
                with scope:
                    async with c.stream(
                        "POST", "/v1/transcriptions/stream", params=params, files=files(i)
                    ) as r:
                        assert r.status_code == 200
                        results[i] = []
                        async with aclosing(sse_events(r)) as events:
                            async for e in events:
                                results[i].append(e)
                                first.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, 0, trio.Event(), trio.CancelScope())
                await engine.opened.wait()
                # The second waits in the queue, told its place; a third finds it full.
                leaving, queued = trio.CancelScope(), trio.Event()
                nursery.start_soon(stream, 1, queued, leaving)
                await queued.wait()
                assert [e.event for e in results[1]] == ["queued"]
                full = await c.post("/v1/transcriptions", params=params, files=files(2))
                assert full.status_code == 503
                assert full.json()["error"]["code"] == "CAPACITY_EXHAUSTED"
                assert int(full.headers["retry-after"]) >= 1
                # A queued client that leaves gives its place back; the next one queues.
                leaving.cancel()
                await wait_until(lambda: engine.admission.queue_length == 0)
                queued = trio.Event()
                nursery.start_soon(stream, 3, queued, trio.CancelScope())
                await queued.wait()
                assert results[3][0].data == {"position": 1}
                engine.gate.set()
            await gw.state.wait_idle()
    assert results[0][-1].event == "done" and results[0][-1].data["text"] == "echo"
    assert results[3][-1].event == "done"
    # Sessions ran one at a time, each on a lease of the engine's own pool; all were given back.
    assert [lease.key for lease in engine.leases] == ["echo", "echo"]
    assert engine.admission.peak_sessions == 1
    assert engine.admission.active == 0 and engine.admission.queue_length == 0


async def test_an_engine_with_no_limits_admits_everyone_at_once() -> None:
    engine = Echo("plain")
    with trio.fail_after(10):
        tickets = [engine.admission.reserve() for _ in range(1000)]
        assert all(t.lease is not None for t in tickets)
        assert engine.admission.active == 1000 and engine.admission.queue_length == 0
        for t in tickets:
            await t.release()
        assert engine.admission.active == 0
