"""Several gateway replicas on one PostgreSQL (issue 17): what the shared store and the
cluster-wide admission cost, and how fast a killed replica's capacity comes back.

Everything runs on this machine, on loopback, in one invocation: a throwaway PostgreSQL
(tests/pg.py: initdb in a temp folder, ``fsync=off``, started once for the whole run; each
figure takes fresh databases on it) and SQLite files in a temp folder.

1. **Store latency, PostgreSQL vs SQLite.** The same ``--n`` transcripts (each ``--segments``
   segments of 10 words, with word timestamps: about 24 KB per row, five minutes of speech),
   written with ``Store.save`` and then read back with ``Store.get``, through the gateway's own
   store classes (``open_store``: SQLite's dedicated thread; PostgreSQL's pool of
   ``--pool-size`` connections on worker threads). First one caller, one call after the other;
   then ``--concurrency`` callers at once (each its own share of the transcripts). p50 and p99
   per call, and calls per second. A save commits without waiting for a disk flush on both
   (SQLite WAL with ``synchronous=NORMAL``; PostgreSQL ``synchronous_commit = off`` for machine
   transcripts), and the throwaway cluster runs with ``fsync=off``: neither figure includes a
   flush.
2. **Admission round-trip per session.** ``await admit()``, ``await ticket.wait()`` and
   ``await ticket.release()`` in a loop, ``--n`` sessions: a local ``Admission`` (this process's
   engines alone), then a ``ClusterAdmission`` (``open_cluster``, default heartbeat and
   lease_ttl) on one replica, then two replicas in this process (each its own
   ``open_cluster``: its own connections, listener and checks) admitting into the same pool at
   once. The upstream has no cap in those rows, so nobody queues: the cost is the reservation's
   transaction under the pool's advisory lock. ``release`` returns at once; the ticket's row is
   deleted by the replica's next check (woken at once by the release), which shares the
   replica's two connections and the pool lock with the next admits, so its cost shows in the
   sessions per second. The last row caps the upstream at one session with two replicas: every
   session waits for the other replica's release to reach the database and for its NOTIFY (a
   hand-off across replicas, the queue's round trip).
3. **Streams per second, one replica vs two.** Real ``gateway serve`` subprocesses
   (bench/_common.py ``start_gateway``), an instant scripted engine (``--words`` words, no
   delay) capped at twice ``--clients`` sessions (a cap is what makes the engine's admission
   cluster-wide; this one never queues), ``--clients`` closed-loop clients (the lean HTTP/1.1 SSE client of
   bench/_common.py, keep-alive) spread round-robin over the replicas, each upload distinct
   (``use_cache=false``, so each stream is an engine session, an admission and a store write),
   ``--duration`` seconds after a short warm-up. Rows: one replica on SQLite (the baseline,
   local admission), one replica on PostgreSQL (shared store and cluster admission), two
   replicas on the same PostgreSQL. The machine has few cores: the replicas, PostgreSQL and the
   load generator (this process) all compete for them, so on 2 cores a second replica adds
   processes, not cores; the CPU columns say where the time went (gateways summed; PostgreSQL's
   postmaster and its backends; the load generator).
4. **Time for a killed replica's capacity to return.** Two replicas on PostgreSQL, a scripted
   engine capped at one session cluster-wide (``max_sessions = 1``, 500 words at 20 ms each, so
   a session lasts 10 s). A stream on replica A holds the session (its first transcription
   event has arrived); a stream on replica B is queued (its ``queued`` event has arrived); A
   gets SIGKILL; the figure is the time from the kill to B's first ``transcription`` event.
   B's replica frees A's places once A's heartbeat is older than ``lease_ttl``, at one of its
   checks (every ``heartbeat``), so the bound is ``lease_ttl + heartbeat``; the figure also
   holds B's grant, its session start and one scripted update (20 ms). ``--rounds`` rounds at
   ``--lease-ttl`` / ``--heartbeat`` (2 / 0.5), then one at the defaults (10 / 1); each round
   starts both replicas afresh on a fresh database.

Run from the repository root on an otherwise idle machine: ``python bench/cluster.py`` (about
2 to 3 minutes on 2 cores). A quick check that it works: ``python bench/cluster.py --n 20
--duration 1 --rounds 1``. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import resource
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import (  # noqa: E402
    ProcStats,
    ServerProcess,
    SSEReader,
    cpu_seconds,
    machine,
    markdown_table,
    percentile,
    raise_fd_limit,
    silent_wav,
    start_gateway,
    upload_request,
    wait_until,
)
from pg import PgServer, pg_server  # noqa: E402

from gateway.admission import UNLIMITED, Admission  # noqa: E402
from gateway.cluster import open_cluster  # noqa: E402
from gateway.config import ClusterConfig, StoreConfig  # noqa: E402
from gateway.events import Segment, Transcript, Word  # noqa: E402
from gateway.store import open_store  # noqa: E402
from gateway.store_base import Store  # noqa: E402
from gateway.store_pg import migrate  # noqa: E402

STREAM = "/v1/transcriptions/stream?use_cache=false"
WORDS_PER_SEGMENT = 10
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f}"


def fresh_database(pg: PgServer) -> str:
    """A new database on the throwaway cluster, migrated to the gateway's schema: its URL."""
    url = pg.create_database()
    with psycopg.connect(url, autocommit=True) as conn:
        migrate(conn)
    return url


