"""Shared test harness: the real gateway under hypercorn on trio, on 127.0.0.1 port 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypercorn.trio import serve as hypercorn_serve

sys.path.insert(0, str(Path(__file__).parent))

import pg

from gateway.app import create_app
from gateway.config import Config
from gateway.jobs import GatewayState
from gateway.server import asgi_app, hypercorn_config


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PgServer]:
    """One throwaway PostgreSQL cluster for the session (tests/pg.py); skips without one."""
    with pg.pg_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: pg.PgServer) -> str:
    """A fresh database on the session's PostgreSQL: its URL."""
    return pg_server.create_database()


GATEWAY_CLI = [sys.executable, "-m", "gateway.cli"]


@dataclass
class ServeProcess:
    """A ``gateway serve`` subprocess: its URL and its stderr (the log) read so far."""

    proc: trio.Process
    url: str
    output: bytearray

    async def read_output(self) -> bytes:
        """Read stderr to its end (the process exits or closes it) and return all of it."""
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.receive_some():
            self.output += chunk
        return bytes(self.output)


async def start_serve(
    nursery: trio.Nursery,
    *args: str,
    env: Mapping[str, str] | None = None,
    bind: str = "127.0.0.1:0",
) -> ServeProcess:
    """Start ``gateway serve ARGS --bind BIND`` in ``nursery`` and wait for its URL.

    ``env`` replaces the environment (default: this one, unbuffered). ``bind`` is a free port by
    default; a fixed one lets a test start a gateway again where a proxy expects it."""
    proc: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [*GATEWAY_CLI, "serve", *args, "--bind", bind],
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else {**os.environ, "PYTHONUNBUFFERED": "1"},
            check=False,
        )
    )
    assert proc.stderr is not None
    output = bytearray()
    while (match := re.search(rb"serving on (http://\S+)", output)) is None:
        chunk = await proc.stderr.receive_some()
        assert chunk, bytes(output)
        output += chunk
    return ServeProcess(proc, match.group(1).decode(), output)


@dataclass
class Gateway:
    url: str
    app: Any

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.gateway
        return state

    async def assert_not_stored(self, transcript_id: str, tenant: str = "") -> None:
        """Nothing of a session that ended early was stored: not in the store, not served."""
        assert await self.state.store.get(transcript_id, tenant) is None
        async with httpx.AsyncClient(base_url=self.url) as client:
            missing = await client.get(f"/v1/transcriptions/{transcript_id}")
        assert missing.status_code == 404


def make_config(tmp_path: Path, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "store": {"path": str(tmp_path / "store" / "gateway.sqlite3")},
        "engines": {"embedded": {"kind": "pocketsphinx", "workers": 2}},
    }
    for key, value in sections.items():
        data[key] = value
    return msgspec.convert(data, Config)


@asynccontextmanager
async def run_gateway(
    config: Config, *, wrap: Callable[[Any], Any] | None = None
) -> AsyncIterator[Gateway]:
    """Serve ``config`` as ``gateway serve`` does (proxy fix included) on a free loopback port.

    ``wrap`` puts test middleware (e.g. a scope spy) around the app, inside the proxy fix.
    """
    app = create_app(config)
    stop = trio.Event()
    served = asgi_app(config, wrap(app) if wrap is not None else app)
    async with trio.open_nursery() as nursery:
        urls = await nursery.start(
            lambda task_status: hypercorn_serve(
                served,
                hypercorn_config(config, "127.0.0.1:0"),
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        try:
            yield Gateway(urls[0], app)
        finally:
            stop.set()


@dataclass
class SSE:
    event: str
    data: Any  # parsed JSON, or the comment text for event == "comment"


async def sse_events(response: httpx.Response) -> AsyncIterator[SSE]:
    """Parse a text/event-stream body; comments come out as SSE("comment", text)."""
    event, data = "message", []
    async with aclosing(response.aiter_lines()) as lines:
        async for line in lines:
            if line == "":
                if data:
                    yield SSE(event, json.loads("\n".join(data)))
                event, data = "message", []
            elif line.startswith(":"):
                yield SSE("comment", line[1:].strip())
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())


async def collect(response: httpx.Response) -> list[SSE]:
    return [e async for e in sse_events(response)]


async def wait_until(predicate: Callable[[], bool], poll: float = 0.01) -> None:
    """Poll an observable state until it holds; callers bound the wait with trio.fail_after."""
    while True:
        if predicate():
            return
        await trio.sleep(poll)
