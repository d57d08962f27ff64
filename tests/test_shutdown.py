"""Graceful shutdown of a real `gateway serve` process on a real SIGTERM, with streams in flight."""

from __future__ import annotations

import itertools
import signal
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest
import trio
from audio_util import GOFORWARD, LIBRIVOX
from conftest import SSE, sse_events, start_serve

pytestmark = pytest.mark.anyio


CONFIG = """
[server]
default_engine = "quick"
keepalive = 0.2
shutdown_grace = {grace}

[store]
path = "{db}"

[engines.quick]
kind = "scripted"
words = ["go", "forward"]
delay = 1.0

[engines.slow]
kind = "scripted"
words = ["never", "finished"]
delay = 2.0
"""


def upload(path: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "audio/wav")}


async def wait_unready(client: httpx.AsyncClient) -> None:
    """Poll /readyz until it reports 503 (an HTTP endpoint has no event to wait on)."""
    for _ in itertools.count():
        if (await client.get("/readyz")).status_code == 503:
            return
        await trio.sleep(0.01)


async def drain_output(stream: trio.abc.ReceiveStream) -> None:
    # Echoed, so that pytest shows the server's log when a test fails.
    while chunk := await stream.receive_some():
        sys.stdout.write(chunk.decode(errors="replace"))


async def test_sigterm_drains_then_stops_streams_with_shutting_down(tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG.format(grace=10.0, db=db))
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            gateway = await start_serve(nursery, "--config", str(config))
            proc, url = gateway.proc, gateway.url
            assert proc.stderr is not None
            nursery.start_soon(drain_output, proc.stderr)
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                assert (await c.get("/readyz")).status_code == 200
                results: dict[str, list[SSE]] = {}
                first_event = {name: trio.Event() for name in ("quick", "slow")}
                blocking: list[httpx.Response] = []

                async def stream(name: str, path: Path) -> None:
                    async with c.stream(
                        "POST",
                        "/v1/transcriptions/stream",
                        params={"engine": name},
                        files=upload(path),
                    ) as r:
                        assert r.status_code == 200
                        events = results.setdefault(name, [])
                        async for event in sse_events(r):
                            if event.event != "comment":
                                events.append(event)
                                first_event[name].set()

                async def blocking_slow() -> None:
                    blocking.append(
                        await c.post(
                            "/v1/transcriptions",
                            params={"engine": "slow", "use_cache": "false"},
                            files=upload(LIBRIVOX),
                        )
                    )

                async with trio.open_nursery() as clients:
                    clients.start_soon(stream, "quick", GOFORWARD)
                    clients.start_soon(stream, "slow", LIBRIVOX)
                    clients.start_soon(blocking_slow)
                    for started in first_event.values():
                        await started.wait()
                    # Both streams are in flight: the signal arrives now.
                    proc.send_signal(signal.SIGTERM)
                    await wait_unready(c)
                    ready = (await c.get("/readyz")).json()
                    assert ready["reasons"] == ["shutting down"]
                    refused = await c.post("/v1/transcriptions/stream", files=upload(GOFORWARD))
                    assert refused.status_code == 503
                    assert refused.json()["error"]["code"] == "SHUTTING_DOWN"
                    assert "retry-after" in refused.headers
                    # In-flight work still runs while the gateway drains.
                    assert not results["slow"] or results["slow"][-1].event == "transcription"
            assert await proc.wait() == 0

    quick, slow = results["quick"], results["slow"]
    assert quick[-1].event == "done" and quick[-1].data["text"] == "go forward"
    assert [e.event for e in slow if e.event != "transcription"] == ["error"]
    assert slow[-1].data["code"] == "SHUTTING_DOWN"
    assert blocking[0].status_code == 503
    assert blocking[0].json()["error"]["code"] == "SHUTTING_DOWN"

    # The database was closed cleanly: intact, checkpointed, and only the finished transcript
    # is in it (the stopped ones left no row, partial or not).
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT id, engine, text FROM transcripts").fetchall()
    finally:
        conn.close()
    assert rows == [(quick[-1].data["id"], "quick", "go forward")]


async def test_a_second_signal_cuts_the_grace_short(tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    config = tmp_path / "gateway.toml"
    # A grace far longer than the hang guard: only the second signal can end the stream in time.
    config.write_text(CONFIG.format(grace=3600.0, db=db))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            gateway = await start_serve(nursery, "--config", str(config))
            proc, url = gateway.proc, gateway.url
            assert proc.stderr is not None
            nursery.start_soon(drain_output, proc.stderr)
            events: list[SSE] = []
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                async with c.stream(
                    "POST",
                    "/v1/transcriptions/stream",
                    params={"engine": "slow"},
                    files=upload(LIBRIVOX),
                ) as r:
                    signalled = False
                    async for event in sse_events(r):
                        events.append(event)
                        if event.event == "transcription" and not signalled:
                            signalled = True
                            proc.send_signal(signal.SIGTERM)
                            await wait_unready(c)
                            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 0
    assert events[-1].event == "error" and events[-1].data["code"] == "SHUTTING_DOWN"
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("SELECT count(*) FROM transcripts").fetchone()[0] == 0
    finally:
        conn.close()
