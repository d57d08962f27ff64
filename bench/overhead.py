"""Gateway overhead against the stack's own limit: the same SSE bytes from a bare hypercorn app.

Setup, all on 127.0.0.1:

- the gateway: a real ``gateway serve`` subprocess with one instant scripted engine (``delay`` 0,
  ``--words`` words, ``--seconds-per-word`` audio seconds each) as the default engine;
- the bare app: bench/bare_sse.py, another subprocess (hypercorn on trio, raw ASGI) that replays the
  frames captured from the gateway for the same request, so both send byte-identical bodies (the
  capture is checked: every stream's frames must come from the captured script, in order);
- the load: ``--procs`` separate processes, each with a lean raw HTTP/1.1 client on trio sockets
  (bench/_common.py SSEReader), N keep-alive connections in all, one stream at a time each
  (closed loop), for ``--duration`` seconds after all connections are open.

Every request is the same ``POST /v1/transcriptions/stream?use_cache=...`` with a generated silent
WAV as a raw ``audio/wav`` body. Two paths:

- ``transcribe`` (the main rows): ``use_cache=false``; the gateway spools and hashes the upload,
  probes and decodes it with PyAV, runs the engine session and stores the transcript in SQLite;
  the bare app reads the body and replays the frames. That work is part of what the gateway adds.
- ``cache``: ``use_cache=true`` on the same bytes: the gateway answers with one cached ``done``
  after the upload, hash and store lookup (still a decoder probe); the bare app replays that frame.

Figures per run (server x N):

- events/s: SSE events received per wall second, from the start signal to the last event;
  streams/s likewise. The gateway conflates snapshots for a slow reader (by design), so it can
  deliver fewer events than the script: the ``events/stream`` column shows it.
- CPU s / 1k events: the server process's utime + stime (all threads, /proc/<pid>/stat) over the
  run, per 1,000 events received.
- latency per event: for each stream and each event k of the script, the time from the first byte
  of the request being sent to the arrival of event k (a conflated event counts as arriving with
  the first later event delivered, so conflation counts against the gateway); p50 and p99 over all
  (stream, event) pairs. "Added" latency is the gateway's percentile minus the bare app's at the
  same N. It includes the upload handling above and, at high N, queueing: in a closed loop with N
  streams in flight, latency is about N / throughput (Little's law).
- in-stream p99: the same but from the stream's first event, so without the per-request work.

``--before DIR`` adds a third server: the gateway of another checkout (a ``git worktree`` of an
older commit), measured in the same run, for before/after figures of a change.

``--profile FILE`` instead runs only the gateway's ``--profile-path`` (transcribe) under py-spy
(sampling, as its child) at ``--profile-n`` streams and prints the top functions by own and by inclusive samples.

Run from the repository root: ``python bench/overhead.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    ROOT,
    ProcStats,
    SSEReader,
    machine,
    markdown_table,
    percentile,
    raise_fd_limit,
    silent_wav,
    start_gateway,
    start_server,
    upload_request,
)

PATHS = {"transcribe": "use_cache=false", "cache": "use_cache=true"}
TARGET = "/v1/transcriptions/stream?"
# Hypercorn adds these itself, so they are not replayed (date changes; the rest would repeat).
_NOT_REPLAYED = {"date", "server", "transfer-encoding", "content-length"}


# --- capture ------------------------------------------------------------------------------------


async def one_stream(
    host: str, port: int, request: bytes
) -> tuple[dict[bytes, bytes], list[bytes]]:
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        reader = SSEReader(stream)
        await stream.send_all(request)
        if await reader.head() != 200:
            raise RuntimeError(f"HTTP {reader.status}: {await reader.body()!r}")
        frames = [f async for f, _ in reader.events() if not f.startswith(b":")]
    return reader.headers, frames


def subsequence(frames: list[bytes], script: list[bytes]) -> list[int] | None:
    """The script positions of ``frames`` matched in order (a frame may repeat), or None."""
    positions, p = [], 0
    for frame in frames:
        while p < len(script) and script[p] != frame:
            p += 1
        if p == len(script):
            return None
        positions.append(p)
    return positions


def _current_time(frame: bytes) -> float:
    return float(json.loads(frame.split(b"data: ", 1)[1])["current_time"])


async def capture(host: str, port: int, wav: bytes, stable: int = 5) -> dict[str, Any]:
    """The gateway's response headers and frames for each path.

    The outbox conflates snapshots (even for one stream, as the engine is instant) and an engine
    may repeat a snapshot, so the transcribe script is the union of the distinct snapshots seen
    over several runs, in ``current_time`` order, then the ``done`` frame; runs continue until
    ``stable`` in a row add nothing.
    """
    scripts: dict[str, list[bytes]] = {}
    headers: dict[bytes, bytes] = {}
    full = upload_request(host, port, TARGET + PATHS["transcribe"], wav, "audio/wav")
    seen: set[bytes] = set()
    done: set[bytes] = set()
    unchanged = 0
    for _ in range(100):
        headers, frames = await one_stream(host, port, full)
        before = len(seen)
        seen.update(frames[:-1])
        done.add(frames[-1])
        unchanged = unchanged + 1 if len(seen) == before else 0
        if unchanged == stable:
            break
    if len(done) != 1 or not next(iter(done)).startswith(b"event: done"):
        raise RuntimeError(f"the final frames are not one and the same done event: {done}")
    scripts["transcribe"] = [*sorted(seen, key=_current_time), *done]
    cached = upload_request(host, port, TARGET + PATHS["cache"], wav, "audio/wav")
    _, frames = await one_stream(host, port, cached)
    if len(frames) != 1 or b'"cached":true' not in frames[0]:
        raise RuntimeError(f"expected one cached done event, got {frames}")
    scripts["cache"] = frames
    return {
        "headers": [
            [k.decode("latin-1"), v.decode("latin-1")]
            for k, v in headers.items()
            if k.decode("latin-1") not in _NOT_REPLAYED
        ],
        "scripts": {
            PATHS[name]: [f.decode("latin-1") for f in frames] for name, frames in scripts.items()
        },
    }


# --- load generator (one process) ---------------------------------------------------------------


@dataclass
class Load:
    streams: int = 0
    events: int = 0
    identical: int = 0  # every frame of the script, byte for byte
    conflated: int = 0  # a strict in-order subsequence ending with the done frame
    errors: list[str] = field(default_factory=list)
    reconnects: int = 0
    last_event: float = 0.0
    latency: list[float] = field(default_factory=list)
    in_stream: list[float] = field(default_factory=list)
    ttfe: list[float] = field(default_factory=list)
    cpu: float = 0.0


async def _load(
    host: str,
    port: int,
    request: bytes,
    script: list[bytes],
    users: int,
    duration: float,
    barrier: Any,
) -> Load:
    last = len(script) - 1
    out = Load()
    conns: list[tuple[trio.SocketStream, SSEReader]] = []

    async def connect() -> None:
        stream = await trio.open_tcp_stream(host, port)
        conns.append((stream, SSEReader(stream)))

    # Open the connections a batch at a time: hypercorn's listen backlog is 100.
    for i in range(0, users, 50):
        async with trio.open_nursery() as nursery:
            for _ in range(min(50, users - i)):
                nursery.start_soon(connect)
    await trio.to_thread.run_sync(barrier.wait)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.perf_counter() + duration

    def record(t0: float, frames: list[bytes], times: list[float]) -> None:
        out.streams += 1
        out.events += len(frames)
        got = subsequence(frames, script)
        if got is None or got[-1] != last:
            out.errors.append(f"unexpected frames {frames[:3]}")
            return
        if len(got) == len(script):
            out.identical += 1
        else:
            out.conflated += 1
        out.last_event = max(out.last_event, times[-1])
        j = 0
        first = times[0]
        out.ttfe.append(first - t0)
        for k in range(len(script)):
            while got[j] < k:
                j += 1
            out.latency.append(times[j] - t0)
            if k:
                out.in_stream.append(times[j] - first)

    async def user(stream: trio.SocketStream, reader: SSEReader) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            await stream.send_all(request)
            if await reader.head() != 200:
                out.errors.append(f"HTTP {reader.status}: {(await reader.body())[:200]!r}")
                break
            frames: list[bytes] = []
            times: list[float] = []
            async for frame, t in reader.events():
                if not frame.startswith(b":"):
                    frames.append(frame)
                    times.append(t)
            record(t0, frames, times)
            # Hypercorn closes a keep-alive connection after 1,000 requests (and says so).
            if reader.headers.get(b"connection", b"").lower() == b"close":
                await stream.aclose()
                stream = await trio.open_tcp_stream(host, port)
                reader = SSEReader(stream)
                out.reconnects += 1
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for stream, reader in conns:
            nursery.start_soon(user, stream, reader)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return out


def load_process(args: tuple[Any, ...], results: Any) -> None:
    try:
        results.put(trio.run(_load, *args))
    except BaseException as exc:
        results.put(exc)
        raise


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Run:
    server: str
    path: str
    n: int
    script_len: int
    load: Load
    cpu: float
    wall: float
    client_cpu: float

    def p(self, values: list[float], q: float) -> float:
        return percentile(values, q) * 1000


def run_load(
    pid: int,
    host: str,
    port: int,
    request: bytes,
    script: list[bytes],
    n: int,
    duration: float,
    procs: int,
) -> tuple[Load, ProcStats, float]:
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, n))
    barrier = ctx.Barrier(procs + 1)
    results = ctx.Queue()
    shares = [n // procs + (i < n % procs) for i in range(procs)]
    workers = [
        ctx.Process(
            target=load_process,
            args=((host, port, request, script, share, duration, barrier), results),
        )
        for share in shares
    ]
    for w in workers:
        w.start()
    barrier.wait(timeout=120)
    stats = ProcStats(pid)
    stats.start()
    t0 = time.perf_counter()
    loads = [results.get(timeout=duration + 300) for _ in workers]
    stats.stop()
    for w in workers:
        w.join()
    for item in loads:
        if isinstance(item, BaseException):
            raise RuntimeError("a load process failed") from item
    total = Load()
    for item in loads:
        total.streams += item.streams
        total.events += item.events
        total.identical += item.identical
        total.conflated += item.conflated
        total.errors += item.errors
        total.reconnects += item.reconnects
        total.last_event = max(total.last_event, item.last_event)
        total.latency += item.latency
        total.in_stream += item.in_stream
        total.ttfe += item.ttfe
        total.cpu += item.cpu
    # Wall time of the load: from the start signal to the last event received.
    stats.wall = total.last_event - t0 if total.last_event else stats.wall
    return total, stats, total.cpu


def measure(
    server: str, path: str, pid: int, url: str, script: list[bytes], wav: bytes, n: int, args: Any
) -> Run:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = upload_request(host, int(port), TARGET + PATHS[path], wav, "audio/wav")
    load, stats, client_cpu = run_load(
        pid, host, int(port), request, script, n, args.duration, args.procs
    )
    if load.errors:
        raise RuntimeError(
            f"{server} {path} N={n}: {len(load.errors)} bad streams: {load.errors[:3]}"
        )
    return Run(server, path, n, len(script), load, stats.cpu, stats.wall, client_cpu)


# --- profile -------------------------------------------------------------------------------------


# Frames every sample passes through (runners, the event loop, worker threads): not hot spots.
_RUNNERS = ("runpy", "threading.py", "gateway/cli.py", "trio/_core/_run.py", "outcome/")


def summarise_profile(raw: Path, top: int) -> str:
    """Top functions by own samples and by inclusive samples from py-spy's collapsed stacks.

    Stacks under an import (start-up) are left out; functions are counted once per stack whatever
    the line; the inclusive table leaves out the runners every sample passes through.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0

    def short(frame: str) -> str:
        name, _, where = frame.partition(" (")
        where = where.rstrip(")").replace(str(ROOT) + "/", "").split("site-packages/")[-1]
        return f"`{name}` {where.rsplit(':', 1)[0]}"

    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or "_find_and_load" in stack:
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            if not any(r in f for r in _RUNNERS):
                inclusive[f] += n

    def rows(counter: Counter[str]) -> list[list[str]]:
        return [[f, str(c), f"{c / total:.1%}"] for f, c in counter.most_common(top)]

    header = ["function", "samples", "share"]
    return "\n".join(
        [
            markdown_table(f"Top {top} by own samples ({total} samples)", header, rows(own)),
            markdown_table(f"Top {top} by inclusive samples", header, rows(inclusive)),
        ]
    )


