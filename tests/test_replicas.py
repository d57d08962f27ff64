"""Two real ``gateway serve`` replicas on one real PostgreSQL, behind the shipped nginx.conf
(tests/replicas.py): what one replica stores, the other reads, serves from cache and corrects;
tenants stay apart across replicas; nginx spreads requests over both and carries on without a
killed one; each replica's /metrics names it.

Each replica's ``store.path`` is its own SQLite file: a replica that ignored ``store.url`` would
share nothing, and these tests would fail (they also check that no SQLite file was made).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from audio_util import GOFORWARD, SHORT
from conftest import collect
from prometheus_client.parser import text_string_to_metric_families
from replicas import WORDS, Replica, Replicas, eventually, run_replicas

from gateway.auth import add_key

pytestmark = pytest.mark.anyio

STREAM = "/v1/transcriptions/stream"
TEXT = " ".join(WORDS)
FIXED = [
    {"start": 0.0, "end": 1.0, "text": "Go"},
    {"start": 1.0, "end": 2.0, "text": "forward."},
]


def upload(path: Path = GOFORWARD) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "audio/wav")}


async def stream(client: httpx.AsyncClient, path: Path = GOFORWARD) -> dict[str, Any]:
    """POST a stream of ``path``; its ``done`` event (after checking it ended well)."""
    async with client.stream("POST", STREAM, files=upload(path)) as response:
        assert response.status_code == 200, await response.aread()
        events = await collect(response)
    kinds = [e.event for e in events]
    assert kinds[-1] == "done" and "error" not in kinds, kinds
    done: dict[str, Any] = events[-1].data
    return done


async def samples(replica: Replica) -> list[Any]:
    """Every sample of the replica's /metrics, parsed (the exposition must be valid)."""
    async with replica.client() as client:
        text = (await client.get("/metrics")).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


async def outcomes(replica: Replica) -> dict[str, float]:
    """The replica's finished streams by outcome code (its gateway_stream_outcomes_total)."""
    counted: Counter[str] = Counter()
    for s in await samples(replica):
        if s.name == "gateway_stream_outcomes_total":
            counted[s.labels["code"]] += s.value
    return dict(counted)


def assert_on_postgresql(tmp_path: Path, cluster: Replicas) -> None:
    for replica in cluster:
        assert not (tmp_path / f"{replica.name}.sqlite3").exists(), "a replica used SQLite"


