"""Several real ``gateway serve`` replicas on one PostgreSQL, behind the shipped nginx.conf.

Each replica is a subprocess (:func:`conftest.start_serve`) on its own loopback port, all started
from one TOML file (``store.url`` on the test's PostgreSQL database); only the replica's name
differs, given as ``GATEWAY_CLUSTER_REPLICA`` in its environment. nginx (tests/nginx_proxy.py)
runs the shipped config with every replica as an upstream server. A replica can be killed with
SIGKILL (or stopped with SIGTERM) and started again on the same port, where nginx expects it.

API::

    async with run_replicas(tmp_path, pg_url, count=2, sections={...}) as cluster:
        a, b = cluster                  # Replica objects, named "replica-a", "replica-b", ...
        a.url                           # http://127.0.0.1:<port>, the same across restarts
        async with a.client() as c:     # httpx client straight to that replica (any httpx
            ...                         # AsyncClient keyword: timeout=, headers=, ...)
        async with cluster.client() as c:   # httpx client of nginx (https, h2; http2=False)
            ...
        cluster.nginx.folder / "access.log" # nginx's logs (cluster.nginx is None: nginx=False)
        await cluster.kill(a)           # SIGKILL; returns once the process is gone
        await cluster.start(a)          # again on a.url; returns once /readyz answers 200
        await cluster.stop(b)           # SIGTERM (graceful drain); returns its exit code
        a.running                       # False between kill/stop and start
        a.process                       # the current run's trio.Process (pid, returncode)
        a.log                           # all its stderr so far (JSON log lines), every run
        a.access_log()                  # its gateway.access records (dicts), every run
        await eventually(check, within=10)  # poll an async check of another process

``sections`` is merged over the defaults below, one section at a time (``engines`` is replaced
whole, so name its default engine in ``server.default_engine``): e.g. a WhisperLiveKit engine on
a fake upstream, ``cluster.heartbeat``/``lease_ttl``, ``auth.keys_file``. Values are TOML
scalars or lists; a nested mapping is a sub-table. The default engine is ``scripted``: every
upload says :data:`WORDS` ("shared across replicas").

Bounds: every wait here is bounded (start-up 60 s, readiness 30 s); a test adds its own
``trio.fail_after`` around the whole.
"""

from __future__ import annotations

import json
import os
import signal
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from conftest import ServeProcess, start_serve
from nginx_proxy import Nginx, run_nginx

__all__ = ["WORDS", "Replica", "Replicas", "eventually", "run_replicas", "toml_text"]

# What the default scripted engine says, for every upload.
WORDS = ["shared", "across", "replicas"]

START_TIMEOUT = 60.0
READY_TIMEOUT = 30.0


def _defaults(tmp_path: Path, store_url: str) -> dict[str, dict[str, Any]]:
    return {
        "server": {
            "default_engine": "scripted",
            "keepalive": 0.5,
            "shutdown_grace": 0.5,
            # nginx is the one proxy hop (as the shipped config pairs it).
            "trusted_hops": 1,
            # Shared by the replicas, as it may be: each sweeps only files no live gateway locks.
            "spool_dir": str(tmp_path / "spool"),
        },
        # store.path (unused with a url) is each replica's own (GATEWAY_STORE_PATH): a replica
        # that ignored store.url would share nothing, and the cross-replica tests would say so.
        "store": {"url": store_url, "pool_size": 2},
        "engines": {"scripted": {"kind": "scripted", "words": WORDS}},
        "log": {"format": "json", "level": "info"},
    }


