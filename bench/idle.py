"""Idle SSE streams: memory and descriptors per open stream, for three kinds of idle stream.

Each stream POSTs the same short silent WAV (raw ``audio/wav`` body) and then receives nothing but
keepalive comments (every ``--keepalive`` seconds). Each kind runs in its own fresh server process
on 127.0.0.1:

- ``queued``: the gateway, with a scripted engine that allows 1 session (``delay`` one hour) and
  queues the rest. The first stream takes the session; every other one gets ``event: queued``
  and waits in the queue: the idle stream a busy gateway holds most of (clients waiting for
  upstream capacity). It holds its spooled upload, but no decoder and no PCM.
- ``session``: the gateway, with a scripted engine that opens a session for every stream and
  waits ``--delay`` seconds (an hour) before its first update: the decoder has decoded the short
  file into the pipeline's channel (16 KB of PCM here, at most 51 KiB whatever the file) and
  every task of the request waits.
- ``bare``: bench/bare_sse.py, raw ASGI on hypercorn with trio, reading the body and then sending
  only keepalives: what the server stack itself costs per idle stream.

Steps per kind: a warm-up (``--warmup`` streams opened and closed, so one-off allocations are not
counted), then the baseline RSS and descriptor count; then streams are opened (``--batch`` at a
time) up to each point of ``--points``, and once every open stream has received a keepalive sent
after the last one was opened (and, for the gateway, ``gateway_active_streams`` equals the
count), the server's RSS (/proc/<pid>/statm) and open descriptors (/proc/<pid>/fd) are read:

    RSS per stream = (RSS with N streams - baseline RSS) / N

At the end every connection is closed and the script waits for the descriptors (and the gauge) to
return to the baseline. Both this process and the servers get RLIMIT_NOFILE raised to the hard
limit.

Run from the repository root: ``python bench/idle.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ROOT,
    ServerProcess,
    SSEReader,
    active_streams,
    fd_count,
    machine,
    markdown_table,
    raise_fd_limit,
    rss_bytes,
    silent_wav,
    start_gateway,
    start_server,
    upload_request,
    wait_until,
)

STREAM = "/v1/transcriptions/stream?"
KINDS = ("queued", "session", "bare")


@dataclass
class Point:
    n: int
    rss: int
    fds: int
    open_seconds: float


class Streams:
    """Open SSE streams that read keepalives until their scope is cancelled."""

    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.opened = 0
        # The newest keepalive arrival per stream.
        self.last_keepalive: list[float] = []
        self.failures: list[str] = []

    async def _one(self, task_status: Any) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        async with stream:
            reader = SSEReader(stream)
            await stream.send_all(self.request)
            if await reader.head() != 200:
                self.failures.append(f"HTTP {reader.status}: {(await reader.body())[:200]!r}")
                task_status.started()
                return
            i = len(self.last_keepalive)
            self.last_keepalive.append(0.0)
            self.opened += 1
            task_status.started()
            async for frame, t in reader.events():
                if frame.startswith(b":"):
                    self.last_keepalive[i] = t
                elif not frame.startswith(b"event: queued"):
                    self.failures.append(f"unexpected event {frame[:80]!r}")
                    return

    async def open(self, nursery: trio.Nursery, count: int, batch: int) -> None:
        """Open ``count`` more streams, ``batch`` at a time, each running in ``nursery``."""
        for i in range(0, count, batch):
            async with trio.open_nursery() as starting:
                for _ in range(min(batch, count - i)):
                    starting.start_soon(nursery.start, self._one)
            if self.failures:
                raise RuntimeError(f"{len(self.failures)} streams failed: {self.failures[:3]}")

    async def settle(self, url: str | None, since: float) -> None:
        """Wait until every stream got a keepalive after ``since`` and the gateway's gauge (if
        ``url``) agrees."""

        async def all_kept_alive() -> bool:
            return min(self.last_keepalive, default=since + 1) > since

        await wait_until(all_kept_alive, 0.1)
        if url is not None:
            gateway = url

            async def gauge_agrees() -> bool:
                return await trio.to_thread.run_sync(active_streams, gateway) == self.opened

            await wait_until(gauge_agrees, 0.1)
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} streams failed: {self.failures[:3]}")


async def drain(url: str | None, pid: int, fds: int | None) -> float:
    """Seconds until ``gateway_active_streams`` (if ``url``) is back to 0 and the server holds at
    most ``fds`` descriptors (the gauge drops before each request's socket and spool file are
    closed); with ``fds`` None, until the count has not dropped for a second.

    The count is read before polling the gauge, and only a drop restarts the second: the server
    may still hold the socket of the previous poll for a moment, which is no stream's."""
    t0 = time.perf_counter()
    seen: list[tuple[float, int]] = []

    async def drained() -> bool:
        now, count = time.perf_counter(), fd_count(pid)
        if url is not None and await trio.to_thread.run_sync(active_streams, url) != 0:
            return False
        if fds is not None:
            return count <= fds
        if not seen or count < seen[-1][1]:
            seen.append((now, count))
        return now - seen[-1][0] >= 1.0

    await wait_until(drained)
    return time.perf_counter() - t0