# --- main ----------------------------------------------------------------------------------------


def gateway_config(args: Any) -> dict[str, Any]:
    words = [f"word{i}" for i in range(args.words)]
    return {
        "server": {"default_engine": "scripted", "shutdown_grace": 1.0},
        "engines": {
            "scripted": {
                "kind": "scripted",
                "words": words,
                "seconds_per_word": args.seconds_per_word,
            }
        },
    }


def fmt(x: float, digits: int = 1) -> str:
    return "-" if math.isnan(x) else f"{x:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1,100,1000", help="concurrent streams, comma-separated")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds of load per run")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes")
    parser.add_argument("--words", type=int, default=40)
    parser.add_argument("--seconds-per-word", type=float, default=0.1)
    parser.add_argument("--paths", default="transcribe,cache")
    parser.add_argument("--before", type=Path, help="also run the gateway of this checkout")
    parser.add_argument("--profile", type=Path, help="profile the gateway with py-spy into FILE")
    parser.add_argument("--profile-n", type=int, default=100)
    parser.add_argument("--profile-path", choices=list(PATHS), default="transcribe")
    parser.add_argument("--profile-top", type=int, default=20)
    args = parser.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    paths = args.paths.split(",")
    limit = raise_fd_limit()
    if max(ns) + 64 > limit:
        sys.exit(f"RLIMIT_NOFILE is {limit}: too low for N = {max(ns)}")
    audio_seconds = args.words * args.seconds_per_word
    wav = silent_wav(audio_seconds)

    print("# Gateway overhead vs a bare hypercorn-on-trio SSE app (bench/overhead.py)\n")
    print(machine())
    print(f"gateway source: {ROOT} ({git_commit(ROOT)})")
    if args.before:
        print(f"before: {args.before} ({git_commit(args.before)})")
    print(
        f"\nscripted engine: {args.words} words, {args.seconds_per_word} s per word, delay 0; "
        f"upload: {audio_seconds:.1f} s silent WAV, 16 kHz mono ({len(wav):,} bytes, raw body); "
        f"load: {args.procs} client processes, closed loop, {args.duration:.0f} s per run; "
        f"loopback only"
    )

    wrap: list[str] = []
    if args.profile:
        spy = Path(sys.executable).parent / "py-spy"
        wrap = [str(spy), "record", "--gil", "--nonblocking", "--format", "raw", "--rate", "250"]
        wrap += ["--output", str(args.profile), "--"]

    with start_gateway(gateway_config(args), wrap=wrap) as gw, tempfile.TemporaryDirectory() as tmp:
        host, port = gw.host_port
        frames = trio.run(capture, host, port, wav)
        scripts = {
            name: [f.encode("latin-1") for f in frames["scripts"][q]] for name, q in PATHS.items()
        }
        print(
            f"script: {len(scripts['transcribe'])} events per transcribe stream "
            f"({sum(map(len, scripts['transcribe'])):,} bytes), 1 per cache stream"
        )
        if args.profile:
            path = args.profile_path
            measure("gateway", path, gw.pid, gw.url, scripts[path], wav, 50, args)
            run = measure(
                "gateway",
                path,
                gw.pid,
                gw.url,
                scripts[path],
                wav,
                args.profile_n,
                args,
            )
            print(
                f"\nprofiled run: {path} path, N={args.profile_n}, "
                f"{run.load.events / run.wall:,.0f} events/s, "
                f"server CPU {run.cpu:.1f} s over {run.wall:.1f} s"
            )
        else:
            frames_file = Path(tmp) / "frames.json"
            frames_file.write_text(json.dumps(frames))
            argv = [
                sys.executable,
                str(ROOT / "bench" / "bare_sse.py"),
                "--frames",
                str(frames_file),
            ]
            with contextlib.ExitStack() as stack:
                bare = stack.enter_context(start_server(argv, workdir=Path(tmp)))
                servers = {"gateway": gw, "bare": bare}
                if args.before:
                    servers["before"] = stack.enter_context(
                        start_gateway(gateway_config(args), source=args.before)
                    )
                runs: list[Run] = []
                for path in paths:
                    for name, srv in servers.items():  # warm-up
                        measure(
                            name,
                            path,
                            srv.pid,
                            srv.url,
                            scripts[path],
                            wav,
                            20,
                            argparse.Namespace(duration=1.0, procs=1),
                        )
                    for n in ns:
                        for name, srv in servers.items():
                            run = measure(name, path, srv.pid, srv.url, scripts[path], wav, n, args)
                            runs.append(run)
                            print(
                                f"  {path} N={n} {name}: {run.load.events / run.wall:,.0f} events/s",
                                file=sys.stderr,
                            )
    if args.profile:
        print(summarise_profile(args.profile, args.profile_top))
        return
    report(runs)