def toml_text(data: Mapping[str, Mapping[str, Any]]) -> str:
    """``{"section": {"key": value}}`` as TOML. JSON's scalars and lists are TOML's too (strings,
    numbers, booleans); a mapping inside a section is a sub-table ``[section.key]``."""
    lines: list[str] = []

    def table(name: str, values: Mapping[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = [(key, value) for key, value in values.items() if isinstance(value, Mapping)]
        for key, value in values.items():
            if not isinstance(value, Mapping):
                lines.append(f"{key} = {json.dumps(value)}")
        for key, value in nested:
            table(f"{name}.{key}", value)

    for name, values in data.items():
        table(name, values)
    return "\n".join(lines) + "\n"


@dataclass
class Replica:
    """One ``gateway serve`` process: a fixed name and port, any number of runs."""

    name: str
    runs: list[ServeProcess] = field(default_factory=list)
    port: int = 0
    running: bool = False
    # Set when the current run's stderr has been read to its end (the process is gone).
    log_ended: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def process(self) -> trio.Process:
        return self.runs[-1].proc

    @property
    def log(self) -> bytes:
        return b"".join(bytes(run.output) for run in self.runs)

    def access_log(self) -> list[dict[str, Any]]:
        """The ``request`` record of each access line it logged so far (all runs)."""
        records = []
        for line in self.log.splitlines():
            if line.startswith(b"{"):
                entry = json.loads(line)
                if entry.get("logger") == "gateway.access":
                    records.append(entry["request"])
        return records

    def client(self, **kw: Any) -> httpx.AsyncClient:
        """An httpx client of this replica (30 s timeouts unless ``timeout`` is given)."""
        return httpx.AsyncClient(**{"base_url": self.url, "timeout": 30.0, **kw})


@dataclass
class Replicas:
    """The running replicas (iterable, indexable) and nginx in front of them."""

    replicas: list[Replica]
    config_path: Path
    nginx: Nginx | None
    _nursery: trio.Nursery

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    def __len__(self) -> int:
        return len(self.replicas)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        """A client of nginx (https, h2 by default: see :meth:`Nginx.client`)."""
        assert self.nginx is not None, "run_replicas(..., nginx=False)"
        return self.nginx.client(**kw)

    async def start(self, replica: Replica) -> None:
        """Start ``replica`` (again: on its port) and wait until its /readyz says 200."""
        assert not replica.running, f"{replica.name} is running"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "GATEWAY_CLUSTER_REPLICA": replica.name,
            "GATEWAY_STORE_PATH": str(self.config_path.parent / f"{replica.name}.sqlite3"),
        }
        bind = f"127.0.0.1:{replica.port}"
        with trio.fail_after(START_TIMEOUT):
            run = await start_serve(
                self._nursery, "--config", str(self.config_path), env=env, bind=bind
            )
        # Read its log all along: a full stderr pipe would block the gateway.
        replica.log_ended = trio.Event()
        self._nursery.start_soon(_read_log, run, replica.log_ended)
        replica.runs.append(run)
        replica.port = int(run.url.rsplit(":", 1)[1])
        replica.running = True

        async def ready() -> bool:
            async with replica.client() as client:
                try:
                    return (await client.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

        await eventually(ready, within=READY_TIMEOUT)

    async def kill(self, replica: Replica) -> None:
        """SIGKILL: no drain, no goodbye to PostgreSQL. Returns once the process is gone."""
        replica.process.kill()
        await replica.process.wait()
        replica.running = False

    async def stop(self, replica: Replica) -> int:
        """SIGTERM: the graceful drain. Returns the exit code once the process is gone."""
        replica.process.send_signal(signal.SIGTERM)
        code = await replica.process.wait()
        replica.running = False
        return code


async def _read_log(run: ServeProcess, ended: trio.Event) -> None:
    await run.read_output()
    ended.set()


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float) -> None:
    """Poll ``check`` (state of another process, which offers no event to wait on) until it is
    true; TooSlowError after ``within`` seconds."""
    with trio.fail_after(within):
        while not await check():  # noqa: ASYNC110
            await trio.sleep(0.02)


@asynccontextmanager
async def run_replicas(
    tmp_path: Path,
    store_url: str,
    *,
    count: int = 2,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
    nginx: bool = True,
) -> AsyncIterator[Replicas]:
    """``count`` replicas on ``store_url`` (started at once, each ready), and nginx in front of
    them unless ``nginx=False``. At exit nginx stops, then the replicas (SIGTERM)."""
    config = _defaults(tmp_path, store_url)
    for name, values in (sections or {}).items():
        config[name] = dict(values) if name == "engines" else {**config.get(name, {}), **values}
    (tmp_path / "spool").mkdir(exist_ok=True)
    config_path = tmp_path / "replicas.toml"
    config_path.write_text(toml_text(config))
    names = [f"replica-{letter}" for letter in string.ascii_lowercase[:count]]
    async with trio.open_nursery() as nursery:
        cluster = Replicas([Replica(name) for name in names], config_path, None, nursery)
        try:
            async with trio.open_nursery() as starting:
                for replica in cluster:
                    starting.start_soon(cluster.start, replica)
            if nginx:
                async with run_nginx(tmp_path, *(r.url for r in cluster)) as proxy:
                    cluster.nginx = proxy
                    yield cluster
            else:
                yield cluster
        finally:
            # SIGTERM, then the rest of each log read to its end (shielded: the test may be
            # ending by a cancellation). Past the bound, cancelling the nursery makes
            # trio.run_process send SIGTERM again, then SIGKILL after 5 s.
            with trio.move_on_after(15, shield=True):
                for replica in cluster:
                    if replica.running:
                        replica.process.terminate()
                for replica in cluster:
                    if replica.runs:
                        await replica.log_ended.wait()
            nursery.cancel_scope.cancel()
            # Captured by pytest, and shown when the test fails: what each replica logged.
            for replica in cluster:
                print(f"--- {replica.name} ({replica.url}) ---")
                print(replica.log.decode(errors="replace"))