async def measure(
    server: ServerProcess, target: str, gauge: bool, wav: bytes, args: Any
) -> tuple[Point, list[Point], float]:
    pid = server.pid
    url = server.url if gauge else None
    host, port = server.host_port
    request = upload_request(host, port, target, wav, "audio/wav")
    settle_timeout = 3 * args.keepalive + 120

    async with trio.open_nursery() as nursery:
        warm = Streams(host, port, request)
        await warm.open(nursery, args.warmup, args.batch)
        with trio.fail_after(settle_timeout):
            await warm.settle(url, time.perf_counter())
        nursery.cancel_scope.cancel()
    with trio.fail_after(60):
        await drain(url, pid, None)
    base = Point(0, rss_bytes(pid), fd_count(pid), 0.0)

    points: list[Point] = []
    async with trio.open_nursery() as nursery:
        streams = Streams(host, port, request)
        for n in args.points:
            t0 = time.perf_counter()
            await streams.open(nursery, n - streams.opened, args.batch)
            opened = time.perf_counter()
            with trio.fail_after(settle_timeout):
                await streams.settle(url, opened)
            point = Point(n, rss_bytes(pid), fd_count(pid), opened - t0)
            points.append(point)
            print(f"  {target}: {n} streams open: {point}", file=sys.stderr)
        nursery.cancel_scope.cancel()
    with trio.fail_after(120):
        drained = await drain(url, pid, base.fds)
    return base, points, drained


@contextlib.contextmanager
def start(kind: str, args: Any) -> Iterator[tuple[ServerProcess, str]]:
    """The server for one kind of idle stream, and the request target its streams use."""
    if kind == "bare":
        with tempfile.TemporaryDirectory(prefix="bench-bare-") as tmp:
            argv = [sys.executable, str(ROOT / "bench" / "bare_sse.py")]
            argv += ["--keepalive", str(args.keepalive), "--bind", "127.0.0.1:0"]
            with start_server(argv, workdir=Path(tmp)) as server:
                yield server, STREAM + "hold"
        return
    engine: dict[str, Any] = {"kind": "scripted", "delay": args.delay, "seconds_per_word": 0.1}
    if kind == "queued":
        engine |= {"max_sessions": 1, "max_queue": 100_000, "queue_timeout": args.delay}
    config = {
        "server": {"default_engine": kind, "keepalive": args.keepalive, "shutdown_grace": 1.0},
        "engines": {kind: engine},
    }
    with start_gateway(config) as server:
        yield server, STREAM + "use_cache=false"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", default="1000,5000", help="stream counts, comma-separated")
    parser.add_argument("--kinds", default=",".join(KINDS), help="kinds of idle stream")
    parser.add_argument("--keepalive", type=float, default=5.0)
    parser.add_argument("--delay", type=float, default=3600.0)
    parser.add_argument("--audio-seconds", type=float, default=0.5)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    args.points = sorted(int(x) for x in args.points.split(","))
    kinds = [k for k in args.kinds.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    limit = raise_fd_limit()
    wav = silent_wav(args.audio_seconds)

    print("# Idle SSE streams held by keepalives (bench/idle.py)\n")
    print(machine())
    print(f"gateway source: {ROOT}")
    print(
        f"\nkeepalive every {args.keepalive:g} s; upload: {args.audio_seconds:g} s silent WAV, "
        f"16 kHz mono ({len(wav):,} bytes, raw body, use_cache=false); gateway engines: scripted, "
        f"delay {args.delay:.0f} s (queued: 1 session, the rest queued); RLIMIT_NOFILE {limit} "
        "(client and servers); a fresh server process per kind; loopback only"
    )
    kib = 1024
    rows = []
    for kind in kinds:
        with start(kind, args) as (server, target):
            base, points, drained = trio.run(measure, server, target, kind != "bare", wav, args)
            after = Point(0, rss_bytes(server.pid), fd_count(server.pid), 0.0)
        rows.append(
            [kind, "0 (after warm-up)", f"{base.rss / kib / kib:.1f}", "-", str(base.fds), "-", "-"]
        )
        for p in points:
            rows.append(
                [
                    kind,
                    str(p.n),
                    f"{p.rss / kib / kib:.1f}",
                    f"{(p.rss - base.rss) / p.n / kib:.1f}",
                    str(p.fds),
                    f"{(p.fds - base.fds) / p.n:.2f}",
                    f"{p.open_seconds:.1f}",
                ]
            )
        rows.append(
            [
                kind,
                f"0 (all closed, drained in {drained:.1f} s)",
                f"{after.rss / kib / kib:.1f}",
                "-",
                str(after.fds),
                "-",
                "-",
            ]
        )
    print(
        markdown_table(
            "Server process with N idle streams (opening time: from the first new connection to "
            "the last 200, cumulative points)",
            [
                "kind",
                "streams",
                "RSS MiB",
                "RSS KiB / stream",
                "open fds",
                "fds / stream",
                "opening s",
            ],
            rows,
        )
    )
    print(
        "\nAfter closing every connection, each server's descriptors returned to the baseline "
        "and the gateway's gateway_active_streams to 0."
    )


if __name__ == "__main__":
    main()