# --- 1. store latency ---------------------------------------------------------------------------


def transcript(name: str, segments: int) -> Transcript:
    """A finished transcript of ``segments`` 5-second segments of 10 timed words each."""
    segs: list[Segment] = []
    words: list[Word] = []
    for s in range(segments):
        start = s * 5.0
        timed = [
            Word(start + k * 0.5, start + k * 0.5 + 0.4, f"word{(s * 7 + k) % 97}")
            for k in range(WORDS_PER_SEGMENT)
        ]
        words += timed
        segs.append(Segment(start, start + 5.0, " ".join(w.word for w in timed)))
    return Transcript(
        id=hashlib.blake2b(name.encode(), digest_size=16).hexdigest(),
        segments=tuple(segs),
        committed=len(segs),
        current_time=segments * 5.0,
        total_time=segments * 5.0,
        words=tuple(words),
        engine="scripted",
        language="en",
    )


@dataclass
class Calls:
    """Latencies of one kind of call, and the wall time they took together."""

    latency: list[float] = field(default_factory=list)
    wall: float = 0.0


async def timed_calls(calls: Sequence[Callable[[], Awaitable[Any]]], callers: int) -> Calls:
    """Run ``calls`` by ``callers`` tasks at once (caller i takes calls i, i + callers, ...),
    each one after the other; every call's latency and the whole wall time."""
    out = Calls()

    async def caller(mine: Sequence[Callable[[], Awaitable[Any]]]) -> None:
        for call in mine:
            t0 = time.perf_counter()
            await call()
            out.latency.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(callers):
            nursery.start_soon(caller, calls[i::callers])
    out.wall = time.perf_counter() - t0
    return out