DEFINITIONS = """
Definitions: events/s and streams/s count what the clients received, from the start signal to
the last event. CPU s / 1k events: the server process's utime + stime over the run per 1,000
events received. Event latency: for each stream and each event k of the script, from the first
byte of the request sent to the arrival of event k (an event the gateway conflated away counts as
arriving with the next one delivered); p50/p99 over all (stream, event) pairs; TTFE is k = 0;
in-stream is measured from the stream's first event instead. Added latency = gateway percentile
minus bare percentile at the same N. The gateway's figures include its per-request work (upload
spooling and hashing, PyAV probe and decode, engine session, SQLite write; cache rows: upload,
hash, probe, store read); the bare app only reads the body. "all events": streams that received
every event of the script (the gateway conflates snapshots for a reader that falls behind)."""


def report(runs: list[Run]) -> None:
    print(DEFINITIONS)
    rows = []
    for r in runs:
        ld = r.load
        rows.append(
            [
                r.path,
                str(r.n),
                r.server,
                fmt(ld.streams / r.wall),
                fmt(ld.events / r.wall, 0),
                fmt(ld.events / ld.streams),
                fmt(r.cpu / ld.events * 1000, 3),
                fmt(r.cpu / r.wall * 100, 0) + " %",
                fmt(r.client_cpu / r.wall * 100, 0) + " %",
                fmt(r.p(ld.ttfe, 50)),
                fmt(r.p(ld.latency, 50)),
                fmt(r.p(ld.latency, 99)),
                fmt(r.p(ld.in_stream, 99)),
                f"{ld.identical}/{ld.streams}",
            ]
        )
    print(
        markdown_table(
            "Per run (latencies in ms; server CPU = server CPU s / wall s, client CPU summed over load processes)",
            [
                "path",
                "N",
                "server",
                "streams/s",
                "events/s",
                "events/stream",
                "CPU s / 1k events",
                "server CPU",
                "client CPU",
                "TTFE p50",
                "event p50",
                "event p99",
                "in-stream p99",
                "all events",
            ],
            rows,
        )
    )
    ratio_rows = []
    by_key = {(r.path, r.n, r.server): r for r in runs}
    for r in runs:
        if r.server != "gateway" or (r.path, r.n, "bare") not in by_key:
            continue
        b = by_key[(r.path, r.n, "bare")]
        g_ev, b_ev = r.load.events / r.wall, b.load.events / b.wall
        g_st, b_st = r.load.streams / r.wall, b.load.streams / b.wall
        ratio_rows.append(
            [
                r.path,
                str(r.n),
                f"{g_ev / b_ev:.2f}x",
                f"{g_st / b_st:.2f}x",
                f"{(r.cpu / r.load.events) / (b.cpu / b.load.events):.1f}x",
                fmt(r.p(r.load.latency, 50) - b.p(b.load.latency, 50)),
                fmt(r.p(r.load.latency, 99) - b.p(b.load.latency, 99)),
                fmt(r.p(r.load.in_stream, 99) - b.p(b.load.in_stream, 99)),
            ]
        )
    print(
        markdown_table(
            "Gateway / bare (added latency = gateway percentile - bare percentile, ms)",
            [
                "path",
                "N",
                "events/s",
                "streams/s",
                "CPU s / 1k events",
                "added p50",
                "added p99",
                "added in-stream p99",
            ],
            ratio_rows,
        )
    )
    before_rows = []
    for r in runs:
        if r.server != "gateway" or (r.path, r.n, "before") not in by_key:
            continue
        b = by_key[(r.path, r.n, "before")]
        before_rows.append(
            [
                r.path,
                str(r.n),
                f"{(r.load.events / r.wall) / (b.load.events / b.wall):.2f}x",
                f"{(r.load.streams / r.wall) / (b.load.streams / b.wall):.2f}x",
                f"{(r.cpu / r.load.events) / (b.cpu / b.load.events):.2f}x",
                fmt(r.p(r.load.latency, 99) - b.p(b.load.latency, 99)),
                fmt(r.p(r.load.in_stream, 99) - b.p(b.load.in_stream, 99)),
            ]
        )
    if before_rows:
        print(
            markdown_table(
                "Gateway now / before (change in p99 = now - before, ms)",
                [
                    "path",
                    "N",
                    "events/s",
                    "streams/s",
                    "CPU s / 1k events",
                    "change in event p99",
                    "change in in-stream p99",
                ],
                before_rows,
            )
        )


def git_commit(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return out.stdout.strip()[:80]


if __name__ == "__main__":
    main()
