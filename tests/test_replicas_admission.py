"""Cluster-wide admission through real replicas: two ``gateway serve`` processes on one real
PostgreSQL, in front of one fake WhisperLiveKit server that counts its concurrent sessions.

The upstream is capped at one session. Whichever replica a stream reaches, the cap holds, the
second stream queues with a visible position, a replica killed with SIGKILL gives its place
back within the lease bound, and a PostgreSQL restart ends no stream uncleanly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from conftest import SSE, sse_events
from fakes.wlk_server import FakeWlkServer, pcm_words, wav_bytes
from pg import pg_server
from prometheus_client.parser import text_string_to_metric_families
from replicas import Replica, Replicas, eventually, run_replicas

pytestmark = pytest.mark.anyio

HEARTBEAT = 0.25
LEASE_TTL = 2.0
STREAM = "/v1/transcriptions/stream"


def sections(upstream: str) -> dict[str, dict[str, Any]]:
    return {
        "server": {"default_engine": "wlk"},
        "engines": {
            "wlk": {
                "kind": "whisperlivekit",
                "urls": [upstream],
                "max_sessions": 1,
                "max_queue": 4,
                "backoff_initial": 0.1,
            }
        },
        "cluster": {"heartbeat": HEARTBEAT, "lease_ttl": LEASE_TTL},
    }


@asynccontextmanager
async def upstream(speed: float) -> AsyncIterator[tuple[FakeWlkServer, str]]:
    server = FakeWlkServer(speed=speed)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(server.serve_tcp)
        yield server, url
        nursery.cancel_scope.cancel()


def audio(words: int, seed: int) -> bytes:
    return wav_bytes(pcm_words([(seed * 7 + i) % 20 for i in range(words)]))


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, store_url: str
) -> AsyncIterator[tuple[FakeWlkServer, Replicas]]:
    """Two replicas on ``store_url`` before one real-time fake WhisperLiveKit server capped at
    one session."""
    async with (
        upstream(speed=1.0) as (fake, url),
        run_replicas(tmp_path, store_url, sections=sections(url), nginx=False) as cluster,
    ):
        yield fake, cluster


async def hold_then_queue(
    nursery: trio.Nursery, fake: FakeWlkServer, holder: Stream, waiter: Stream
) -> SSE:
    """Start ``holder`` until it runs upstream, then ``waiter``; its first ``queued`` event."""
    nursery.start_soon(holder.run)
    await fake.wait_for(lambda: fake.active == 1)
    nursery.start_soon(waiter.run)
    return await waiter.wait_for("queued")


class Stream:
    """One SSE transcription through a replica, its events kept as they arrive."""

    def __init__(self, replica: Replica, body: bytes) -> None:
        self.replica, self.body = replica, body
        self.events: list[SSE] = []
        self.changed = trio.Event()
        self.error: BaseException | None = None

    def positions(self) -> list[int]:
        return [e.data["position"] for e in self.events if e.event == "queued"]

    def last(self) -> str:
        frames = [e.event for e in self.events if e.event != "comment"]
        return frames[-1] if frames else ""

    async def run(self) -> None:
        try:
            async with (
                self.replica.client(timeout=60) as client,
                client.stream(
                    "POST", STREAM, files={"file": ("a.wav", self.body, "audio/wav")}
                ) as response,
                aclosing(sse_events(response)) as events,
            ):
                assert response.status_code == 200, await response.aread()
                async for event in events:
                    self.events.append(event)
                    self.changed.set()
                    self.changed = trio.Event()
        except (httpx.HTTPError, trio.BrokenResourceError) as exc:
            self.error = exc
        self.changed.set()

    async def wait_for(self, kind: str) -> SSE:
        while True:
            found = next((e for e in self.events if e.event == kind), None)
            if found is not None:
                return found
            if self.error is not None or self.last() in ("done", "error"):
                raise AssertionError(f"no {kind!r} event: {self.events} {self.error!r}")
            await self.changed.wait()


async def test_two_replicas_share_one_upstream_cap_and_one_queue(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(120):
        async with two_replicas(tmp_path, pg_url) as (fake, cluster):
            a, b = cluster
            first, second = Stream(a, audio(6, 1)), Stream(b, audio(4, 2))
            async with trio.open_nursery() as nursery:
                queued = await hold_then_queue(nursery, fake, first, second)
                assert queued.data["position"] == 1
                assert fake.active == 1

                # B runs nothing itself, yet reports the cluster's session and its queue
                # (as of its last check: at most a heartbeat old).
                async def b_sees_the_cluster() -> bool:
                    figures = await engine_figures(b)
                    assert figures["gateway_engine_sessions"] == 0
                    return (
                        figures["gateway_engine_cluster_sessions"] == 1
                        and figures["gateway_engine_cluster_queue_length"] == 1
                    )

                await eventually(b_sees_the_cluster, within=10)
            assert first.last() == "done" and second.last() == "done", (
                first.events,
                second.events,
            )
            assert fake.peak_active == 1
            assert len(fake.accepted) == 2


async def test_a_killed_replica_gives_its_place_back_within_the_lease_bound(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(120):
        async with two_replicas(tmp_path, pg_url) as (fake, cluster):
            a, b = cluster
            holder, waiter = Stream(a, audio(60, 3)), Stream(b, audio(4, 4))
            async with trio.open_nursery() as nursery:
                await hold_then_queue(nursery, fake, holder, waiter)
                killed = trio.current_time()
                await cluster.kill(a)
                await waiter.wait_for("transcription")
                freed_after = trio.current_time() - killed
            assert waiter.last() == "done", waiter.events
            # lease_ttl after the last heartbeat, found at the next check.
            assert freed_after <= LEASE_TTL + 3 * HEARTBEAT + 2.0, freed_after
            assert fake.peak_active == 1
            await check_readiness(cluster)


async def engine_figures(replica: Replica) -> dict[str, float]:
    """The wlk engine's gateway_engine_* gauges on ``replica``'s /metrics, summed over upstreams."""
    async with replica.client() as client:
        text = (await client.get("/metrics")).text
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("gateway_engine_") and sample.labels.get("engine") == "wlk":
                assert sample.labels["replica"] == replica.name
                figures[sample.name] = figures.get(sample.name, 0) + sample.value
    return figures


async def check_readiness(cluster: Replicas) -> None:
    for replica in cluster:
        if not replica.running:
            continue
        async with replica.client() as client:
            ready = (await client.get("/readyz")).json()
        assert ready["admission"]["mode"] == "cluster", ready
        assert ready["admission"]["status"] == "ok", ready


async def test_a_postgresql_restart_mid_stream_ends_cleanly_and_stores_nothing_half_written(
    tmp_path: Path,
) -> None:
    with pg_server() as server, trio.fail_after(180):
        url = server.create_database()
        async with two_replicas(tmp_path, url) as (fake, cluster):
            a, b = cluster
            stream = Stream(a, audio(8, 5))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.run)
                first = await stream.wait_for("transcription")
                server.stop("fast")
                server.start()
            end = stream.last()
            assert end in ("done", "error"), stream.events
            done = next(e for e in stream.events if e.event in ("done", "error"))
            async with a.client() as client:

                async def ready() -> bool:
                    r = await client.get("/readyz")
                    return r.status_code == 200

                await eventually(ready, within=30)
                got = await client.get(f"/v1/transcriptions/{first.data['id']}")
                if end == "done":
                    assert got.status_code == 200
                    assert got.json()["text"] == done.data["text"]
                else:
                    assert got.status_code == 404, got.text
            # Both replicas admit again, and a new stream runs to its end and is stored.
            for replica in (a, b):
                again = Stream(replica, audio(2, 6 if replica is a else 7))
                await again.run()
                assert again.last() == "done", again.events
                final = again.events[-1].data
                async with replica.client() as client:
                    got = await client.get(f"/v1/transcriptions/{final['id']}")
                assert got.status_code == 200 and got.json()["text"] == final["text"]
            assert fake.peak_active == 1