async def store_rows(label: str, store: Store, args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for callers in (1, args.concurrency):
        batch = [transcript(f"{label} {callers} {i}", args.segments) for i in range(args.n)]

        def save(t: Transcript) -> Callable[[], Awaitable[None]]:
            return lambda: store.save(t)

        def get(t: Transcript) -> Callable[[], Awaitable[Any]]:
            async def call() -> None:
                if await store.get(t.id) is None:
                    raise RuntimeError(f"{label}: {t.id} was not stored")

            return call

        for op, calls in (
            ("save", [save(t) for t in batch]),
            ("get", [get(t) for t in batch]),
        ):
            result = await timed_calls(calls, callers)
            rows.append(
                [
                    label,
                    str(callers),
                    op,
                    ms(percentile(result.latency, 50)),
                    ms(percentile(result.latency, 99)),
                    f"{len(calls) / result.wall:,.0f}",
                ]
            )
    return rows


async def figure_store(pg: PgServer, args: argparse.Namespace) -> str:
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        async with open_store(str(Path(tmp) / "gateway.sqlite3")) as sqlite:
            # Warm-up: the first calls open files and fill caches.
            await store_rows("warm-up", sqlite, argparse.Namespace(**{**vars(args), "n": 10}))
            rows += await store_rows("SQLite", sqlite, args)
    url = pg.create_database()  # the store migrates it itself
    async with open_store(StoreConfig(url=url, pool_size=args.pool_size)) as postgres:
        await store_rows("warm-up", postgres, argparse.Namespace(**{**vars(args), "n": 10}))
        rows += await store_rows("PostgreSQL", postgres, args)
    return markdown_table(
        f"1. Store latency: {args.n} transcripts of {args.segments} segments, saved then read"
        f" (ms per call; PostgreSQL pool of {args.pool_size} connections)",
        ["store", "callers", "call", "p50", "p99", "calls/s"],
        rows,
    )


# --- 2. admission round trip --------------------------------------------------------------------


async def admission_loop(admission: Admission, n: int, out: list[float]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        ticket = await admission.admit()
        await ticket.wait()
        await ticket.release()
        out.append(time.perf_counter() - t0)


async def run_admissions(admissions: Sequence[Admission], n: int) -> tuple[list[float], float]:
    """``n`` sessions through each admission, all admissions at once: latencies, wall time."""
    latency: list[float] = []
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for admission in admissions:
            nursery.start_soon(admission_loop, admission, n, latency)
    return latency, time.perf_counter() - t0


async def cluster_admissions(
    url: str, replicas: int, cap: int, n: int
) -> tuple[list[float], float]:
    async with contextlib.AsyncExitStack() as stack:
        admissions: list[Admission] = []
        for r in range(replicas):
            config = ClusterConfig(replica=f"bench-{r}")
            cluster = await stack.enter_async_context(open_cluster(url, config))
            admissions.append(cluster.admission("bench", Admission({"upstream": cap})))
        return await run_admissions(admissions, n)


async def figure_admission(pg: PgServer, args: argparse.Namespace) -> str:
    n = args.n
    runs = [
        ("local Admission (one process)", await run_admissions([Admission({"u": UNLIMITED})], n)),
    ]
    for label, replicas, cap in (
        ("ClusterAdmission, 1 replica, no cap", 1, UNLIMITED),
        ("ClusterAdmission, 2 replicas at once, no cap", 2, UNLIMITED),
        ("ClusterAdmission, 2 replicas at once, cap 1 (hand-offs)", 2, 1),
    ):
        url = await trio.to_thread.run_sync(fresh_database, pg)
        await cluster_admissions(url, replicas, cap, min(n, 10))  # warm-up
        runs.append((label, await cluster_admissions(url, replicas, cap, n)))
    rows = [
        [
            label,
            str(len(latency)),
            f"{percentile(latency, 50) * 1000:,.3f}",
            f"{percentile(latency, 99) * 1000:,.3f}",
            f"{len(latency) / wall:,.0f}",
        ]
        for label, (latency, wall) in runs
    ]
    return markdown_table(
        "2. Admission round trip per session: admit + wait + release (ms; sessions/s over all"
        " replicas)",
        ["admission", "sessions", "p50", "p99", "sessions/s"],
        rows,
    )


# --- gateways as subprocesses -------------------------------------------------------------------


def scripted(
    words: int, *, seconds_per_word: float, delay: float = 0.0, cap: int = 0
) -> dict[str, Any]:
    return {
        "kind": "scripted",
        "words": [f"w{i}" for i in range(words)],
        "seconds_per_word": seconds_per_word,
        "delay": delay,
        "max_sessions": cap,
    }


def gateway_config(
    engine: dict[str, Any], store_url: str | None, replica: str, cluster: dict[str, float]
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"default_engine": "scripted", "shutdown_grace": 1.0},
        "engines": {"scripted": engine},
    }
    if store_url is not None:
        config["store"] = {"url": store_url}
        config["cluster"] = {"replica": replica, **cluster}
    return config


@contextlib.contextmanager
def replicas(configs: Sequence[dict[str, Any]]) -> Iterator[list[ServerProcess]]:
    """One ``gateway serve`` per config, each answering 200 on /readyz."""
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(start_gateway(c)) for c in configs]
        trio.run(wait_ready, servers)
        yield servers