async def test_written_through_one_read_cached_and_corrected_through_the_other(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(120):
        async with run_replicas(tmp_path, pg_url, nginx=False) as cluster:
            a, b = cluster
            async with a.client() as through_a, b.client() as through_b:
                written = await stream(through_a)
                assert written["cached"] is False and written["text"] == TEXT
                path = f"/v1/transcriptions/{written['id']}"

                read = await through_b.get(path)
                assert read.status_code == 200
                assert read.json()["text"] == TEXT and read.json()["engine"] == "scripted"
                assert read.json()["segments"] == written["segments"]

                # The same audio through B: B's cache hit, no engine session on B.
                hit = await stream(through_b)
                assert hit["cached"] is True and hit["id"] == written["id"]
                assert hit["text"] == TEXT

                put = await through_b.put(f"{path}/corrections", json={"segments": FIXED})
                assert put.status_code == 200 and put.json()["corrected"] is True

                # The correction, read and served from cache through A.
                corrected = (await through_a.get(path)).json()
                assert corrected["corrected"] is True and corrected["text"] == "Go forward."
                again = await stream(through_a)
                assert again["cached"] is True and again["corrected"] is True
                assert again["text"] == "Go forward."
                txt = await through_a.get(path, params={"format": "txt"})
                assert txt.text == "Go forward.\n"
            assert await outcomes(a) == {"OK": 1, "CACHED": 1}
            assert await outcomes(b) == {"CACHED": 1}
            assert_on_postgresql(tmp_path, cluster)


async def test_tenants_stay_apart_across_replicas(tmp_path: Path, pg_url: str) -> None:
    keys_file = tmp_path / "keys.jsonl"
    _, key_x = add_key(keys_file, "tenant-x")
    _, key_y = add_key(keys_file, "tenant-y")
    x = {"authorization": f"Bearer {key_x}"}
    y = {"authorization": f"Bearer {key_y}"}
    sections = {"auth": {"keys_file": str(keys_file)}}
    with trio.fail_after(120):
        async with run_replicas(tmp_path, pg_url, sections=sections, nginx=False) as cluster:
            a, b = cluster
            async with (
                a.client(headers=x) as x_on_a,
                b.client(headers=x) as x_on_b,
                b.client(headers=y) as y_on_b,
                b.client() as nobody_on_b,
            ):
                written = await stream(x_on_a)
                path = f"/v1/transcriptions/{written['id']}"

                # Y, on the other replica: no such transcript, to read or to correct.
                missing = await y_on_b.get(path)
                assert missing.status_code == 404
                assert missing.json()["error"]["code"] == "NOT_FOUND"
                refused = await y_on_b.put(f"{path}/corrections", json={"segments": FIXED})
                assert refused.status_code == 404
                # ...and no cache hit on X's audio: Y's own transcript is made for Y.
                own = await stream(y_on_b)
                assert own["cached"] is False and own["id"] == written["id"]
                corrected = await y_on_b.put(f"{path}/corrections", json={"segments": FIXED})
                assert corrected.status_code == 200
                assert (await nobody_on_b.get(path)).status_code == 401

                # X, on B, still sees X's own, untouched by Y's correction.
                mine = await x_on_b.get(path)
                assert mine.status_code == 200
                assert mine.json()["text"] == TEXT and mine.json()["corrected"] is False
                assert (await stream(x_on_b))["cached"] is True
            assert_on_postgresql(tmp_path, cluster)


@pytest.mark.nginx
async def test_through_nginx_requests_spread_and_everything_is_shared(
    tmp_path: Path, pg_url: str
) -> None:
    with trio.fail_after(120):
        async with run_replicas(tmp_path, pg_url) as cluster, cluster.client() as client:
            a, b = cluster
            # Each replica names itself in every series of its own /metrics.
            for replica in cluster:
                assert {s.labels["replica"] for s in await samples(replica)} == {replica.name}

            ids = [f"spread-{i}" for i in range(10)]
            for request_id in ids:
                r = await client.get("/healthz", headers={"x-request-id": request_id})
                assert r.status_code == 200

            def served_by(replica: Replica) -> set[str]:
                return {e["request_id"] for e in replica.access_log()} & set(ids)

            async def all_logged() -> bool:
                return len(served_by(a) | served_by(b)) == len(ids)

            # Access lines reach each replica's stderr when the response has ended.
            await eventually(all_logged, within=10)
            assert served_by(a) and served_by(b)
            assert not served_by(a) & served_by(b)

            # Written, read, served from cache and corrected through nginx, whichever replica
            # each request reaches.
            written = await stream(client)
            path = f"/v1/transcriptions/{written['id']}"
            for _ in range(4):
                read = await client.get(path)
                assert read.status_code == 200 and read.json()["text"] == TEXT
            assert (await stream(client))["cached"] is True
            put = await client.put(f"{path}/corrections", json={"segments": FIXED})
            assert put.status_code == 200
            for _ in range(4):
                assert (await client.get(path)).json()["text"] == "Go forward."
            served = [await outcomes(replica) for replica in cluster]
            assert sum(o.get("OK", 0) for o in served) == 1
            assert sum(o.get("CACHED", 0) for o in served) == 1
            assert_on_postgresql(tmp_path, cluster)


@pytest.mark.nginx
async def test_nginx_carries_on_without_a_killed_replica(tmp_path: Path, pg_url: str) -> None:
    with trio.fail_after(120):
        async with run_replicas(tmp_path, pg_url) as cluster, cluster.client() as client:
            a, b = cluster
            # Both replicas have served (nginx holds keep-alive connections to each).
            for _ in range(4):
                assert (await client.get("/healthz")).status_code == 200
            await cluster.kill(b)
            # Uploads first: a connection refused by the dead replica is no request sent, so
            # nginx passes even a POST on to the live one (one of the two would reach B).
            first = await stream(client)
            second = await stream(client, SHORT)
            assert first["cached"] is False and second["cached"] is False
            for done in (first, second):
                read = await client.get(f"/v1/transcriptions/{done['id']}")
                assert read.status_code == 200
            assert await outcomes(a) == {"OK": 2}

            # B comes back on its port with the shared store: it serves what A wrote.
            await cluster.start(b)
            async with b.client() as through_b:
                assert (await stream(through_b))["cached"] is True
            assert b"connect() failed" in (cluster.nginx.folder / "error.log").read_bytes()