async def wait_ready(servers: Sequence[ServerProcess]) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for server in servers:
            last = ""

            async def ready(server: ServerProcess = server) -> bool:
                nonlocal last
                try:
                    answer = await client.get(server.url + "/readyz")
                except httpx.TransportError as exc:
                    last = repr(exc)
                    return False
                last = answer.text
                return answer.status_code == 200

            try:
                with trio.fail_after(60):
                    await wait_until(ready)
            except trio.TooSlowError:
                raise RuntimeError(
                    f"{server.url} not ready in 60 s: {last}\n{server.log()[-3000:]}"
                ) from None


def unique_wav(template: bytes, tag: int) -> bytes:
    """``template`` (a silent WAV) with ``tag`` written into its first samples: distinct bytes,
    so distinct content ids, rows and sessions."""
    header = 44
    return template[:header] + struct.pack("<Q", tag) + template[header + 8 :]


async def open_stream(server: ServerProcess, body: bytes) -> tuple[trio.SocketStream, SSEReader]:
    host, port = server.host_port
    stream = await trio.open_tcp_stream(host, port)
    reader = SSEReader(stream)
    await stream.send_all(upload_request(host, port, STREAM, body, "audio/wav"))
    if await reader.head() != 200:
        raise RuntimeError(f"{server.url}: HTTP {reader.status}: {await reader.body()!r}")
    return stream, reader


# --- 3. streams per second ----------------------------------------------------------------------


@dataclass
class LoadResult:
    streams: int = 0
    latency: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0
    client_cpu: float = 0.0


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def closed_loop(
    servers: Sequence[ServerProcess], clients: int, duration: float, wav: bytes
) -> LoadResult:
    """``clients`` keep-alive connections, client i on replica i mod len(servers), each
    streaming one distinct upload after another until ``duration`` has passed."""
    out = LoadResult()
    nonce = int.from_bytes(os.urandom(4)) << 32

    async def client(i: int) -> None:
        server = servers[i % len(servers)]
        host, port = server.host_port
        stream = await trio.open_tcp_stream(host, port)
        reader = SSEReader(stream)
        count = 0
        while time.perf_counter() < deadline:
            count += 1
            body = unique_wav(wav, nonce | i << 24 | count)
            t0 = time.perf_counter()
            await stream.send_all(upload_request(host, port, STREAM, body, "audio/wav"))
            if await reader.head() != 200:
                out.errors.append(f"HTTP {reader.status}: {(await reader.body())[:200]!r}")
                break
            last = b""
            async for frame, _ in reader.events():
                if not frame.startswith(b":"):
                    last = frame
            if not last.startswith(b"event: done"):
                out.errors.append(f"{server.url}: the stream ended with {last[:200]!r}")
                break
            out.latency.append(time.perf_counter() - t0)
            out.streams += 1
            # Hypercorn closes a keep-alive connection after 1,000 requests (and says so).
            if reader.headers.get(b"connection", b"").lower() == b"close":
                await stream.aclose()
                stream = await trio.open_tcp_stream(host, port)
                reader = SSEReader(stream)
        await stream.aclose()

    cpu0 = own_cpu()
    t0 = time.perf_counter()
    deadline = t0 + duration
    with trio.fail_after(duration + 120):
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
    out.wall = time.perf_counter() - t0
    out.client_cpu = own_cpu() - cpu0
    return out


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its living children (PostgreSQL's
    postmaster: its backends are children)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # cutime and cstime, after utime and stime: the children it has reaped.
    reaped = stat[stat.rindex(")") + 2 :].split()[13:15]
    total = cpu_seconds(pid) + sum(int(f) for f in reaped) / _CLK_TCK
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


def pg_rows(url: str) -> int:
    """Transcripts the replicas stored in PostgreSQL (each stream stores one)."""
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM transcripts").fetchone()
    return int(row[0]) if row else 0


def postmaster_pid(pg: PgServer) -> int:
    return int((pg.data_dir / "postmaster.pid").read_text().split()[0])


def figure_streams(pg: PgServer, args: argparse.Namespace) -> str:
    engine = scripted(args.words, seconds_per_word=0.1, cap=2 * args.clients)
    wav = silent_wav(args.words * 0.1)
    rows = []
    for label, count, on_pg in (
        ("1 replica, SQLite (local admission)", 1, False),
        ("1 replica, PostgreSQL", 1, True),
        ("2 replicas, one PostgreSQL", 2, True),
    ):
        url = fresh_database(pg) if on_pg else None
        configs = [gateway_config(engine, url, f"bench-{r}", {}) for r in range(count)]
        with replicas(configs) as servers:
            trio.run(closed_loop, servers, 2 * count, 1.0, wav)  # warm-up
            stats = [ProcStats(s.pid) for s in servers]
            for s in stats:
                s.start()
            pg0 = tree_cpu(postmaster_pid(pg))
            load = trio.run(closed_loop, servers, args.clients, args.duration, wav)
            pg_cpu = tree_cpu(postmaster_pid(pg)) - pg0
            for s in stats:
                s.stop()
        if load.errors:
            raise RuntimeError(f"{label}: {len(load.errors)} failed streams: {load.errors[:3]}")
        stored = str(pg_rows(url)) if url is not None else "-"
        wall = load.wall
        rows.append(
            [
                label,
                f"{load.streams / wall:,.1f}",
                ms(percentile(load.latency, 50)),
                ms(percentile(load.latency, 99)),
                f"{sum(s.cpu for s in stats) / wall:.0%}",
                f"{pg_cpu / wall:.0%}",
                f"{load.client_cpu / wall:.0%}",
                str(load.streams),
                stored,
            ]
        )
        print(f"  {label}: {load.streams / wall:,.1f} streams/s", file=sys.stderr)
    note = ""
    if any(row[-1] == "0" for row in rows[1:]):
        # The rows say so too; this says what it means for the figures.
        note = (
            "\nNote: the replicas stored no transcript in PostgreSQL: this gateway opens its"
            " store at store.path (SQLite, one file per replica) and only the admission is on"
            " PostgreSQL; its PostgreSQL rows measure the cluster admission, not the shared store."
        )
    table = markdown_table(
        f"3. Streams/s: {args.clients} closed-loop clients for {args.duration:g} s, instant"
        f" scripted engine ({args.words} words), distinct {args.words * 0.1:g} s uploads"
        f" (stream time from request to done, ms; CPU as a share of one core)",
        [
            "setup",
            "streams/s",
            "stream p50",
            "stream p99",
            "gateways CPU",
            "PostgreSQL CPU",
            "load generator CPU",
            "streams",
            "rows in PostgreSQL",
        ],
        rows,
    )
    return table + "\n" + note if note else table


# --- 4. a killed replica's capacity -------------------------------------------------------------

KILL_WORDS = 500
KILL_DELAY = 0.02


async def next_frame(events: Any, kind: bytes) -> float:
    """Read frames until one of ``kind`` (``event: <kind>``); its arrival time."""
    async for frame, arrived in events:
        if frame.startswith(b"event: " + kind + b"\r\n"):
            return float(arrived)
        if frame.startswith((b"event: done", b"event: error")):
            raise RuntimeError(f"the stream ended before a {kind!r} event: {frame[:200]!r}")
    raise RuntimeError(f"the stream ended before a {kind!r} event")


async def drain(events: Any) -> None:
    """Read the killed holder's stream to its end, whatever that end is."""
    with contextlib.suppress(EOFError, OSError, ValueError, trio.BrokenResourceError):
        async for _ in events:
            pass


async def kill_round(a: ServerProcess, b: ServerProcess, wav: bytes, bound: float) -> float:
    """A's stream holds the only session, B's waits; SIGKILL A: seconds until B's stream gets
    its first transcription event."""
    with trio.fail_after(bound + 60):
        holder, holder_reader = await open_stream(a, unique_wav(wav, 1))
        holder_events = holder_reader.events()
        await next_frame(holder_events, b"transcription")
        waiter, waiter_reader = await open_stream(b, unique_wav(wav, 2))
        waiter_events = waiter_reader.events()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, holder_events)
            await next_frame(waiter_events, b"queued")
            killed = time.perf_counter()
            os.kill(a.pid, signal.SIGKILL)
            started = await next_frame(waiter_events, b"transcription")
            nursery.cancel_scope.cancel()
        await waiter.aclose()
        await holder.aclose()
    return started - killed


def figure_kill(pg: PgServer, args: argparse.Namespace) -> str:
    engine = scripted(KILL_WORDS, seconds_per_word=KILL_DELAY, delay=KILL_DELAY, cap=1)
    wav = silent_wav(KILL_WORDS * KILL_DELAY)
    settings = [(args.lease_ttl, args.heartbeat, args.rounds), (10.0, 1.0, 1)]
    rows = []
    for ttl, beat, rounds in settings:
        cluster = {"lease_ttl": ttl, "heartbeat": beat}
        times = []
        for r in range(rounds):
            url = fresh_database(pg)
            configs = [gateway_config(engine, url, f"bench-{x}", cluster) for x in "ab"]
            with replicas(configs) as (a, b):
                times.append(trio.run(kill_round, a, b, wav, ttl + beat))
            print(
                f"  lease_ttl {ttl:g}, heartbeat {beat:g}, round {r + 1}: {times[-1]:.2f} s",
                file=sys.stderr,
            )
        bound = ttl + beat
        rows.append(
            [
                f"{ttl:g}",
                f"{beat:g}",
                str(rounds),
                f"{min(times):.2f}",
                f"{statistics.median(times):.2f}",
                f"{max(times):.2f}",
                f"{bound:g}",
                f"{sum(t <= bound for t in times)}/{rounds}",
            ]
        )
    return markdown_table(
        "4. A killed replica's capacity: SIGKILL the replica holding the only session, seconds"
        " until the stream queued on the other replica gets its first transcription event",
        ["lease_ttl", "heartbeat", "rounds", "min", "median", "max", "bound", "within bound"],
        rows,
    )


# --- main ----------------------------------------------------------------------------------------


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} {five:.2f}"


@contextlib.contextmanager
def postgres() -> Iterator[PgServer]:
    try:
        with pg_server() as server:
            yield server
    except pytest.skip.Exception as exc:
        sys.exit(f"bench/{Path(sys.argv[0]).name} needs PostgreSQL's binaries: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figures", default="1,2,3,4", help="which figures, comma-separated")
    parser.add_argument("--n", type=int, default=500, help="store calls and admission sessions")
    parser.add_argument("--segments", type=int, default=60, help="segments per transcript")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent store callers")
    parser.add_argument("--pool-size", type=int, default=4, help="PostgreSQL store connections")
    parser.add_argument("--clients", type=int, default=16, help="closed-loop stream clients")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of stream load")
    parser.add_argument("--words", type=int, default=10, help="scripted words per stream")
    parser.add_argument("--rounds", type=int, default=5, help="kill rounds at --lease-ttl")
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--heartbeat", type=float, default=0.5)
    args = parser.parse_args()
    figures = {int(f) for f in args.figures.split(",")}
    raise_fd_limit(4096)

    print("# Several replicas on one PostgreSQL (bench/cluster.py)\n")
    print(machine(("trio", "hypercorn", "psycopg", "psycopg-pool")))
    print(f"load average at start: {load_average()}")
    started = time.perf_counter()
    with postgres() as pg:
        print(f"PostgreSQL: {pg.bin_dir.parent.name} ({pg.bin_dir}), fsync=off, on loopback")
        if 1 in figures:
            print(trio.run(figure_store, pg, args))
        if 2 in figures:
            print(trio.run(figure_admission, pg, args))
        if 3 in figures:
            print(figure_streams(pg, args))
        if 4 in figures:
            print(figure_kill(pg, args))
    print(f"\nwall time: {time.perf_counter() - started:.0f} s")
    print(f"load average at end: {load_average()}")


if __name__ == "__main__":
    main()
